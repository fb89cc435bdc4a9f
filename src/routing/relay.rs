//! Relaying a committed stream, and rescuing it. A stream that is cut, stalls past
//! `STREAM_IDLE_TIMEOUT_MS` or ends without a `finish_reason` after its first content is
//! continued on the next deployment the route would choose: the original messages plus the text
//! already sent as a partial assistant answer and a short instruction to go on, its first words
//! trimmed where they repeat the end of what was sent, its chunks relayed as further chunks of
//! the same stream. A continuation that is refused is tried once more as the original request
//! restarted, used only if its text begins with exactly what was sent. What cannot be continued
//! (a tool call, several choices, log probabilities), or cannot be within the deadline and the
//! number of continuations allowed, ends with the honest `stream_interrupted` error that names
//! the original failure. Behind a buffered front (API Gateway) nothing has reached the caller
//! yet, so an answer that cannot be continued is restarted whole on the next deployment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::attempt::{Answer, Attempt};
use crate::clock::Clock;
use crate::health::Event;
use crate::outcome::{ChatBody, total_tokens};
use crate::pool::Route;
use crate::sse;
use crate::telemetry;
use crate::upstream::{Chunk, Next, Opened, StreamEvent};

use super::engine::{Engine, RouteError};
use super::failover::MIN_ATTEMPT;
use super::link::Writes;
use super::splice::{self, Join};

/// After the final `finish_reason`, what is left (a usage event, `[DONE]`) must follow soon;
/// past this the stream is finalised without waiting for it.
const FINALISE_GRACE: Duration = Duration::from_secs(2);
/// Frames queued between the upstream reader and a slow caller.
const RELAY_BUFFER: usize = 64;
/// Appended (after the partial answer) to ask another deployment to continue it. A trailing
/// assistant message alone is not continued by OpenAI-format models (they start a new answer)
/// and is refused by models that want the conversation to end with a user message; an
/// instruction after it works with both.
const CONTINUE: &str = "Continue your previous answer exactly where it stopped, even in the middle of a word or sentence. Write only the rest of it: do not repeat anything you already wrote and add nothing before it.";
/// About what the instruction and its framing cost in prompt tokens, for the usage estimate.
const INSTRUCTION_TOKENS: u64 = 40;

/// How the caller receives the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// As they come (Lambda response streaming).
    Streamed,
    /// All at once, at the end (API Gateway, ALB): a broken answer can still be replaced.
    Buffered,
}

/// A stream being relayed: its frames, and, once it has ended, what became of it.
pub struct Streamed {
    pub frames: mpsc::Receiver<Bytes>,
    pub report: oneshot::Receiver<StreamReport>,
}

/// What became of a relayed stream.
#[derive(Debug, Clone)]
pub struct StreamReport {
    /// Every deployment that produced part of the answer, in order.
    pub deployments: Vec<String>,
    /// The attempts made to continue (or restart) it.
    pub attempts: Vec<Attempt>,
    /// `done`, `refused` (the provider's safety system stopped it), `interrupted`, or `gone`
    /// (the caller left).
    pub ending: &'static str,
    /// `usage.total_tokens`, both deployments' when the caller asked for usage.
    pub tokens: Option<u64>,
}

/// Where the frames go.
enum Output {
    Streamed(mpsc::Sender<Bytes>),
    Buffered {
        tx: mpsc::Sender<Bytes>,
        held: Vec<Bytes>,
    },
}

impl Output {
    /// False when the caller is gone.
    async fn send(&mut self, frame: Bytes) -> bool {
        match self {
            Output::Streamed(tx) => tx.send(frame).await.is_ok(),
            Output::Buffered { held, .. } => {
                held.push(frame);
                true
            }
        }
    }

    /// Forgets what was relayed, when the caller has not seen it yet.
    fn discard(&mut self) -> bool {
        match self {
            Output::Streamed(_) => false,
            Output::Buffered { held, .. } => {
                held.clear();
                true
            }
        }
    }

    /// Hands over what is held; the body ends when this returns.
    async fn close(self) {
        if let Output::Buffered { tx, held } = self {
            for frame in held {
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// How the current stream's text joins the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Joining {
    /// Relayed as it comes.
    Direct,
    /// A continuation: its first words may repeat the end of the answer.
    Continuation,
    /// The original request restarted: usable if it begins with exactly what was sent.
    Restart,
}

/// The stream being read.
struct Current {
    index: usize,
    opened: Opened,
    joining: Joining,
    /// Not the stream the answer began with: its chunks take the answer's id, its role chunk
    /// is not news.
    resumed: bool,
    /// Chunks held while the join is decided, and their text.
    pending: Vec<Chunk>,
    pending_text: String,
    /// Content chunks relayed from this stream.
    relayed: u64,
}

/// How a stream ended.
enum Ending {
    Done,
    /// The caller is gone.
    Gone,
    /// The provider's safety system stopped it: its error event.
    Refused(String),
    /// A restart went another way than what was sent.
    Diverged,
    Broken {
        why: &'static str,
        /// The deployment's own error event, when it sent one.
        event: Option<String>,
        stalled: bool,
    },
}

/// The relay of one request's stream.
pub struct Relay<C: Clock> {
    engine: Arc<Engine<C>>,
    route: Route,
    body: ChatBody,
    deadline: Instant,
    out: Output,
    report: Option<oneshot::Sender<StreamReport>>,
    writes: Writes,
    /// The answer's text so far, as relayed.
    sent: String,
    /// A tool call, a refusal, several choices or log probabilities were relayed.
    opaque: bool,
    /// The answer's chunk id (its first stream's).
    id: Option<String>,
    deployments: Vec<String>,
    /// Deployments whose stream broke, not asked again.
    failed: Vec<usize>,
    attempts: Vec<Attempt>,
    resumes: u32,
    /// The first break: the deployment, why, and its own error event if any.
    cut: Option<(String, &'static str, Option<String>)>,
    /// Content chunks the broken streams produced (about one token each, as Azure streams).
    spent_tokens: u64,
    tokens: Option<u64>,
    skipped: usize,
}

impl<C: Clock> Relay<C> {
    pub fn new(
        engine: Arc<Engine<C>>,
        route: Route,
        body: ChatBody,
        deadline: Instant,
        delivery: Delivery,
        writes: Writes,
    ) -> (Self, Streamed) {
        let (tx, frames) = mpsc::channel(RELAY_BUFFER);
        let (report, reported) = oneshot::channel();
        let out = match delivery {
            Delivery::Streamed => Output::Streamed(tx),
            Delivery::Buffered => Output::Buffered {
                tx,
                held: Vec::new(),
            },
        };
        // Several choices or log probabilities cannot be continued as one text.
        let opaque = body.get("n").and_then(Value::as_u64).unwrap_or(1) > 1
            || body.get("logprobs") == Some(&Value::Bool(true));
        let relay = Self {
            engine,
            route,
            body,
            deadline,
            out,
            report: Some(report),
            writes,
            sent: String::new(),
            opaque,
            id: None,
            deployments: Vec::new(),
            failed: Vec::new(),
            attempts: Vec::new(),
            resumes: 0,
            cut: None,
            spent_tokens: 0,
            tokens: None,
            skipped: 0,
        };
        (
            relay,
            Streamed {
                frames,
                report: reported,
            },
        )
    }

    /// Relays deployment `index`'s opened stream (and its rescuers') to the end.
    pub async fn run(mut self, index: usize, opened: Opened) {
        self.deployments.push(self.engine.id(index).to_owned());
        let mut current = Current {
            index,
            opened,
            joining: Joining::Direct,
            resumed: false,
            pending: Vec::new(),
            pending_text: String::new(),
            relayed: 0,
        };
        let ending = loop {
            match self.pump(&mut current).await {
                Ending::Broken {
                    why,
                    event,
                    stalled,
                } => {
                    self.broke(&current, why, event.clone(), stalled);
                    match self.resume().await {
                        Some(next) => current = next,
                        None => {
                            break Ending::Broken {
                                why,
                                event,
                                stalled,
                            };
                        }
                    }
                }
                Ending::Diverged => {
                    self.failed.push(current.index);
                    break Ending::Diverged;
                }
                Ending::Refused(data) => {
                    let change = self.engine.health.record(
                        current.index,
                        Event::Refused,
                        self.engine.clock.now(),
                    );
                    self.engine.publish(current.index, change, &mut self.writes);
                    break Ending::Refused(data);
                }
                other => break other,
            }
        };
        let (last, name) = match &ending {
            Ending::Done => (Some(sse::done()), "done"),
            Ending::Refused(data) => (Some(sse::event(data)), "refused"),
            Ending::Gone => (None, "gone"),
            Ending::Diverged | Ending::Broken { .. } => (Some(self.interrupted()), "interrupted"),
        };
        if self.skipped > 0 {
            tracing::warn!(
                deployments = self.deployments.join(" "),
                skipped = self.skipped,
                "skipped malformed or Azure-only stream events"
            );
        }
        if let Some(report) = self.report.take() {
            let _ = report.send(StreamReport {
                deployments: self.deployments.clone(),
                attempts: std::mem::take(&mut self.attempts),
                ending: name,
                tokens: self.tokens,
            });
        }
        // The caller may be gone already; the table still hears what happened. Its writes
        // finish before the body ends: Lambda freezes the environment after it.
        if let Some(last) = last {
            self.out.send(last).await;
        }
        let Self {
            engine,
            out,
            writes,
            ..
        } = self;
        engine.finish(writes).await;
        out.close().await;
        telemetry::flush(engine.metrics.get().copied());
    }

    /// Relays `current` until it ends, one way or another.
    async fn pump(&mut self, current: &mut Current) -> Ending {
        let mut head = std::mem::take(&mut current.opened.head).into_iter();
        let mut finished = false;
        loop {
            let next = match head.next() {
                Some(event) => Some(Next::Event(event)),
                None => {
                    let wait = if finished {
                        FINALISE_GRACE
                    } else {
                        self.engine.settings.stream_idle_timeout
                    };
                    let remaining = self.engine.remaining(self.deadline);
                    let next = self
                        .engine
                        .clock
                        .timeout(wait.min(remaining), current.opened.events.next())
                        .await;
                    if next.is_none() && !finished {
                        let why = if remaining <= wait {
                            "the request's deadline was reached"
                        } else {
                            "no event within the stream idle timeout"
                        };
                        return Ending::Broken {
                            why,
                            event: None,
                            stalled: true,
                        };
                    }
                    next
                }
            };
            let chunk = match next {
                None | Some(Next::Event(StreamEvent::Done)) => return self.settle(current).await,
                Some(Next::End | Next::Broken) if finished => return self.settle(current).await,
                Some(Next::End) => {
                    return Ending::Broken {
                        why: "the stream ended before the answer did",
                        event: None,
                        stalled: false,
                    };
                }
                Some(Next::Broken) => {
                    return Ending::Broken {
                        why: "the connection broke mid-answer",
                        event: None,
                        stalled: false,
                    };
                }
                Some(Next::Event(StreamEvent::Skip)) => {
                    self.skipped += 1;
                    continue;
                }
                Some(Next::Event(StreamEvent::Refused { data, .. })) => {
                    return Ending::Refused(data);
                }
                Some(Next::Event(StreamEvent::Error(data))) => {
                    return Ending::Broken {
                        why: "the deployment sent an error event",
                        event: Some(data),
                        stalled: false,
                    };
                }
                Some(Next::Event(StreamEvent::Chunk(chunk))) => chunk,
            };
            finished |= chunk.finish.is_some();
            if let Err(ending) = self.take(current, chunk).await {
                return ending;
            }
        }
    }

    /// The stream ended after its answer: whatever is held is decided now.
    async fn settle(&mut self, current: &mut Current) -> Ending {
        if current.joining != Joining::Direct
            && let Err(ending) = self.join(current, true).await
        {
            return ending;
        }
        Ending::Done
    }

    /// One chunk of `current`: relayed, or held while its join is decided.
    async fn take(&mut self, current: &mut Current, chunk: Chunk) -> Result<(), Ending> {
        if current.joining == Joining::Direct {
            return self.emit(current, chunk).await;
        }
        let finished = chunk.finish.is_some();
        current.pending_text.push_str(&chunk.text);
        current.pending.push(chunk);
        self.join(current, finished).await
    }

    /// Decides how the held chunks join the answer, once they can tell.
    async fn join(&mut self, current: &mut Current, finished: bool) -> Result<(), Ending> {
        let decision = match current.joining {
            Joining::Direct => return Ok(()),
            Joining::Continuation => {
                splice::continuation(&self.sent, &current.pending_text, finished)
            }
            Joining::Restart => splice::restart(&self.sent, &current.pending_text, finished),
        };
        let mut skip = match decision {
            Join::Wait => return Ok(()),
            Join::Diverged => return Err(Ending::Diverged),
            Join::Trim(n) => n,
        };
        current.joining = Joining::Direct;
        current.pending_text.clear();
        for mut chunk in std::mem::take(&mut current.pending) {
            if skip > 0 && !chunk.text.is_empty() {
                let cut = skip.min(chunk.text.len());
                chunk.text = chunk.text[cut..].to_owned();
                skip -= cut;
                chunk.content = !chunk.text.is_empty();
                chunk.data = rewrite(&chunk.data, None, Some(&chunk.text), None);
            }
            self.emit(current, chunk).await?;
        }
        Ok(())
    }

    /// Relays one chunk.
    async fn emit(&mut self, current: &mut Current, chunk: Chunk) -> Result<(), Ending> {
        if current.resumed && !chunk.content && chunk.finish.is_none() && chunk.usage.is_none() {
            // A resumed stream's role chunk (or what trimming emptied): not news.
            return Ok(());
        }
        self.opaque |= chunk.opaque;
        if self.id.is_none() {
            self.id = chunk_id(&chunk.data);
        }
        self.sent.push_str(&chunk.text);
        if chunk.content {
            current.relayed += 1;
        }
        let usage = chunk.usage.as_ref().map(|usage| {
            if self.deployments.len() > 1 {
                self.with_spent(usage)
            } else {
                usage.clone()
            }
        });
        if let Some(usage) = &usage {
            self.tokens = total_tokens(Some(usage));
        }
        let data = if current.resumed {
            rewrite(&chunk.data, self.id.as_deref(), None, usage.as_ref())
        } else {
            chunk.data
        };
        if self.out.send(sse::event(&data)).await {
            Ok(())
        } else {
            Err(Ending::Gone)
        }
    }

    /// `usage` of a rescuing stream, plus an estimate of what the broken ones used: their
    /// content chunks (about a token each) and, for each, the prompt as the rescuer counted
    /// it, less the partial answer and the instruction a continuation adds.
    fn with_spent(&self, usage: &Value) -> Value {
        let number = |field: &str| usage.get(field).and_then(Value::as_u64).unwrap_or(0);
        let broken = (self.deployments.len() - 1) as u64;
        let own_prompt = number("prompt_tokens")
            .saturating_sub(self.spent_tokens + INSTRUCTION_TOKENS)
            .max(1);
        let prompt = number("prompt_tokens") + broken * own_prompt;
        let completion = number("completion_tokens") + self.spent_tokens;
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }

    /// Records a break of `current`'s stream.
    fn broke(
        &mut self,
        current: &Current,
        why: &'static str,
        event: Option<String>,
        stalled: bool,
    ) {
        let id = self.engine.id(current.index).to_owned();
        let now = self.engine.clock.now();
        let health = if stalled {
            Event::TimedOut
        } else {
            Event::Failure
        };
        let change = self.engine.health.record(current.index, health, now);
        self.engine.publish(current.index, change, &mut self.writes);
        self.failed.push(current.index);
        self.spent_tokens += current.relayed;
        telemetry::interrupted(&id);
        tracing::warn!(
            deployment = id,
            outcome = "stream_interrupted",
            reason = why,
            frames_relayed = current.relayed,
            "upstream stream interrupted after the answer had started"
        );
        if self.cut.is_none() {
            self.cut = Some((id, why, event));
        }
    }

    /// Another deployment's stream to go on with, if the answer can be rescued.
    async fn resume(&mut self) -> Option<Current> {
        let allowed = self.engine.settings.continuations;
        if self.resumes >= allowed || self.engine.remaining(self.deadline) < MIN_ATTEMPT {
            return None;
        }
        self.resumes += 1;
        if !self.opaque && !self.sent.is_empty() {
            let body = continuation(&self.body, &self.sent, self.spent_tokens);
            let opened = self
                .engine
                .open(
                    &self.route,
                    &body,
                    self.deadline,
                    &self.failed,
                    &mut self.writes,
                )
                .await;
            match opened {
                Ok((index, answer)) => {
                    return Some(self.resumed(index, answer, Joining::Continuation));
                }
                // Refused as a continuation: the original request may still do.
                Err(RouteError::Unavailable(exhausted)) if exhausted.refusal().is_some() => {
                    self.attempts.extend(exhausted.attempts);
                }
                Err(error) => {
                    self.attempts.extend(attempts(error));
                    return None;
                }
            }
        }
        let joining = if self.out.discard() {
            // Nothing reached the caller: the answer starts again, whole.
            self.sent.clear();
            (self.opaque, self.id) = (false, None);
            self.deployments.clear();
            Joining::Direct
        } else if self.opaque {
            return None;
        } else {
            Joining::Restart
        };
        let opened = self
            .engine
            .open(
                &self.route,
                &self.body,
                self.deadline,
                &self.failed,
                &mut self.writes,
            )
            .await;
        match opened {
            Ok((index, answer)) => Some(self.resumed(index, answer, joining)),
            Err(error) => {
                self.attempts.extend(attempts(error));
                None
            }
        }
    }

    fn resumed(&mut self, index: usize, answer: Answer<Opened>, joining: Joining) -> Current {
        let from = self
            .cut
            .as_ref()
            .map_or("", |(d, _, _)| d.as_str())
            .to_owned();
        telemetry::continued(&from, &answer.deployment);
        tracing::info!(
            from,
            to = answer.deployment,
            how = match joining {
                Joining::Continuation => "continuation",
                Joining::Restart => "restart, used if it repeats what was sent",
                Joining::Direct => "restart of an answer the caller has not seen",
            },
            "the stream goes on on another deployment"
        );
        let resumed = !self.deployments.is_empty();
        self.deployments.push(answer.deployment);
        self.attempts.extend(answer.attempts);
        Current {
            index,
            opened: answer.output,
            joining,
            resumed,
            pending: Vec::new(),
            pending_text: String::new(),
            relayed: 0,
        }
    }

    /// The last frame of an answer that could not be rescued: the deployment's own error event
    /// when it sent one and nothing else was tried, else `stream_interrupted` naming the
    /// original failure. OpenAI SDKs raise either as an error.
    fn interrupted(&self) -> Bytes {
        let Some((deployment, why, event)) = &self.cut else {
            return interrupted_event("unknown", "it went another way", 0);
        };
        match event {
            Some(event) if self.attempts.is_empty() && self.resumes == 0 => sse::event(event),
            _ => interrupted_event(deployment, why, self.resumes),
        }
    }
}

/// The event that ends an interrupted stream instead of `[DONE]`.
fn interrupted_event(deployment: &str, why: &str, tries: u32) -> Bytes {
    let rescue = match tries {
        0 => String::new(),
        1 => "; it could not be continued on another deployment".to_owned(),
        n => format!("; {n} attempts to continue it on another deployment failed"),
    };
    let message = format!(
        "The answer from deployment {deployment} was interrupted ({why}){rescue}; it is incomplete. Retry the request."
    );
    sse::event(
        &json!({"error": {"message": message, "type": "server_error", "code": "stream_interrupted"}})
            .to_string(),
    )
}

/// The attempts an error carries.
fn attempts(error: RouteError) -> Vec<Attempt> {
    match error {
        RouteError::ContentFiltered { attempts, .. } => attempts,
        RouteError::Unavailable(exhausted) => exhausted.attempts,
    }
}

/// The request that asks another deployment to continue `sent`: the original messages, the
/// partial answer as an assistant message and the instruction to go on; a tool call is not an
/// option for it, and what the answer may still spend is what the original allowed less what
/// was already produced (`spent` tokens).
fn continuation(body: &ChatBody, sent: &str, spent: u64) -> ChatBody {
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

/// A chunk's `id`, when it has a non-empty one.
fn chunk_id(data: &str) -> Option<String> {
    serde_json::from_str::<Value>(data)
        .ok()?
        .get("id")?
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

/// A chunk's JSON with its `id`, its first choice's content or its `usage` replaced.
fn rewrite(data: &str, id: Option<&str>, text: Option<&str>, usage: Option<&Value>) -> String {
    let Ok(mut chunk) = serde_json::from_str::<Value>(data) else {
        return data.to_owned();
    };
    if let Some(id) = id {
        chunk["id"] = Value::from(id);
    }
    if let Some(text) = text
        && let Some(delta) = chunk.pointer_mut("/choices/0/delta")
    {
        delta["content"] = Value::from(text);
    }
    if let Some(usage) = usage {
        chunk["usage"] = usage.clone();
    }
    chunk.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continuation_asks_for_the_rest_and_no_tool_call_within_what_is_left() {
        let body: ChatBody = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": "Tell me how"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "max_tokens": 50,
            "stream": true
        }))
        .unwrap();
        let asked = Value::Object(continuation(&body, "[gpt-4o] You said: ", 3));
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
        let out: Value =
            serde_json::from_str(&rewrite(data, Some("first"), Some("Tell"), None)).unwrap();
        assert_eq!(out["id"], "first");
        assert_eq!(out["choices"][0]["delta"]["content"], "Tell");
        assert_eq!(chunk_id(data).as_deref(), Some("other"));
    }
}
