//! The Responses API: `POST /openai/v1/responses` on each deployment's resource (Azure serves it
//! on the v1 API only, so classic entries are called there too, with their own key), the
//! deployment's name as `model`, a `response` object passed through as sent. A stored response
//! lives on the resource that made it: `GET`/`DELETE /openai/v1/responses/{id}` and
//! `.../{id}/input_items` ([`Stored`]) go there, and routing remembers where that is.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use serde_json::json;

use crate::outcome::{Document, Failure, JsonBody, Transient, total_tokens};
use crate::pool::Deployment;
use crate::sse;

use super::events::{Chunk, StreamEvent};
use super::kind::{Edit, Kind, KindId, Spent, Streaming};
use super::wire::refusal;

/// `POST .../openai/v1/responses`.
pub struct Responses;

impl Kind for Responses {
    const ID: KindId = KindId::Responses;
    type Answer = Document;

    fn url(d: &Deployment) -> String {
        d.v1_url("responses")
    }

    /// On the v1 API the body names the deployment, for classic entries too.
    fn model(d: &Deployment) -> Option<&str> {
        Some(&d.deployment)
    }

    /// A `response` object; one whose `status` is `failed` is the deployment's failure (Azure
    /// answers some server errors that way), worth trying elsewhere. `incomplete` (a token
    /// limit reached, say) is an answer.
    fn answer(body: Bytes) -> Result<Document, Failure> {
        #[derive(Deserialize)]
        struct Wire {
            id: String,
            status: Option<String>,
            usage: Option<Value>,
        }
        match serde_json::from_slice::<Wire>(&body) {
            Ok(wire) if wire.status.as_deref() != Some("failed") => Ok(Document {
                id: Some(wire.id),
                tokens: total_tokens(wire.usage.as_ref()),
                raw: body,
            }),
            _ => Err(Failure::Transient(Transient::BadResponse)),
        }
    }

    fn tokens(answer: &Document) -> Option<u64> {
        answer.tokens
    }
}

/// Appended to ask another deployment to go on with a cut answer (chat's words, as an input
/// message after the partial answer).
const CONTINUE: &str = "Continue your previous answer exactly where it stopped, even in the middle of a word or sentence. Write only the rest of it: do not repeat anything you already wrote and add nothing before it.";
/// About what the instruction and its framing cost in input tokens, for the usage estimate.
const INSTRUCTION_TOKENS: u64 = 40;

/// Whether a response made for `body` is stored where it is made (the API's default).
pub fn stores(body: &JsonBody) -> bool {
    body.get("store") != Some(&Value::Bool(false))
}

/// Responses streams: named events (`event: response.output_text.delta`), each with its `type`
/// and `sequence_number` in the data; a preamble (`response.created`, `response.in_progress`,
/// `response.output_item.added`, `response.content_part.added`) before any output, held until
/// the first output or a failure; `response.completed` (or `incomplete`) ends it, with no
/// `[DONE]`. `error` and `response.failed` are the deployment's failure.
impl Streaming for Responses {
    fn event(data: &str) -> StreamEvent {
        let Ok(value @ Value::Object(_)) = serde_json::from_str::<Value>(data) else {
            return StreamEvent::Skip;
        };
        let Some(kind) = value.get("type").and_then(Value::as_str) else {
            return StreamEvent::Skip;
        };
        match kind {
            "error" => {
                let envelope = serde_json::json!({"error": value});
                return match refusal(&envelope) {
                    Some(filter) => StreamEvent::Refused {
                        data: data.to_owned(),
                        filter,
                    },
                    None => StreamEvent::Error(data.to_owned()),
                };
            }
            "response.failed" => return StreamEvent::Error(data.to_owned()),
            _ => {}
        }
        let response = value.get("response");
        let text = match kind {
            "response.output_text.delta" => value["delta"].as_str().unwrap_or_default(),
            _ => "",
        };
        // Output: text, or what a continuation cannot take over (a tool call's arguments, a
        // refusal, a reasoning summary, any other delta).
        let content =
            kind.ends_with(".delta") && (!text.is_empty() || kind != "response.output_text.delta");
        let tool_item = kind == "response.output_item.added"
            && value["item"]["type"]
                .as_str()
                .is_some_and(|t| t != "message");
        let opaque = (content && kind != "response.output_text.delta") || tool_item;
        let finish = match kind {
            "response.completed" | "response.incomplete" => {
                Some(kind.trim_start_matches("response.").to_owned())
            }
            _ => None,
        };
        StreamEvent::Chunk(Chunk {
            data: data.to_owned(),
            id: response
                .and_then(|r| r["id"].as_str())
                .filter(|id| !id.is_empty())
                .map(str::to_owned),
            text: text.to_owned(),
            content: content || tool_item,
            finish,
            opaque,
            usage: response
                .and_then(|r| r.get("usage"))
                .filter(|u| !u.is_null())
                .cloned(),
            item: value
                .get("item_id")
                .or_else(|| value.get("item").and_then(|i| i.get("id")))
                .and_then(Value::as_str)
                .map(str::to_owned),
            sequence: value.get("sequence_number").and_then(Value::as_u64),
            closing: kind.ends_with(".done"),
        })
    }

    /// Only an answer whose whole history travels in the request can go on elsewhere: a stored
    /// one (or one that continues a stored conversation) would leave its state split between
    /// two resources.
    fn continuable(body: &JsonBody) -> bool {
        !stores(body) && body.get("previous_response_id").is_none_or(Value::is_null)
    }

    /// The original input (a string becomes a user message), the partial answer as an
    /// assistant message and the instruction to go on; no tool call, and what the answer may
    /// still spend is what the original allowed less what was produced.
    fn continuation(body: &JsonBody, sent: &str, spent: u64) -> JsonBody {
        let mut body = body.clone();
        let mut input = match body.remove("input") {
            Some(Value::Array(items)) => items,
            Some(Value::String(text)) => vec![json!({"role": "user", "content": text})],
            _ => Vec::new(),
        };
        input.push(json!({"role": "assistant", "content": sent}));
        input.push(json!({"role": "user", "content": CONTINUE}));
        body.insert("input".into(), Value::Array(input));
        if body.contains_key("tools") {
            body.insert("tool_choice".into(), Value::from("none"));
        }
        if let Some(n) = body.get("max_output_tokens").and_then(Value::as_u64) {
            body.insert(
                "max_output_tokens".into(),
                Value::from(n.saturating_sub(spent).max(16)),
            );
        }
        body
    }

    /// A resumed event as the answer's own: its response's id, its item, its sequence number,
    /// its trimmed text, and in `*.done` events and the final response, the whole text.
    fn rewrite(chunk: &Chunk, edit: Edit<'_>) -> String {
        let Ok(mut value) = serde_json::from_str::<Value>(&chunk.data) else {
            return chunk.data.clone();
        };
        if let Some(text) = edit.text
            && value.get("delta").is_some_and(Value::is_string)
        {
            value["delta"] = Value::from(text);
        }
        if let Some(n) = edit.sequence {
            value["sequence_number"] = Value::from(n);
        }
        if let Some(item) = edit.item {
            if value.get("item_id").is_some() {
                value["item_id"] = Value::from(item);
            }
            if let Some(id) = value.pointer_mut("/item/id") {
                *id = Value::from(item);
            }
        }
        if let Some(whole) = edit.whole {
            if value.get("text").is_some_and(Value::is_string) {
                value["text"] = Value::from(whole);
            }
            for pointer in ["/part/text", "/item/content/0/text"] {
                if let Some(text) = value.pointer_mut(pointer) {
                    *text = Value::from(whole);
                }
            }
        }
        if let Some(response) = value.get_mut("response").filter(|r| r.is_object()) {
            if let Some(id) = edit.id {
                response["id"] = Value::from(id);
            }
            if let Some(usage) = edit.usage {
                response["usage"] = usage.clone();
            }
            if let Some(Value::Array(output)) = response.get_mut("output") {
                for item in output.iter_mut().filter(|i| i["type"] == "message") {
                    if let Some(id) = edit.item {
                        item["id"] = Value::from(id);
                    }
                    if let Some(text) = item.pointer_mut("/content/0/text") {
                        // The final response's text is the whole answer.
                        if let Some(whole) = edit.whole.or(edit.text) {
                            *text = Value::from(whole);
                        }
                    }
                }
            }
        }
        value.to_string()
    }

    /// The rescuing stream's usage plus the broken ones': their output deltas, and for each
    /// its input as the rescuer counted it, less the partial answer and the instruction.
    fn usage(usage: &Value, spent: Spent) -> Value {
        let number = |field: &str| usage.get(field).and_then(Value::as_u64).unwrap_or(0);
        let own_input = number("input_tokens")
            .saturating_sub(spent.chunks + INSTRUCTION_TOKENS)
            .max(1);
        let input = number("input_tokens") + spent.broken * own_input;
        let output = number("output_tokens") + spent.chunks;
        let mut usage = usage.clone();
        usage["input_tokens"] = Value::from(input);
        usage["output_tokens"] = Value::from(output);
        usage["total_tokens"] = Value::from(input + output);
        usage
    }

    /// `event: <type>` and the data: Responses clients read the event's name.
    fn frame(data: &str) -> Bytes {
        let kind = serde_json::from_str::<Value>(data)
            .ok()
            .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned));
        match kind {
            Some(kind) => sse::named_event(&kind, data),
            None => sse::event(data),
        }
    }

    fn pins(body: &JsonBody) -> bool {
        stores(body)
    }
}

/// What is asked of a stored response, where it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredOp {
    /// `GET .../responses/{id}`.
    Get,
    /// `DELETE .../responses/{id}`.
    Delete,
    /// `GET .../responses/{id}/input_items`.
    InputItems,
}

/// The calls on a stored response: any JSON object from a 2xx is the answer, passed through.
pub struct Stored;

impl Kind for Stored {
    const ID: KindId = KindId::Responses;
    type Answer = Document;

    fn url(d: &Deployment) -> String {
        Responses::url(d)
    }

    fn answer(body: Bytes) -> Result<Document, Failure> {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(_)) => Ok(Document {
                id: None,
                tokens: None,
                raw: body,
            }),
            _ => Err(Failure::Transient(Transient::BadResponse)),
        }
    }

    fn tokens(_: &Document) -> Option<u64> {
        None
    }
}

/// Whether `id` has the shape of a response id (`resp_...`): letters, digits, `_` and `-`, so
/// that it can go into a URL path and a table key as it is.
pub fn is_response_id(id: &str) -> bool {
    id.len() > 5
        && id.len() <= 200
        && id.starts_with("resp")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::ApiStyle;

    #[test]
    fn a_response_is_an_answer_unless_it_failed() {
        let ok = br#"{"id":"resp_1","object":"response","status":"completed","output":[],"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}"#;
        let answer = Responses::answer(Bytes::from_static(ok)).unwrap();
        assert_eq!(answer.id.as_deref(), Some("resp_1"));
        assert_eq!(answer.tokens, Some(7));
        let incomplete = br#"{"id":"resp_2","status":"incomplete"}"#;
        assert!(Responses::answer(Bytes::from_static(incomplete)).is_ok());
        for bad in [
            &br#"{"id":"resp_3","status":"failed"}"#[..],
            b"{}",
            b"<html>",
        ] {
            assert!(matches!(
                Responses::answer(Bytes::copy_from_slice(bad)),
                Err(Failure::Transient(Transient::BadResponse))
            ));
        }
    }

    #[test]
    fn every_entry_is_called_on_its_resources_v1_api_with_the_deployment_as_model() {
        let mut d = Deployment {
            id: "a".into(),
            endpoint: "https://r.openai.azure.com".into(),
            deployment: "gpt-4o".into(),
            key: None,
            key_var: "K".into(),
            api: ApiStyle::Classic {
                api_version: "2024-10-21".into(),
            },
            priority: 0,
            weight: 1.0,
            context_window: None,
            serves: Default::default(),
            auth: Default::default(),
        };
        assert_eq!(
            Responses::url(&d),
            "https://r.openai.azure.com/openai/v1/responses"
        );
        assert_eq!(Responses::model(&d), Some("gpt-4o"));
        d.api = ApiStyle::V1;
        d.endpoint = "http://127.0.0.1:8000/v1".into();
        assert_eq!(Responses::url(&d), "http://127.0.0.1:8000/v1/responses");
    }

    #[test]
    fn response_ids_are_checked_before_they_reach_a_url() {
        assert!(is_response_id(
            "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
        ));
        for bad in [
            "",
            "resp_",
            "msg_123",
            "resp_../../x",
            "resp_a b",
            "resp_a?b=c",
        ] {
            assert!(!is_response_id(bad), "{bad}");
        }
    }
}
