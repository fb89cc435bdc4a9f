//! What one execution environment remembers about each deployment between invocations.
//! Pure data plus a clock passed in, so tests move time without sleeping.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Where "now" comes from. The real one reads the system clocks; tests use [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
    /// Wall-clock time, for HTTP-dates in Retry-After.
    fn wall(&self) -> SystemTime;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_wall: SystemTime,
    elapsed_ms: AtomicU64,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            start_wall: SystemTime::now(),
            elapsed_ms: AtomicU64::new(0),
        }
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.elapsed_ms.fetch_add(ms, Ordering::SeqCst);
    }
    fn elapsed(&self) -> Duration {
        Duration::from_millis(self.elapsed_ms.load(Ordering::SeqCst))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }
    fn wall(&self) -> SystemTime {
        self.start_wall + self.elapsed()
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now(&self) -> Instant {
        (**self).now()
    }
    fn wall(&self) -> SystemTime {
        (**self).wall()
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct DeploymentHealth {
    throttled_until: Option<Instant>,
}

/// Health of each deployment, indexed like the configured deployment list.
#[derive(Debug)]
pub struct HealthTable {
    deployments: Mutex<Vec<DeploymentHealth>>,
}

impl HealthTable {
    pub fn new(deployments: usize) -> Self {
        Self {
            deployments: Mutex::new(vec![DeploymentHealth::default(); deployments]),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Vec<DeploymentHealth>) -> R) -> R {
        // A panic elsewhere cannot leave this plain data half-written, so a poisoned lock is usable.
        let mut guard = self
            .deployments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    /// Records a 429: the deployment is skipped until `until`. A later, longer Retry-After
    /// extends the cooldown; a shorter one never shortens it.
    pub fn throttle(&self, index: usize, until: Instant) {
        self.with(|all| {
            if let Some(h) = all.get_mut(index) {
                h.throttled_until = Some(h.throttled_until.map_or(until, |t| t.max(until)));
            }
        });
    }

    /// When the deployment's cooldown ends, if it is still cooling down at `now`.
    pub fn cooling_until(&self, index: usize, now: Instant) -> Option<Instant> {
        self.with(|all| {
            all.get(index)
                .and_then(|h| h.throttled_until)
                .filter(|until| *until > now)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cooldown_ends_on_time_and_is_only_ever_extended() {
        let clock = ManualClock::default();
        let health = HealthTable::new(2);
        let t0 = clock.now();
        health.throttle(0, t0 + Duration::from_secs(7));
        assert_eq!(
            health.cooling_until(0, t0),
            Some(t0 + Duration::from_secs(7))
        );
        assert_eq!(health.cooling_until(1, t0), None);

        health.throttle(0, t0 + Duration::from_secs(2));
        assert_eq!(
            health.cooling_until(0, t0),
            Some(t0 + Duration::from_secs(7)),
            "a shorter Retry-After never shortens the cooldown"
        );
        health.throttle(0, t0 + Duration::from_secs(30));
        assert_eq!(
            health.cooling_until(0, t0),
            Some(t0 + Duration::from_secs(30))
        );

        clock.advance(Duration::from_secs(30));
        assert_eq!(health.cooling_until(0, clock.now()), None);
    }
}
