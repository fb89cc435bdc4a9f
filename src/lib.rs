//! fallback-chat: an AWS Lambda function that answers chat requests from whichever Azure OpenAI
//! deployment can answer now, remembering throttling between invocations.

pub mod api;
pub mod auth;
pub mod azure;
pub mod config;
pub mod error;
pub mod failover;
pub mod health;
pub mod openai;
pub mod pool;
pub mod secrets;
pub mod stream;
pub mod telemetry;

use crate::auth::ClientKeys;
use crate::azure::Upstream;
use crate::config::Config;
use crate::error::ConfigError;
use crate::health::{Breaker, Clock, HealthTable, SystemClock};

/// Everything built once per execution environment and shared by every invocation.
pub struct App<C: Clock = SystemClock> {
    config: Config,
    upstream: Upstream,
    health: HealthTable,
    auth: ClientKeys,
    /// Where EMF metrics are collected, once installed (tests usually run without).
    metrics: Option<&'static metrics_cloudwatch_embedded::Collector>,
    clock: C,
}

impl App<SystemClock> {
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        Self::with_clock(config, SystemClock)
    }
}

impl<C: Clock> App<C> {
    /// Builds the HTTP client (connection pool, rustls) and the health table.
    pub fn with_clock(config: Config, clock: C) -> Result<Self, ConfigError> {
        // Each execution environment draws its own seed, so a fleet spreads its choices.
        Self::with_seed(config, clock, fastrand::u64(..))
    }

    /// As [`App::with_clock`], with the seed of the weighted random choice fixed.
    pub fn with_seed(config: Config, clock: C, seed: u64) -> Result<Self, ConfigError> {
        let breaker = Breaker {
            failures: config.circuit_failures,
            open_for: config.circuit_open,
            // A probe cannot take longer than one attempt.
            probe_lease: config.attempt_timeout,
        };
        Ok(Self {
            auth: ClientKeys::from_config(&config)?,
            upstream: Upstream::new(&config.pool)?,
            health: HealthTable::new(config.pool.deployments.len(), breaker, seed),
            config,
            metrics: None,
            clock,
        })
    }

    /// Flushes EMF metrics to stdout after each invocation.
    pub fn with_metrics(
        mut self,
        collector: &'static metrics_cloudwatch_embedded::Collector,
    ) -> Self {
        self.metrics = Some(collector);
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}
