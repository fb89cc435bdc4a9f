//! Streamed chat completions: fail over until a deployment's stream has produced its first
//! content, then relay its events to the caller, and never let a cut or stalled stream pass
//! for a finished answer.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event as SseEvent, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use reqwest::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

use crate::App;
use crate::azure::{ChatBody, Outcome, Transient};
use crate::error::RequestError;
use crate::failover::{Attempt, Quota};
use crate::health::{Clock, Event};
use crate::pool::Route;
use crate::telemetry;

/// After the final `finish_reason`, what is left (a usage event, `[DONE]`) must follow soon;
/// past this the stream is finalised without waiting for it.
const FINALISE_GRACE: Duration = Duration::from_secs(2);
/// Frames queued between the upstream reader and a slow caller.
const RELAY_BUFFER: usize = 64;

type Events =
    Pin<Box<dyn Stream<Item = Result<SseEvent, EventStreamError<reqwest::Error>>> + Send>>;

/// A deployment's stream that has produced content and is ready to be relayed.
pub struct Opened {
    events: Events,
    /// Frames already read (the role chunk, the first content) to send before the rest.
    head: Vec<Bytes>,
    /// A `finish_reason` was seen: the answer is complete even if `[DONE]` never comes.
    finished: bool,
    /// `[DONE]` was seen: nothing more to read.
    done: bool,
}

/// A committed stream: who answers, how it was found, and the frames to send.
pub struct Streaming {
    pub deployment: String,
    pub attempts: Vec<Attempt>,
    pub frames: mpsc::Receiver<Bytes>,
}

/// What one upstream event is to the relay.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Done,
    /// Malformed, or one of Azure's own events (empty first event with prompt_filter_results,
    /// asynchronous filter results with `"id":""`) that OpenAI clients do not expect.
    Skip,
    Error,
    Chunk {
        content: bool,
        finish: bool,
    },
}

fn frame(data: &str) -> Frame {
    if data.trim() == "[DONE]" {
        return Frame::Done;
    }
    let Ok(Value::Object(event)) = serde_json::from_str::<Value>(data) else {
        return Frame::Skip;
    };
    if event.contains_key("error") {
        return Frame::Error;
    }
    let choices = event.get("choices").and_then(Value::as_array);
    let has_usage = event.get("usage").is_some_and(|u| !u.is_null());
    if event.get("id").and_then(Value::as_str) == Some("") && !has_usage {
        return Frame::Skip;
    }
    match choices {
        Some(choices) if !choices.is_empty() => {
            let content = choices.iter().any(|c| {
                let delta = &c["delta"];
                delta["content"].as_str().is_some_and(|s| !s.is_empty())
                    || delta["refusal"].as_str().is_some_and(|s| !s.is_empty())
                    || !delta["tool_calls"].is_null()
                    || !delta["function_call"].is_null()
            });
            let finish = choices.iter().any(|c| !c["finish_reason"].is_null());
            Frame::Chunk { content, finish }
        }
        _ if has_usage => Frame::Chunk {
            content: false,
            finish: false,
        },
        Some(_) => Frame::Skip,
        None => Frame::Skip,
    }
}

/// Server-sent events are `data: <payload>` and a blank line; relayed payloads are single-line
/// JSON, so this is the whole of the framing (parsing upstream events is eventsource-stream's).
fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// The event that ends an interrupted stream instead of `[DONE]`; OpenAI SDKs raise it as an error.
fn interrupted(deployment: &str, why: &str) -> Bytes {
    let message = format!(
        "The answer from deployment {deployment} was interrupted ({why}); it is incomplete. Retry the request."
    );
    sse(&json!({"error": {"message": message, "type": "server_error", "code": "stream_interrupted"}}).to_string())
}

impl<C: Clock> App<C> {
    /// Fails over until a deployment's stream produces content within the time-to-first-token
    /// limit, then relays it from a background task. Errors come back before any byte is sent.
    pub async fn stream(
        self: &Arc<Self>,
        route: &Route,
        body: &ChatBody,
        budget: Duration,
    ) -> Result<Streaming, RequestError> {
        let deadline = Instant::now() + budget;
        let (opened, index, attempts) = self
            .failover(route, budget, |index, deadline| {
                self.open(index, body, deadline)
            })
            .await?;
        telemetry::answered(&self.config.pool.deployments[index].id, None);
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        tokio::spawn(Arc::clone(self).relay(index, opened, deadline, tx));
        Ok(Streaming {
            deployment: self.config.pool.deployments[index].id.clone(),
            attempts,
            frames: rx,
        })
    }

    /// One deployment, until its first content: a failure before then is an ordinary failed
    /// attempt (with the one quick retry for a 500 or reset).
    async fn open(
        &self,
        index: usize,
        body: &ChatBody,
        deadline: Instant,
    ) -> (Attempt, Result<Opened, Outcome>) {
        let started = Instant::now();
        let mut retried = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let call_started = Instant::now();
            let first_token_by = call_started + self.config.first_token_timeout.min(remaining);
            let timeout = self.config.attempt_timeout.min(remaining);
            let (status, result) = match self
                .upstream
                .open_stream(index, body, timeout, self.clock.wall())
                .await
            {
                Err((status, outcome)) => (status, Err(outcome)),
                Ok(response) => (
                    Some(response.status().as_u16()),
                    first_content(response, first_token_by).await,
                ),
            };
            let settled = match &result {
                Ok((_, quota)) => Ok(*quota),
                Err(outcome) => Err(outcome),
            };
            let attempt = self.settle(index, status, settled, started, call_started, retried);
            if let Err(outcome) = &result
                && self.retry_once(index, outcome, retried, deadline)
            {
                retried = true;
                continue;
            }
            return (attempt, result.map(|(opened, _)| opened));
        }
    }

    /// Relays the rest of the stream. A stream that ends (or stalls) after its `finish_reason`
    /// is finalised with `[DONE]`; one that is cut or stalls before it ends with an error event
    /// and no `[DONE]`, and counts as a failure of the deployment.
    async fn relay(
        self: Arc<Self>,
        index: usize,
        mut opened: Opened,
        deadline: Instant,
        tx: mpsc::Sender<Bytes>,
    ) {
        let id = self.config.pool.deployments[index].id.clone();
        for head in opened.head.drain(..) {
            if tx.send(head).await.is_err() {
                return;
            }
        }
        let (mut finished, mut skipped) = (opened.finished, 0usize);
        let mut frames = 0usize;
        let ending = loop {
            if opened.done {
                break done();
            }
            let wait = if finished {
                FINALISE_GRACE
            } else {
                self.config.stream_idle_timeout
            };
            let by = (Instant::now() + wait).min(deadline);
            let next = timeout_at(by, opened.events.next()).await;
            let why = match next {
                Ok(Some(Ok(event))) => match frame(&event.data) {
                    Frame::Done => break done(),
                    Frame::Skip => {
                        skipped += 1;
                        continue;
                    }
                    Frame::Error => {
                        // The deployment said why it stopped: pass that on, without [DONE].
                        self.interrupted(index, &id, "error event", frames);
                        break sse(&event.data);
                    }
                    Frame::Chunk { finish, .. } => {
                        finished |= finish;
                        frames += 1;
                        if tx.send(sse(&event.data)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                },
                _ if finished => break done(),
                Ok(None) => "the stream ended before the answer did",
                Ok(Some(Err(_))) => "the connection broke mid-answer",
                Err(_) if by == deadline => "the request's deadline was reached",
                Err(_) => "no event within the stream idle timeout",
            };
            self.interrupted(index, &id, why, frames);
            break interrupted(&id, why);
        };
        if skipped > 0 {
            tracing::warn!(
                deployment = id,
                skipped,
                "skipped malformed or Azure-only stream events"
            );
        }
        // The caller may be gone already; nothing more to do then.
        let _ = tx.send(ending).await;
        telemetry::flush(self.metrics);
    }

    fn interrupted(&self, index: usize, id: &str, why: &str, frames: usize) {
        self.health.record(index, Event::Failure, self.clock.now());
        tracing::warn!(
            deployment = id,
            outcome = "stream_interrupted",
            reason = why,
            frames_relayed = frames,
            "upstream stream interrupted after the answer had started"
        );
    }
}

/// Reads a fresh 2xx stream up to its first content (or its end, if it has none), keeping the
/// frames worth relaying. Anything else before `by` is a failure of this attempt.
async fn first_content(response: Response, by: Instant) -> Result<(Opened, Quota), Outcome> {
    let number = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    };
    let quota = Quota {
        remaining_requests: number("x-ratelimit-remaining-requests"),
        remaining_tokens: number("x-ratelimit-remaining-tokens"),
    };
    let mut events: Events = Box::pin(response.bytes_stream().eventsource());
    let mut head = Vec::new();
    loop {
        let event = match timeout_at(by, events.next()).await {
            Err(_) => return Err(Outcome::Transient(Transient::FirstTokenTimeout)),
            Ok(None) | Ok(Some(Err(_))) => return Err(Outcome::Transient(Transient::Reset)),
            Ok(Some(Ok(event))) => event,
        };
        let (finished, done) = match frame(&event.data) {
            Frame::Skip => continue,
            Frame::Error => return Err(Outcome::Transient(Transient::BadResponse)),
            // A complete answer with no content at all is still a complete answer.
            Frame::Done => {
                head.push(done());
                (true, true)
            }
            Frame::Chunk { content, finish } => {
                head.push(sse(&event.data));
                if !(content || finish) {
                    continue;
                }
                (finish, false)
            }
        };
        let opened = Opened {
            events,
            head,
            finished,
            done,
        };
        return Ok((opened, quota));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_told_apart() {
        assert_eq!(frame("[DONE]"), Frame::Done);
        assert_eq!(
            frame(r#"{"choices":[{"delta":{"content": BROKEN"#),
            Frame::Skip
        );
        assert_eq!(frame(r#"{"unexpected":true}"#), Frame::Skip);
        assert_eq!(
            frame(
                r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[]}"#
            ),
            Frame::Skip,
            "Azure's empty first event"
        );
        assert_eq!(
            frame(r#"{"choices":[{"index":0,"delta":{},"content_filter_offsets":{}}],"id":""}"#),
            Frame::Skip,
            "Azure's asynchronous filter event"
        );
        assert_eq!(
            frame(
                r#"{"id":"c1","choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#
            ),
            Frame::Chunk {
                content: false,
                finish: false
            }
        );
        assert_eq!(
            frame(r#"{"id":"c1","choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#),
            Frame::Chunk {
                content: true,
                finish: false
            }
        );
        assert_eq!(
            frame(
                r#"{"id":"c1","choices":[{"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}]}"#
            ),
            Frame::Chunk {
                content: true,
                finish: false
            }
        );
        assert_eq!(
            frame(r#"{"id":"c1","choices":[{"delta":{},"finish_reason":"stop"}]}"#),
            Frame::Chunk {
                content: false,
                finish: true
            }
        );
        assert_eq!(
            frame(r#"{"id":"c1","choices":[],"usage":{"total_tokens":3}}"#),
            Frame::Chunk {
                content: false,
                finish: false
            }
        );
        assert_eq!(frame(r#"{"error":{"message":"boom"}}"#), Frame::Error);
    }
}
