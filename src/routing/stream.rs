//! Streamed chat completions: fail over until a deployment's stream has produced its first
//! content, then relay its events to the caller, and never let a cut or stalled stream pass
//! for a finished answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;

use crate::attempt::Answer;
use crate::clock::Clock;
use crate::health::Event;
use crate::outcome::ChatBody;
use crate::pool::Route;
use crate::sse;
use crate::telemetry;
use crate::upstream::{Next, Opened, StreamEvent};

use super::engine::{Engine, RouteError};
use super::link::Writes;

/// After the final `finish_reason`, what is left (a usage event, `[DONE]`) must follow soon;
/// past this the stream is finalised without waiting for it.
const FINALISE_GRACE: Duration = Duration::from_secs(2);
/// Frames queued between the upstream reader and a slow caller.
const RELAY_BUFFER: usize = 64;

/// The event that ends an interrupted stream instead of `[DONE]`; OpenAI SDKs raise it as an error.
fn interrupted(deployment: &str, why: &str) -> Bytes {
    let message = format!(
        "The answer from deployment {deployment} was interrupted ({why}); it is incomplete. Retry the request."
    );
    sse::event(
        &json!({"error": {"message": message, "type": "server_error", "code": "stream_interrupted"}})
            .to_string(),
    )
}

impl<C: Clock> Engine<C> {
    /// Fails over until a deployment's stream produces content within the time-to-first-token
    /// limit, then relays it from a background task: the answer's output is the frames to send.
    /// Errors come back before any byte is sent.
    pub async fn stream(
        self: &Arc<Self>,
        route: &Route,
        body: &ChatBody,
        deadline: Instant,
    ) -> Result<Answer<mpsc::Receiver<Bytes>>, RouteError> {
        let first_token = self.settings.first_token_timeout;
        let mut writes = Writes::default();
        let opened = self
            .failover(route, deadline, &mut writes, |index, timeout| {
                self.upstream
                    .open_stream(&self.clock, index, body, timeout, first_token)
            })
            .await;
        let (index, answer) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                self.finish(writes).await;
                return Err(error);
            }
        };
        telemetry::answered(&answer.deployment, None);
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        let Answer {
            route,
            deployment,
            output: opened,
            attempts,
        } = answer;
        tokio::spawn(Arc::clone(self).relay(index, opened, deadline, writes, tx));
        Ok(Answer {
            route,
            deployment,
            output: rx,
            attempts,
        })
    }

    /// Relays the rest of the stream. A stream that ends (or stalls) after its `finish_reason`
    /// is finalised with `[DONE]`; one that is cut or stalls before it ends with an error event
    /// and no `[DONE]`, and counts as a failure of the deployment. The request's table writes
    /// finish before the stream ends (Lambda freezes the environment after it).
    async fn relay(
        self: Arc<Self>,
        index: usize,
        mut opened: Opened,
        deadline: Instant,
        mut writes: Writes,
        tx: mpsc::Sender<Bytes>,
    ) {
        let id = self.id(index).to_owned();
        for head in opened.head.drain(..) {
            if tx.send(head).await.is_err() {
                return self.finish(writes).await;
            }
        }
        let (mut finished, mut skipped) = (opened.finished, 0usize);
        let mut frames = 0usize;
        let ending = loop {
            if opened.done {
                break sse::done();
            }
            let wait = if finished {
                FINALISE_GRACE
            } else {
                self.settings.stream_idle_timeout
            };
            let remaining = self.remaining(deadline);
            let next = self
                .clock
                .timeout(wait.min(remaining), opened.events.next())
                .await;
            let why = match next {
                Some(Next::Event(StreamEvent::Done)) => break sse::done(),
                Some(Next::Event(StreamEvent::Skip)) => {
                    skipped += 1;
                    continue;
                }
                Some(Next::Event(StreamEvent::Error(data))) => {
                    // The deployment said why it stopped: pass that on, without [DONE].
                    self.interrupted(index, &id, "error event", frames, &mut writes);
                    break sse::event(&data);
                }
                Some(Next::Event(StreamEvent::Chunk { data, finish, .. })) => {
                    finished |= finish;
                    frames += 1;
                    if tx.send(sse::event(&data)).await.is_err() {
                        return self.finish(writes).await;
                    }
                    continue;
                }
                _ if finished => break sse::done(),
                Some(Next::End) => "the stream ended before the answer did",
                Some(Next::Broken) => "the connection broke mid-answer",
                None if remaining <= wait => "the request's deadline was reached",
                None => "no event within the stream idle timeout",
            };
            self.interrupted(index, &id, why, frames, &mut writes);
            break interrupted(&id, why);
        };
        if skipped > 0 {
            tracing::warn!(
                deployment = id,
                skipped,
                "skipped malformed or Azure-only stream events"
            );
        }
        // The caller may be gone already; the table still hears what happened.
        let _ = tx.send(ending).await;
        self.finish(writes).await;
        telemetry::flush(self.metrics.get().copied());
    }

    fn interrupted(&self, index: usize, id: &str, why: &str, frames: usize, writes: &mut Writes) {
        let change = self.health.record(index, Event::Failure, self.clock.now());
        self.publish(index, change, writes);
        tracing::warn!(
            deployment = id,
            outcome = "stream_interrupted",
            reason = why,
            frames_relayed = frames,
            "upstream stream interrupted after the answer had started"
        );
    }
}
