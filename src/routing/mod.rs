//! The routing policy: an [`Engine`] that owns the pool, the upstream client, the health table,
//! the clock and the settings, and one failover loop that serves whole and streamed answers,
//! sharing what it learns with the rest of the fleet when a table is configured.

mod engine;
mod failover;
mod fleet;
mod link;
mod relay;
mod splice;
mod stream;

pub use engine::{Engine, RouteError, Settings};
pub use relay::{Delivery, StreamReport, Streamed};
