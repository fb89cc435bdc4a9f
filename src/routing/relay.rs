//! Relaying a committed stream, and rescuing it. A stream that is cut, stalls past
//! `STREAM_IDLE_TIMEOUT_MS` or ends without finishing after its first content is continued on
//! the next deployment the route would choose (the kind of call says how: chat asks with the
//! original messages plus the partial answer and an instruction to go on), its first words
//! trimmed where they repeat the end of what was sent, its chunks relayed as further chunks of
//! the same stream. A continuation that is refused is tried once more as the original request
//! restarted, used only if its text begins with exactly what was sent. What cannot be continued
//! (a tool call, several choices, log probabilities), or cannot be within the deadline and the
//! number of continuations allowed, ends with [`StreamEnding::Interrupted`], which the surface
//! turns into an honest error event. Behind a buffered front (API Gateway) nothing has reached
//! the caller yet, so an answer that cannot be continued is restarted whole on the next
//! deployment.

use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::attempt::{Answer, Attempt};
use crate::clock::Clock;
use crate::health::Event;
use crate::outcome::{JsonBody, total_tokens};
use crate::pool::Route;
use crate::telemetry;
use crate::upstream::{Chunk, Edit, Next, Opened, Spent, StreamEvent, Streaming};

use super::failover::{Failover, MIN_ATTEMPT, RouteError};
use super::splice::{self, Join};
use super::sync::Writes;

/// After the final `finish_reason`, what is left (a usage event, `[DONE]`) must follow soon;
/// past this the stream is finalised without waiting for it.
const FINALISE_GRACE: Duration = Duration::from_secs(2);
/// Frames queued between the upstream reader and a slow caller.
const RELAY_BUFFER: usize = 64;

/// How the caller receives the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// As they come (Lambda response streaming).
    Streamed,
    /// All at once, at the end (API Gateway, ALB): a broken answer can still be replaced.
    Buffered,
}

/// What the relay hands the surface: the events to pass on, then how the stream ended (the
/// surface writes the last event, in its own wire format).
#[derive(Debug, Clone)]
pub enum Relayed {
    Frame(Bytes),
    End(StreamEnding),
}

/// Why a stream broke after its first content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nothing came within the stream idle timeout.
    Stalled,
    /// The request's deadline was reached while it was still running.
    Deadline,
    /// The body ended before the answer did.
    EndedEarly,
    /// The connection broke.
    Broke,
    /// The deployment sent an error event.
    ErrorEvent,
    /// A restart of the answer went another way than what was sent.
    Diverged,
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cut::Stalled => "no event within the stream idle timeout",
            Cut::Deadline => "the request's deadline was reached",
            Cut::EndedEarly => "the stream ended before the answer did",
            Cut::Broke => "the connection broke mid-answer",
            Cut::ErrorEvent => "the deployment sent an error event",
            Cut::Diverged => "it went another way",
        })
    }
}

/// How a relayed stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnding {
    /// The answer is complete.
    Done,
    /// The provider's safety system stopped it: its error event was relayed as sent.
    Refused,
    /// It broke and could not be rescued: `deployment`'s stream, for `why`, after `tries`
    /// attempts to continue it elsewhere. `reported`: the deployment's own error event was
    /// relayed (nothing else was tried), and says it all.
    Interrupted {
        deployment: String,
        why: Cut,
        tries: u32,
        reported: bool,
    },
    /// The caller went away.
    Gone,
}

impl StreamEnding {
    /// As the summary log line names it.
    pub fn as_str(&self) -> &'static str {
        match self {
            StreamEnding::Done => "done",
            StreamEnding::Refused => "refused",
            StreamEnding::Interrupted { .. } => "interrupted",
            StreamEnding::Gone => "gone",
        }
    }
}

/// A stream being relayed: its frames, and, once it has ended, what became of it.
pub struct Streamed {
    pub frames: mpsc::Receiver<Relayed>,
    pub report: oneshot::Receiver<StreamReport>,
}

/// What became of a relayed stream.
#[derive(Debug, Clone)]
pub struct StreamReport {
    /// Every deployment that produced part of the answer, in order.
    pub deployments: Vec<String>,
    /// The attempts made to continue (or restart) it.
    pub attempts: Vec<Attempt>,
    pub ending: StreamEnding,
    /// `usage.total_tokens` (both deployments' for a continued answer), when a deployment
    /// said.
    pub tokens: Option<u64>,
    /// Characters of answer text relayed: what is left to estimate its tokens from when no
    /// deployment said.
    pub text_chars: usize,
}

/// Where the frames go.
pub(super) enum Output {
    Streamed(mpsc::Sender<Relayed>),
    Buffered {
        tx: mpsc::Sender<Relayed>,
        held: Vec<Relayed>,
    },
}

/// The two ends of a relay: where it writes, what the caller reads, and where the report goes.
pub(super) fn channel(delivery: Delivery) -> (Output, oneshot::Sender<StreamReport>, Streamed) {
    let (tx, frames) = mpsc::channel(RELAY_BUFFER);
    let (report, reported) = oneshot::channel();
    let out = match delivery {
        Delivery::Streamed => Output::Streamed(tx),
        Delivery::Buffered => Output::Buffered {
            tx,
            held: Vec::new(),
        },
    };
    (
        out,
        report,
        Streamed {
            frames,
            report: reported,
        },
    )
}

impl Output {
    /// False when the caller is gone.
    async fn send(&mut self, item: Relayed) -> bool {
        match self {
            Output::Streamed(tx) => tx.send(item).await.is_ok(),
            Output::Buffered { held, .. } => {
                held.push(item);
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
            for item in held {
                if tx.send(item).await.is_err() {
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

/// How reading one stream ended.
enum Ending {
    Done,
    /// The caller is gone.
    Gone,
    /// The provider's safety system stopped it: its error event.
    Refused(String),
    /// A restart went another way than what was sent.
    Diverged,
    Broken {
        why: Cut,
        /// The deployment's own error event, when it sent one.
        event: Option<String>,
        stalled: bool,
    },
}

/// The first break of an answer.
struct First {
    deployment: String,
    why: Cut,
    event: Option<String>,
}

/// The relay of one request's stream of kind `K`, holding the policy it rescues with.
pub(super) struct Relay<'a, C: Clock, K> {
    policy: Failover<'a, C>,
    route: Route,
    body: JsonBody,
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
    /// The output item its text belongs to (Responses), and the last sequence number relayed.
    item: Option<String>,
    sequence: Option<u64>,
    deployments: Vec<String>,
    /// Deployments whose stream broke, not asked again.
    failed: Vec<usize>,
    attempts: Vec<Attempt>,
    resumes: u32,
    cut: Option<First>,
    /// Content chunks the broken streams produced (about one token each, as Azure streams).
    spent_tokens: u64,
    tokens: Option<u64>,
    skipped: usize,
    kind: PhantomData<K>,
}

impl<'a, C: Clock, K: Streaming> Relay<'a, C, K> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        policy: Failover<'a, C>,
        route: Route,
        body: JsonBody,
        deadline: Instant,
        out: Output,
        report: oneshot::Sender<StreamReport>,
        writes: Writes,
    ) -> Self {
        Self {
            opaque: !K::continuable(&body),
            policy,
            route,
            body,
            deadline,
            out,
            report: Some(report),
            writes,
            sent: String::new(),
            id: None,
            item: None,
            sequence: None,
            deployments: Vec::new(),
            failed: Vec::new(),
            attempts: Vec::new(),
            resumes: 0,
            cut: None,
            spent_tokens: 0,
            tokens: None,
            skipped: 0,
            kind: PhantomData,
        }
    }

    /// Relays deployment `index`'s opened stream (and its rescuers') to the end.
    pub(super) async fn run(mut self, index: usize, opened: Opened) {
        self.deployments.push(self.policy.id(index).to_owned());
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
                    let now = self.policy.clock.now();
                    self.policy
                        .sync
                        .record(current.index, Event::Refused, now, &mut self.writes);
                    break Ending::Refused(data);
                }
                other => break other,
            }
        };
        let (event, ending) = match ending {
            Ending::Done => (None, StreamEnding::Done),
            Ending::Refused(data) => (Some(data), StreamEnding::Refused),
            Ending::Gone => (None, StreamEnding::Gone),
            Ending::Diverged | Ending::Broken { .. } => self.interrupted(),
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
                ending: ending.clone(),
                tokens: self.tokens,
                text_chars: self.sent.chars().count(),
            });
        }
        // The caller may be gone already; the table still hears what happened. Its writes
        // finish before the body ends: Lambda freezes the environment after it.
        if ending != StreamEnding::Gone {
            if let Some(event) = event {
                self.out.send(Relayed::Frame(K::frame(&event))).await;
            }
            self.out.send(Relayed::End(ending)).await;
        }
        let Self {
            policy,
            out,
            writes,
            ..
        } = self;
        policy.sync.finish(writes).await;
        out.close().await;
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
                        self.policy.settings.stream_idle_timeout
                    };
                    let remaining = self.policy.remaining(self.deadline);
                    let next = self
                        .policy
                        .clock
                        .timeout(wait.min(remaining), current.opened.events.next())
                        .await;
                    if next.is_none() && !finished {
                        let why = if remaining <= wait {
                            Cut::Deadline
                        } else {
                            Cut::Stalled
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
                        why: Cut::EndedEarly,
                        event: None,
                        stalled: false,
                    };
                }
                Some(Next::Broken) => {
                    return Ending::Broken {
                        why: Cut::Broke,
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
                        why: Cut::ErrorEvent,
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
                let edit = Edit {
                    text: Some(&chunk.text),
                    ..Edit::default()
                };
                chunk.data = K::rewrite(&chunk, edit);
            }
            self.emit(current, chunk).await?;
        }
        Ok(())
    }

    /// Relays one chunk.
    async fn emit(&mut self, current: &mut Current, chunk: Chunk) -> Result<(), Ending> {
        if current.resumed
            && !chunk.content
            && chunk.finish.is_none()
            && chunk.usage.is_none()
            && !chunk.closing
        {
            // A resumed stream's opening (chat's role chunk, Responses' preamble) or what
            // trimming emptied: not news.
            return Ok(());
        }
        self.opaque |= chunk.opaque;
        if self.id.is_none() && chunk.id.is_some() {
            self.id.clone_from(&chunk.id);
            // A stored answer's id, as soon as it is known: a follow-up may come from another
            // environment before this stream has ended.
            if let Some(id) = &self.id
                && K::pins(&self.body)
            {
                self.policy.sync.pin(id, current.index).await;
            }
        }
        if self.item.is_none() {
            self.item.clone_from(&chunk.item);
        }
        let sequence = if current.resumed {
            self.sequence.map(|n| n + 1)
        } else {
            chunk.sequence
        };
        if sequence.is_some() {
            self.sequence = sequence;
        }
        self.sent.push_str(&chunk.text);
        if chunk.content {
            current.relayed += 1;
        }
        let usage = chunk.usage.as_ref().map(|usage| {
            if self.deployments.len() > 1 {
                let spent = Spent {
                    chunks: self.spent_tokens,
                    broken: (self.deployments.len() - 1) as u64,
                };
                K::usage(usage, spent)
            } else {
                usage.clone()
            }
        });
        if let Some(usage) = &usage {
            self.tokens = total_tokens(Some(usage));
            if !chunk.content && chunk.finish.is_none() && !K::shows_usage(&self.body) {
                // Asked for on the caller's behalf (to count it): counted, not relayed.
                return Ok(());
            }
        }
        let data = if current.resumed {
            let edit = Edit {
                id: self.id.as_deref(),
                text: None,
                usage: usage.as_ref(),
                item: self.item.as_deref(),
                sequence,
                whole: (chunk.closing || chunk.finish.is_some()).then_some(self.sent.as_str()),
            };
            K::rewrite(&chunk, edit)
        } else {
            chunk.data
        };
        if self.out.send(Relayed::Frame(K::frame(&data))).await {
            Ok(())
        } else {
            Err(Ending::Gone)
        }
    }

    /// Records a break of `current`'s stream.
    fn broke(&mut self, current: &Current, why: Cut, event: Option<String>, stalled: bool) {
        let id = self.policy.id(current.index).to_owned();
        let now = self.policy.clock.now();
        let health = if stalled {
            Event::TimedOut
        } else {
            Event::Failure
        };
        self.policy
            .sync
            .record(current.index, health, now, &mut self.writes);
        self.failed.push(current.index);
        self.spent_tokens += current.relayed;
        telemetry::interrupted(&id);
        tracing::warn!(
            deployment = id,
            outcome = "stream_interrupted",
            reason = %why,
            frames_relayed = current.relayed,
            "upstream stream interrupted after the answer had started"
        );
        if self.cut.is_none() {
            self.cut = Some(First {
                deployment: id,
                why,
                event,
            });
        }
    }

    /// Another deployment's stream to go on with, if the answer can be rescued.
    async fn resume(&mut self) -> Option<Current> {
        let allowed = self.policy.settings.continuations;
        if self.resumes >= allowed || self.policy.remaining(self.deadline) < MIN_ATTEMPT {
            return None;
        }
        self.resumes += 1;
        if !self.opaque && !self.sent.is_empty() {
            let body = K::continuation(&self.body, &self.sent, self.spent_tokens);
            let opened = self
                .policy
                .open::<K>(
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
                    self.attempts.extend(error.into_attempts());
                    return None;
                }
            }
        }
        let joining = if self.out.discard() {
            // Nothing reached the caller: the answer starts again, whole.
            self.sent.clear();
            self.opaque = !K::continuable(&self.body);
            self.id = None;
            self.item = None;
            self.sequence = None;
            self.deployments.clear();
            Joining::Direct
        } else if self.opaque {
            return None;
        } else {
            Joining::Restart
        };
        let opened = self
            .policy
            .open::<K>(
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
                self.attempts.extend(error.into_attempts());
                None
            }
        }
    }

    fn resumed(&mut self, index: usize, answer: Answer<Opened>, joining: Joining) -> Current {
        let from = self
            .cut
            .as_ref()
            .map_or("", |cut| cut.deployment.as_str())
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

    /// How an answer that could not be rescued ends: with the deployment's own error event when
    /// it sent one and nothing else was tried, else as interrupted, naming the original failure.
    /// OpenAI SDKs raise either as an error.
    fn interrupted(&self) -> (Option<String>, StreamEnding) {
        let Some(cut) = &self.cut else {
            let ending = StreamEnding::Interrupted {
                deployment: "unknown".into(),
                why: Cut::Diverged,
                tries: 0,
                reported: false,
            };
            return (None, ending);
        };
        let own = cut
            .event
            .clone()
            .filter(|_| self.attempts.is_empty() && self.resumes == 0);
        let ending = StreamEnding::Interrupted {
            deployment: cut.deployment.clone(),
            why: cut.why,
            tries: self.resumes,
            reported: own.is_some(),
        };
        (own, ending)
    }
}
