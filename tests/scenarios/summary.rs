//! Each request's summary log line, on every path, with the real clock: its latency counts from
//! the moment the request came, so a deployment that takes 80 ms shows at least 80 ms.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{API_KEY, Behavior, Emulator, Logs, http_api_get, http_api_post};
use fallback_chat::App;
use fallback_chat::config::Config;
use serde_json::{Value, json};

const LATENCY: Duration = Duration::from_millis(80);

/// The App a cold start builds (system clock), over an emulator whose gpt-4o takes `LATENCY`.
async fn app() -> (Arc<App>, Emulator) {
    let emulator = Emulator::builder()
        .api_key(API_KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .start()
        .await
        .expect("emulator starts");
    emulator.set_latency("gpt-4o", LATENCY);
    let url = emulator.url();
    let config = Config::from_lookup(|name| match name {
        "AZURE_OPENAI_ENDPOINT" => Some(url.clone()),
        "AZURE_OPENAI_API_KEY" => Some(API_KEY.into()),
        "AZURE_OPENAI_DEPLOYMENTS" => Some("gpt-4o".into()),
        "AUTH_PROVIDED_BY" => Some("authorizer".into()),
        _ => None,
    })
    .expect("valid config");
    (
        Arc::new(App::new(config).expect("the app builds")),
        emulator,
    )
}

/// The `latency_ms` of the summary lines in `logs`, waiting up to a second for a stream's.
async fn latencies(logs: &Logs, count: usize) -> Vec<u64> {
    for _ in 0..100 {
        let found: Vec<u64> = logs
            .lines()
            .iter()
            .filter(|line| line["fields"]["message"] == "request")
            .map(|line| line["fields"]["latency_ms"].as_u64().expect("latency_ms"))
            .collect();
        if found.len() >= count {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {count} summary lines:\n{}", logs.text());
}

#[tokio::test]
async fn every_summary_line_counts_its_latency_from_the_request_start() {
    let (app, _emulator) = app().await;
    let logs = Logs::default();
    let _current = tracing::subscriber::set_default(logs.subscriber());
    let request = |event: String| lambda_http::request::from_str(&event).expect("an event");
    let question = json!({"messages": [{"role": "user", "content": "hi"}]});
    let mut streamed = question.clone();
    streamed["stream"] = Value::Bool(true);

    let asked = app
        .handle_buffered(request(http_api_get(Some("hello"))))
        .await;
    assert_eq!(asked.status(), 200);
    let whole = app
        .handle_buffered(request(http_api_post(
            "/v1/chat/completions",
            &question.to_string(),
        )))
        .await;
    assert_eq!(whole.status(), 200);
    let buffered_stream = app
        .handle_buffered(request(http_api_post(
            "/v1/chat/completions",
            &streamed.to_string(),
        )))
        .await;
    assert_eq!(buffered_stream.status(), 200);
    let stream = app
        .handle(request(http_api_post(
            "/v1/chat/completions",
            &streamed.to_string(),
        )))
        .await;
    assert_eq!(stream.status(), 200);
    common::body(stream).await;

    let found = latencies(&logs, 4).await;
    assert_eq!(found.len(), 4, "{}", logs.text());
    for ms in found {
        assert!(
            ms >= LATENCY.as_millis() as u64,
            "a summary line says {ms} ms for an answer that took at least {LATENCY:?}:\n{}",
            logs.text()
        );
    }
}

#[tokio::test]
async fn attempts_count_deployments_and_calls_count_a_quick_retry_as_the_second_call_it_is() {
    let h = common::Harness::new().await;
    // One 500, retried once on the same deployment, which then answers.
    h.emulator.push("gpt-4o", Behavior::ServerError);
    let reply = h.ask("hello").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["deployment"], "gpt-4o");
    assert_eq!(
        reply.header("x-fallback-attempts"),
        Some("1"),
        "one deployment"
    );
    assert_eq!(h.calls("gpt-4o"), 2);
    let line = h
        .logs
        .lines()
        .into_iter()
        .find(|l| l["fields"]["message"] == "request")
        .expect("a summary line");
    assert_eq!(line["fields"]["calls"], 2, "two upstream calls");
    assert_eq!(line["fields"]["attempts"], "gpt-4o:ok");
}
