//! The policy, top to bottom: take the deployments in order, skip those cooling down, try the
//! rest within the deadline, classify each outcome, and decide whether to go on.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::App;
use crate::azure::{self, Completion, ContentFilter, Outcome, Transient};
use crate::error::RequestError;
use crate::health::Clock;

/// An attempt needs at least this long to be worth starting (one loopback or in-region round trip).
const MIN_ATTEMPT: Duration = Duration::from_millis(100);
/// When a deployment failed without saying when it recovers, a caller may try again this soon.
const TRANSIENT_RECOVERY: Duration = Duration::from_secs(1);

/// One deployment's part in a request: tried, or skipped and why.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub deployment: String,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Attempt {
    fn skipped(deployment: &str, outcome: &'static str, retry_after: Option<Duration>) -> Self {
        Self {
            deployment: deployment.to_owned(),
            outcome,
            status: None,
            ms: 0,
            retry_after_ms: retry_after.map(millis),
            message: None,
        }
    }

    /// Whether this attempt called the deployment (as opposed to skipping it).
    pub fn called(&self) -> bool {
        !matches!(self.outcome, "cooling_down" | "deadline_exceeded")
    }
}

/// No deployment could answer: every attempt, and when the soonest one recovers.
#[derive(Debug)]
pub struct Exhausted {
    pub attempts: Vec<Attempt>,
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
    pub fn calls(&self) -> usize {
        self.attempts.iter().filter(|a| a.called()).count()
    }
}

impl<C: Clock> App<C> {
    /// Asks the configured deployments in order until one answers, within `budget`.
    pub async fn complete(&self, query: &str, budget: Duration) -> Result<Answer, RequestError> {
        let deadline = Instant::now() + budget;
        let body = azure::chat_body(&self.config.system_prompt, query);
        let mut attempts = Vec::with_capacity(self.config.deployments.len());
        let mut soonest: Option<Duration> = None;
        let mut note_recovery = |after: Duration| {
            soonest = Some(soonest.map_or(after, |s| s.min(after)));
        };

        for (index, deployment) in self.config.deployments.iter().enumerate() {
            let now = self.clock.now();
            if let Some(until) = self.health.cooling_until(index, now) {
                let wait = until - now;
                note_recovery(wait);
                let attempt = Attempt::skipped(deployment, "cooling_down", Some(wait));
                log_attempt(&attempt);
                attempts.push(attempt);
                continue;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < MIN_ATTEMPT {
                note_recovery(TRANSIENT_RECOVERY);
                let attempt = Attempt::skipped(deployment, "deadline_exceeded", None);
                log_attempt(&attempt);
                attempts.push(attempt);
                continue;
            }

            let started = Instant::now();
            let timeout = self.config.attempt_timeout.min(remaining);
            let (status, outcome) = self
                .upstream
                .chat(deployment, body.clone(), timeout, self.clock.wall())
                .await;
            let mut attempt = Attempt {
                deployment: deployment.clone(),
                outcome: "ok",
                status,
                ms: millis(started.elapsed()),
                retry_after_ms: None,
                message: None,
            };

            match outcome {
                Outcome::Answered(completion) => {
                    if let Some(filter) = completion.output_filter() {
                        attempt.outcome = "content_filter";
                        log_attempt(&attempt);
                        return Err(filtered(deployment, filter));
                    }
                    log_attempt(&attempt);
                    attempts.push(attempt);
                    return Ok(Answer {
                        deployment: deployment.clone(),
                        completion,
                        attempts,
                    });
                }
                Outcome::ContentFiltered(filter) => {
                    attempt.outcome = "content_filter";
                    log_attempt(&attempt);
                    return Err(filtered(deployment, filter));
                }
                Outcome::Throttled { retry_after } => {
                    let cooldown = retry_after.unwrap_or(self.config.throttle_cooldown);
                    let now = self.clock.now();
                    self.health.throttle(index, now + cooldown);
                    // The table may hold a longer cooldown than this 429 asked for.
                    let wait = self
                        .health
                        .cooling_until(index, now)
                        .map_or(Duration::ZERO, |until| until - now);
                    note_recovery(wait);
                    attempt.outcome = "throttled";
                    attempt.retry_after_ms = Some(millis(wait));
                }
                Outcome::Transient(kind) => {
                    note_recovery(TRANSIENT_RECOVERY);
                    attempt.outcome = match kind {
                        Transient::Status(_) => "server_error",
                        Transient::Timeout => "timeout",
                        Transient::Connect => "connection_error",
                        Transient::Reset => "connection_reset",
                        Transient::BadResponse => "bad_response",
                    };
                    if kind == Transient::Status(408) {
                        attempt.outcome = "timeout";
                    }
                }
                Outcome::Misconfigured {
                    status,
                    code,
                    message,
                } => {
                    attempt.outcome = "misconfigured";
                    attempt.message = Some(misconfiguration_hint(status, &code, &message));
                }
                Outcome::ContextLengthExceeded { message } => {
                    attempt.outcome = "context_length_exceeded";
                    attempt.message = Some(message);
                }
                Outcome::Rejected { message, .. } => {
                    attempt.outcome = "rejected";
                    attempt.message = Some(message);
                }
            }
            log_attempt(&attempt);
            attempts.push(attempt);
        }

        Err(RequestError::Unavailable(Exhausted {
            attempts,
            retry_after: soonest.unwrap_or(self.config.throttle_cooldown),
        }))
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
            "no such deployment on this resource: check AZURE_OPENAI_DEPLOYMENTS"
        }
        (404, _) => "not found: check AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_VERSION",
        _ => {
            "access denied: check AZURE_OPENAI_API_KEY belongs to AZURE_OPENAI_ENDPOINT's resource"
        }
    };
    if message.is_empty() {
        fix.to_owned()
    } else {
        format!("{fix} (Azure said: {message})")
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One structured line per attempt; the Lambda request id comes from the runtime's span.
fn log_attempt(a: &Attempt) {
    let (deployment, outcome, status, latency_ms, retry_after_ms) =
        (&a.deployment, a.outcome, a.status, a.ms, a.retry_after_ms);
    match a.outcome {
        "ok" => tracing::info!(
            deployment,
            outcome,
            status,
            latency_ms,
            retry_after_ms,
            "upstream attempt"
        ),
        "misconfigured" => tracing::error!(
            deployment,
            outcome,
            status,
            latency_ms,
            retry_after_ms,
            detail = a.message.as_deref(),
            "upstream attempt: configuration error"
        ),
        _ => tracing::warn!(
            deployment,
            outcome,
            status,
            latency_ms,
            retry_after_ms,
            "upstream attempt"
        ),
    }
}
