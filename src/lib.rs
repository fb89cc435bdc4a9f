//! fallback-chat: an AWS Lambda function that answers chat requests from whichever Azure OpenAI
//! deployment can answer now, remembering throttling between invocations.
//!
//! Layers, each importing only from those below it (`tests/structure.rs` checks it):
//! leaves (`clock`, `secret`, `attempt`, `outcome`, `sse`, `reply`, `error`), then `pool` and
//! `telemetry`, then `config`, `upstream` and `health`, then `routing` (the Engine), then `http`
//! (the surface, which defines the [`App`] and handles requests), and this file, which builds
//! the App once per execution environment.

#![warn(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    clippy::unwrap_used
)]

// Public: what the binary, the tests and the benchmarks use; the rest is the crate's own, so
// the compiler finds what nothing uses.
mod attempt;
// The one place that reads the time and waits.
#[allow(clippy::disallowed_methods)]
pub mod clock;
pub mod config;
pub mod error;
// Fuzz targets (fuzz/, tests/fuzz.rs); not part of the API.
#[doc(hidden)]
pub mod fuzz;
pub mod health;
// The surface answers with HTTP statuses; upstream/ reads Azure's.
#[allow(clippy::disallowed_types)]
mod http;
pub mod limits;
pub mod net;
mod outcome;
pub mod pool;
pub mod reply;
mod routing;
pub mod secret;
mod sse;
pub mod telemetry;
#[allow(clippy::disallowed_types)]
mod upstream;

use std::sync::Arc;

use aws_config::{BehaviorVersion, SdkConfig};
use metrics_cloudwatch_embedded::Collector;

use crate::clock::{Clock, SystemClock};
use crate::config::clients::Client;
use crate::config::{Config, keys};
use crate::error::ConfigError;
use crate::health::{Breaker, Fleet};
use crate::http::Surface;
use crate::limits::{Ledger, Limiter};
use crate::net::Http;
use crate::pool::{Auth, EntraCredential};
use crate::routing::{Engine, Settings};

pub use crate::http::App;
pub use crate::http::auth::ClientKeys;
pub use crate::http::event::repair as repair_event;

impl App<SystemClock> {
    /// The App without the fleet's shared health, whatever `HEALTH_TABLE` says, and with the
    /// keys as configured (no reference resolved).
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        Self::with_clock(config, SystemClock)
    }

    /// The App as a cold start builds it: the HTTP client from the configured roots; the AWS
    /// SDK's configuration loaded once, and only when a key is held in AWS or `HEALTH_TABLE`
    /// names a table; the keys held in AWS resolved; the fleet's shared health read once
    /// before the first request.
    pub async fn start(config: Config) -> Result<Self, ConfigError> {
        let http = http_client(&config)?;
        let federated = config.pool.deployments.iter().any(|d| {
            matches!(&d.auth, Auth::Entra(app) if matches!(app.credential, EntraCredential::AwsFederation { .. }))
        });
        let aws = if keys::referenced(&config) || config.health_table.is_some() || federated {
            Some(aws_config(&http).await)
        } else {
            None
        };
        let (config, fleet) = match &aws {
            Some(aws) => {
                let config = keys::resolve(&config, aws).await?.apply(config);
                let fleet = config
                    .health_table
                    .as_deref()
                    .map(|table| Fleet::connect(table, aws));
                (config, fleet)
            }
            None => (config, None),
        };
        let app = Self::build(
            config,
            &http,
            SystemClock,
            fastrand::u64(..),
            fleet,
            aws.as_ref(),
        )?;
        app.engine.warm_up().await;
        Ok(app)
    }
}

/// The environment's one HTTP client (Azure, and AWS when needed), trusting the configured roots.
fn http_client(config: &Config) -> Result<Http, ConfigError> {
    Http::new(&config.extra_roots).map_err(|e| ConfigError::HttpClient(Box::new(e)))
}

/// The AWS SDK's shared configuration, from the Lambda environment (region, credentials,
/// `AWS_ENDPOINT_URL`), calling AWS over the environment's one HTTP client.
async fn aws_config(http: &Http) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http.for_aws())
        .load()
        .await
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
        let http = http_client(&config)?;
        Self::build(config, &http, clock, seed, fleet, None)
    }

    /// As [`App::with_fleet`], reaching AWS (STS, for Entra ID federation) through `aws`.
    pub fn with_aws(
        config: Config,
        clock: C,
        seed: u64,
        fleet: Option<Fleet>,
        aws: &SdkConfig,
    ) -> Result<Self, ConfigError> {
        let http = http_client(&config)?;
        Self::build(config, &http, clock, seed, fleet, Some(aws))
    }

    fn build(
        config: Config,
        http: &Http,
        clock: C,
        seed: u64,
        fleet: Option<Fleet>,
        aws: Option<&SdkConfig>,
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
        let limits = Limiter::new(
            &config.clients,
            config.limits,
            clock.clone(),
            fleet.as_ref().map(Ledger::of),
            config.health_timeout,
        );
        // What each client may do; its keys are in `keys`, and nowhere else.
        let clients = config
            .clients
            .into_iter()
            .map(|client| Client {
                keys: Vec::new(),
                ..client
            })
            .collect();
        let engine = Engine::new(config.pool, http, settings, clock, seed, fleet, aws);
        Ok(Self {
            engine: Arc::new(engine),
            keys,
            clients,
            limits,
            surface,
            metrics: None,
        })
    }

    /// How many calls this environment has made to the health table for the clients' limits
    /// (leases of a window), for what a request costs in them.
    pub fn limit_table_calls(&self) -> u64 {
        self.limits.table_calls()
    }

    /// Whether an Entra ID token can be had for every app the pool authenticates with: the
    /// reason for each that cannot (`--check`).
    pub async fn check_tokens(&self) -> Vec<String> {
        self.engine
            .check_tokens()
            .await
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect()
    }

    /// Whether some client's limits are counted through the fleet's table: the environment
    /// then holds leases to give back before it shuts down ([`App::release_leases`]).
    pub fn shares_limits(&self) -> bool {
        self.limits.shared()
    }

    /// Before the environment shuts down: the unspent leases of the clients' limits given back
    /// to the fleet (what was given back, in requests and tokens together).
    pub async fn release_leases(&self) -> u64 {
        self.limits.release().await
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
