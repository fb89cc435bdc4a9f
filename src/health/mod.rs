//! What an environment, and the fleet, remembers about each deployment: the local table every
//! decision reads (`table`), and the shared state other environments publish (`shared`, kept in
//! DynamoDB by `fleet`).

mod fleet;
mod shared;
mod table;

pub use fleet::{Fleet, FleetError, Written};
pub use shared::Shared;
pub use table::{Breaker, Change, Choice, Event, HealthTable, State};
