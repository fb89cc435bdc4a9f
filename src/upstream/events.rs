//! A deployment's streamed answer, read: server-sent events (parsed by `eventsource-stream`)
//! told apart by what they are to an OpenAI client, and the opening read up to the first
//! content, which decides whether the stream is worth committing to.

use std::pin::Pin;

use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use reqwest::Response;
use serde_json::Value;

use crate::outcome::{Failure, Transient};
use crate::sse;

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// The events of one streamed answer.
pub struct EventStream(Events);

/// What one upstream event is to the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent {
    Done,
    /// Malformed, or one of Azure's own events (empty first event with prompt_filter_results,
    /// asynchronous filter results with `"id":""`) that OpenAI clients do not expect.
    Skip,
    /// The deployment's own error event: its JSON, to pass on.
    Error(String),
    /// A chunk to relay as it is: its JSON, whether it carries content, whether it finishes.
    Chunk {
        data: String,
        content: bool,
        finish: bool,
    },
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

/// A deployment's stream that has produced content and is ready to be relayed.
pub struct Opened {
    pub events: EventStream,
    /// Frames already read (the role chunk, the first content) to send before the rest.
    pub head: Vec<Bytes>,
    /// A `finish_reason` was seen: the answer is complete even if `[DONE]` never comes.
    pub finished: bool,
    /// `[DONE]` was seen: nothing more to read.
    pub done: bool,
}

/// Tells one event's data apart.
pub fn classify(data: &str) -> StreamEvent {
    if data.trim() == "[DONE]" {
        return StreamEvent::Done;
    }
    let Ok(Value::Object(event)) = serde_json::from_str::<Value>(data) else {
        return StreamEvent::Skip;
    };
    if event.contains_key("error") {
        return StreamEvent::Error(data.to_owned());
    }
    let choices = event.get("choices").and_then(Value::as_array);
    let has_usage = event.get("usage").is_some_and(|u| !u.is_null());
    if event.get("id").and_then(Value::as_str) == Some("") && !has_usage {
        return StreamEvent::Skip;
    }
    let (content, finish) = match choices {
        Some(choices) if !choices.is_empty() => (
            choices.iter().any(|c| {
                let delta = &c["delta"];
                delta["content"].as_str().is_some_and(|s| !s.is_empty())
                    || delta["refusal"].as_str().is_some_and(|s| !s.is_empty())
                    || !delta["tool_calls"].is_null()
                    || !delta["function_call"].is_null()
            }),
            choices.iter().any(|c| !c["finish_reason"].is_null()),
        ),
        _ if has_usage => (false, false),
        _ => return StreamEvent::Skip,
    };
    StreamEvent::Chunk {
        data: data.to_owned(),
        content,
        finish,
    }
}

/// Reads a fresh 2xx stream up to its first content (or its end, if it has none), keeping the
/// frames worth relaying. A stream that ends or errs before then is a failure of this attempt;
/// the caller bounds how long this may take.
pub(super) async fn first_content(mut events: EventStream) -> Result<Opened, Failure> {
    let mut head = Vec::new();
    loop {
        let (finished, done) = match events.next().await {
            Next::End | Next::Broken => return Err(Failure::Transient(Transient::Reset)),
            Next::Event(StreamEvent::Skip) => continue,
            Next::Event(StreamEvent::Error(_)) => {
                return Err(Failure::Transient(Transient::BadResponse));
            }
            // A complete answer with no content at all is still a complete answer.
            Next::Event(StreamEvent::Done) => {
                head.push(sse::done());
                (true, true)
            }
            Next::Event(StreamEvent::Chunk {
                data,
                content,
                finish,
            }) => {
                head.push(sse::event(&data));
                if !(content || finish) {
                    continue;
                }
                (finish, false)
            }
        };
        return Ok(Opened {
            events,
            head,
            finished,
            done,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &str, content: bool, finish: bool) -> StreamEvent {
        StreamEvent::Chunk {
            data: data.to_owned(),
            content,
            finish,
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
        let role = r#"{"id":"c1","choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(classify(role), chunk(role, false, false));
        let hi = r#"{"id":"c1","choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        assert_eq!(classify(hi), chunk(hi, true, false));
        let tool = r#"{"id":"c1","choices":[{"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}]}"#;
        assert_eq!(classify(tool), chunk(tool, true, false));
        let stop = r#"{"id":"c1","choices":[{"delta":{},"finish_reason":"stop"}]}"#;
        assert_eq!(classify(stop), chunk(stop, false, true));
        let usage = r#"{"id":"c1","choices":[],"usage":{"total_tokens":3}}"#;
        assert_eq!(classify(usage), chunk(usage, false, false));
        let error = r#"{"error":{"message":"boom"}}"#;
        assert_eq!(classify(error), StreamEvent::Error(error.to_owned()));
    }
}
