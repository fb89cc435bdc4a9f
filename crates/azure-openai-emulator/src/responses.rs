//! The Responses API's wire shapes: a `response` object with one message output, its named
//! stream events, the stored responses of a resource (`previous_response_id`, `GET`,
//! `DELETE`, `input_items`) and their errors. An answer reads as chat's does
//! (`[<deployment>] You said: <last user input>`), and a response that continues a stored
//! conversation says how many turns it remembers, so tests can tell history was there.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::wire::{self, Conversation, Reply, random_u64, unix_now, word_count};

/// A response the resource keeps: the object, its input items, and the whole conversation up
/// to it (for the next turn).
#[derive(Clone, Debug)]
pub(crate) struct StoredResponse {
    pub response: Value,
    pub input_items: Vec<Value>,
    pub history: Vec<Value>,
}

/// A response made for one request.
pub(crate) struct Made {
    pub id: String,
    pub item_id: String,
    pub text: String,
    /// The `response` object as `response.completed` carries it (and `GET` returns it).
    pub response: Value,
    pub input_items: Vec<Value>,
    pub history: Vec<Value>,
}

/// The request's input as items: a string is one user message.
pub(crate) fn input_items(body: &Value) -> Vec<Value> {
    match body.get("input") {
        Some(Value::String(text)) => vec![json!({
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        })],
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    }
}

/// What a request must carry, as Azure checks it: something to answer, and a
/// `previous_response_id` this resource stores.
pub(crate) fn check(body: Option<&Value>, stored: impl Fn(&str) -> bool) -> Result<(), Reply> {
    let Some(body) = body.filter(|b| b.is_object()) else {
        return Err(wire::bad_request(
            "We could not parse the JSON body of your request.",
            "input",
        ));
    };
    let previous = body.get("previous_response_id").and_then(Value::as_str);
    if let Some(id) = previous
        && !stored(id)
    {
        return Err(not_found_reply(
            StatusCode::BAD_REQUEST,
            &format!("Previous response with id '{id}' not found."),
            Some("previous_response_id"),
            Some("previous_response_not_found"),
        ));
    }
    if input_items(body).is_empty() && previous.is_none() {
        return Err(wire::bad_request(
            "Missing required parameter: 'input'.",
            "input",
        ));
    }
    Ok(())
}

/// `deployment`'s response to `body`, after `history` (the stored conversation it continues).
pub(crate) fn make(
    deployment: &str,
    model: &str,
    body: &Value,
    history: Vec<Value>,
    deployments: &[String],
    overlap: usize,
) -> Made {
    let input = input_items(body);
    let mut conversation: Vec<Value> = history.clone();
    conversation.extend(input.iter().cloned());
    let asked = Conversation::read(&conversation, deployments);
    let mut text = asked.answer(deployment, deployments, overlap);
    let turns = history
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .count();
    if turns > 0 {
        text.push_str(&format!(" (remembering {turns} earlier turns)"));
    }
    let id = format!("resp_{:016x}{:016x}", random_u64(), random_u64());
    let item_id = format!("msg_{:016x}{:016x}", random_u64(), random_u64());
    let input_tokens: u64 = conversation
        .iter()
        .map(|m| word_count(&wire::content_text(m.get("content"))) + 3)
        .sum();
    let output_tokens = word_count(&text);
    let message = json!({
        "type": "message",
        "id": item_id,
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    });
    let response = json!({
        "id": id,
        "object": "response",
        "created_at": unix_now(),
        "status": "completed",
        "model": model,
        "previous_response_id": body.get("previous_response_id").cloned().unwrap_or(Value::Null),
        "store": body.get("store").cloned().unwrap_or(Value::Bool(true)),
        "output": [message],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    });
    let mut history = conversation;
    history.push(json!({"role": "assistant", "content": text}));
    Made {
        id,
        item_id,
        text,
        response,
        input_items: input,
        history,
    }
}

impl Made {
    /// Whether the request asked to keep it (the default).
    pub fn stored(body: &Value) -> bool {
        body.get("store") != Some(&Value::Bool(false))
    }

    pub fn keep(&self) -> StoredResponse {
        StoredResponse {
            response: self.response.clone(),
            input_items: self.input_items.clone(),
            history: self.history.clone(),
        }
    }

    /// The 200 of a request that was not streamed. Azure's Responses API reports its
    /// rate-limit headers as -1.
    pub fn reply(&self) -> Reply {
        Reply {
            status: StatusCode::OK,
            headers: vec![
                ("x-ratelimit-remaining-requests", "-1".into()),
                ("x-ratelimit-remaining-tokens", "-1".into()),
            ],
            body: self.response.to_string(),
        }
    }

    /// The stream's events, framed (`event:` and `data:`), numbered from 0: the preamble, one
    /// text delta per word, then the closing events and `response.completed`.
    pub fn events(&self) -> ResponseEvents {
        let mut n = 0u64;
        let mut frame = |mut event: Value| {
            event["sequence_number"] = Value::from(n);
            n += 1;
            let kind = event["type"].as_str().unwrap_or_default().to_owned();
            format!("event: {kind}\ndata: {event}\n\n")
        };
        let mut pending = self.response.clone();
        pending["status"] = Value::from("in_progress");
        pending["output"] = json!([]);
        pending["usage"] = Value::Null;
        let item = |status: &str, text: &str| {
            json!({"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                   "content": if text.is_empty() { json!([]) } else { json!([{"type": "output_text", "text": text, "annotations": []}]) }})
        };
        let preamble = vec![
            frame(json!({"type": "response.created", "response": pending})),
            frame(json!({"type": "response.in_progress", "response": pending})),
            frame(
                json!({"type": "response.output_item.added", "output_index": 0, "item": item("in_progress", "")}),
            ),
            frame(
                json!({"type": "response.content_part.added", "item_id": self.item_id, "output_index": 0, "content_index": 0,
                         "part": {"type": "output_text", "text": "", "annotations": []}}),
            ),
        ];
        let deltas = wire::words_with_spaces(&self.text)
            .into_iter()
            .map(|word| {
                frame(
                    json!({"type": "response.output_text.delta", "item_id": self.item_id,
                             "output_index": 0, "content_index": 0, "delta": word}),
                )
            })
            .collect();
        let closing = vec![
            frame(
                json!({"type": "response.output_text.done", "item_id": self.item_id, "output_index": 0, "content_index": 0, "text": self.text}),
            ),
            frame(
                json!({"type": "response.content_part.done", "item_id": self.item_id, "output_index": 0, "content_index": 0,
                         "part": {"type": "output_text", "text": self.text, "annotations": []}}),
            ),
            frame(
                json!({"type": "response.output_item.done", "output_index": 0, "item": item("completed", &self.text)}),
            ),
            frame(json!({"type": "response.completed", "response": self.response})),
        ];
        let error = frame(json!({"type": "error", "code": "server_error",
            "message": "The server had an error processing your request. Sorry about that!", "param": null}));
        ResponseEvents {
            preamble,
            deltas,
            closing,
            error,
        }
    }
}

/// A response's stream, framed.
pub(crate) struct ResponseEvents {
    pub preamble: Vec<String>,
    pub deltas: Vec<String>,
    pub closing: Vec<String>,
    /// An `error` event, for the behaviours that fail mid-stream.
    pub error: String,
}

/// Azure's (OpenAI's) answer for an id it does not store.
pub(crate) fn not_found_reply(
    status: StatusCode,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})
            .to_string(),
    }
}

/// `GET .../responses/{id}` and its `input_items`, `DELETE`.
pub(crate) fn stored_reply(op: StoredOp, id: &str, stored: Option<StoredResponse>) -> Reply {
    let Some(stored) = stored else {
        return not_found_reply(
            StatusCode::NOT_FOUND,
            &format!("Response with id '{id}' not found."),
            None,
            None,
        );
    };
    let body = match op {
        StoredOp::Get => stored.response,
        StoredOp::Delete => json!({"id": id, "object": "response", "deleted": true}),
        StoredOp::InputItems => {
            let first = stored
                .input_items
                .first()
                .and_then(|i| i.get("id"))
                .cloned();
            let last = stored.input_items.last().and_then(|i| i.get("id")).cloned();
            json!({"object": "list", "data": stored.input_items, "first_id": first, "last_id": last, "has_more": false})
        }
    };
    Reply {
        status: StatusCode::OK,
        headers: Vec::new(),
        body: body.to_string(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoredOp {
    Get,
    Delete,
    InputItems,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follow_up_remembers_the_turns_before_it() {
        let deployments = vec!["a".to_owned()];
        let first = make(
            "a",
            "gpt-4o",
            &json!({"input": "hi"}),
            Vec::new(),
            &deployments,
            0,
        );
        assert_eq!(first.text, "[a] You said: hi");
        let second = make(
            "a",
            "gpt-4o",
            &json!({"input": "and then?", "previous_response_id": first.id}),
            first.history.clone(),
            &deployments,
            0,
        );
        assert_eq!(
            second.text,
            "[a] You said: and then? (remembering 1 earlier turns)"
        );
        let events = second.events();
        assert_eq!(events.preamble.len(), 4);
        assert!(events.preamble[0].starts_with("event: response.created\ndata: "));
        assert!(events.closing[3].contains("\"sequence_number\""));
    }
}
