//! The policy, top to bottom: choose the next deployment (health decides which are usable,
//! priority and weight decide among them), call it within what is left of the deadline,
//! classify the outcome, record it, and decide whether to go on.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::App;
use crate::azure::{ChatBody, Completion, ContentFilter, Outcome, Transient};
use crate::error::RequestError;
use crate::health::{Clock, Event, State};
use crate::pool::Route;
use crate::telemetry;

/// An attempt needs at least this long to be worth starting (one in-region round trip).
pub const MIN_ATTEMPT: Duration = Duration::from_millis(100);
/// A deployment that failed without saying when it recovers may be worth asking this soon.
const TRANSIENT_RECOVERY: Duration = Duration::from_secs(1);

/// One deployment's part in a request: called (perhaps twice), or not and why.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub deployment: String,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Whether a single 500 or reset was retried once on the same deployment.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retried: bool,
    /// Azure's error code, for answers that were refusals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Attempt {
    fn not_called(deployment: &str, outcome: &'static str, wait: Option<Duration>) -> Self {
        Self {
            deployment: deployment.to_owned(),
            outcome,
            status: None,
            ms: 0,
            retry_after_ms: wait.map(millis),
            retried: false,
            code: None,
            message: None,
        }
    }

    /// Whether this attempt called the deployment.
    pub fn called(&self) -> bool {
        !matches!(
            self.outcome,
            "cooling_down"
                | "circuit_open"
                | "probe_in_flight"
                | "deadline_exceeded"
                | "context_window_too_small"
        )
    }
}

/// A route member's state when nothing could answer.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentState {
    pub deployment: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovers_in_ms: Option<u64>,
}

/// No deployment could answer: every attempt, each deployment's state, and when the soonest
/// one recovers.
#[derive(Debug)]
pub struct Exhausted {
    pub attempts: Vec<Attempt>,
    pub deployments: Vec<DeploymentState>,
    pub retry_after: Duration,
}

/// A completion and how it was obtained.
#[derive(Debug)]
pub struct Answer {
    pub deployment: String,
    pub completion: Completion,
    pub attempts: Vec<Attempt>,
}

impl Answer {
    /// How many deployments were called to get this answer.
    pub fn calls(&self) -> usize {
        self.attempts.iter().filter(|a| a.called()).count()
    }
}

/// What the request has learned so far about which deployments are worth trying.
struct Tried {
    called: Vec<bool>,
    /// After a context_length_exceeded, only a larger window than this can help.
    needs_window_over: Option<u32>,
}

/// A successful call's news for the health table: the quota the deployment says it has left.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quota {
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

impl<C: Clock> App<C> {
    /// Asks the route's deployments for a whole completion until one answers, within `budget`.
    pub async fn complete(
        &self,
        route: &Route,
        body: &ChatBody,
        budget: Duration,
    ) -> Result<Answer, RequestError> {
        let (completion, index, attempts) = self
            .failover(route, budget, |index, deadline| {
                self.call(index, body, deadline)
            })
            .await?;
        let tokens = completion
            .usage
            .as_ref()
            .and_then(|u| u.get("total_tokens"))
            .and_then(serde_json::Value::as_u64);
        telemetry::answered(&self.config.pool.deployments[index].id, tokens);
        Ok(Answer {
            deployment: self.config.pool.deployments[index].id.clone(),
            completion,
            attempts,
        })
    }

    /// The loop every request runs: choose a deployment, let `attempt` try it before
    /// `deadline`, and go on according to the outcome until one succeeds or none is left.
    /// Returns what the successful attempt produced, the deployment's index and all attempts.
    pub(crate) async fn failover<T, F, Fut>(
        &self,
        route: &Route,
        budget: Duration,
        mut attempt: F,
    ) -> Result<(T, usize, Vec<Attempt>), RequestError>
    where
        F: FnMut(usize, Instant) -> Fut,
        Fut: Future<Output = (Attempt, Result<T, Outcome>)>,
    {
        let deadline = Instant::now() + budget;
        let pool = &self.config.pool.deployments;
        let mut tried = Tried {
            called: vec![false; pool.len()],
            needs_window_over: None,
        };
        let too_small = |t: &Tried, i: usize| matches!((t.needs_window_over, pool[i].context_window), (Some(need), Some(w)) if w <= need);
        let mut attempts = Vec::new();
        let mut out_of_time = false;
        let mut failed: Option<String> = None;

        loop {
            if deadline.saturating_duration_since(Instant::now()) < MIN_ATTEMPT {
                out_of_time = true;
                break;
            }
            let skip = |i: usize| tried.called[i] || too_small(&tried, i);
            let Some(index) = self
                .health
                .select(&route.members, pool, skip, self.clock.now())
            else {
                break;
            };
            tried.called[index] = true;
            if let Some(previous) = failed.take() {
                telemetry::failover(&previous);
            }
            let (mut made, result) = attempt(index, deadline).await;
            match result {
                Ok(value) => {
                    attempts.push(made);
                    return Ok((value, index, attempts));
                }
                Err(Outcome::ContentFiltered(filter)) => {
                    return Err(filtered(&made.deployment, filter));
                }
                Err(Outcome::ContextLengthExceeded { message }) => {
                    // Never the same one again; only a larger configured window can help.
                    if let Some(window) = pool[index].context_window {
                        tried.needs_window_over =
                            Some(tried.needs_window_over.map_or(window, |w| w.max(window)));
                    }
                    made.message = Some(message);
                }
                Err(_) => {}
            }
            failed = Some(made.deployment.clone());
            attempts.push(made);
        }
        telemetry::unavailable(&route.name);

        // Say why every deployment that was not called was left out.
        let now = self.clock.now();
        let mut deployments = Vec::with_capacity(route.members.len());
        let mut soonest = None::<Duration>;
        for &i in &route.members {
            let state = self.health.state(i, now);
            let wait = state
                .until()
                .map(|until| until.saturating_duration_since(now));
            let recovery = wait.unwrap_or(TRANSIENT_RECOVERY);
            soonest = Some(soonest.map_or(recovery, |s| s.min(recovery)));
            deployments.push(DeploymentState {
                deployment: pool[i].id.clone(),
                state: state.name(),
                recovers_in_ms: wait.map(millis),
            });
            if tried.called[i] {
                continue;
            }
            let outcome = match state {
                State::Throttled { .. } => "cooling_down",
                State::CircuitOpen { .. } => "circuit_open",
                State::ProbeInFlight => "probe_in_flight",
                _ if too_small(&tried, i) => "context_window_too_small",
                _ if out_of_time => "deadline_exceeded",
                _ => continue,
            };
            let attempt = Attempt::not_called(&pool[i].id, outcome, wait);
            log_attempt(&attempt);
            attempts.push(attempt);
        }
        Err(RequestError::Unavailable(Exhausted {
            attempts,
            deployments,
            retry_after: soonest.unwrap_or(self.config.throttle_cooldown),
        }))
    }

    /// Calls one deployment for a whole completion, once more after a single 500 or reset
    /// when time allows.
    async fn call(
        &self,
        index: usize,
        body: &ChatBody,
        deadline: Instant,
    ) -> (Attempt, Result<Completion, Outcome>) {
        let started = Instant::now();
        let mut retried = false;
        loop {
            let timeout = self
                .config
                .attempt_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let call_started = Instant::now();
            let (status, outcome) = self
                .upstream
                .chat(index, body, timeout, self.clock.wall())
                .await;
            let result = match outcome {
                Outcome::Answered(completion) => Ok(completion),
                other => Err(other),
            };
            let settled = result.as_ref().map(|c| Quota {
                remaining_requests: c.remaining_requests,
                remaining_tokens: c.remaining_tokens,
            });
            let attempt = self.settle(index, status, settled, started, call_started, retried);
            if let Err(outcome) = &result
                && self.retry_once(index, outcome, retried, deadline)
            {
                retried = true;
                continue;
            }
            return (attempt, result);
        }
    }

    /// Whether a failed call deserves its one quick retry on the same deployment: a single
    /// 500 or reset, never a 4xx, while the circuit still lets it in and the deadline leaves room.
    pub(crate) fn retry_once(
        &self,
        index: usize,
        outcome: &Outcome,
        retried: bool,
        deadline: Instant,
    ) -> bool {
        !retried
            && matches!(
                outcome,
                Outcome::Transient(Transient::Status(500) | Transient::Reset)
            )
            && self.health.state(index, self.clock.now()).usable()
            && deadline.saturating_duration_since(Instant::now()) >= MIN_ATTEMPT
    }

    /// Records what one call came to in the health table, and describes and logs it as an
    /// attempt (`started` is when this deployment's first call began).
    pub(crate) fn settle(
        &self,
        index: usize,
        status: Option<u16>,
        result: Result<Quota, &Outcome>,
        started: Instant,
        call_started: Instant,
        retried: bool,
    ) -> Attempt {
        let now = self.clock.now();
        let mut attempt = Attempt {
            deployment: self.config.pool.deployments[index].id.clone(),
            outcome: "ok",
            status,
            ms: millis(started.elapsed()),
            retry_after_ms: None,
            retried,
            code: None,
            message: None,
        };
        let event = match result {
            Ok(quota) => Event::Success {
                latency: call_started.elapsed(),
                remaining_requests: quota.remaining_requests,
                remaining_tokens: quota.remaining_tokens,
            },
            Err(Outcome::Throttled { retry_after }) => Event::Throttled {
                until: now + retry_after.unwrap_or(self.config.throttle_cooldown),
            },
            Err(Outcome::Transient(_) | Outcome::Misconfigured { .. }) => Event::Failure,
            Err(_) => Event::Answered,
        };
        self.health.record(index, event, now);

        if let Err(outcome) = result {
            attempt.outcome = match outcome {
                Outcome::Answered(_) => "ok",
                Outcome::Throttled { .. } => {
                    // The table may hold a longer cooldown than this 429 asked for.
                    let until = self.health.state(index, now).until();
                    attempt.retry_after_ms = Some(until.map_or(0, |u| millis(u - now)));
                    "throttled"
                }
                Outcome::Transient(Transient::Status(408) | Transient::Timeout) => "timeout",
                Outcome::Transient(Transient::FirstTokenTimeout) => "first_token_timeout",
                Outcome::Transient(Transient::Status(_)) => "server_error",
                Outcome::Transient(Transient::Connect) => "connection_error",
                Outcome::Transient(Transient::Reset) => "connection_reset",
                Outcome::Transient(Transient::BadResponse) => "bad_response",
                Outcome::Misconfigured {
                    status,
                    code,
                    message,
                } => {
                    attempt.message = Some(misconfiguration_hint(*status, code, message));
                    attempt.code = Some(code.clone()).filter(|c| !c.is_empty());
                    "misconfigured"
                }
                Outcome::ContentFiltered(_) => "content_filter",
                Outcome::ContextLengthExceeded { .. } => {
                    attempt.code = Some("context_length_exceeded".into());
                    "context_length_exceeded"
                }
                Outcome::Rejected { message, code, .. } => {
                    attempt.message = Some(message.clone());
                    attempt.code = Some(code.clone()).filter(|c| !c.is_empty());
                    "rejected"
                }
            };
        }
        log_attempt(&attempt);
        telemetry::call(&attempt);
        attempt
    }
}

fn filtered(deployment: &str, filter: ContentFilter) -> RequestError {
    RequestError::ContentFiltered {
        deployment: deployment.to_owned(),
        filter,
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

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One structured line per attempt; the Lambda request id comes from the runtime's span.
pub(crate) fn log_attempt(a: &Attempt) {
    let (deployment, outcome, status, latency_ms, retry_after_ms, retried) = (
        &a.deployment,
        a.outcome,
        a.status,
        a.ms,
        a.retry_after_ms,
        a.retried,
    );
    match a.outcome {
        "ok" => tracing::info!(
            deployment,
            outcome,
            status,
            latency_ms,
            retry_after_ms,
            retried,
            "upstream attempt"
        ),
        "misconfigured" => tracing::error!(
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
