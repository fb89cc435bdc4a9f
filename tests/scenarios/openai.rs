//! The OpenAI-compatible routes, buffered: what an existing OpenAI or Azure OpenAI client sees.

use crate::common;

use common::{Behavior, Emulator, Harness, RetryAfter, event};
use serde_json::{Value, json};

fn chat(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Reset my password"}
        ],
        "temperature": 0.2,
        "seed": 7,
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "x_vendor_field": {"kept": true}
    })
}

#[tokio::test]
async fn the_body_passes_through_untouched_and_the_answer_comes_back_as_sent() {
    let h = Harness::new().await;
    let sent = chat("gpt-4o");
    let reply = h.post("/v1/chat/completions", &sent).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["object"], "chat.completion");
    assert_eq!(
        reply.body["model"], "gpt-4o-2024-08-06",
        "the model that really answered"
    );
    assert!(reply.body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(
        reply.body["prompt_filter_results"].is_array(),
        "Azure's own fields are kept"
    );
    assert_eq!(reply.header("x-fallback-deployment"), Some("gpt-4o"));

    let received = &h.emulator.requests("gpt-4o")[0];
    assert_eq!(received.body, sent, "every field, unknown ones included");
}

#[tokio::test]
async fn a_throttled_primary_is_invisible_to_the_client_except_for_the_model() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7))),
            ("gpt-35-turbo", Behavior::Healthy),
        ],
        &[],
    )
    .await;
    let reply = h.post("/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["model"], "gpt-35-turbo-0125");
    assert_eq!(reply.header("x-fallback-deployment"), Some("gpt-35-turbo"));
    assert_eq!(reply.header("x-fallback-attempts"), Some("2"));
}

#[tokio::test]
async fn the_azure_path_works_with_its_api_version() {
    let h = Harness::new().await;
    let mut body = chat("ignored");
    body.as_object_mut().unwrap().remove("model");
    let reply = h
        .post(
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            &body,
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["object"], "chat.completion");
}

#[tokio::test]
async fn the_model_picks_a_named_route_and_an_unknown_one_is_a_404() {
    let west = Emulator::builder()
        .api_key("west")
        .deployment("gpt-4o", Behavior::Healthy)
        .deployment("gpt-4o-mini", Behavior::Healthy)
        .start()
        .await
        .unwrap();
    let pool = json!({
        "deployments": [
            {"id": "big", "endpoint": west.url(), "deployment": "gpt-4o", "key_env": "K"},
            {"id": "small", "endpoint": west.url(), "deployment": "gpt-4o-mini", "key_env": "K", "api": "v1"}
        ],
        "routes": {"chat": ["big", "small"], "mini": ["small"]},
        "default_route": "chat"
    });
    let vars = [
        ("FALLBACK_POOL".to_string(), pool.to_string()),
        ("K".to_string(), "west".to_string()),
    ];
    let h = Harness::build(west, Vec::new(), &vars, None);

    let reply = h.post("/v1/chat/completions", &chat("mini")).await;
    assert_eq!(reply.header("x-fallback-deployment"), Some("small"));
    // The v1 deployment gets its own name as `model`, whatever alias the client used.
    assert_eq!(
        h.emulator.requests("gpt-4o-mini")[0].body["model"],
        "gpt-4o-mini"
    );

    let reply = h.post("/v1/chat/completions", &chat("gpt-5")).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["error"]["code"], "model_not_found");
    assert_eq!(reply.body["error"]["param"], "model");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("chat, mini")
    );
    assert_eq!(h.emulator.total_calls(), 1);
}

#[tokio::test]
async fn bad_requests_get_openai_style_errors_and_cost_nothing_upstream() {
    let h = Harness::with(&[], &[("MAX_BODY_BYTES", "400")]).await;
    let cases: [(String, u16, &str, Value); 5] = [
        (
            "{\"model\": \"gpt-4o\", \"messages\": [".into(),
            400,
            "invalid_json",
            Value::Null,
        ),
        ("[1, 2]".into(), 400, "invalid_json", Value::Null),
        (
            json!({"model": "gpt-4o"}).to_string(),
            400,
            "missing_required_parameter",
            json!("messages"),
        ),
        (
            json!({"model": "gpt-4o", "messages": "hi"}).to_string(),
            400,
            "invalid_type",
            json!("messages"),
        ),
        (
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(500)}]})
                .to_string(),
            413,
            "request_too_large",
            Value::Null,
        ),
    ];
    for (body, status, code, param) in cases {
        let reply = h
            .invoke(&common::http_api_post("/v1/chat/completions", &body))
            .await;
        assert_eq!(reply.status, status, "{body}");
        let error = &reply.body["error"];
        assert_eq!(error["code"], code, "{body}");
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert_eq!(error["param"], param, "{body}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(h.emulator.total_calls(), 0);
}

#[tokio::test]
async fn a_get_on_the_chat_route_is_a_405_with_allow_post() {
    let h = Harness::new().await;
    let mut event: Value =
        serde_json::from_str(&common::http_api_post("/v1/chat/completions", "")).unwrap();
    event["requestContext"]["http"]["method"] = json!("GET");
    let reply = h.invoke(&event.to_string()).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST"));
    assert_eq!(reply.body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn a_filtered_prompt_comes_back_as_azure_explains_it() {
    let h = Harness::with(&[("gpt-4o", Behavior::ContentFilter)], &[]).await;
    let reply = h.post("/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(reply.status, 400);
    let error = &reply.body["error"];
    assert_eq!(error["code"], "content_filter");
    assert_eq!(error["param"], "prompt");
    assert_eq!(error["innererror"]["code"], "ResponsibleAIPolicyViolation");
    assert_eq!(
        error["innererror"]["content_filter_result"]["hate"]["filtered"],
        true
    );
}

#[tokio::test]
async fn a_request_too_long_for_every_deployment_is_a_400_not_a_503() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::ContextLengthExceeded),
            ("gpt-35-turbo", Behavior::ContextLengthExceeded),
        ],
        &[],
    )
    .await;
    let reply = h.post("/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "context_length_exceeded");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length")
    );
}

#[tokio::test]
async fn when_nothing_answers_the_503_is_openai_shaped_with_retry_after() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7))),
            ("gpt-35-turbo", Behavior::Unavailable),
        ],
        &[],
    )
    .await;
    let reply = h.post("/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("1"));
    let error = &reply.body["error"];
    assert_eq!(error["code"], "all_deployments_unavailable");
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(error["deployments"][0]["state"], "throttled");
}

#[tokio::test]
async fn the_new_paths_replay_from_events() {
    for source in ["http-api", "function-url"] {
        let h = Harness::new().await;
        for (case, status) in [
            ("openai-chat", 200),
            ("azure-chat", 200),
            ("openai-invalid-json", 400),
        ] {
            let reply = h.invoke(&event(&format!("{source}/{case}.json"))).await;
            assert_eq!(reply.status, status, "{source}/{case}: {:?}", reply.body);
        }
        assert_eq!(h.emulator.total_calls(), 2, "{source}");
    }
}
