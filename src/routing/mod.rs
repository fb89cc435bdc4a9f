//! The routing policy: an [`Engine`] that owns the pool, the upstream client, the health table,
//! the clock and the settings, and one failover loop that serves whole and streamed answers.

mod engine;
mod failover;
mod stream;

pub use engine::{Engine, RouteError, Settings};
pub use failover::MIN_ATTEMPT;
