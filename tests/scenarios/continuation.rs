//! Rescuing a cut stream: the caller gets the whole answer, continued on another deployment,
//! once, with no gap and no repetition; what cannot be rescued ends with the honest error that
//! names the original failure. And a refusal is never routed around.

use crate::common;

use std::time::{Duration, Instant};

use common::{API_KEY, Behavior, Emulator, Harness, body, content, events};
use serde_json::{Value, json};

fn chat(usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Tell me how to reset my password"}],
        "stream": true
    });
    if usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

const WHOLE: &str = "[gpt-4o] You said: Tell me how to reset my password";

async fn two(first: Behavior, second: Behavior, env: &[(&str, &str)]) -> Harness {
    Harness::with(&[("gpt-4o", first), ("gpt-35-turbo", second)], env).await
}

/// The summary line of the request (logged when its stream has ended).
async fn summary(h: &Harness) -> Value {
    let started = Instant::now();
    loop {
        let line = h
            .logs
            .lines()
            .into_iter()
            .find(|l| l["fields"]["message"] == "request");
        if let Some(line) = line {
            return line["fields"].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}",
            h.logs.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn interrupted(events: &[Value]) -> String {
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{events:?}");
    assert!(!events.contains(&json!("[DONE]")));
    last["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_stream_cut_mid_answer_is_finished_by_the_next_deployment_once_and_whole() {
    let h = two(Behavior::StreamCut { after: 3 }, Behavior::Healthy, &[]).await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    assert_eq!(response.status(), 200);
    let events = events(&body(response).await);
    assert_eq!(content(&events), WHOLE, "no gap, no repetition");
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    let chunks: Vec<&Value> = events.iter().filter(|e| e.is_object()).collect();
    assert!(
        chunks.iter().all(|c| c["id"] == chunks[0]["id"]),
        "one stream, one id: {chunks:?}"
    );
    let models: Vec<&str> = chunks.iter().filter_map(|c| c["model"].as_str()).collect();
    assert_eq!(models.first(), Some(&"gpt-4o-2024-08-06"));
    assert_eq!(
        models.last(),
        Some(&"gpt-35-turbo-0125"),
        "the chunks say who wrote them"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e["choices"][0]["finish_reason"] == "stop")
            .count(),
        1
    );

    // The continuation asked for the rest: the answer so far, then what to do with it.
    let asked = &h.emulator.requests("gpt-35-turbo")[0].body;
    let messages = asked["messages"].as_array().unwrap();
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], "[gpt-4o] You said: ");
    assert_eq!(messages[2]["role"], "user");

    let line = summary(&h).await;
    assert_eq!(line["deployment"], "gpt-4o");
    assert_eq!(line["continued_on"], "gpt-35-turbo");
    assert_eq!(line["ending"], "done");
}

#[tokio::test]
async fn a_stream_that_stalls_mid_answer_is_finished_after_the_idle_timeout() {
    let h = two(
        Behavior::StreamStall { after: 4 },
        Behavior::Healthy,
        &[("STREAM_IDLE_TIMEOUT_MS", "300")],
    )
    .await;
    let started = Instant::now();
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert_eq!(content(&events), WHOLE);
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_continuation_that_repeats_the_end_of_the_answer_is_trimmed() {
    let h = two(
        Behavior::StreamCut { after: 5 },
        Behavior::ContinueOverlap { words: 2 },
        &[],
    )
    .await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert_eq!(content(&events), WHOLE);
}

#[tokio::test]
async fn usage_adds_both_deployments_calls() {
    let h = two(Behavior::StreamCut { after: 3 }, Behavior::Healthy, &[]).await;
    let response = h.open("/v1/chat/completions", &chat(true)).await;
    let events = events(&body(response).await);
    assert_eq!(content(&events), WHOLE);
    let usage = &events[events.len() - 2]["usage"];
    // The cut stream wrote 3 words before it broke, the continuation the other 7.
    assert_eq!(usage["completion_tokens"], 10, "{usage}");
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        prompt + 10,
        "{usage}"
    );
    // Both prompts, each at least the question's 10 tokens (7 words and the message framing).
    assert!(prompt >= 2 * 10, "{usage}");
}

#[tokio::test]
async fn a_deployment_that_refuses_a_trailing_assistant_message_still_continues_the_answer() {
    let h = two(Behavior::StreamCut { after: 3 }, Behavior::NoPrefill, &[]).await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert_eq!(content(&events), WHOLE);
    assert_eq!(events.last(), Some(&json!("[DONE]")));
}

/// Two resources serving the same model: a restarted request writes the same answer.
async fn same_model_twice(second: Behavior) -> Harness {
    let east = Emulator::builder()
        .api_key(API_KEY)
        .deployment("gpt-4o", Behavior::StreamCut { after: 3 })
        .start()
        .await
        .unwrap();
    let west = Emulator::builder()
        .api_key(API_KEY)
        .deployment("gpt-4o", second)
        .start()
        .await
        .unwrap();
    let pool = json!({"deployments": [
        {"id": "east", "endpoint": east.url(), "deployment": "gpt-4o", "priority": 0},
        {"id": "west", "endpoint": west.url(), "deployment": "gpt-4o", "priority": 1}
    ]});
    let vars = [
        ("FALLBACK_POOL".to_string(), pool.to_string()),
        ("AZURE_OPENAI_API_KEY".to_string(), API_KEY.to_string()),
    ];
    Harness::build(east, vec![west], &vars, None)
}

#[tokio::test]
async fn a_refused_continuation_is_replaced_by_a_restart_that_writes_the_same_answer() {
    let h = same_model_twice(Behavior::RefuseContinuation).await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert_eq!(content(&events), WHOLE, "the restart's first words skipped");
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    let west = &h.others[0];
    assert_eq!(
        west.calls("gpt-4o"),
        2,
        "the continuation, refused; the restart"
    );
}

#[tokio::test]
async fn a_restart_that_goes_another_way_ends_with_the_error_that_names_the_cut() {
    let h = two(
        Behavior::StreamCut { after: 3 },
        Behavior::RefuseContinuation,
        &[],
    )
    .await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert_eq!(
        content(&events),
        "[gpt-4o] You said: ",
        "nothing of the other answer"
    );
    let message = interrupted(&events);
    assert!(message.contains("gpt-4o"), "{message}");
    assert!(
        message.contains("the connection broke mid-answer"),
        "{message}"
    );
    assert!(
        !message.contains("partial answer"),
        "not the refusal: {message}"
    );
    assert_eq!(h.calls("gpt-35-turbo"), 2);
}

#[tokio::test]
async fn a_tool_call_cut_mid_stream_ends_with_the_honest_error() {
    let h = two(Behavior::StreamToolCut { after: 2 }, Behavior::Healthy, &[]).await;
    let mut body_json = chat(false);
    body_json["tools"] = json!([{"type": "function", "function": {"name": "lookup"}}]);
    let response = h.open("/v1/chat/completions", &body_json).await;
    let events = events(&body(response).await);
    interrupted(&events);
    assert_eq!(h.calls("gpt-35-turbo"), 0, "a tool call is not continued");
}

#[tokio::test]
async fn with_no_deployment_or_no_time_left_the_stream_ends_honestly_within_its_deadline() {
    let h = Harness::with(&[("gpt-4o", Behavior::StreamCut { after: 3 })], &[]).await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let message = interrupted(&events(&body(response).await));
    assert!(message.contains("could not be continued"), "{message}");

    let h = two(
        Behavior::StreamStall { after: 3 },
        Behavior::Healthy,
        &[
            ("REQUEST_TIMEOUT_MS", "1000"),
            ("ATTEMPT_TIMEOUT_MS", "500"),
        ],
    )
    .await;
    let started = Instant::now();
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let message = interrupted(&events(&body(response).await));
    assert!(message.contains("deadline"), "{message}");
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(h.calls("gpt-35-turbo"), 0);
}

#[tokio::test]
async fn a_deployment_that_never_sends_headers_costs_the_first_token_limit_not_an_attempt() {
    let h = two(
        Behavior::Hang,
        Behavior::Healthy,
        &[
            ("FIRST_TOKEN_TIMEOUT_MS", "300"),
            ("ATTEMPT_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let started = Instant::now();
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    assert_eq!(response.headers()["x-fallback-deployment"], "gpt-35-turbo");
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
    let events = events(&body(response).await);
    assert_eq!(
        content(&events),
        "[gpt-35-turbo] You said: Tell me how to reset my password"
    );
}

#[tokio::test]
async fn behind_api_gateway_a_cut_stream_is_answered_whole() {
    let h = two(Behavior::StreamCut { after: 3 }, Behavior::Healthy, &[]).await;
    let reply = h.post("/v1/chat/completions", &chat(false)).await;
    assert_eq!(reply.status, 200);
    let whole = events(reply.body.as_str().unwrap());
    assert_eq!(content(&whole), WHOLE);
    assert_eq!(whole.last(), Some(&json!("[DONE]")));

    // A tool call cannot be continued, but the caller has seen nothing yet: it starts again.
    let h = two(Behavior::StreamToolCut { after: 2 }, Behavior::Healthy, &[]).await;
    let mut asked = chat(false);
    asked["tools"] = json!([{"type": "function", "function": {"name": "lookup"}}]);
    let reply = h.post("/v1/chat/completions", &asked).await;
    let events = events(reply.body.as_str().unwrap());
    assert_eq!(
        content(&events),
        "[gpt-35-turbo] You said: Tell me how to reset my password",
        "the next deployment's whole answer, nothing of the cut one"
    );
    assert!(
        events
            .iter()
            .all(|e| e["choices"][0]["delta"]["tool_calls"].is_null())
    );
    assert_eq!(events.last(), Some(&json!("[DONE]")));
}

#[tokio::test]
async fn behind_api_gateway_the_headers_name_every_deployment_that_wrote_the_answer() {
    // Nothing has reached the caller when the cut stream is continued: its headers can say who
    // wrote the answer and how many deployments were called for it.
    let h = two(Behavior::StreamCut { after: 3 }, Behavior::Healthy, &[]).await;
    let reply = h.post("/v1/chat/completions", &chat(false)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("x-fallback-deployment"),
        Some("gpt-4o, gpt-35-turbo")
    );
    assert_eq!(reply.header("x-fallback-attempts"), Some("2"));
    let line = summary(&h).await;
    assert_eq!(line["calls"], 2);
    assert_eq!(line["continued_on"], "gpt-35-turbo");

    // Restarted whole on the next deployment: only it wrote the answer.
    let h = two(Behavior::StreamToolCut { after: 2 }, Behavior::Healthy, &[]).await;
    let mut asked = chat(false);
    asked["tools"] = json!([{"type": "function", "function": {"name": "lookup"}}]);
    let reply = h.post("/v1/chat/completions", &asked).await;
    assert_eq!(reply.header("x-fallback-deployment"), Some("gpt-35-turbo"));
    assert_eq!(reply.header("x-fallback-attempts"), Some("2"));
}

/// A pool of a v1 (OpenAI-compatible) deployment first, a classic one after it.
async fn v1_first(first: Behavior) -> Harness {
    let emulator = Emulator::builder()
        .api_key(API_KEY)
        .deployment("gpt-4o", first)
        .deployment("gpt-35-turbo", Behavior::Healthy)
        .start()
        .await
        .unwrap();
    let pool = json!({"deployments": [
        {"id": "openai", "endpoint": emulator.url(), "deployment": "gpt-4o", "api": "v1", "priority": 0},
        {"id": "azure", "endpoint": emulator.url(), "deployment": "gpt-35-turbo", "priority": 1}
    ]});
    let vars = [
        ("FALLBACK_POOL".to_string(), pool.to_string()),
        ("AZURE_OPENAI_API_KEY".to_string(), API_KEY.to_string()),
    ];
    Harness::build(emulator, Vec::new(), &vars, None)
}

#[tokio::test]
async fn a_refusal_in_any_dialect_reaches_the_caller_and_is_never_routed_around() {
    for (h, code) in [
        (
            v1_first(Behavior::ContentPolicy).await,
            "content_policy_violation",
        ),
        (
            two(Behavior::ContentFilter, Behavior::Healthy, &[]).await,
            "content_filter",
        ),
    ] {
        // Buffered, on the OpenAI route.
        let mut asked = chat(false);
        asked["stream"] = json!(false);
        let reply = h.post("/v1/chat/completions", &asked).await;
        assert_eq!(reply.status, 400, "{code}: {:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], code);
        assert!(reply.body["error"]["message"].as_str().unwrap().len() > 10);

        // Streamed: the refusal comes before any event.
        let response = h.open("/v1/chat/completions", &chat(false)).await;
        assert_eq!(response.status(), 400, "{code}");
        let error: Value = serde_json::from_str(&body(response).await).unwrap();
        assert_eq!(error["error"]["code"], code);

        // GET /?query= says it too.
        let reply = h.ask("something it refuses").await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.body["code"], code);

        assert_eq!(h.calls("gpt-35-turbo"), 0, "{code}: never sent elsewhere");
    }
}

#[tokio::test]
async fn a_completion_filtered_on_output_is_relayed_as_the_provider_ended_it() {
    let h = two(Behavior::OutputFiltered, Behavior::Healthy, &[]).await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["finish_reason"] == "content_filter"),
        "{events:?}"
    );
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert_eq!(h.calls("gpt-35-turbo"), 0);
}
