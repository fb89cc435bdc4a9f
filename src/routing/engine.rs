//! The Engine: everything the routing policy needs, owned in one place (the pool, the upstream
//! client, what this environment remembers, the clock and the settings), and the two ways of
//! asking it for an answer: whole, or streamed.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics_cloudwatch_embedded::Collector;

use crate::attempt::{Answer, Attempt, Exhausted};
use crate::clock::Clock;
use crate::health::{Breaker, Fleet, HealthTable};
use crate::net::Http;
use crate::outcome::{ChatBody, Completion, ContentFilter};
use crate::pool::{Pool, Route};
use crate::telemetry;
use crate::upstream::Upstream;

use super::link::{FleetLink, WARM_UP_LIMIT, Writes};

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
    /// How many times, at most, a stream cut after its first content is continued on another
    /// deployment (0: never; the stream ends with an honest error instead).
    pub continuations: u32,
    pub breaker: Breaker,
    /// While probes keep timing out, each opening doubles up to this.
    pub max_open: Duration,
    /// How often, at most, the fleet's table is read on the request path.
    pub health_refresh: Duration,
    /// The longest any call to the fleet's table may take.
    pub health_timeout: Duration,
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
    /// The fleet's shared health, when a table is configured.
    pub(super) fleet: Option<FleetLink>,
    /// Where EMF metrics are collected, once installed (tests usually run without).
    pub(super) metrics: OnceLock<&'static Collector>,
}

impl<C: Clock> Engine<C> {
    /// Prepares each deployment's calls over `http` and builds the health table; `seed` seeds
    /// the weighted random choice; `fleet` shares health with the rest of the fleet.
    pub fn new(
        pool: Pool,
        http: &Http,
        settings: Settings,
        clock: C,
        seed: u64,
        fleet: Option<Fleet>,
    ) -> Self {
        let fleet = fleet.map(|fleet| {
            let keys = pool
                .deployments
                .iter()
                .map(|d| Fleet::key(&d.endpoint, &d.deployment))
                .collect();
            FleetLink::new(
                fleet,
                keys,
                settings.health_refresh,
                settings.health_timeout,
            )
        });
        Self {
            upstream: Upstream::new(&pool, http),
            health: HealthTable::new(pool.deployments.len(), settings.breaker, seed)
                .with_max_open(settings.max_open),
            pool,
            clock,
            settings,
            fleet,
            metrics: OnceLock::new(),
        }
    }

    /// Before the first request: what the fleet already knows (a new environment does not start
    /// blind), and the table's connection made.
    pub async fn warm_up(&self) {
        self.refresh(WARM_UP_LIMIT, true).await;
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
        let mut writes = Writes::default();
        let result = self
            .failover(route, deadline, &[], &mut writes, |index, timeout| {
                self.upstream.chat(&self.clock, index, body, timeout)
            })
            .await;
        self.finish(writes).await;
        let (_, answer) = result?;
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
