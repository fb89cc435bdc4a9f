//! The application every invocation shares: the routing engine, the client keys and the
//! surface's settings. lib.rs builds it once per execution environment; the surface's modules
//! add its request handling.

use std::sync::Arc;
use std::time::Duration;

use metrics_cloudwatch_embedded::Collector;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, LimitSettings};
use crate::routing::Engine;

use crate::config::clients::Client;
use crate::limits::Limiter;

use super::auth::ClientKeys;

/// Everything built once per execution environment and shared by every invocation.
pub struct App<C: Clock = SystemClock> {
    pub(crate) engine: Arc<Engine<C>>,
    pub(crate) keys: ClientKeys,
    /// The named clients (without their keys), indexed as `Caller::Client` names them.
    pub(crate) clients: Vec<Client>,
    pub(crate) limits: Limiter<C>,
    pub(crate) surface: Surface,
    /// Where EMF metrics are collected, once installed (tests usually run without).
    pub(crate) metrics: Option<&'static Collector>,
}

/// The surface's own settings (read from the environment at cold start).
#[derive(Debug, Clone)]
pub struct Surface {
    pub system_prompt: String,
    pub max_query_chars: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub deadline_margin: Duration,
    /// Lambda response streaming (a Function URL with InvokeMode RESPONSE_STREAM) rather than
    /// one buffered response per invocation.
    pub response_streaming: bool,
    /// How the named clients' requests are estimated and kept off short deployments.
    pub limits: LimitSettings,
}

impl From<&Config> for Surface {
    fn from(config: &Config) -> Self {
        Self {
            system_prompt: config.system_prompt.clone(),
            max_query_chars: config.max_query_chars,
            max_body_bytes: config.max_body_bytes,
            request_timeout: config.request_timeout,
            deadline_margin: config.deadline_margin,
            response_streaming: config.response_streaming,
            limits: config.limits,
        }
    }
}
