//! What the Engine keeps to share health with the fleet: the table's handle and settings, and
//! the writes a request has started.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::health::{Fleet, FleetError};

/// A new environment reads the fleet's health before its first request, with more time than
/// the request path allows (its first connection to DynamoDB includes a TLS handshake).
pub(super) const WARM_UP_LIMIT: Duration = Duration::from_secs(1);
/// How often, at most, the table's unavailability is logged (every occurrence is counted).
pub(super) const WARN_EVERY: Duration = Duration::from_secs(60);
/// A probe's or trial's lease outlasts its call by this much, then lapses for another to try.
pub(super) const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// The fleet's table, as this Engine uses it.
pub struct FleetLink {
    pub(super) fleet: Fleet,
    /// Each pool deployment's name in the table, indexed like the pool.
    pub(super) keys: Vec<String>,
    pub(super) refresh: Duration,
    pub(super) limit: Duration,
    /// When unavailability was last logged, and how many times since.
    pub(super) warned: Mutex<(Option<Instant>, u64)>,
}

impl FleetLink {
    pub fn new(fleet: Fleet, keys: Vec<String>, refresh: Duration, limit: Duration) -> Self {
        Self {
            fleet,
            keys,
            refresh,
            limit,
            warned: Mutex::new((None, 0)),
        }
    }
}

/// A change, as the table is told it (epoch times in ms).
pub(super) enum Published {
    Recovered,
    Throttle(u64),
    Open(u64, Duration),
    Failed,
}

/// What a background write came to: for the deployment at `index`, a fleet count that reached
/// the threshold (the opening's end and length) opens its circuit here too.
pub(super) struct Outcome {
    pub(super) index: usize,
    pub(super) operation: &'static str,
    pub(super) result: Result<Option<(u64, Duration)>, FleetError>,
    pub(super) ms: u64,
}

/// The table writes one request started, to be finished before its response.
#[derive(Default)]
pub struct Writes(pub(super) Vec<JoinHandle<Outcome>>);
