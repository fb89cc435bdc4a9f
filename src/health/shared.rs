//! What the fleet's table holds about one deployment, as epoch times in milliseconds (so every
//! execution environment reads them the same way, whatever its own monotonic clock).

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shared {
    /// Throttled until then; once past (and not cleared), the next call is a trial.
    pub throttled_until: Option<u64>,
    /// The circuit is open until then; once past, the next call is a probe.
    pub open_until: Option<u64>,
    /// How long that opening lasts: the base for the next one.
    pub open_ms: Option<u64>,
    /// Consecutive failures the fleet counted while the circuit was closed.
    pub failures: u32,
    /// Someone holds the lease on the next probe or trial until then.
    pub lease_until: Option<u64>,
    /// That someone is this execution environment.
    pub lease_ours: bool,
}

impl Shared {
    /// Nothing is wrong with the deployment, as far as the fleet knows.
    pub fn is_empty(&self) -> bool {
        self.throttled_until.is_none()
            && self.open_until.is_none()
            && self.failures == 0
            && self.lease_until.is_none()
    }
}
