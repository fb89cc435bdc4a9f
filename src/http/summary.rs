//! Each request's one summary log line: route, status, who answered, each attempt's outcome,
//! latency, tokens. Built from the answer, or from the reason there was none; never read back
//! from the response.

use std::time::Duration;

use crate::attempt::{Answer, Attempt, calls};
use crate::clock::millis;
use crate::routing::RouteError;

pub(super) struct Summary {
    route: String,
    deployment: Option<String>,
    attempts: Vec<Attempt>,
    tokens: Option<u64>,
    stream: bool,
    error: Option<String>,
}

impl Summary {
    /// A request that got an answer (`tokens` when the answer says how many it used).
    pub fn answered<T>(answer: &Answer<T>, tokens: Option<u64>) -> Self {
        Self {
            route: answer.route.clone(),
            deployment: Some(answer.deployment.clone()),
            attempts: answer.attempts.clone(),
            tokens,
            stream: false,
            error: None,
        }
    }

    /// A request routing could not answer.
    pub fn unanswered(error: &RouteError, message: String) -> Self {
        let (route, attempts) = match error {
            RouteError::ContentFiltered {
                route, attempts, ..
            } => (route, attempts),
            RouteError::Unavailable(exhausted) => (&exhausted.route, &exhausted.attempts),
        };
        Self {
            route: route.clone(),
            deployment: None,
            attempts: attempts.clone(),
            tokens: None,
            stream: false,
            error: Some(message),
        }
    }

    /// A request refused before any deployment was asked.
    pub fn refused(route: &str, message: String) -> Self {
        Self {
            route: route.to_owned(),
            deployment: None,
            attempts: Vec::new(),
            tokens: None,
            stream: false,
            error: Some(message),
        }
    }

    pub fn streamed(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    pub fn log(&self, status: u16, latency: Duration) {
        let attempts = self
            .attempts
            .iter()
            .map(|a| format!("{}:{}", a.deployment, a.outcome.as_str()))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(
            route = self.route,
            status,
            deployment = self.deployment,
            calls = calls(&self.attempts),
            attempts,
            latency_ms = millis(latency),
            total_tokens = self.tokens,
            stream = self.stream,
            error = self.error.as_deref(),
            "request"
        );
    }
}
