//! What one execution environment remembers about each deployment between invocations:
//! throttled-until, circuit state, latency and remaining quota, and the choice of the next
//! deployment to try. Pure data plus a time passed in, so tests move time without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::attempt::Availability;
use crate::pool::Deployment;

/// The circuit breaker's settings.
#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// How long an open circuit keeps the deployment out before one probe is let through.
    pub open_for: Duration,
    /// A probe that has not reported back after this long frees the slot for another.
    pub probe_lease: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed {
        failures: u32,
    },
    /// Out until `until`; after that, half-open: one probe at a time.
    Open {
        until: Instant,
        probe_since: Option<Instant>,
    },
}

#[derive(Debug, Clone, Copy)]
struct DeploymentHealth {
    throttled_until: Option<Instant>,
    circuit: Circuit,
    latency_ewma_ms: Option<f64>,
    remaining_requests: Option<u64>,
    remaining_tokens: Option<u64>,
}

impl Default for DeploymentHealth {
    fn default() -> Self {
        Self {
            throttled_until: None,
            circuit: Circuit::Closed { failures: 0 },
            latency_ewma_ms: None,
            remaining_requests: None,
            remaining_tokens: None,
        }
    }
}

/// Where a deployment stands at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Available,
    /// The circuit's trip time has passed: the next caller is its probe.
    HalfOpen,
    Throttled {
        until: Instant,
    },
    CircuitOpen {
        until: Instant,
    },
    /// Half-open, and another request's probe is still out.
    ProbeInFlight,
}

impl State {
    pub fn usable(self) -> bool {
        matches!(self, State::Available | State::HalfOpen)
    }

    /// How the 503 body names this state.
    pub fn availability(self) -> Availability {
        match self {
            State::Available => Availability::Available,
            State::HalfOpen => Availability::HalfOpen,
            State::Throttled { .. } => Availability::Throttled,
            State::CircuitOpen { .. } => Availability::CircuitOpen,
            State::ProbeInFlight => Availability::ProbeInFlight,
        }
    }

    /// When the deployment can be called again, if it cannot be now.
    pub fn until(self) -> Option<Instant> {
        match self {
            State::Throttled { until } | State::CircuitOpen { until } => Some(until),
            _ => None,
        }
    }
}

impl DeploymentHealth {
    fn state(&self, now: Instant, breaker: &Breaker) -> State {
        let throttled = self.throttled_until.filter(|t| *t > now);
        let open = match self.circuit {
            Circuit::Open { until, .. } if until > now => Some(until),
            _ => None,
        };
        match (throttled, open) {
            (Some(t), Some(o)) if o > t => State::CircuitOpen { until: o },
            (Some(t), _) => State::Throttled { until: t },
            (None, Some(o)) => State::CircuitOpen { until: o },
            (None, None) => match self.circuit {
                Circuit::Open {
                    probe_since: Some(since),
                    ..
                } if now.saturating_duration_since(since) < breaker.probe_lease => {
                    State::ProbeInFlight
                }
                Circuit::Open { .. } => State::HalfOpen,
                Circuit::Closed { .. } => State::Available,
            },
        }
    }
}

/// What one call to a deployment came to, as far as its health is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    Success {
        latency: Duration,
        remaining_requests: Option<u64>,
        remaining_tokens: Option<u64>,
    },
    Throttled {
        until: Instant,
    },
    /// 5xx, timeouts, resets, refused connections, authentication and deployment errors.
    Failure,
    /// The deployment refused this request (a 400 of some kind): it is reachable and alive.
    Refused,
}

struct Table {
    deployments: Vec<DeploymentHealth>,
    rng: fastrand::Rng,
}

/// Health of each deployment in the pool, indexed like [`crate::pool::Pool::deployments`].
pub struct HealthTable {
    table: Mutex<Table>,
    breaker: Breaker,
}

/// Latencies within this many milliseconds of each other weigh about the same: only a real
/// difference (another region, a loaded deployment) should move traffic.
const LATENCY_DAMPING_MS: f64 = 50.0;
/// Weight of the newest sample in the latency average.
const EWMA_ALPHA: f64 = 0.3;
/// The least share of its weight a deployment keeps when it reports no remaining quota.
const EMPTY_QUOTA_FACTOR: f64 = 0.05;

impl HealthTable {
    pub fn new(deployments: usize, breaker: Breaker, seed: u64) -> Self {
        Self {
            table: Mutex::new(Table {
                deployments: vec![DeploymentHealth::default(); deployments],
                rng: fastrand::Rng::with_seed(seed),
            }),
            breaker,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        // A panic elsewhere cannot leave this plain data half-written, so a poisoned lock is usable.
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn state(&self, index: usize, now: Instant) -> State {
        self.with(|t| {
            t.deployments
                .get(index)
                .map_or(State::Available, |h| h.state(now, &self.breaker))
        })
    }

    /// Chooses the next deployment among `members` (minus those `skip` rejects): the lowest
    /// priority that has a usable member, then weighted random inside it, favouring more
    /// remaining quota and lower latency. A half-open deployment that is chosen becomes the
    /// probe, so no other request picks it until it reports back.
    pub fn select(
        &self,
        members: &[usize],
        pool: &[Deployment],
        skip: impl Fn(usize) -> bool,
        now: Instant,
    ) -> Option<usize> {
        self.with(|t| {
            let usable = |i: usize| {
                !skip(i)
                    && t.deployments
                        .get(i)
                        .is_some_and(|h| h.state(now, &self.breaker).usable())
            };
            let priority = members
                .iter()
                .copied()
                .filter(|&i| usable(i))
                .map(|i| pool[i].priority)
                .min()?;
            let group = || {
                members
                    .iter()
                    .copied()
                    .filter(move |&i| pool[i].priority == priority && usable(i))
            };

            // What the group knows, so each member is judged against its peers.
            let (mut max_requests, mut max_tokens, mut min_latency) = (0u64, 0u64, f64::MAX);
            for i in group() {
                let h = &t.deployments[i];
                max_requests = max_requests.max(h.remaining_requests.unwrap_or(0));
                max_tokens = max_tokens.max(h.remaining_tokens.unwrap_or(0));
                min_latency = min_latency.min(h.latency_ewma_ms.unwrap_or(f64::MAX));
            }
            let effective = |i: usize| {
                let h = &t.deployments[i];
                let share = |remaining: Option<u64>, max: u64| match remaining {
                    Some(r) if max > 0 => (r as f64 / max as f64).max(EMPTY_QUOTA_FACTOR),
                    Some(_) => EMPTY_QUOTA_FACTOR,
                    None => 1.0,
                };
                let quota = share(h.remaining_requests, max_requests)
                    .min(share(h.remaining_tokens, max_tokens));
                let speed = match h.latency_ewma_ms {
                    Some(own) if min_latency < f64::MAX => {
                        (min_latency + LATENCY_DAMPING_MS) / (own + LATENCY_DAMPING_MS)
                    }
                    _ => 1.0,
                };
                pool[i].weight * quota * speed
            };

            let total: f64 = group().map(effective).sum();
            let mut point = t.rng.f64() * total;
            let mut chosen = None;
            for i in group() {
                chosen = Some(i);
                point -= effective(i);
                if point < 0.0 {
                    break;
                }
            }
            let chosen = chosen?;
            if let Circuit::Open { probe_since, .. } = &mut t.deployments[chosen].circuit {
                *probe_since = Some(now);
            }
            Some(chosen)
        })
    }

    /// Records what a call came to.
    pub fn record(&self, index: usize, event: Event, now: Instant) {
        let breaker = self.breaker;
        self.with(|t| {
            let Some(h) = t.deployments.get_mut(index) else {
                return;
            };
            match event {
                Event::Success {
                    latency,
                    remaining_requests,
                    remaining_tokens,
                } => {
                    h.circuit = Circuit::Closed { failures: 0 };
                    let ms = latency.as_secs_f64() * 1000.0;
                    h.latency_ewma_ms = Some(
                        h.latency_ewma_ms
                            .map_or(ms, |avg| avg + EWMA_ALPHA * (ms - avg)),
                    );
                    h.remaining_requests = remaining_requests.or(h.remaining_requests);
                    h.remaining_tokens = remaining_tokens.or(h.remaining_tokens);
                }
                Event::Throttled { until } => {
                    // A later, longer Retry-After extends the cooldown; a shorter one never shortens it.
                    h.throttled_until = Some(h.throttled_until.map_or(until, |t| t.max(until)));
                    h.remaining_requests = Some(0);
                    // It answered: whatever its circuit said, the deployment is reachable.
                    h.circuit = Circuit::Closed { failures: 0 };
                }
                Event::Refused => h.circuit = Circuit::Closed { failures: 0 },
                Event::Failure => {
                    h.circuit = match h.circuit {
                        Circuit::Closed { failures } if failures + 1 < breaker.failures => {
                            Circuit::Closed {
                                failures: failures + 1,
                            }
                        }
                        // A failure while still open (another request's) changes nothing.
                        open @ Circuit::Open { until, .. } if until > now => open,
                        // The threshold reached, or the half-open probe failed: out again.
                        _ => Circuit::Open {
                            until: now + breaker.open_for,
                            probe_since: None,
                        },
                    };
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    const BREAKER: Breaker = Breaker {
        failures: 3,
        open_for: Duration::from_secs(30),
        probe_lease: Duration::from_secs(10),
    };

    #[test]
    fn a_cooldown_ends_on_time_and_is_only_ever_extended() {
        let clock = ManualClock::default();
        let health = HealthTable::new(2, BREAKER, 1);
        let t0 = clock.now();
        let throttle = |s: u64| Event::Throttled {
            until: t0 + Duration::from_secs(s),
        };
        health.record(0, throttle(7), t0);
        assert_eq!(
            health.state(0, t0),
            State::Throttled {
                until: t0 + Duration::from_secs(7)
            }
        );
        assert_eq!(health.state(1, t0), State::Available);

        health.record(0, throttle(2), t0);
        assert_eq!(
            health.state(0, t0).until(),
            Some(t0 + Duration::from_secs(7)),
            "a shorter Retry-After never shortens the cooldown"
        );
        health.record(0, throttle(30), t0);
        assert_eq!(
            health.state(0, t0).until(),
            Some(t0 + Duration::from_secs(30))
        );

        clock.advance(Duration::from_secs(30));
        assert_eq!(health.state(0, clock.now()), State::Available);
    }

    fn one_deployment() -> Vec<Deployment> {
        vec![Deployment {
            id: "a".into(),
            endpoint: "https://x".into(),
            deployment: "a".into(),
            key: None,
            key_var: "K".into(),
            api: crate::pool::ApiStyle::V1,
            priority: 0,
            weight: 1.0,
            context_window: None,
        }]
    }

    #[test]
    fn the_circuit_opens_lets_one_probe_through_and_closes_on_success() {
        let clock = ManualClock::default();
        let health = HealthTable::new(1, BREAKER, 1);
        let pool = one_deployment();
        let now = clock.now();
        for _ in 0..2 {
            health.record(0, Event::Failure, now);
            assert_eq!(health.state(0, now), State::Available);
        }
        health.record(0, Event::Failure, now);
        assert!(matches!(health.state(0, now), State::CircuitOpen { .. }));
        assert_eq!(health.select(&[0], &pool, |_| false, now), None);

        clock.advance(BREAKER.open_for);
        let now = clock.now();
        assert_eq!(health.state(0, now), State::HalfOpen);
        assert_eq!(
            health.select(&[0], &pool, |_| false, now),
            Some(0),
            "the probe"
        );
        assert_eq!(health.state(0, now), State::ProbeInFlight);
        assert_eq!(
            health.select(&[0], &pool, |_| false, now),
            None,
            "only one probe"
        );

        health.record(0, Event::Failure, now);
        assert!(
            matches!(health.state(0, now), State::CircuitOpen { .. }),
            "failed probe"
        );

        clock.advance(BREAKER.open_for);
        let now = clock.now();
        assert_eq!(health.select(&[0], &pool, |_| false, now), Some(0));
        health.record(
            0,
            Event::Success {
                latency: Duration::from_millis(100),
                remaining_requests: None,
                remaining_tokens: None,
            },
            now,
        );
        assert_eq!(health.state(0, now), State::Available);
    }

    #[test]
    fn a_probe_that_never_reports_back_frees_the_slot_after_its_lease() {
        let clock = ManualClock::default();
        let health = HealthTable::new(1, BREAKER, 1);
        let pool = one_deployment();
        for _ in 0..3 {
            health.record(0, Event::Failure, clock.now());
        }
        clock.advance(BREAKER.open_for);
        assert_eq!(health.select(&[0], &pool, |_| false, clock.now()), Some(0));
        clock.advance(BREAKER.probe_lease);
        assert_eq!(health.state(0, clock.now()), State::HalfOpen);
    }
}
