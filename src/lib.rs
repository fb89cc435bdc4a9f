//! fallback-chat: an AWS Lambda function that answers chat requests from whichever Azure OpenAI
//! deployment can answer now, remembering throttling between invocations.
//!
//! Layers, each importing only from those below it (`tests/structure.rs` checks it):
//! leaves (`clock`, `secret`, `attempt`, `outcome`, `sse`, `reply`, `error`), then `pool` and
//! `telemetry`, then `config`, `upstream` and `health`, then `routing` (the Engine), then `http`
//! (the surface, which defines the [`App`] and handles requests), and this file, which builds
//! the App once per execution environment.

pub mod attempt;
pub mod clock;
pub mod config;
pub mod error;
pub mod health;
pub mod http;
pub mod net;
pub mod outcome;
pub mod pool;
pub mod reply;
pub mod routing;
pub mod secret;
pub mod sse;
pub mod telemetry;
pub mod upstream;

use std::sync::Arc;

use metrics_cloudwatch_embedded::Collector;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::error::ConfigError;
use crate::health::{Breaker, Fleet};
use crate::http::Surface;
use crate::http::auth::ClientKeys;
use crate::routing::{Engine, Settings};

pub use crate::http::App;

impl App<SystemClock> {
    /// The App without the fleet's shared health, whatever `HEALTH_TABLE` says.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        Self::with_clock(config, SystemClock)
    }

    /// The App as a cold start builds it: with the fleet's shared health when `HEALTH_TABLE`
    /// names a table (aws-config is loaded only then), read once before the first request.
    pub async fn start(config: Config) -> Result<Self, ConfigError> {
        let fleet = match &config.health_table {
            Some(table) => Some(Fleet::connect(table, &config.http).await),
            None => None,
        };
        let app = Self::with_fleet(config, SystemClock, fastrand::u64(..), fleet)?;
        app.engine.warm_up().await;
        Ok(app)
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
        Self::with_fleet(config, clock, seed, None)
    }

    /// As [`App::with_seed`], sharing health with the rest of the fleet through `fleet`.
    pub fn with_fleet(
        config: Config,
        clock: C,
        seed: u64,
        fleet: Option<Fleet>,
    ) -> Result<Self, ConfigError> {
        let settings = Settings {
            attempt_timeout: config.attempt_timeout,
            throttle_cooldown: config.throttle_cooldown,
            first_token_timeout: config.first_token_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
            continuations: config.stream_continuations,
            breaker: Breaker {
                failures: config.circuit_failures,
                open_for: config.circuit_open,
                // A probe cannot take longer than one attempt.
                probe_lease: config.attempt_timeout,
            },
            max_open: config.circuit_max_open,
            health_refresh: config.health_refresh,
            health_timeout: config.health_timeout,
        };
        let keys = ClientKeys::from_config(&config)?;
        let surface = Surface::from(&config);
        let engine = Engine::new(config.pool, &config.http, settings, clock, seed, fleet);
        Ok(Self {
            engine: Arc::new(engine),
            keys,
            surface,
            metrics: None,
        })
    }

    /// Whether the runtime loop streams responses (`RESPONSE_MODE=streaming`).
    pub fn response_streaming(&self) -> bool {
        self.surface.response_streaming
    }

    /// Flushes EMF metrics to stdout after each invocation (and when a stream ends).
    pub fn with_metrics(mut self, collector: &'static Collector) -> Self {
        self.engine.flush_metrics_to(collector);
        self.metrics = Some(collector);
        self
    }
}
