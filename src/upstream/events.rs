//! A deployment's streamed answer, read: server-sent events (parsed by `eventsource-stream`)
//! told apart by what they are to an OpenAI client, and the opening read up to the first
//! content, which decides whether the stream is worth committing to.

use std::pin::Pin;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use reqwest::Response;
use serde_json::Value;

use crate::outcome::{ContentFilter, Failure, Transient};

use super::wire::refusal;

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// The events of one streamed answer.
pub struct EventStream(Events);

/// What one upstream event is to the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Done,
    /// Malformed, or one of Azure's own events (empty first event with prompt_filter_results,
    /// asynchronous filter results with `"id":""`) that OpenAI clients do not expect.
    Skip,
    /// The deployment's safety system stopped the answer: its error event, to pass on as sent.
    Refused {
        data: String,
        filter: ContentFilter,
    },
    /// Another error event: the deployment stopped for its own reasons (its JSON).
    Error(String),
    Chunk(Chunk),
}

/// A chunk of the answer, to relay.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Its JSON, as sent.
    pub data: String,
    /// The text it adds to the answer (the first choice's `delta.content`).
    pub text: String,
    /// It carries content: text, a refusal, a tool call.
    pub content: bool,
    /// Its `finish_reason`, when it has one.
    pub finish: Option<String>,
    /// It carries what a continuation cannot take over: a tool call, a refusal, several choices,
    /// log probabilities.
    pub opaque: bool,
    /// Its `usage` object, when it has one.
    pub usage: Option<Value>,
}

/// What reading the next event came to.
#[derive(Debug)]
pub enum Next {
    Event(StreamEvent),
    /// The body ended.
    End,
    /// The connection broke.
    Broken,
}

impl EventStream {
    pub(super) fn new(response: Response) -> Self {
        Self(Box::pin(response.bytes_stream().eventsource()))
    }

    pub async fn next(&mut self) -> Next {
        match self.0.next().await {
            None => Next::End,
            Some(Err(_)) => Next::Broken,
            Some(Ok(event)) => Next::Event(classify(&event.data)),
        }
    }
}

/// A deployment's stream that has produced content (or finished), ready to be relayed.
pub struct Opened {
    pub events: EventStream,
    /// The events read so far, worth relaying: chunks up to the first content, or `[DONE]`.
    pub head: Vec<StreamEvent>,
}

/// Tells one event's data apart.
pub fn classify(data: &str) -> StreamEvent {
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
    if value.get("id").and_then(Value::as_str) == Some("") && usage.is_none() {
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
        data: data.to_owned(),
        text,
        content,
        finish,
        opaque,
        usage,
    })
}

/// Reads a fresh 2xx stream up to its first content (or its end, if it has none), keeping the
/// events worth relaying. A stream that ends or errs before then is a failure of this attempt,
/// and a refusal is the deployment's answer; the caller bounds how long this may take.
pub(super) async fn first_content(mut events: EventStream) -> Result<Opened, Failure> {
    let mut head = Vec::new();
    loop {
        let event = match events.next().await {
            Next::End | Next::Broken => return Err(Failure::Transient(Transient::Reset)),
            Next::Event(event) => event,
        };
        let opened = match &event {
            StreamEvent::Skip => continue,
            StreamEvent::Refused { filter, .. } => {
                return Err(Failure::ContentFiltered(Box::new(filter.clone())));
            }
            StreamEvent::Error(_) => return Err(Failure::Transient(Transient::BadResponse)),
            // A complete answer with no content at all is still a complete answer.
            StreamEvent::Done => true,
            StreamEvent::Chunk(chunk) => chunk.content || chunk.finish.is_some(),
        };
        head.push(event);
        if opened {
            return Ok(Opened { events, head });
        }
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
        assert_eq!(usage.usage, Some(serde_json::json!({"total_tokens": 3})));
        let error = r#"{"error":{"message":"boom"}}"#;
        assert_eq!(classify(error), StreamEvent::Error(error.to_owned()));
        assert!(matches!(
            classify(r#"{"error":{"message":"no","code":"content_filter"}}"#),
            StreamEvent::Refused { filter, .. } if filter.code == "content_filter"
        ));
    }
}
