//! What a request did with each deployment, and how it ended: the records that routing produces
//! and the HTTP surface, the logs and the metrics read. Plain data; imports nothing from the crate.

use std::time::Duration;

use serde::Serialize;

/// How one deployment's part in a request ended. The names are those of logs, metrics and the
/// 503 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// It answered.
    Ok,
    /// 429: skipped until its Retry-After has passed.
    Throttled,
    /// 408, or no whole answer within the attempt's time.
    Timeout,
    /// A stream that produced no content within the first-token limit.
    FirstTokenTimeout,
    ServerError,
    /// The connection could not be opened.
    ConnectionError,
    /// The connection broke before a whole answer arrived.
    ConnectionReset,
    /// A 2xx that was not a chat completion.
    BadResponse,
    /// 401, 403 or 404: a configuration fault.
    Misconfigured,
    /// No Entra ID token could be had for it.
    TokenUnavailable,
    /// Azure's content filter refused the prompt: the request ends here.
    ContentFilter,
    /// 400: too long for this deployment's context window.
    ContextLengthExceeded,
    /// Another 4xx: this deployment refused this request.
    Rejected,
    /// Not called: cooling down after a 429.
    CoolingDown,
    /// Not called: its circuit is open.
    CircuitOpen,
    /// Not called: another request is probing it.
    ProbeInFlight,
    /// Not called: too little of the request's time was left.
    DeadlineExceeded,
    /// Not called: its context window is no larger than one that was already too small.
    ContextWindowTooSmall,
    /// Not called: a batch client's request, and the quota the deployment reports left is
    /// under the reserve kept for interactive clients.
    ReservedForInteractive,
}

impl AttemptOutcome {
    /// Whether the deployment was called (an outcome of a call, not a reason to skip it).
    pub fn called(self) -> bool {
        !matches!(
            self,
            Self::CoolingDown
                | Self::CircuitOpen
                | Self::ProbeInFlight
                | Self::DeadlineExceeded
                | Self::ContextWindowTooSmall
                | Self::ReservedForInteractive
        )
    }

    /// The deployment refused this request itself (not a fault of the deployment).
    pub fn is_refusal(self) -> bool {
        matches!(self, Self::Rejected | Self::ContextLengthExceeded)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Throttled => "throttled",
            Self::Timeout => "timeout",
            Self::FirstTokenTimeout => "first_token_timeout",
            Self::ServerError => "server_error",
            Self::ConnectionError => "connection_error",
            Self::ConnectionReset => "connection_reset",
            Self::BadResponse => "bad_response",
            Self::Misconfigured => "misconfigured",
            Self::TokenUnavailable => "token_unavailable",
            Self::ContentFilter => "content_filter",
            Self::ContextLengthExceeded => "context_length_exceeded",
            Self::Rejected => "rejected",
            Self::CoolingDown => "cooling_down",
            Self::CircuitOpen => "circuit_open",
            Self::ProbeInFlight => "probe_in_flight",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::ContextWindowTooSmall => "context_window_too_small",
            Self::ReservedForInteractive => "reserved_for_interactive",
        }
    }
}

/// One deployment's part in a request: called (perhaps twice), or not and why.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub deployment: String,
    pub outcome: AttemptOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Whether a single 500 or reset was retried once on the same deployment.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retried: bool,
    /// The deployment's error code, for answers that were refusals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Attempt {
    /// A deployment that was left out, and why.
    pub fn not_called(deployment: &str, outcome: AttemptOutcome, wait: Option<Duration>) -> Self {
        Self {
            deployment: deployment.to_owned(),
            outcome,
            status: None,
            ms: 0,
            retry_after_ms: wait.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
            retried: false,
            code: None,
            message: None,
        }
    }

    pub fn called(&self) -> bool {
        self.outcome.called()
    }
}

/// How many deployments `attempts` called (an attempt is one deployment's part, its quick retry
/// included): the `x-fallback-attempts` header.
pub fn called(attempts: &[Attempt]) -> usize {
    attempts.iter().filter(|a| a.called()).count()
}

/// How many upstream calls `attempts` made: a quick retry is a second call to the same
/// deployment. The summary line's `calls`.
pub fn upstream_calls(attempts: &[Attempt]) -> usize {
    attempts
        .iter()
        .filter(|a| a.called())
        .map(|a| 1 + usize::from(a.retried))
        .sum()
}

/// Where a deployment stands, as the 503 body names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    Available,
    /// Its circuit's open period is over: the next request to choose it is its probe.
    HalfOpen,
    Throttled,
    CircuitOpen,
    /// Half-open, and another request's probe is still out.
    ProbeInFlight,
}

/// A route member's state when nothing could answer.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentState {
    pub deployment: String,
    pub state: Availability,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovers_in_ms: Option<u64>,
}

/// No deployment could answer: every attempt, each deployment's state, and when the soonest
/// one recovers.
#[derive(Debug)]
pub struct Exhausted {
    pub route: String,
    pub attempts: Vec<Attempt>,
    pub deployments: Vec<DeploymentState>,
    pub retry_after: Duration,
}

impl Exhausted {
    /// Every deployment that was called refused the request itself (a 400 such as an
    /// unsupported parameter, or a context too long for all of them): that refusal is the answer.
    pub fn refusal(&self) -> Option<&Attempt> {
        let mut called = self.attempts.iter().filter(|a| a.called()).peekable();
        called.peek()?;
        let mut last = None;
        for attempt in called {
            if !attempt.outcome.is_refusal() {
                return None;
            }
            last = Some(attempt);
        }
        last
    }
}

/// What a request got: `output` from `deployment`, and every attempt it took.
#[derive(Debug)]
pub struct Answer<T> {
    pub route: String,
    pub deployment: String,
    pub output: T,
    pub attempts: Vec<Attempt>,
}

impl<T> Answer<T> {
    /// How many deployments were called to get this answer.
    pub fn called(&self) -> usize {
        called(&self.attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_serialise_as_their_names_and_know_whether_they_called() {
        for outcome in [
            AttemptOutcome::Ok,
            AttemptOutcome::FirstTokenTimeout,
            AttemptOutcome::ContextWindowTooSmall,
        ] {
            let json = serde_json::to_value(outcome).unwrap();
            assert_eq!(json, outcome.as_str());
        }
        assert!(AttemptOutcome::Throttled.called());
        assert!(!AttemptOutcome::CoolingDown.called());
    }

    #[test]
    fn attempts_count_deployments_and_calls_count_a_quick_retry_twice() {
        let mut retried = Attempt::not_called("a", AttemptOutcome::Ok, None);
        retried.retried = true;
        let attempts = [
            Attempt::not_called("b", AttemptOutcome::ServerError, None),
            retried,
            Attempt::not_called("c", AttemptOutcome::CoolingDown, None),
        ];
        assert_eq!(called(&attempts), 2, "two deployments were called");
        assert_eq!(upstream_calls(&attempts), 3, "three calls reached them");
    }

    #[test]
    fn a_refusal_is_the_answer_only_when_every_call_was_one() {
        let attempt = |outcome| Attempt::not_called("d", outcome, None);
        let exhausted = |outcomes: &[AttemptOutcome]| Exhausted {
            route: "r".into(),
            attempts: outcomes.iter().map(|o| attempt(*o)).collect(),
            deployments: Vec::new(),
            retry_after: Duration::from_secs(1),
        };
        use AttemptOutcome::*;
        assert!(
            exhausted(&[Rejected, ContextLengthExceeded, CoolingDown])
                .refusal()
                .is_some_and(|a| a.outcome == ContextLengthExceeded)
        );
        assert!(exhausted(&[Rejected, ServerError]).refusal().is_none());
        assert!(exhausted(&[CoolingDown]).refusal().is_none());
    }
}
