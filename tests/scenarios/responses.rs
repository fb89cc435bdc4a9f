//! The Responses API through the one engine: a new response fails over freely; a stored one
//! is continued, read, listed and deleted only on the resource that holds it, from any
//! execution environment; streams hold Azure's preamble until the first output, and a cut
//! after it is continued (state carried in the request) or ends with an honest error event.

use std::sync::Arc;
use std::time::Duration;

use crate::common;

use common::{API_KEY, Behavior, Emulator, Harness, Logs, RetryAfter, body, http_api_post};
use fallback_chat::App;
use fallback_chat::clock::ManualClock;
use fallback_chat::config::Config;
use serde_json::{Value, json};

/// Two resources, each with gpt-4o: east (priority 0) and west (priority 1).
async fn two(east: Behavior, west: Behavior) -> (Harness, Vec<(String, String)>) {
    let start = |behavior: Behavior| async move {
        Emulator::builder()
            .api_key(API_KEY)
            .deployment("gpt-4o", behavior)
            .start()
            .await
            .unwrap()
    };
    let (east, west) = (start(east).await, start(west).await);
    let pool = json!({"deployments": [
        {"id": "east", "endpoint": east.url(), "deployment": "gpt-4o", "priority": 0},
        {"id": "west", "endpoint": west.url(), "deployment": "gpt-4o", "priority": 1, "api": "v1"}
    ]});
    let vars = vec![
        ("FALLBACK_POOL".to_string(), pool.to_string()),
        ("AZURE_OPENAI_API_KEY".to_string(), API_KEY.to_string()),
        ("AUTH_PROVIDED_BY".to_string(), "authorizer".to_string()),
    ];
    (Harness::build(east, vec![west], &vars, None), vars)
}

fn west(h: &Harness) -> &Emulator {
    &h.others[0]
}

/// Named SSE events: (event name, data).
fn named(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"));
                }
            }
            (name, data)
        })
        .collect()
}

fn text_of(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect()
}

fn output_text(response: &Value) -> &str {
    response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_throttled_primary_is_invisible_and_the_body_passes_through() {
    let (h, _) = two(
        Behavior::Throttled(RetryAfter::Seconds(7)),
        Behavior::Healthy,
    )
    .await;
    let sent = json!({
        "model": "gpt-4o",
        "input": "Reset my password",
        "instructions": "Be terse.",
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        "reasoning": {"effort": "low"},
        "text": {"format": {"type": "text"}},
        "x_vendor_field": {"kept": true}
    });
    for path in ["/v1/responses", "/openai/v1/responses"] {
        let reply = h.post(path, &sent).await;
        assert_eq!(reply.status, 200, "{path}: {:?}", reply.body);
        assert_eq!(reply.body["object"], "response");
        assert_eq!(reply.header("x-fallback-deployment"), Some("west"));
        assert_eq!(
            output_text(&reply.body),
            "[gpt-4o] You said: Reset my password"
        );
    }
    // Classic entries are called on the resource's v1 API too, with the deployment as model.
    let east = &h.emulator.requests("gpt-4o")[0];
    assert_eq!(east.path, "/openai/v1/responses");
    assert_eq!(
        east.headers.get("api-key").map(String::as_str),
        Some(API_KEY)
    );
    let mut expected = sent.clone();
    expected["model"] = json!("gpt-4o");
    assert_eq!(east.body, expected, "every field, unknown ones included");
    assert_eq!(
        h.emulator.calls("gpt-4o"),
        1,
        "east cools down after its 429"
    );
}

#[tokio::test]
async fn a_stored_conversation_goes_on_where_it_is_stored_and_nowhere_else() {
    let (h, _) = two(
        Behavior::Throttled(RetryAfter::Seconds(7)),
        Behavior::Healthy,
    )
    .await;
    let first = h
        .post(
            "/v1/responses",
            &json!({"model": "gpt-4o", "input": "Where is my order?"}),
        )
        .await;
    assert_eq!(first.header("x-fallback-deployment"), Some("west"));
    let id = first.body["id"].as_str().unwrap().to_owned();

    // East is healthy again, and first by priority; the conversation is on west.
    h.set("gpt-4o", Behavior::Healthy);
    h.advance(Duration::from_secs(8));
    let follow_up = json!({"model": "gpt-4o", "input": "And when?", "previous_response_id": id});
    let reply = h.post("/v1/responses", &follow_up).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("x-fallback-deployment"), Some("west"));
    assert_eq!(
        output_text(&reply.body),
        "[gpt-4o] You said: And when? (remembering 1 earlier turns)"
    );
    assert_eq!(h.emulator.calls("gpt-4o"), 1, "east was not asked");
    let next_id = reply.body["id"].as_str().unwrap().to_owned();

    // West down: a 503 that names it, and nothing asked of east.
    west(&h).set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(30)));
    let reply = h
        .post(
            "/v1/responses",
            &json!({"model": "gpt-4o", "input": "Hello?", "previous_response_id": next_id}),
        )
        .await;
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert_eq!(reply.body["error"]["code"], "conversation_unavailable");
    assert_eq!(reply.body["error"]["deployment"], "west");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("stored with deployment west"), "{message}");
    assert!(
        reply
            .header("retry-after")
            .is_some_and(|s| s.parse::<u64>().unwrap() >= 29)
    );
    assert_eq!(h.emulator.calls("gpt-4o"), 1, "still never east");

    // Without stored state the request fails over freely.
    let reply = h
        .post(
            "/v1/responses",
            &json!({"model": "gpt-4o", "input": "Hi", "store": false}),
        )
        .await;
    assert_eq!(reply.header("x-fallback-deployment"), Some("east"));
}

#[tokio::test]
async fn an_id_the_environment_does_not_know_is_looked_up_once_then_remembered() {
    let (h, vars) = two(Behavior::Healthy, Behavior::Healthy).await;
    // Made on west: east throttled for the first request only.
    h.emulator
        .push("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(1)));
    let first = h
        .post("/v1/responses", &json!({"model": "gpt-4o", "input": "one"}))
        .await;
    assert_eq!(first.header("x-fallback-deployment"), Some("west"));
    let id = first.body["id"].as_str().unwrap().to_owned();

    // Another execution environment, no fleet table: it has never seen the id.
    let config =
        Config::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())).unwrap();
    let other = Arc::new(App::with_clock(config, Arc::new(ManualClock::default())).unwrap());
    let logs = Logs::default();
    let follow_up = json!({"model": "gpt-4o", "input": "two", "previous_response_id": id});
    for _ in 0..2 {
        let event = http_api_post("/v1/responses", &follow_up.to_string());
        let reply = common::invoke_app(&other, &logs, &event, common::epoch_ms() + 30_000).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.header("x-fallback-deployment"), Some("west"));
    }
    assert_eq!(
        h.emulator.stored_calls(),
        1,
        "east asked once whether it holds the id"
    );
    assert_eq!(
        west(&h).stored_calls(),
        1,
        "west asked once, then remembered"
    );
    assert_eq!(
        h.emulator.calls("gpt-4o"),
        1,
        "east never answered the follow-ups"
    );
}

#[tokio::test]
async fn stored_responses_are_read_listed_and_deleted_where_they_live() {
    let (h, _) = two(
        Behavior::Throttled(RetryAfter::Seconds(7)),
        Behavior::Healthy,
    )
    .await;
    let made = h
        .post(
            "/v1/responses",
            &json!({"model": "gpt-4o", "input": "keep me"}),
        )
        .await;
    let id = made.body["id"].as_str().unwrap().to_owned();

    let get = |path: String| {
        let h = &h;
        async move {
            let event = common::http_api_request("GET", &path, None);
            h.invoke(&event).await
        }
    };
    let reply = get(format!("/v1/responses/{id}")).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["id"], json!(id));
    assert_eq!(reply.header("x-fallback-deployment"), Some("west"));
    let items = get(format!("/openai/v1/responses/{id}/input_items?limit=10")).await;
    assert_eq!(items.status, 200, "{:?}", items.body);
    assert_eq!(items.body["object"], "list");
    assert_eq!(items.body["data"][0]["content"][0]["text"], "keep me");

    let deleted = h
        .invoke(&common::http_api_request(
            "DELETE",
            &format!("/v1/responses/{id}"),
            None,
        ))
        .await;
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    assert_eq!(deleted.body["deleted"], true);
    assert!(!west(&h).has_response(&id));
    // East's cooldown over, it can be asked whether it holds the id.
    h.advance(Duration::from_secs(8));
    let gone = get(format!("/v1/responses/{id}")).await;
    assert_eq!(gone.status, 404, "{:?}", gone.body);
    assert_eq!(gone.body["error"]["code"], "response_not_found");
    assert_eq!(
        h.emulator.stored_calls(),
        1,
        "the forgotten id was looked up again"
    );
}

#[tokio::test]
async fn bad_responses_requests_get_a_clear_4xx_and_cost_nothing_upstream() {
    let (h, _) = two(Behavior::Healthy, Behavior::Healthy).await;
    let cases = [
        (
            json!({"model": "gpt-4o"}),
            400,
            "missing_required_parameter",
        ),
        (json!({"model": "gpt-4o", "input": 3}), 400, "invalid_type"),
        (
            json!({"model": "gpt-4o", "input": "x", "previous_response_id": "msg_../../x"}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "gpt-4o", "input": "x", "previous_response_id": 7}),
            400,
            "invalid_value",
        ),
    ];
    for (sent, status, code) in cases {
        let reply = h.post("/v1/responses", &sent).await;
        assert_eq!(reply.status, status, "{sent}: {:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], code, "{sent}");
    }
    let reply = h
        .invoke(&http_api_post(
            "/v1/responses",
            "{\"model\": \"gpt-4o\", \"input\": ",
        ))
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "invalid_json");
    let reply = h
        .invoke(&common::http_api_request(
            "GET",
            "/v1/responses/not-an-id",
            None,
        ))
        .await;
    assert_eq!(reply.status, 400);
    let reply = h
        .invoke(&common::http_api_request(
            "PUT",
            "/v1/responses/resp_abc123",
            None,
        ))
        .await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, DELETE"));
    assert_eq!(h.emulator.total_calls() + west(&h).total_calls(), 0);
    assert_eq!(h.emulator.stored_calls() + west(&h).stored_calls(), 0);

    // An id no resource holds: each asked once, then a 400 as OpenAI answers it.
    let reply = h
        .post(
            "/v1/responses",
            &json!({"model": "gpt-4o", "input": "x", "previous_response_id": "resp_unknown1"}),
        )
        .await;
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert_eq!(reply.body["error"]["code"], "previous_response_not_found");
    assert_eq!(h.emulator.total_calls() + west(&h).total_calls(), 0);
}

#[tokio::test]
async fn the_responses_and_embeddings_payloads_replay_from_events() {
    for source in ["http-api", "function-url"] {
        let h = Harness::new().await;
        for (case, status) in [
            ("openai-responses", 200),
            ("openai-responses-stream", 200),
            // Looked up on the resource, which does not hold it.
            ("openai-response-get", 404),
            // This pool has no embedding deployments: the error says how to add them.
            ("openai-embeddings", 400),
        ] {
            let reply = h
                .invoke(&common::event(&format!("{source}/{case}.json")))
                .await;
            assert_eq!(reply.status, status, "{source}/{case}: {:?}", reply.body);
        }
        assert_eq!(h.emulator.total_calls(), 2, "{source}");
        assert_eq!(h.emulator.stored_calls(), 1, "{source}");
    }
}

#[tokio::test]
async fn a_lookup_asks_another_deployment_of_the_resource_when_one_is_cooling_down() {
    // One resource, gpt-4o throttled: gpt-35-turbo, on the same resource, can read its store.
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7))),
            ("gpt-35-turbo", Behavior::Healthy),
        ],
        &[],
    )
    .await;
    let made = h
        .post(
            "/v1/responses",
            &json!({"model": "gpt-4o", "input": "keep me"}),
        )
        .await;
    assert_eq!(made.header("x-fallback-deployment"), Some("gpt-35-turbo"));
    let unknown = h
        .invoke(&common::http_api_request(
            "GET",
            "/v1/responses/resp_unknown1",
            None,
        ))
        .await;
    assert_eq!(unknown.status, 404, "{:?}", unknown.body);
    assert_eq!(h.emulator.stored_calls(), 1, "one GET for the one resource");
}

fn streamed(input: &str, store: bool) -> Value {
    json!({"model": "gpt-4o", "input": input, "stream": true, "store": store})
}

#[tokio::test]
async fn an_error_event_after_the_preamble_is_a_failed_attempt_the_client_never_sees() {
    let (h, _) = two(Behavior::StreamError { after: 0 }, Behavior::Healthy).await;
    let response = h
        .open("/v1/responses", &streamed("Tell me a story", true))
        .await;
    assert_eq!(
        response.headers().get("x-fallback-deployment").unwrap(),
        "west"
    );
    let events = named(&body(response).await);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "response.created");
    assert_eq!(
        names.iter().filter(|n| **n == "response.created").count(),
        1
    );
    assert!(!names.contains(&"error"), "{names:?}");
    assert_eq!(names.last(), Some(&"response.completed"));
    assert_eq!(text_of(&events), "[gpt-4o] You said: Tell me a story");
    let numbers: Vec<u64> = events
        .iter()
        .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] > w[0]), "{numbers:?}");
}

#[tokio::test]
async fn a_stateless_stream_cut_or_stalled_after_output_is_continued_whole() {
    for behavior in [
        Behavior::StreamCut { after: 3 },
        Behavior::StreamStall { after: 3 },
    ] {
        let (h, _) = two(behavior.clone(), Behavior::Healthy).await;
        let response = h
            .open("/v1/responses", &streamed("Tell me a story", false))
            .await;
        let events = named(&body(response).await);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            text_of(&events),
            "[gpt-4o] You said: Tell me a story",
            "{behavior:?}"
        );
        assert_eq!(
            names.iter().filter(|n| **n == "response.created").count(),
            1
        );
        assert_eq!(names.last(), Some(&"response.completed"), "{behavior:?}");
        let (_, done) = events.last().unwrap();
        let (_, created) = &events[0];
        assert_eq!(
            done["response"]["id"], created["response"]["id"],
            "one response id"
        );
        assert_eq!(
            output_text(&done["response"]),
            "[gpt-4o] You said: Tell me a story"
        );
        let numbers: Vec<u64> = events
            .iter()
            .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
            .collect();
        assert!(
            numbers.windows(2).all(|w| w[1] > w[0]),
            "{behavior:?}: {numbers:?}"
        );
        let item = events[3].1["item_id"].clone();
        assert!(
            events
                .iter()
                .filter(|(n, _)| n == "response.output_text.delta")
                .all(|(_, d)| d["item_id"] == item),
            "one item"
        );
        assert_eq!(west(&h).calls("gpt-4o"), 1);
    }
}

#[tokio::test]
async fn a_stored_stream_cut_after_output_ends_with_an_honest_error_event() {
    let (h, _) = two(Behavior::StreamCut { after: 3 }, Behavior::Healthy).await;
    let response = h
        .open("/v1/responses", &streamed("Tell me a story", true))
        .await;
    let events = named(&body(response).await);
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(last["code"], "stream_interrupted");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("deployment east")
    );
    assert!(!events.iter().any(|(n, _)| n == "response.completed"));

    // Buffered (API Gateway), nothing reached the caller: the answer is restarted whole.
    h.set("gpt-4o", Behavior::StreamCut { after: 3 });
    let reply = h
        .post("/v1/responses", &streamed("Tell me a story", true))
        .await;
    assert_eq!(reply.status, 200);
    let events = named(reply.body.as_str().unwrap());
    assert_eq!(text_of(&events), "[gpt-4o] You said: Tell me a story");
    assert_eq!(events.last().unwrap().0, "response.completed");
}
