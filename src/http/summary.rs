//! Each request's one summary log line: route, status, who answered, each attempt's outcome,
//! latency, tokens. Built from the answer, or from the reason there was none; never read back
//! from the response.

use std::time::Duration;

use crate::attempt::{Answer, Attempt, upstream_calls};
use crate::clock::millis;
use crate::routing::{RouteError, StreamEnding, StreamReport};

pub(super) struct Summary {
    /// What was asked: `chat`, `embeddings`, `responses`, ...
    operation: &'static str,
    route: String,
    deployment: Option<String>,
    attempts: Vec<Attempt>,
    tokens: Option<u64>,
    stream: bool,
    error: Option<String>,
    /// The deployments that went on with a stream another began.
    continued_on: Vec<String>,
    /// How a stream ended (`unknown`: the relay stopped without saying).
    ending: Option<&'static str>,
    /// The named client that sent it.
    client: Option<String>,
    /// Characters of answer text a stream relayed.
    text_chars: usize,
}

impl Summary {
    /// A request that got an answer (`tokens` when the answer says how many it used).
    pub fn answered<T>(answer: &Answer<T>, tokens: Option<u64>) -> Self {
        Self {
            operation: "chat",
            route: answer.route.clone(),
            deployment: Some(answer.deployment.clone()),
            attempts: answer.attempts.clone(),
            tokens,
            stream: false,
            error: None,
            continued_on: Vec::new(),
            ending: None,
            client: None,
            text_chars: 0,
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
            operation: "chat",
            route: route.clone(),
            deployment: None,
            attempts: attempts.clone(),
            tokens: None,
            stream: false,
            error: Some(message),
            continued_on: Vec::new(),
            ending: None,
            client: None,
            text_chars: 0,
        }
    }

    /// A request that got no answer after `attempts`, for the reason `message` gives.
    pub fn failed(route: &str, attempts: &[Attempt], message: String) -> Self {
        Self {
            attempts: attempts.to_vec(),
            ..Self::refused(route, message)
        }
    }

    /// A request refused before any deployment was asked.
    pub fn refused(route: &str, message: String) -> Self {
        Self {
            operation: "chat",
            route: route.to_owned(),
            deployment: None,
            attempts: Vec::new(),
            tokens: None,
            stream: false,
            error: Some(message),
            continued_on: Vec::new(),
            ending: None,
            client: None,
            text_chars: 0,
        }
    }

    /// Answered by `deployment`, though the answer was not passed on.
    pub fn by(mut self, deployment: &str) -> Self {
        self.deployment = Some(deployment.to_owned());
        self
    }

    pub fn operation(mut self, operation: &'static str) -> Self {
        self.operation = operation;
        self
    }

    pub fn streamed(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    /// How the stream ended (`None`: the relay stopped without saying).
    pub fn ended(mut self, report: Option<StreamReport>) -> Self {
        let Some(report) = report else {
            self.ending = Some("unknown");
            return self;
        };
        self.ending = Some(report.ending.as_str());
        self.tokens = report.tokens;
        self.text_chars = report.text_chars;
        self.attempts.extend(report.attempts);
        self.continued_on = report.deployments.into_iter().skip(1).collect();
        if report.ending != StreamEnding::Done {
            self.error = Some(format!("the stream ended: {}", report.ending.as_str()));
        }
        self
    }

    /// The named client that sent it.
    pub fn client(mut self, client: Option<&str>) -> Self {
        self.client = client.map(str::to_owned);
        self
    }

    /// The tokens the answer used, when a deployment said.
    pub fn tokens(&self) -> Option<u64> {
        self.tokens
    }

    /// Whether a deployment answered (a stream that broke later included).
    pub fn was_answered(&self) -> bool {
        self.deployment.is_some()
    }

    /// Characters of answer text a stream relayed.
    pub fn text_chars(&self) -> usize {
        self.text_chars
    }

    pub fn log(&self, status: u16, latency: Duration) {
        let attempts = self
            .attempts
            .iter()
            .map(|a| format!("{}:{}", a.deployment, a.outcome.as_str()))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(
            operation = self.operation,
            client = self.client.as_deref(),
            route = self.route,
            status,
            deployment = self.deployment,
            calls = upstream_calls(&self.attempts),
            attempts,
            latency_ms = millis(latency),
            total_tokens = self.tokens,
            stream = self.stream,
            continued_on = (!self.continued_on.is_empty()).then(|| self.continued_on.join(" ")),
            ending = self.ending,
            error = self.error.as_deref(),
            "request"
        );
    }
}
