//! The routing policy: an [`Engine`] built once per execution environment, which lends a
//! `Failover` policy what it acts on for each request; one loop for every kind of
//! call, whole or streamed; one owner and writer of health (`sync`), which shares it with the
//! rest of the fleet when a table is configured; and the relay that rescues a cut stream.

mod engine;
mod failover;
mod relay;
mod settings;
mod splice;
mod state;
mod sync;

pub use engine::Engine;
pub use failover::RouteError;
pub use relay::{Delivery, Relayed, StreamEnding, StreamReport, Streamed};
pub use settings::Settings;
pub use state::StateError;
