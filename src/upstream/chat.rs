//! Chat completions, the one kind of call `GET /?query=` and `/v1/chat/completions` make:
//! `chat/completions` on each deployment, a `chat.completion` answer, `chat.completion.chunk`
//! events, and a cut stream continued as the original messages plus the partial answer and an
//! instruction to go on.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::outcome::{Completion, Failure, JsonBody, Transient};
use crate::pool::Deployment;

use super::events::{Chunk, StreamEvent};
use super::kind::{Edit, Kind, KindId, Spent, Streaming};
use super::wire::refusal;

/// Appended (after the partial answer) to ask another deployment to continue it. A trailing
/// assistant message alone is not continued by OpenAI-format models (they start a new answer)
/// and is refused by models that want the conversation to end with a user message; an
/// instruction after it works with both.
const CONTINUE: &str = "Continue your previous answer exactly where it stopped, even in the middle of a word or sentence. Write only the rest of it: do not repeat anything you already wrote and add nothing before it.";
/// About what the instruction and its framing cost in prompt tokens, for the usage estimate.
const INSTRUCTION_TOKENS: u64 = 40;

/// `POST .../chat/completions`.
pub struct Chat;

impl Kind for Chat {
    const ID: KindId = KindId::Chat;
    type Answer = Completion;

    fn url(d: &Deployment) -> String {
        d.url("chat/completions")
    }

    fn answer(body: Bytes) -> Result<Completion, Failure> {
        match serde_json::from_slice::<WireCompletion>(&body) {
            Ok(c) => c.into_completion(body),
            Err(_) => Err(Failure::Transient(Transient::BadResponse)),
        }
    }

    fn tokens(answer: &Completion) -> Option<u64> {
        answer.total_tokens()
    }
}

impl Streaming for Chat {
    fn event(data: &str) -> StreamEvent {
        if data.trim() == "[DONE]" {
            return StreamEvent::Done;
        }
        let Ok(value @ Value::Object(_)) = serde_json::from_str::<Value>(data) else {
            return StreamEvent::Skip;
        };
        if value.get("error").is_some() {
            return match refusal(&value) {
                Some(filter) => StreamEvent::Refused {
                    data: data.to_owned(),
                    filter,
                },
                None => StreamEvent::Error(data.to_owned()),
            };
        }
        let usage = value.get("usage").filter(|u| !u.is_null()).cloned();
        let id = value.get("id").and_then(Value::as_str);
        if id == Some("") && usage.is_none() {
            return StreamEvent::Skip;
        }
        let choices = value.get("choices").and_then(Value::as_array);
        let (text, content, finish, opaque) = match choices {
            Some(choices) if !choices.is_empty() => {
                let delta = |c: &Value, field: &str| !c["delta"][field].is_null();
                let text = choices[0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let tools = choices.iter().any(|c| {
                    delta(c, "tool_calls")
                        || delta(c, "function_call")
                        || c["delta"]["refusal"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty())
                });
                let content = tools
                    || choices.iter().any(|c| {
                        c["delta"]["content"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty())
                    });
                let finish = choices
                    .iter()
                    .find_map(|c| c["finish_reason"].as_str())
                    .map(str::to_owned);
                let opaque = tools
                    || choices.len() > 1
                    || choices.iter().any(|c| c["index"].as_u64().unwrap_or(0) > 0)
                    || choices.iter().any(|c| !c["logprobs"].is_null());
                (text, content, finish, opaque)
            }
            _ if usage.is_some() => (String::new(), false, None, false),
            _ => return StreamEvent::Skip,
        };
        StreamEvent::Chunk(Chunk {
            id: id.filter(|id| !id.is_empty()).map(str::to_owned),
            data: data.to_owned(),
            text,
            content,
            finish,
            opaque,
            usage,
            item: None,
            sequence: None,
            closing: false,
        })
    }

    fn continuable(body: &JsonBody) -> bool {
        body.get("n").and_then(Value::as_u64).unwrap_or(1) <= 1
            && body.get("logprobs") != Some(&Value::Bool(true))
    }

    /// The original messages, the partial answer as an assistant message and the instruction to
    /// go on; a tool call is not an option for it, and what the answer may still spend is what
    /// the original allowed less what was already produced.
    fn continuation(body: &JsonBody, sent: &str, spent: u64) -> JsonBody {
        let mut body = body.clone();
        if let Some(Value::Array(messages)) = body.get_mut("messages") {
            messages.push(json!({"role": "assistant", "content": sent}));
            messages.push(json!({"role": "user", "content": CONTINUE}));
        }
        if body.contains_key("tools") || body.contains_key("functions") {
            body.insert("tool_choice".into(), Value::from("none"));
        }
        for limit in ["max_tokens", "max_completion_tokens"] {
            if let Some(n) = body.get(limit).and_then(Value::as_u64) {
                body.insert(limit.into(), Value::from(n.saturating_sub(spent).max(1)));
            }
        }
        body
    }

    fn with_usage(body: &JsonBody) -> Option<JsonBody> {
        if Self::shows_usage(body) {
            return None;
        }
        let mut body = body.clone();
        let options = body.entry("stream_options").or_insert_with(|| json!({}));
        if !options.is_object() {
            *options = json!({});
        }
        options["include_usage"] = Value::Bool(true);
        Some(body)
    }

    fn shows_usage(body: &JsonBody) -> bool {
        body.get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true)
    }

    /// The chunk's `id`, its first choice's content or its `usage` replaced.
    fn rewrite(chunk: &Chunk, edit: Edit<'_>) -> String {
        let Ok(mut value) = serde_json::from_str::<Value>(&chunk.data) else {
            return chunk.data.clone();
        };
        if let Some(id) = edit.id {
            value["id"] = Value::from(id);
        }
        if let Some(text) = edit.text
            && let Some(delta) = value.pointer_mut("/choices/0/delta")
        {
            delta["content"] = Value::from(text);
        }
        if let Some(usage) = edit.usage {
            value["usage"] = usage.clone();
        }
        value.to_string()
    }

    /// The rescuing stream's usage plus the broken ones': their content chunks, and for each its
    /// prompt as the rescuer counted it, less the partial answer and the instruction a
    /// continuation adds.
    fn usage(usage: &Value, spent: Spent) -> Value {
        let number = |field: &str| usage.get(field).and_then(Value::as_u64).unwrap_or(0);
        let own_prompt = number("prompt_tokens")
            .saturating_sub(spent.chunks + INSTRUCTION_TOKENS)
            .max(1);
        let prompt = number("prompt_tokens") + spent.broken * own_prompt;
        let completion = number("completion_tokens") + spent.chunks;
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }
}

#[derive(Deserialize)]
struct WireCompletion {
    #[serde(default)]
    model: String,
    choices: Vec<WireChoice>,
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: Option<WireMessage>,
    finish_reason: Option<String>,
    content_filter_results: Option<Value>,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<String>,
}

impl WireCompletion {
    fn into_completion(self, raw: Bytes) -> Result<Completion, Failure> {
        let Some(choice) = self.choices.into_iter().next() else {
            return Err(Failure::Transient(Transient::BadResponse));
        };
        Ok(Completion {
            content: choice.message.and_then(|m| m.content),
            finish_reason: choice.finish_reason,
            model: self.model,
            usage: self.usage,
            content_filter_results: choice.content_filter_results,
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(event: StreamEvent) -> Chunk {
        match event {
            StreamEvent::Chunk(chunk) => chunk,
            other => panic!("not a chunk: {other:?}"),
        }
    }

    #[test]
    fn events_are_told_apart() {
        let classify = Chat::event;
        assert_eq!(classify("[DONE]"), StreamEvent::Done);
        assert_eq!(
            classify(r#"{"choices":[{"delta":{"content": BROKEN"#),
            StreamEvent::Skip
        );
        assert_eq!(classify(r#"{"unexpected":true}"#), StreamEvent::Skip);
        assert_eq!(
            classify(
                r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[]}"#
            ),
            StreamEvent::Skip,
            "Azure's empty first event"
        );
        assert_eq!(
            classify(r#"{"choices":[{"index":0,"delta":{},"content_filter_offsets":{}}],"id":""}"#),
            StreamEvent::Skip,
            "Azure's asynchronous filter event"
        );
        let role = chunk(classify(
            r#"{"id":"c1","choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        ));
        assert!(!role.content && role.finish.is_none() && role.text.is_empty());
        assert_eq!(role.id.as_deref(), Some("c1"));
        let hi = chunk(classify(
            r#"{"id":"c1","choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        ));
        assert!(hi.content && !hi.opaque);
        assert_eq!(hi.text, "Hi");
        let tool = chunk(classify(
            r#"{"id":"c1","choices":[{"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}]}"#,
        ));
        assert!(tool.content && tool.opaque && tool.text.is_empty());
        let stop = chunk(classify(
            r#"{"id":"c1","choices":[{"delta":{},"finish_reason":"stop"}]}"#,
        ));
        assert_eq!(stop.finish.as_deref(), Some("stop"));
        let usage = chunk(classify(
            r#"{"id":"c1","choices":[],"usage":{"total_tokens":3}}"#,
        ));
        assert_eq!(usage.usage, Some(json!({"total_tokens": 3})));
        let error = r#"{"error":{"message":"boom"}}"#;
        assert_eq!(classify(error), StreamEvent::Error(error.to_owned()));
        assert!(matches!(
            classify(r#"{"error":{"message":"no","code":"content_filter"}}"#),
            StreamEvent::Refused { filter, .. } if filter.code == "content_filter"
        ));
    }

    #[test]
    fn a_continuation_asks_for_the_rest_and_no_tool_call_within_what_is_left() {
        let body: JsonBody = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": "Tell me how"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "max_tokens": 50,
            "stream": true
        }))
        .unwrap();
        let asked = Value::Object(Chat::continuation(&body, "[gpt-4o] You said: ", 3));
        assert_eq!(asked["messages"][1]["role"], "assistant");
        assert_eq!(asked["messages"][1]["content"], "[gpt-4o] You said: ");
        assert_eq!(asked["messages"][2]["role"], "user");
        assert_eq!(asked["tool_choice"], "none");
        assert_eq!(asked["max_tokens"], 47);
        assert_eq!(asked["stream"], true);
    }

    #[test]
    fn a_resumed_chunk_takes_the_answers_id_and_its_trimmed_text() {
        let data = r#"{"id":"other","choices":[{"index":0,"delta":{"content":"You said: Tell"}}]}"#;
        let chunk = chunk(Chat::event(data));
        assert_eq!(chunk.id.as_deref(), Some("other"));
        let edit = Edit {
            id: Some("first"),
            text: Some("Tell"),
            ..Edit::default()
        };
        let out: Value = serde_json::from_str(&Chat::rewrite(&chunk, edit)).unwrap();
        assert_eq!(out["id"], "first");
        assert_eq!(out["choices"][0]["delta"]["content"], "Tell");
    }

    #[test]
    fn a_success_without_choices_is_not_an_answer() {
        for body in [&br#"{"choices":[]}"#[..], b"<html>"] {
            assert!(matches!(
                Chat::answer(Bytes::copy_from_slice(body)),
                Err(Failure::Transient(Transient::BadResponse))
            ));
        }
    }

    #[test]
    fn several_choices_or_log_probabilities_cannot_be_continued() {
        let body = |v: Value| serde_json::from_value::<JsonBody>(v).unwrap();
        assert!(Chat::continuable(&body(json!({"messages": []}))));
        assert!(!Chat::continuable(&body(json!({"n": 2}))));
        assert!(!Chat::continuable(&body(json!({"logprobs": true}))));
    }
}
