//! The routing policy's settings, read from the environment at cold start.

use std::time::Duration;

use crate::health::Breaker;

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
