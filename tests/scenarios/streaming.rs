//! Streamed chat completions through the real handler: failover before the first content,
//! and after it, never a cut or stalled stream passed off as a finished answer.

use crate::common;

use std::time::{Duration, Instant};

use common::{Behavior, Harness, RetryAfter, body, content, event, events};
use fallback_chat::reply::Reply;
use serde_json::{Value, json};

fn chat(stream_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Tell me how"}],
        "stream": true
    });
    if stream_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

#[tokio::test]
async fn a_healthy_stream_is_relayed_whole_without_azures_own_events() {
    let h = Harness::new().await;
    let response = h.open("/v1/chat/completions", &chat(true)).await;
    assert_eq!(response.status(), 200);
    let header = |n: &str| {
        response
            .headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("x-fallback-deployment").as_deref(), Some("gpt-4o"));
    assert!(matches!(response.body(), Reply::Stream(_)));

    let events = events(&body(response).await);
    assert_eq!(content(&events), "[gpt-4o] You said: Tell me how");
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert!(
        events.iter().all(|e| e.is_string() || e["id"] != ""),
        "Azure's prompt_filter_results event and filter-only events are dropped: {events:?}"
    );
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &events[events.len() - 2];
    assert!(
        usage["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{usage}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["finish_reason"] == "stop")
    );
}

#[tokio::test]
async fn a_throttled_primary_is_skipped_before_the_stream_starts() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7))),
            ("gpt-35-turbo", Behavior::Healthy),
        ],
        &[],
    )
    .await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    assert_eq!(
        response.headers()["x-fallback-deployment"]
            .to_str()
            .unwrap(),
        "gpt-35-turbo"
    );
    let events = events(&body(response).await);
    assert_eq!(content(&events), "[gpt-35-turbo] You said: Tell me how");
    assert_eq!(events[1]["model"], "gpt-35-turbo-0125");
}

#[tokio::test]
async fn any_failure_before_the_first_content_falls_over() {
    let cases = [
        Behavior::StreamCut { after: 0 },
        Behavior::StreamStall { after: 0 },
        Behavior::StreamSlowStart { ms: 3_000 },
        Behavior::ServerError,
        Behavior::ResetConnection,
        Behavior::Hang,
    ];
    for behavior in cases {
        let h = Harness::with(
            &[
                ("gpt-4o", behavior.clone()),
                ("gpt-35-turbo", Behavior::Healthy),
            ],
            &[
                ("FIRST_TOKEN_TIMEOUT_MS", "300"),
                ("ATTEMPT_TIMEOUT_MS", "1000"),
            ],
        )
        .await;
        let started = Instant::now();
        let response = h.open("/v1/chat/completions", &chat(false)).await;
        assert_eq!(response.status(), 200, "{behavior:?}");
        assert_eq!(
            response.headers()["x-fallback-deployment"]
                .to_str()
                .unwrap(),
            "gpt-35-turbo",
            "{behavior:?}"
        );
        let events = events(&body(response).await);
        assert_eq!(
            content(&events),
            "[gpt-35-turbo] You said: Tell me how",
            "{behavior:?}"
        );
        assert_eq!(events.last(), Some(&json!("[DONE]")), "{behavior:?}");
        // A stall or slow first token costs the time-to-first-token limit, not the attempt timeout.
        assert!(
            started.elapsed() < Duration::from_millis(2_500),
            "{behavior:?}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn with_continuation_off_a_stream_cut_after_content_ends_with_an_error_and_no_done() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::StreamCut { after: 3 }),
            ("gpt-35-turbo", Behavior::Healthy),
        ],
        &[("STREAM_CONTINUATIONS", "0")],
    )
    .await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    assert_eq!(
        response.status(),
        200,
        "bytes were on their way: the status is sent"
    );
    let events = events(&body(response).await);
    assert_eq!(
        content(&events),
        "[gpt-4o] You said: ",
        "the three pieces that arrived"
    );
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{events:?}");
    assert!(!events.contains(&json!("[DONE]")));
    assert_eq!(h.calls("gpt-35-turbo"), 0);
}

#[tokio::test]
async fn a_stall_after_content_ends_with_an_error_within_the_idle_timeout() {
    let h = Harness::with(
        &[("gpt-4o", Behavior::StreamStall { after: 2 })],
        &[("STREAM_IDLE_TIMEOUT_MS", "300")],
    )
    .await;
    let started = Instant::now();
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        events.last().unwrap()["error"]["code"],
        "stream_interrupted"
    );
    assert!(!events.contains(&json!("[DONE]")));

    // The stall counted against the deployment's health.
    let reply = h.ask("next").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn malformed_events_are_skipped_and_the_answer_stays_whole() {
    let h = Harness::with(&[("gpt-4o", Behavior::StreamCorrupt { at: 1 })], &[]).await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert_eq!(content(&events), "[gpt-4o] You said: Tell me how");
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert!(events.iter().all(|e| e.get("unexpected").is_none()));
}

#[tokio::test]
async fn a_finished_stream_without_done_is_finalised_promptly() {
    let h = Harness::with(&[("gpt-4o", Behavior::StreamNoDone)], &[]).await;
    let started = Instant::now();
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(content(&events), "[gpt-4o] You said: Tell me how");
    assert_eq!(events.last(), Some(&json!("[DONE]")));
}

#[tokio::test]
async fn azures_asynchronous_filter_events_are_not_relayed() {
    let h = Harness::with(&[("gpt-4o", Behavior::StreamAsyncFilter)], &[]).await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    let events = events(&body(response).await);
    assert_eq!(content(&events), "[gpt-4o] You said: Tell me how");
    assert!(
        events
            .iter()
            .all(|e| e["choices"][0].get("content_filter_offsets").is_none())
    );
}

#[tokio::test]
async fn when_nothing_can_stream_the_error_comes_before_any_event() {
    let h = Harness::with(&[("gpt-4o", Behavior::Unavailable)], &[]).await;
    let response = h.open("/v1/chat/completions", &chat(false)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["content-type"], "application/json");
    let error: Value = serde_json::from_str(&body(response).await).unwrap();
    assert_eq!(error["error"]["code"], "all_deployments_unavailable");
}

#[tokio::test]
async fn behind_api_gateway_a_stream_is_sent_whole() {
    for source in ["http-api", "function-url"] {
        let h = Harness::new().await;
        let reply = h
            .invoke(&event(&format!("{source}/openai-chat-stream.json")))
            .await;
        assert_eq!(reply.status, 200, "{source}");
        assert_eq!(reply.header("content-type"), Some("text/event-stream"));
        let events = events(reply.body.as_str().unwrap());
        assert_eq!(
            content(&events),
            "[gpt-4o] You said: How do I reset my password?"
        );
        assert_eq!(events.last(), Some(&json!("[DONE]")), "{source}");
    }
}
