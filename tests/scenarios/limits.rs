//! Named clients and their limits, through the real handler and the emulator: refused early
//! (429 in OpenAI's shape, Retry-After and the `x-ratelimit-*` headers, no upstream call), other
//! clients unaffected, served again when the window frees; streams settled with their real usage;
//! a failed call costs nothing; a batch client kept off a deployment short of quota.

use std::time::Duration;

use crate::common;

use common::{API_KEY, Behavior, Emulator, Harness, Reply, http_api_get, http_api_post};
use serde_json::{Value, json};

const CHATBOT: &str = "fc-chatbot-0123456789abcdef";
const NIGHTLY: &str = "fc-nightly-0123456789abcdef";
const OTHER: &str = "fc-other-0123456789abcdefgh";

/// gpt-4o then gpt-35-turbo; `clients` as FALLBACK_CLIENTS, their keys in KEY_*.
async fn harness(clients: Value, env: &[(&str, &str)]) -> Harness {
    let emulator = Emulator::builder()
        .api_key(API_KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .deployment("gpt-35-turbo", Behavior::Healthy)
        .start()
        .await
        .unwrap();
    let mut vars: Vec<(String, String)> = vec![
        ("AZURE_OPENAI_ENDPOINT".into(), emulator.url()),
        ("AZURE_OPENAI_API_KEY".into(), API_KEY.into()),
        ("FALLBACK_CLIENTS".into(), clients.to_string()),
        ("KEY_CHATBOT".into(), CHATBOT.into()),
        ("KEY_NIGHTLY".into(), NIGHTLY.into()),
        ("KEY_OTHER".into(), OTHER.into()),
    ];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Harness::build(emulator, Vec::new(), &vars, None)
}

/// `event` with `key` as its bearer token.
fn with_key(event: String, key: &str) -> String {
    let mut event: Value = serde_json::from_str(&event).unwrap();
    event["headers"]["authorization"] = Value::String(format!("Bearer {key}"));
    event.to_string()
}

async fn chat(h: &Harness, key: &str, body: Value) -> Reply {
    h.invoke(&with_key(
        http_api_post("/v1/chat/completions", &body.to_string()),
        key,
    ))
    .await
}

fn hello() -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50})
}

fn calls(h: &Harness) -> usize {
    h.calls("gpt-4o") + h.calls("gpt-35-turbo")
}

fn number(reply: &Reply, header: &str) -> u64 {
    reply
        .header(header)
        .unwrap_or_else(|| panic!("{header} missing: {:?}", reply.headers))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_client_over_its_requests_per_minute_is_refused_early_and_served_again_when_the_window_frees()
 {
    let h = harness(
        json!([
            {"name": "chatbot", "key_env": "KEY_CHATBOT", "requests_per_minute": 2},
            {"name": "other", "key_env": "KEY_OTHER", "requests_per_minute": 100}
        ]),
        &[],
    )
    .await;
    let first = chat(&h, CHATBOT, hello()).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(number(&first, "x-ratelimit-limit-requests"), 2);
    assert_eq!(number(&first, "x-ratelimit-remaining-requests"), 1);
    assert!(
        first
            .header("x-ratelimit-reset-requests")
            .unwrap()
            .ends_with('s')
    );
    assert_eq!(chat(&h, CHATBOT, hello()).await.status, 200);
    let before = calls(&h);

    let refused = chat(&h, CHATBOT, hello()).await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(refused.body["error"]["type"], "requests");
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("client 'chatbot'") && message.contains("requests per minute"),
        "{message}"
    );
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(number(&refused, "x-ratelimit-remaining-requests"), 0);
    assert_eq!(
        calls(&h),
        before,
        "a refused request costs no upstream call"
    );

    // Another client is unaffected.
    let other = chat(&h, OTHER, hello()).await;
    assert_eq!(other.status, 200);
    assert_eq!(number(&other, "x-ratelimit-remaining-requests"), 99);

    // The summary line names the client; the refusal is logged with its status.
    let lines = h.logs.lines();
    let summaries: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request")
        .collect();
    assert!(
        summaries
            .iter()
            .any(|l| l["fields"]["client"] == "chatbot" && l["fields"]["status"] == 429)
    );
    assert!(
        summaries
            .iter()
            .any(|l| l["fields"]["client"] == "other" && l["fields"]["status"] == 200)
    );

    h.advance(Duration::from_secs(60));
    assert_eq!(chat(&h, CHATBOT, hello()).await.status, 200);
}

#[tokio::test]
async fn tokens_are_reserved_before_the_call_and_settled_with_the_real_usage() {
    let h = harness(
        json!([{"name": "chatbot", "key_env": "KEY_CHATBOT", "tokens_per_minute": 2000}]),
        &[],
    )
    .await;
    // Reserved: about 1,500 for the completion it allows; used: what the emulator reports.
    let big = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1500});
    let first = chat(&h, CHATBOT, big.clone()).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let used = first.body["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(number(&first, "x-ratelimit-limit-tokens"), 2000);
    assert_eq!(number(&first, "x-ratelimit-remaining-tokens"), 2000 - used);
    // Settled at its usage, so a second one of the same size fits too.
    assert_eq!(chat(&h, CHATBOT, big).await.status, 200);

    // More than the whole limit can never pass: said so, with no Retry-After.
    let before = calls(&h);
    let huge = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5000});
    let refused = chat(&h, CHATBOT, huge).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["error"]["type"], "tokens");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Request too large")
    );
    assert_eq!(refused.header("retry-after"), None);
    assert_eq!(calls(&h), before);
}

#[tokio::test]
async fn a_spent_daily_quota_is_insufficient_quota_and_a_failed_call_costs_nothing() {
    let h = harness(
        json!([{"name": "chatbot", "key_env": "KEY_CHATBOT", "tokens_per_day": 150}]),
        &[("LIMITS_DEFAULT_COMPLETION_TOKENS", "20")],
    )
    .await;
    let ask = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]});
    // Every deployment fails: a 503, and the reservation comes back whole.
    h.set("gpt-4o", Behavior::ServerError);
    h.set("gpt-35-turbo", Behavior::ServerError);
    let failed = chat(&h, CHATBOT, ask.clone()).await;
    assert_eq!(failed.status, 503);
    assert_eq!(number(&failed, "x-ratelimit-remaining-tokens"), 150);

    h.set("gpt-4o", Behavior::Healthy);
    h.set("gpt-35-turbo", Behavior::Healthy);
    h.advance(Duration::from_secs(120));
    // Served until what is left of the day is less than a request needs, then refused.
    let mut used = 0;
    let refused = loop {
        let reply = chat(&h, CHATBOT, ask.clone()).await;
        if reply.status != 200 {
            break reply;
        }
        used += reply.body["usage"]["total_tokens"].as_u64().unwrap();
        assert!(used <= 150, "admitted past the quota: {used}");
        assert_eq!(number(&reply, "x-ratelimit-remaining-tokens"), 150 - used);
    };
    assert!(used > 0);
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.body["error"]["code"], "insufficient_quota");
    assert_eq!(refused.body["error"]["type"], "insufficient_quota");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("renews in")
    );
    // The day renews at midnight UTC.
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    let midnight = (86_400_000 - common::wall_ms(&*h.clock) % 86_400_000).div_ceil(1000);
    assert!(
        wait.abs_diff(midnight) <= 1,
        "{wait} s, midnight in {midnight} s"
    );
}

#[tokio::test]
async fn a_stream_is_settled_with_its_usage_which_a_caller_who_did_not_ask_does_not_see() {
    let h = harness(
        json!([{"name": "chatbot", "key_env": "KEY_CHATBOT", "tokens_per_minute": 100000}]),
        &[],
    )
    .await;
    let mut body = hello();
    body["stream"] = Value::Bool(true);
    let reply = chat(&h, CHATBOT, body).await;
    assert_eq!(reply.status, 200);
    let events = common::events(reply.body.as_str().unwrap_or_default());
    assert!(!events.is_empty(), "{:?}", reply.body);
    assert!(
        events
            .iter()
            .all(|e| e.get("usage").is_none_or(Value::is_null)),
        "the caller did not ask for usage: {events:?}"
    );
    // It was asked for upstream, and counted.
    let sent = &h.emulator.requests("gpt-4o")[0];
    assert_eq!(sent.body["stream_options"]["include_usage"], true);
    let lines = h.logs.lines();
    let summary = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request")
        .unwrap();
    let tokens = summary["fields"]["total_tokens"]
        .as_u64()
        .expect("tokens counted");
    assert!(tokens > 0);

    // A caller who asks sees it, once.
    let mut asked = hello();
    asked["stream"] = Value::Bool(true);
    asked["stream_options"] = json!({"include_usage": true});
    let reply = chat(&h, CHATBOT, asked).await;
    let events = common::events(reply.body.as_str().unwrap_or_default());
    assert_eq!(events.iter().filter(|e| e["usage"].is_object()).count(), 1);
}

#[tokio::test]
async fn a_batch_client_keeps_off_a_deployment_short_of_quota_while_an_interactive_one_reaches_it()
{
    let h = harness(
        json!([
            {"name": "chatbot", "key_env": "KEY_CHATBOT"},
            {"name": "nightly", "key_env": "KEY_NIGHTLY", "priority": "batch"}
        ]),
        &[("BATCH_RESERVE_TOKENS", "10000")],
    )
    .await;
    // gpt-4o reports 5,000 tokens left: under the reserve.
    h.emulator.set_remaining("gpt-4o", 99, 5000);
    let first = chat(&h, CHATBOT, hello()).await;
    assert_eq!(first.header("x-fallback-deployment"), Some("gpt-4o"));
    let batch = chat(&h, NIGHTLY, hello()).await;
    assert_eq!(batch.status, 200, "{:?}", batch.body);
    assert_eq!(batch.header("x-fallback-deployment"), Some("gpt-35-turbo"));
    let interactive = chat(&h, CHATBOT, hello()).await;
    assert_eq!(interactive.header("x-fallback-deployment"), Some("gpt-4o"));

    // The fallback reports little left too: the batch request there learns it, the next
    // is refused with the reason, and the interactive client is still served.
    h.emulator.set_remaining("gpt-35-turbo", 99, 2000);
    let learns = chat(&h, NIGHTLY, hello()).await;
    assert_eq!(learns.header("x-fallback-deployment"), Some("gpt-35-turbo"));
    let before = calls(&h);
    let refused = chat(&h, NIGHTLY, hello()).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(
        refused.raw.contains("reserved_for_interactive"),
        "{}",
        refused.raw
    );
    assert_eq!(calls(&h), before);
    let interactive = chat(&h, CHATBOT, hello()).await;
    assert_eq!(interactive.header("x-fallback-deployment"), Some("gpt-4o"));
}

#[tokio::test]
async fn routes_a_client_may_not_use_and_the_original_interface_get_clear_errors() {
    let h = harness(
        json!([{"name": "chatbot", "key_env": "KEY_CHATBOT", "requests_per_minute": 1,
                "routes": ["default"]}]),
        &[],
    )
    .await;
    let ok = h.invoke(&with_key(http_api_get(Some("hi")), CHATBOT)).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let refused = h.invoke(&with_key(http_api_get(Some("hi")), CHATBOT)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["code"], "rate_limit_exceeded");
    assert!(
        refused.body["error"]
            .as_str()
            .unwrap()
            .contains("Rate limit reached")
    );
    assert!(refused.header("retry-after").is_some());
    // Unknown keys are still 401, and the plain keys are unlimited (none configured here).
    let wrong = h.invoke(&with_key(http_api_get(Some("hi")), OTHER)).await;
    assert_eq!(wrong.status, 401);
}

#[tokio::test]
async fn a_client_kept_to_some_routes_gets_a_403_for_the_others_at_no_cost() {
    let emulator = Emulator::builder()
        .api_key(API_KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .deployment("gpt-4o-mini", Behavior::Healthy)
        .start()
        .await
        .unwrap();
    let pool = json!({
        "deployments": [
            {"id": "big", "endpoint": emulator.url(), "deployment": "gpt-4o"},
            {"id": "small", "endpoint": emulator.url(), "deployment": "gpt-4o-mini"}
        ],
        "routes": {"gpt-4o": ["big"], "gpt-4o-mini": ["small"]},
        "default_route": "gpt-4o-mini"
    });
    let clients = json!([{"name": "intern", "key_env": "KEY_CHATBOT", "routes": ["gpt-4o-mini"]}]);
    let vars = [
        ("FALLBACK_POOL".to_string(), pool.to_string()),
        ("AZURE_OPENAI_API_KEY".to_string(), API_KEY.to_string()),
        ("FALLBACK_CLIENTS".to_string(), clients.to_string()),
        ("KEY_CHATBOT".to_string(), CHATBOT.to_string()),
    ];
    let h = Harness::build(emulator, Vec::new(), &vars, None);
    let denied = chat(&h, CHATBOT, hello()).await;
    assert_eq!(denied.status, 403, "{:?}", denied.body);
    assert_eq!(denied.body["error"]["type"], "permission_error");
    assert_eq!(denied.body["error"]["code"], "model_not_allowed");
    assert!(
        denied.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-4o-mini")
    );
    assert_eq!(h.calls("gpt-4o"), 0);
    let mut allowed = hello();
    allowed["model"] = json!("gpt-4o-mini");
    assert_eq!(chat(&h, CHATBOT, allowed).await.status, 200);
    // No limits: no rate-limit headers.
    assert_eq!(denied.header("x-ratelimit-limit-requests"), None);
}

#[tokio::test]
async fn a_stream_cut_and_continued_counts_both_calls() {
    let h = harness(
        json!([{"name": "chatbot", "key_env": "KEY_CHATBOT", "tokens_per_minute": 100000}]),
        &[],
    )
    .await;
    h.set("gpt-4o", Behavior::StreamCut { after: 3 });
    let mut body = hello();
    body["stream"] = Value::Bool(true);
    let reply = chat(&h, CHATBOT, body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(h.calls("gpt-4o"), 1);
    assert_eq!(h.calls("gpt-35-turbo"), 1);
    let lines = h.logs.lines();
    let summary = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request")
        .unwrap();
    assert_eq!(summary["fields"]["continued_on"], "gpt-35-turbo");
    let total = summary["fields"]["total_tokens"].as_u64().unwrap();
    // The continuation's own usage, plus the broken stream's prompt and its three chunks.
    let continuation = &h.emulator.requests("gpt-35-turbo")[0];
    assert_eq!(continuation.body["stream_options"]["include_usage"], true);
    assert!(total > 3, "{total}");
    // What the client was counted at is what the summary says it used.
    assert_eq!(
        number(&reply, "x-ratelimit-remaining-tokens"),
        100000 - total,
        "{:?}",
        reply.headers
    );
}
