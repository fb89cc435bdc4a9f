//! fallback-chat: an AWS Lambda function that answers chat requests from whichever Azure OpenAI
//! deployment can answer now, remembering throttling between invocations.

pub mod api;
pub mod azure;
pub mod config;
pub mod error;
pub mod failover;
pub mod health;

use crate::azure::Upstream;
use crate::config::Config;
use crate::error::ConfigError;
use crate::health::{Clock, HealthTable, SystemClock};

/// Everything built once per execution environment and shared by every invocation.
pub struct App<C: Clock = SystemClock> {
    config: Config,
    upstream: Upstream,
    health: HealthTable,
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
        Ok(Self {
            upstream: Upstream::new(&config)?,
            health: HealthTable::new(config.deployments.len()),
            config,
            clock,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}
