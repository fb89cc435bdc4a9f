//! Closed by default: client keys, checked before anything costs quota.

use crate::common;

use std::process::Command;

use common::{Harness, http_api_get, http_api_post};
use serde_json::{Value, json};

const CLIENT_KEY: &str = "fc-test-client-key-5b1d0c7e9a";

async fn guarded() -> Harness {
    Harness::with(
        &[],
        &[(
            "CLIENT_API_KEYS",
            &format!("another-key-0123456789,{CLIENT_KEY}"),
        )],
    )
    .await
}

fn with_header(event: String, name: &str, value: &str) -> String {
    let mut event: Value = serde_json::from_str(&event).unwrap();
    event["headers"][name] = json!(value);
    event.to_string()
}

fn chat() -> String {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

#[tokio::test]
async fn without_a_key_nothing_is_served_and_nothing_is_spent() {
    let h = guarded().await;
    let reply = h.invoke(&http_api_get(Some("hello"))).await;
    assert_eq!(reply.status, 401);
    assert!(
        reply.body["error"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));

    let reply = h
        .invoke(&http_api_post("/v1/chat/completions", &chat()))
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.body["error"]["code"], "invalid_api_key");
    assert_eq!(reply.body["error"]["type"], "invalid_request_error");

    // Even a malformed request is refused for its missing key first.
    let reply = h.invoke(&http_api_post("/v1/chat/completions", "{")).await;
    assert_eq!(reply.status, 401);
    assert_eq!(h.emulator.total_calls(), 0);
}

#[tokio::test]
async fn a_wrong_key_is_refused() {
    let h = guarded().await;
    for (header, value) in [
        ("authorization", "Bearer fc-test-client-key-5b1d0c7e9b"),
        ("api-key", "fc-test-client-key"),
        ("authorization", CLIENT_KEY),
    ] {
        let event = with_header(http_api_get(Some("hello")), header, value);
        let reply = h.invoke(&event).await;
        assert_eq!(reply.status, 401, "{header}: {value}");
    }
    assert_eq!(h.emulator.total_calls(), 0);
}

#[tokio::test]
async fn the_key_is_accepted_the_way_openai_and_azure_clients_send_it() {
    let h = guarded().await;
    let bearer = format!("Bearer {CLIENT_KEY}");
    let reply = h
        .invoke(&with_header(
            http_api_get(Some("hello")),
            "authorization",
            &bearer,
        ))
        .await;
    assert_eq!(reply.status, 200);
    let reply = h
        .invoke(&with_header(
            http_api_post("/v1/chat/completions", &chat()),
            "authorization",
            &bearer,
        ))
        .await;
    assert_eq!(reply.status, 200);
    let reply = h
        .invoke(&with_header(
            http_api_post(
                "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                &chat(),
            ),
            "api-key",
            CLIENT_KEY,
        ))
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        !h.logs.text().contains(CLIENT_KEY),
        "the client key is never logged"
    );
}

#[test]
fn the_cold_start_refuses_an_open_configuration() {
    let output = Command::new(env!("CARGO_BIN_EXE_fallback-chat"))
        .env_clear()
        .env("AZURE_OPENAI_ENDPOINT", "https://x.openai.azure.com")
        .env("AZURE_OPENAI_API_KEY", "sk-never-printed-0000")
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for needed in [
        "closed by default",
        "CLIENT_API_KEYS",
        "AUTH_PROVIDED_BY=iam",
    ] {
        assert!(printed.contains(needed), "{printed}");
    }
    assert!(!printed.contains("sk-never-printed"), "{printed}");
}

#[tokio::test]
async fn the_sample_events_carry_the_example_client_key() {
    let h = Harness::with(&[], &[("CLIENT_API_KEYS", "fc-example-client-key-0000")]).await;
    for source in ["rest-api", "http-api", "function-url", "alb"] {
        let reply = h
            .invoke(&common::event(&format!("{source}/get-query.json")))
            .await;
        assert_eq!(reply.status, 200, "{source}");
    }
}
