//! The policy, top to bottom: choose the next deployment (health decides which are usable,
//! priority and weight decide among them), call it within what is left of the deadline,
//! classify the outcome, record it, and decide whether to go on. One loop for every kind of
//! call, buffered or streamed; the call itself is the only thing that differs.
//!
//! [`Failover`] borrows what the policy acts on (the pool, the upstream client, the fleet sync,
//! the clock, the settings): the Engine lends it for a request, and a stream's relay holds one
//! for the rescues it may need.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::attempt::{Answer, Attempt, AttemptOutcome, DeploymentState, Exhausted};
use crate::clock::{Clock, millis};
use crate::health::{Event, State};
use crate::outcome::{Called, ContentFilter, Failure, JsonBody, Transient};
use crate::pool::{Deployment, Pool, Route};
use crate::telemetry;
use crate::upstream::{Kind, Opened, Streaming, Upstream};

use super::settings::Settings;
use super::sync::{FleetSync, Writes};

/// An attempt needs at least this long to be worth starting (one in-region round trip).
pub const MIN_ATTEMPT: Duration = Duration::from_millis(100);
/// A deployment that failed without saying when it recovers may be worth asking this soon.
const TRANSIENT_RECOVERY: Duration = Duration::from_secs(1);
/// A probe of a deployment that has answered before may take this many times its usual latency
/// (and at least `MIN_PROBE`) before it counts as another timeout.
const PROBE_LATENCIES: u32 = 4;
const MIN_PROBE: Duration = Duration::from_secs(1);

/// Why a request got no answer.
#[derive(Debug)]
pub enum RouteError {
    /// A provider's safety system refused the prompt: the request ends here, unanswered by
    /// any other deployment.
    ContentFiltered {
        route: String,
        deployment: String,
        filter: ContentFilter,
        attempts: Vec<Attempt>,
    },
    /// No deployment could answer.
    Unavailable(Exhausted),
}

impl RouteError {
    /// The attempts it carries.
    pub fn into_attempts(self) -> Vec<Attempt> {
        match self {
            RouteError::ContentFiltered { attempts, .. } => attempts,
            RouteError::Unavailable(exhausted) => exhausted.attempts,
        }
    }
}

/// The policy, and everything it acts on, borrowed.
pub struct Failover<'a, C: Clock> {
    pub pool: &'a Pool,
    pub upstream: &'a Upstream,
    pub sync: &'a FleetSync<C>,
    pub clock: &'a C,
    pub settings: &'a Settings,
}

impl<C: Clock> Clone for Failover<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C: Clock> Copy for Failover<'_, C> {}

/// What the request has learned so far about which deployments are worth trying.
struct Tried {
    called: Vec<bool>,
    /// After a context_length_exceeded, only a larger window than this can help.
    needs_window_over: Option<u32>,
}

impl Tried {
    /// Whether deployment `i` cannot help: already called, or no larger than a window that was
    /// already too small.
    fn rules_out(&self, i: usize, pool: &[Deployment]) -> bool {
        self.called[i] || self.too_small(i, pool)
    }

    fn too_small(&self, i: usize, pool: &[Deployment]) -> bool {
        matches!(
            (self.needs_window_over, pool[i].context_window),
            (Some(need), Some(window)) if window <= need
        )
    }
}

impl<C: Clock> Failover<'_, C> {
    /// Asks `route`'s deployments for a whole answer of kind `K` until one answers, before
    /// `deadline`.
    pub async fn whole<K: Kind>(
        &self,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
        writes: &mut Writes,
    ) -> Result<Answer<K::Answer>, RouteError> {
        let (_, answer) = self
            .run(route, deadline, &[], writes, |index, timeout| {
                self.upstream.call::<K>(self.clock, index, body, timeout)
            })
            .await?;
        Ok(answer)
    }

    /// The loop for a stream of kind `K`: a deployment of `route` (none in `exclude`) whose
    /// stream for `body` has produced its first content, and its index.
    pub async fn open<K: Streaming>(
        &self,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
        exclude: &[usize],
        writes: &mut Writes,
    ) -> Result<(usize, Answer<Opened>), RouteError> {
        let first_token = self.settings.first_token_timeout;
        self.run(route, deadline, exclude, writes, |index, timeout| {
            self.upstream
                .open::<K>(self.clock, index, body, timeout, first_token)
        })
        .await
    }

    /// The loop every request runs: choose a deployment, let `call` try it (once, or twice
    /// after a single 500 or reset) with what is left of the time before `deadline`, and go on
    /// according to the outcome until one answers or none is left. `call` gets the deployment's
    /// index and the time its call may take. What the calls teach the fleet goes to `writes`;
    /// the deployments in `exclude` are not tried.
    pub(super) async fn run<T, F, Fut>(
        &self,
        route: &Route,
        deadline: Instant,
        exclude: &[usize],
        writes: &mut Writes,
        call: F,
    ) -> Result<(usize, Answer<T>), RouteError>
    where
        F: Fn(usize, Duration) -> Fut,
        Fut: Future<Output = Called<T>>,
    {
        let pool = &self.pool.deployments;
        let mut tried = Tried {
            called: (0..pool.len()).map(|i| exclude.contains(&i)).collect(),
            needs_window_over: None,
        };
        let mut attempts = Vec::new();
        let mut out_of_time = false;
        let mut failed: Option<usize> = None;
        self.sync.refresh().await;

        loop {
            if self.remaining(deadline) < MIN_ATTEMPT {
                out_of_time = true;
                break;
            }
            // Read before choosing: the choice holds the health table's lock.
            let reserved: Vec<usize> = route
                .members
                .iter()
                .copied()
                .filter(|&i| self.reserved(route, i))
                .collect();
            let skip = |i: usize| tried.rules_out(i, pool) || reserved.contains(&i);
            let Some(choice) = self.sync.choose(&route.members, pool, skip) else {
                break;
            };
            let index = choice.index;
            // A probe after timeouts must not cost its caller a whole attempt timeout.
            let limit = if choice.probe {
                self.probe_timeout(index)
            } else {
                self.settings.attempt_timeout
            };
            if !self.sync.lease(&choice, limit).await {
                continue;
            }
            tried.called[index] = true;
            if let Some(previous) = failed.take() {
                telemetry::failover(self.id(previous));
            }
            let (attempt, result) = self.attempt(index, deadline, limit, writes, &call).await;
            attempts.push(attempt);
            match result {
                Ok(output) => {
                    let answer = Answer {
                        route: route.name.clone(),
                        deployment: self.id(index).to_owned(),
                        output,
                        attempts,
                    };
                    return Ok((index, answer));
                }
                Err(Failure::ContentFiltered(filter)) => {
                    return Err(RouteError::ContentFiltered {
                        route: route.name.clone(),
                        deployment: self.id(index).to_owned(),
                        filter: *filter,
                        attempts,
                    });
                }
                Err(Failure::ContextLengthExceeded { .. }) => {
                    // Never the same one again; only a larger configured window can help.
                    if let Some(window) = pool[index].context_window {
                        tried.needs_window_over =
                            Some(tried.needs_window_over.map_or(window, |w| w.max(window)));
                    }
                }
                Err(_) => {}
            }
            failed = Some(index);
        }
        telemetry::unavailable(&route.name);
        Err(RouteError::Unavailable(self.exhausted(
            route,
            &tried,
            attempts,
            out_of_time,
        )))
    }

    /// Whether `route` keeps deployment `i` out for what it reports left (a batch client's).
    fn reserved(&self, route: &Route, i: usize) -> bool {
        // Read only for a route that keeps a reserve: most requests' routes do not.
        route.reserve.is_some_and(|reserve| {
            self.sync
                .remaining_tokens(i)
                .is_some_and(|left| left < reserve)
        })
    }

    /// Time left before `deadline`.
    pub fn remaining(&self, deadline: Instant) -> Duration {
        deadline.saturating_duration_since(self.clock.now())
    }

    /// Deployment `index`'s id, as logs and responses name it.
    pub fn id(&self, index: usize) -> &str {
        self.pool
            .deployments
            .get(index)
            .map_or("unknown", |d| d.id.as_str())
    }

    /// How long a probe of deployment `index` may take: a few times its usual latency when it
    /// has answered before, the first-token limit otherwise, never more than an attempt.
    fn probe_timeout(&self, index: usize) -> Duration {
        let limit = match self.sync.latency(index) {
            Some(latency) => (latency * PROBE_LATENCIES).max(MIN_PROBE),
            None => self.settings.first_token_timeout,
        };
        limit.min(self.settings.attempt_timeout)
    }

    /// One deployment: a call within `limit`, and once more after a single 500 or reset when
    /// time allows.
    async fn attempt<T, F, Fut>(
        &self,
        index: usize,
        deadline: Instant,
        limit: Duration,
        writes: &mut Writes,
        call: &F,
    ) -> (Attempt, Result<T, Failure>)
    where
        F: Fn(usize, Duration) -> Fut,
        Fut: Future<Output = Called<T>>,
    {
        let started = self.clock.now();
        let mut retried = false;
        loop {
            let timeout = limit.min(self.remaining(deadline));
            let call_started = self.clock.now();
            let called = call(index, timeout).await;
            let attempt = self.settle(index, &called, started, call_started, retried, writes);
            if let Err(failure) = &called.result
                && self.retry_once(index, failure, retried, deadline)
            {
                retried = true;
                continue;
            }
            return (attempt, called.result);
        }
    }

    /// Whether a failed call deserves its one quick retry on the same deployment: a single
    /// 500 or reset, never a 4xx, while the circuit still lets it in and the deadline leaves room.
    fn retry_once(
        &self,
        index: usize,
        failure: &Failure,
        retried: bool,
        deadline: Instant,
    ) -> bool {
        !retried
            && matches!(
                failure,
                Failure::Transient(Transient::Status(500) | Transient::Reset)
            )
            && self.sync.state(index).usable()
            && self.remaining(deadline) >= MIN_ATTEMPT
    }

    /// Records what one call came to in the health table (and starts telling the fleet), and
    /// describes and logs it as an attempt (`started` is when this deployment's first call began).
    fn settle<T>(
        &self,
        index: usize,
        called: &Called<T>,
        started: Instant,
        call_started: Instant,
        retried: bool,
        writes: &mut Writes,
    ) -> Attempt {
        let now = self.clock.now();
        let event = match &called.result {
            Ok(_) => Event::Success {
                latency: now - call_started,
                remaining_requests: called.quota.remaining_requests,
                remaining_tokens: called.quota.remaining_tokens,
            },
            Err(Failure::Throttled { retry_after }) => Event::Throttled {
                until: now + retry_after.unwrap_or(self.settings.throttle_cooldown),
            },
            Err(Failure::Transient(Transient::Timeout | Transient::FirstTokenTimeout)) => {
                Event::TimedOut
            }
            Err(
                Failure::Transient(_) | Failure::Misconfigured { .. } | Failure::NoToken { .. },
            ) => Event::Failure,
            Err(_) => Event::Refused,
        };
        self.sync.record(index, event, now, writes);

        let mut attempt = Attempt {
            deployment: self.id(index).to_owned(),
            outcome: AttemptOutcome::Ok,
            status: called.status,
            ms: millis(now - started),
            retry_after_ms: None,
            retried,
            code: None,
            message: None,
        };
        if let Err(failure) = &called.result {
            attempt.outcome = outcome(failure);
            match failure {
                Failure::Throttled { .. } => {
                    // The table may hold a longer cooldown than this 429 asked for.
                    let until = self.sync.state(index).until();
                    attempt.retry_after_ms = Some(until.map_or(0, |u| millis(u - now)));
                }
                Failure::Misconfigured {
                    status,
                    code,
                    message,
                } => {
                    attempt.message = Some(misconfiguration_hint(*status, code, message));
                    attempt.code = Some(code.clone()).filter(|c| !c.is_empty());
                }
                Failure::NoToken { message } => attempt.message = Some(message.clone()),
                Failure::ContextLengthExceeded { message } => {
                    attempt.code = Some("context_length_exceeded".into());
                    attempt.message = Some(message.clone());
                }
                Failure::Rejected { message, code, .. } => {
                    attempt.message = Some(message.clone());
                    attempt.code = Some(code.clone()).filter(|c| !c.is_empty());
                }
                Failure::Transient(_) | Failure::ContentFiltered(_) => {}
            }
        }
        log_attempt(&attempt);
        telemetry::call(&attempt);
        attempt
    }

    /// Why every deployment that was not called was left out, and when the soonest recovers.
    fn exhausted(
        &self,
        route: &Route,
        tried: &Tried,
        mut attempts: Vec<Attempt>,
        out_of_time: bool,
    ) -> Exhausted {
        let pool = &self.pool.deployments;
        let now = self.clock.now();
        let mut deployments = Vec::with_capacity(route.members.len());
        let mut soonest = None::<Duration>;
        for &i in &route.members {
            let state = self.sync.state(i);
            let wait = state
                .until()
                .map(|until| until.saturating_duration_since(now));
            let recovery = wait.unwrap_or(TRANSIENT_RECOVERY);
            soonest = Some(soonest.map_or(recovery, |s| s.min(recovery)));
            deployments.push(DeploymentState {
                deployment: pool[i].id.clone(),
                state: state.availability(),
                recovers_in_ms: wait.map(millis),
            });
            if tried.called[i] {
                continue;
            }
            let outcome = match state {
                State::Throttled { .. } => AttemptOutcome::CoolingDown,
                State::CircuitOpen { .. } => AttemptOutcome::CircuitOpen,
                State::ProbeInFlight => AttemptOutcome::ProbeInFlight,
                _ if tried.too_small(i, pool) => AttemptOutcome::ContextWindowTooSmall,
                _ if self.reserved(route, i) => AttemptOutcome::ReservedForInteractive,
                _ if out_of_time => AttemptOutcome::DeadlineExceeded,
                _ => continue,
            };
            let attempt = Attempt::not_called(&pool[i].id, outcome, wait);
            log_attempt(&attempt);
            attempts.push(attempt);
        }
        Exhausted {
            route: route.name.clone(),
            attempts,
            deployments,
            retry_after: soonest.unwrap_or(self.settings.throttle_cooldown),
        }
    }
}

/// How an attempt that got no answer is named.
fn outcome(failure: &Failure) -> AttemptOutcome {
    match failure {
        Failure::Throttled { .. } => AttemptOutcome::Throttled,
        Failure::Transient(Transient::Status(408) | Transient::Timeout) => AttemptOutcome::Timeout,
        Failure::Transient(Transient::FirstTokenTimeout) => AttemptOutcome::FirstTokenTimeout,
        Failure::Transient(Transient::Status(_)) => AttemptOutcome::ServerError,
        Failure::Transient(Transient::Connect) => AttemptOutcome::ConnectionError,
        Failure::Transient(Transient::Reset) => AttemptOutcome::ConnectionReset,
        Failure::Transient(Transient::BadResponse) => AttemptOutcome::BadResponse,
        Failure::Misconfigured { .. } => AttemptOutcome::Misconfigured,
        Failure::NoToken { .. } => AttemptOutcome::TokenUnavailable,
        Failure::ContentFiltered(_) => AttemptOutcome::ContentFilter,
        Failure::ContextLengthExceeded { .. } => AttemptOutcome::ContextLengthExceeded,
        Failure::Rejected { .. } => AttemptOutcome::Rejected,
    }
}

fn misconfiguration_hint(status: u16, code: &str, message: &str) -> String {
    let fix = match (status, code) {
        (404, "DeploymentNotFound") => {
            "no such deployment on this resource: check AZURE_OPENAI_DEPLOYMENTS (or the entry in FALLBACK_POOL)"
        }
        (404, _) => {
            "not found: check AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_VERSION (or the entry in FALLBACK_POOL)"
        }
        _ => {
            "access denied: check AZURE_OPENAI_API_KEY (or the entry's key_env) belongs to the endpoint's resource"
        }
    };
    if message.is_empty() {
        fix.to_owned()
    } else {
        format!("{fix} (Azure said: {message})")
    }
}

/// One structured line per attempt; the Lambda request id comes from the runtime's span.
fn log_attempt(a: &Attempt) {
    let (deployment, outcome, status, latency_ms, retry_after_ms, retried) = (
        &a.deployment,
        a.outcome.as_str(),
        a.status,
        a.ms,
        a.retry_after_ms,
        a.retried,
    );
    match a.outcome {
        AttemptOutcome::Ok => tracing::info!(
            deployment,
            outcome,
            status,
            latency_ms,
            retry_after_ms,
            retried,
            "upstream attempt"
        ),
        AttemptOutcome::Misconfigured | AttemptOutcome::TokenUnavailable => tracing::error!(
            deployment,
            outcome,
            status,
            latency_ms,
            retry_after_ms,
            retried,
            detail = a.message.as_deref(),
            "upstream attempt: configuration error"
        ),
        _ => tracing::warn!(
            deployment,
            outcome,
            status,
            latency_ms,
            retry_after_ms,
            retried,
            "upstream attempt"
        ),
    }
}
