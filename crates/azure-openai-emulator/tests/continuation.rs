//! Continuing a partial answer, as a deployment asked to rescue a cut stream sees it.

mod common;

use azure_openai_emulator::{Behavior, Emulator};
use serde_json::{Value, json};

const QUESTION: &str = "How do I reset my password?";
const WHOLE: &str = "[a] You said: How do I reset my password?";

async fn start(b: Behavior) -> Emulator {
    Emulator::builder()
        .deployment("a", Behavior::Healthy)
        .deployment("b", b)
        .start()
        .await
        .expect("emulator starts")
}

/// Asks deployment `b` with `messages`: (status, the answer's text or the error's message).
async fn ask(emu: &Emulator, messages: Value) -> (u16, String) {
    let response = common::client()
        .post(format!(
            "{}/openai/deployments/b/chat/completions?api-version=2024-10-21",
            emu.url()
        ))
        .header("api-key", emu.api_key())
        .json(&json!({"messages": messages}))
        .send()
        .await
        .expect("emulator answers");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .or(body["error"]["message"].as_str())
        .unwrap_or_default()
        .to_owned();
    (status, text)
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

#[tokio::test]
async fn a_partial_answer_gets_the_rest_of_it_in_either_form() {
    let emu = start(Behavior::Healthy).await;
    let partial = "[a] You said: How do";
    // As a prefill (the last message), and followed by an instruction to continue.
    for messages in [
        json!([user(QUESTION), assistant(partial)]),
        json!([user(QUESTION), assistant(partial), user("Continue.")]),
    ] {
        let (status, rest) = ask(&emu, messages).await;
        assert_eq!(status, 200);
        assert_eq!(format!("{partial}{rest}"), WHOLE);
    }
    // A whole earlier answer is a conversation, not a partial one.
    let (_, answer) = ask(
        &emu,
        json!([user(QUESTION), assistant(WHOLE), user("And?")]),
    )
    .await;
    assert_eq!(answer, "[b] You said: And?");
    // Without a partial answer: the whole canonical answer, so a restart repeats the prefix.
    let (_, answer) = ask(&emu, json!([user(QUESTION)])).await;
    assert_eq!(answer, "[b] You said: How do I reset my password?");
}

#[tokio::test]
async fn a_continuation_may_repeat_the_end_of_the_partial_answer() {
    let emu = start(Behavior::ContinueOverlap { words: 2 }).await;
    let (_, rest) = ask(
        &emu,
        json!([user(QUESTION), assistant("[a] You said: How do")]),
    )
    .await;
    assert_eq!(rest, "How do I reset my password?");
}

#[tokio::test]
async fn refusing_modes_answer_400_and_only_to_what_they_refuse() {
    let emu = start(Behavior::NoPrefill).await;
    let partial = "[a] You said: How";
    let (status, message) = ask(&emu, json!([user(QUESTION), assistant(partial)])).await;
    assert_eq!(status, 400);
    assert!(message.contains("prefill"), "{message}");
    let (status, _) = ask(
        &emu,
        json!([user(QUESTION), assistant(partial), user("Go on.")]),
    )
    .await;
    assert_eq!(status, 200, "ends with a user message: accepted");

    let emu = start(Behavior::RefuseContinuation).await;
    let (status, _) = ask(
        &emu,
        json!([user(QUESTION), assistant(partial), user("Go on.")]),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = ask(&emu, json!([user(QUESTION)])).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn content_policy_is_refused_the_openai_way() {
    let emu = start(Behavior::ContentPolicy).await;
    let response = common::client()
        .post(format!("{}/openai/v1/chat/completions", emu.url()))
        .header("authorization", format!("Bearer {}", emu.api_key()))
        .json(&json!({"model": "b", "messages": [user(QUESTION)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "content_policy_violation");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}
