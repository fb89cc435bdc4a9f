//! The Engine: everything the routing policy needs, owned in one place (the pool, the upstream
//! client, what this environment remembers, the clock and the settings), and the two ways of
//! asking it for an answer: whole, or streamed.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics_cloudwatch_embedded::Collector;

use crate::attempt::{Answer, Attempt, Exhausted};
use crate::clock::Clock;
use crate::health::{Breaker, HealthTable};
use crate::outcome::{ChatBody, Completion, ContentFilter};
use crate::pool::{Pool, Route};
use crate::telemetry;
use crate::upstream::{BuildError, Upstream};

/// The policy's settings (read from the environment at cold start).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Longest one deployment may take before the next is tried.
    pub attempt_timeout: Duration,
    /// How long to skip a deployment whose 429 said nothing about when to return.
    pub throttle_cooldown: Duration,
    /// A stream that has sent no content this long after its request is a failed attempt.
    pub first_token_timeout: Duration,
    /// A stream that sends nothing this long once it has started is cut.
    pub stream_idle_timeout: Duration,
    pub breaker: Breaker,
}

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

/// The routing policy and everything it acts on. Built once per execution environment.
pub struct Engine<C: Clock> {
    pub(super) pool: Pool,
    pub(super) upstream: Upstream,
    pub(super) health: HealthTable,
    pub(super) clock: C,
    pub(super) settings: Settings,
    /// Where EMF metrics are collected, once installed (tests usually run without).
    pub(super) metrics: OnceLock<&'static Collector>,
}

impl<C: Clock> Engine<C> {
    /// Builds the HTTP client (connection pool, rustls) and the health table; `seed` seeds the
    /// weighted random choice.
    pub fn new(pool: Pool, settings: Settings, clock: C, seed: u64) -> Result<Self, BuildError> {
        Ok(Self {
            upstream: Upstream::new(&pool)?,
            health: HealthTable::new(pool.deployments.len(), settings.breaker, seed),
            pool,
            clock,
            settings,
            metrics: OnceLock::new(),
        })
    }

    /// Flushes EMF metrics to stdout when a stream this engine relays ends.
    pub fn flush_metrics_to(&self, collector: &'static Collector) {
        // Set once, at start-up; a second call changes nothing.
        let _ = self.metrics.set(collector);
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The moment `budget` from now: the request's deadline.
    pub fn deadline(&self, budget: Duration) -> Instant {
        self.clock.now() + budget
    }

    /// Asks the route's deployments for a whole completion until one answers, before `deadline`.
    pub async fn complete(
        &self,
        route: &Route,
        body: &ChatBody,
        deadline: Instant,
    ) -> Result<Answer<Completion>, RouteError> {
        let (_, answer) = self
            .failover(route, deadline, |index, timeout| {
                self.upstream.chat(&self.clock, index, body, timeout)
            })
            .await?;
        telemetry::answered(&answer.deployment, answer.output.total_tokens());
        Ok(answer)
    }

    pub(super) fn id(&self, index: usize) -> &str {
        self.pool
            .deployments
            .get(index)
            .map_or("unknown", |d| d.id.as_str())
    }
}
