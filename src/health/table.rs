//! What one execution environment remembers about each deployment between invocations:
//! throttled-until, circuit state, latency and remaining quota, what the fleet's shared table
//! last said, and the choice of the next deployment to try. Pure data plus a time passed in, so
//! tests move time without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::attempt::Availability;
use crate::pool::Deployment;

use super::shared::Shared;

/// The circuit breaker's settings.
#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// How long an open circuit keeps the deployment out before one probe is let through (and
    /// again after each probe that fails fast).
    pub open_for: Duration,
    /// A probe that has not reported back after this long frees the slot for another.
    pub probe_lease: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed {
        failures: u32,
    },
    /// Out until `until`; after that, half-open: one probe at a time. `period` is how long this
    /// opening lasts, the base for the next one.
    Open {
        until: Instant,
        period: Duration,
    },
}

/// A lease on a deployment's next call (a probe, or the trial after a shared cooldown), taken
/// in the fleet's table so that one environment of the fleet makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    until: Instant,
    ours: bool,
}

#[derive(Debug, Clone, Copy)]
struct DeploymentHealth {
    throttled_until: Option<Instant>,
    circuit: Circuit,
    /// When this environment's probe or trial of the deployment began, while it is out.
    probe_since: Option<Instant>,
    latency_ewma_ms: Option<f64>,
    remaining_requests: Option<u64>,
    remaining_tokens: Option<u64>,
    /// Once its cooldown is over, the next call is a trial (which needs the fleet's lease): set
    /// by any cooldown the fleet shares, cleared when a call here or the fleet's table says how
    /// the deployment is doing.
    trial: bool,
    lease: Option<Lease>,
    /// The fleet's table holds something about this deployment, so a recovery is news.
    shared: bool,
}

impl Default for DeploymentHealth {
    fn default() -> Self {
        Self {
            throttled_until: None,
            circuit: Circuit::Closed { failures: 0 },
            probe_since: None,
            latency_ewma_ms: None,
            remaining_requests: None,
            remaining_tokens: None,
            trial: false,
            lease: None,
            shared: false,
        }
    }
}

/// Where a deployment stands at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Available,
    /// Its circuit's open period (or the fleet's cooldown) is over: the next caller probes it.
    HalfOpen,
    Throttled {
        until: Instant,
    },
    CircuitOpen {
        until: Instant,
    },
    /// Half-open, and another request's probe (here or elsewhere in the fleet) is still out.
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
    /// Its next call is a probe of an open circuit.
    fn probing(&self, now: Instant) -> bool {
        matches!(self.circuit, Circuit::Open { until, .. } if until <= now)
    }

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
            (None, None) if !(self.probing(now) || self.trial) => State::Available,
            (None, None) => {
                let elsewhere = self.lease.is_some_and(|l| !l.ours && l.until > now);
                let here = self.probe_since.is_some_and(|since| {
                    now.saturating_duration_since(since) < breaker.probe_lease
                });
                if elsewhere || here {
                    State::ProbeInFlight
                } else {
                    State::HalfOpen
                }
            }
        }
    }

    /// Whether the fleet should hear that it is well again.
    fn noteworthy(&self) -> bool {
        self.shared
            || self.trial
            || self.throttled_until.is_some()
            || self.circuit != Circuit::Closed { failures: 0 }
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
    /// 5xx, resets, refused connections, authentication and deployment errors: failures that
    /// cost the caller little.
    Failure,
    /// No answer within the call's time limit: a failure that cost the caller that limit.
    TimedOut,
    /// The deployment refused this request (a 400 of some kind): it is reachable and alive.
    Refused,
}

/// What the fleet should learn from a call, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// It answered, after something had been wrong: clear what the fleet holds.
    Recovered,
    /// Throttled until then (the longest cooldown known).
    Throttled {
        until: Instant,
    },
    /// One more consecutive failure, the circuit still closed.
    Failed,
    /// The circuit opened (or a probe failed and it opened again).
    Opened {
        until: Instant,
        period: Duration,
    },
}

/// The deployment chosen for the next call, and what kind of call it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub index: usize,
    /// It probes an open circuit: a failure keeps it out, a success brings it back.
    pub probe: bool,
    /// It tries a deployment whose shared cooldown has just ended.
    pub trial: bool,
    /// The fleet's lease for this probe or trial is already this environment's.
    pub leased: bool,
}

struct Table {
    deployments: Vec<DeploymentHealth>,
    rng: fastrand::Rng,
    /// When the fleet's table was last read (or a read began).
    refreshed: Option<Instant>,
}

/// Health of each deployment in the pool, indexed like [`crate::pool::Pool::deployments`].
pub struct HealthTable {
    table: Mutex<Table>,
    breaker: Breaker,
    /// The longest an open circuit stays out while probes keep timing out (doubling from
    /// `breaker.open_for`).
    max_open: Duration,
    /// The fleet shares this environment's cooldowns: when one ends, the first call after it is
    /// a trial, so the fleet does not call the deployment all at once.
    fleet: bool,
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
                refreshed: None,
            }),
            breaker,
            max_open: breaker.open_for,
            fleet: false,
        }
    }

    /// Cooldowns are shared with a fleet: whoever learned one (this environment, from a 429, or
    /// another, through the table), the first call after it ends is a trial that needs the
    /// fleet's lease, until the table says how it went.
    pub fn shared_with_fleet(mut self) -> Self {
        self.fleet = true;
        self
    }

    /// While probes keep timing out, each open period doubles, up to `max_open`.
    pub fn with_max_open(mut self, max_open: Duration) -> Self {
        self.max_open = max_open.max(self.breaker.open_for);
        self
    }

    fn with<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        // A panic elsewhere cannot leave this plain data half-written, so a poisoned lock is usable.
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// The tokens deployment `index` last reported left (`x-ratelimit-remaining-tokens`).
    pub fn remaining_tokens(&self, index: usize) -> Option<u64> {
        self.with(|t| t.deployments.get(index).and_then(|h| h.remaining_tokens))
    }

    pub fn state(&self, index: usize, now: Instant) -> State {
        self.with(|t| {
            t.deployments
                .get(index)
                .map_or(State::Available, |h| h.state(now, &self.breaker))
        })
    }

    /// The deployment's average latency, when it has answered.
    pub fn latency(&self, index: usize) -> Option<Duration> {
        self.with(|t| {
            t.deployments
                .get(index)
                .and_then(|h| h.latency_ewma_ms)
                .map(|ms| Duration::from_secs_f64(ms / 1000.0))
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
        self.choose(members, pool, skip, now).map(|c| c.index)
    }

    /// [`HealthTable::select`], saying what kind of call the chosen deployment's is.
    pub fn choose(
        &self,
        members: &[usize],
        pool: &[Deployment],
        skip: impl Fn(usize) -> bool,
        now: Instant,
    ) -> Option<Choice> {
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
            let index = chosen?;
            let h = &mut t.deployments[index];
            let probe = h.probing(now);
            let trial = !probe && h.trial;
            if probe || trial {
                h.probe_since = Some(now);
            }
            Some(Choice {
                index,
                probe,
                trial,
                leased: h.lease.is_some_and(|l| l.ours && l.until > now),
            })
        })
    }

    /// Records what a call came to, and says what the fleet should learn from it.
    pub fn record(&self, index: usize, event: Event, now: Instant) -> Change {
        let breaker = self.breaker;
        let max_open = self.max_open;
        let fleet = self.fleet;
        self.with(|t| {
            let Some(h) = t.deployments.get_mut(index) else {
                return Change::None;
            };
            let noteworthy = h.noteworthy();
            let change = match event {
                Event::Success {
                    latency,
                    remaining_requests,
                    remaining_tokens,
                } => {
                    let ms = latency.as_secs_f64() * 1000.0;
                    h.latency_ewma_ms = Some(
                        h.latency_ewma_ms
                            .map_or(ms, |avg| avg + EWMA_ALPHA * (ms - avg)),
                    );
                    h.remaining_requests = remaining_requests.or(h.remaining_requests);
                    h.remaining_tokens = remaining_tokens.or(h.remaining_tokens);
                    h.recovered(now)
                }
                Event::Refused => h.recovered(now),
                Event::Throttled { until } => {
                    // A later, longer Retry-After extends the cooldown; a shorter one never shortens it.
                    let until = h.throttled_until.map_or(until, |t| t.max(until));
                    h.throttled_until = Some(until);
                    h.remaining_requests = Some(0);
                    // It answered: whatever its circuit said, the deployment is reachable.
                    h.circuit = Circuit::Closed { failures: 0 };
                    // The fleet is told: when it ends, one call tries it for everyone.
                    (h.probe_since, h.trial, h.lease) = (None, fleet, None);
                    Change::Throttled { until }
                }
                Event::Failure | Event::TimedOut => {
                    h.probe_since = None;
                    match h.circuit {
                        Circuit::Closed { failures } if failures + 1 < breaker.failures => {
                            h.circuit = Circuit::Closed {
                                failures: failures + 1,
                            };
                            Change::Failed
                        }
                        // A failure while still open (another request's) changes nothing.
                        Circuit::Open { until, .. } if until > now => Change::None,
                        // The half-open probe failed: out again, for longer while probes time out.
                        Circuit::Open { period, .. } => {
                            let period = match event {
                                Event::TimedOut => (period * 2).min(max_open),
                                _ => breaker.open_for,
                            };
                            h.open(now + period, period)
                        }
                        // The threshold reached.
                        Circuit::Closed { .. } => h.open(now + breaker.open_for, breaker.open_for),
                    }
                }
            };
            match change {
                Change::Recovered if !noteworthy => Change::None,
                change => change,
            }
        })
    }

    /// The fleet's table is due to be read: more than `period` since it last was. A read that is
    /// due counts as begun, so concurrent requests do not read it twice.
    pub fn refresh_due(&self, now: Instant, period: Duration) -> bool {
        self.with(|t| {
            let due = t
                .refreshed
                .is_none_or(|at| now.saturating_duration_since(at) >= period);
            if due {
                t.refreshed = Some(now);
            }
            due
        })
    }

    /// Takes in what the fleet's table says about deployment `index`. `wall_ms` is the epoch
    /// time (ms) that corresponds to `now`.
    pub fn merge(&self, index: usize, shared: &Shared, now: Instant, wall_ms: u64) {
        let at = |epoch_ms: u64| now + Duration::from_millis(epoch_ms.saturating_sub(wall_ms));
        self.with(|t| {
            let Some(h) = t.deployments.get_mut(index) else {
                return;
            };
            h.shared = !shared.is_empty();
            match shared.throttled_until {
                // Never shortens what this environment knows. When it ends, whether this read
                // came before or after, the next call is a trial.
                Some(until) if until > wall_ms => {
                    let until = at(until);
                    h.throttled_until = Some(h.throttled_until.map_or(until, |t| t.max(until)));
                    h.trial = true;
                }
                // Over, and no one has tried it since: the next call is a trial.
                Some(_) => h.trial = true,
                // The fleet holds no cooldown: none began (or one's trial answered), unless
                // this environment's own is still in force (its write may not have landed).
                None => h.trial &= h.throttled_until.is_some_and(|t| t > now),
            }
            let period = shared
                .open_ms
                .map(Duration::from_millis)
                .unwrap_or(self.breaker.open_for);
            match (shared.open_until, h.circuit) {
                (Some(until), Circuit::Open { until: own, .. }) if until > wall_ms => {
                    h.circuit = Circuit::Open {
                        until: own.max(at(until)),
                        period,
                    };
                }
                (Some(until), Circuit::Closed { .. }) if until > wall_ms => {
                    h.circuit = Circuit::Open {
                        until: at(until),
                        period,
                    };
                }
                // Open and over: half-open for the whole fleet.
                (Some(_), Circuit::Closed { .. }) => {
                    h.circuit = Circuit::Open { until: now, period };
                }
                // Closed for the fleet (someone's probe succeeded): no need to probe here.
                (None, Circuit::Open { until, .. }) if until <= now => {
                    h.circuit = Circuit::Closed {
                        failures: shared.failures,
                    };
                    h.probe_since = None;
                }
                (None, Circuit::Closed { failures }) => {
                    h.circuit = Circuit::Closed {
                        failures: failures.max(shared.failures),
                    };
                }
                _ => {}
            }
            h.lease = shared
                .lease_until
                .filter(|until| *until > wall_ms)
                .map(|until| Lease {
                    until: at(until),
                    ours: shared.lease_ours,
                });
        })
    }

    /// The fleet's lease on deployment `index`'s next call is ours until `until`, or (when
    /// `ours` is false) another environment's.
    pub fn leased(&self, index: usize, until: Instant, ours: bool) {
        self.with(|t| {
            if let Some(h) = t.deployments.get_mut(index) {
                h.lease = Some(Lease { until, ours });
                if !ours {
                    h.probe_since = None;
                }
            }
        })
    }

    /// The fleet counted enough consecutive failures: the circuit is open until `until`.
    pub fn opened(&self, index: usize, until: Instant, period: Duration) {
        self.with(|t| {
            if let Some(h) = t.deployments.get_mut(index)
                && !matches!(h.circuit, Circuit::Open { until: own, .. } if own >= until)
            {
                h.open(until, period);
            }
        })
    }
}

impl DeploymentHealth {
    fn recovered(&mut self, now: Instant) -> Change {
        self.circuit = Circuit::Closed { failures: 0 };
        self.throttled_until = self.throttled_until.filter(|t| *t > now);
        (self.probe_since, self.trial, self.lease) = (None, false, None);
        Change::Recovered
    }

    fn open(&mut self, until: Instant, period: Duration) -> Change {
        self.circuit = Circuit::Open { until, period };
        (self.probe_since, self.trial, self.lease) = (None, false, None);
        Change::Opened { until, period }
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
            serves: Default::default(),
            auth: Default::default(),
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

    fn open_until(health: &HealthTable, now: Instant) -> Duration {
        match health.state(0, now) {
            State::CircuitOpen { until } => until - now,
            other => panic!("not open: {other:?}"),
        }
    }

    #[test]
    fn probes_that_time_out_back_off_to_the_cap_and_a_fast_failure_or_success_resets_it() {
        let clock = ManualClock::default();
        let health = HealthTable::new(1, BREAKER, 1).with_max_open(Duration::from_secs(100));
        let pool = one_deployment();
        for _ in 0..3 {
            health.record(0, Event::TimedOut, clock.now());
        }
        assert_eq!(open_until(&health, clock.now()), Duration::from_secs(30));
        for expected in [60, 100, 100] {
            clock.advance(open_until(&health, clock.now()));
            let choice = health.choose(&[0], &pool, |_| false, clock.now()).unwrap();
            assert!(choice.probe && !choice.trial);
            let change = health.record(0, Event::TimedOut, clock.now());
            let period = Duration::from_secs(expected);
            assert_eq!(
                change,
                Change::Opened {
                    until: clock.now() + period,
                    period
                }
            );
        }
        // A probe that fails fast (a 503: it is up, and cheap to ask) is retried soon.
        clock.advance(open_until(&health, clock.now()));
        health.select(&[0], &pool, |_| false, clock.now());
        health.record(0, Event::Failure, clock.now());
        assert_eq!(open_until(&health, clock.now()), BREAKER.open_for);
    }

    #[test]
    fn only_news_is_worth_telling_the_fleet() {
        let clock = ManualClock::default();
        let health = HealthTable::new(1, BREAKER, 1);
        let now = clock.now();
        assert_eq!(health.record(0, Event::Refused, now), Change::None);
        assert_eq!(health.record(0, Event::Failure, now), Change::Failed);
        assert_eq!(
            health.record(0, Event::Refused, now),
            Change::Recovered,
            "a failure was counted: the fleet should forget it"
        );
        assert_eq!(health.record(0, Event::Refused, now), Change::None);
        let until = now + Duration::from_secs(7);
        assert_eq!(
            health.record(0, Event::Throttled { until }, now),
            Change::Throttled { until }
        );
    }

    fn shared(f: impl FnOnce(&mut Shared)) -> Shared {
        let mut shared = Shared::default();
        f(&mut shared);
        shared
    }

    #[test]
    fn the_fleets_cooldowns_and_circuits_merge_without_shortening_local_ones() {
        let clock = ManualClock::default();
        let health = HealthTable::new(1, BREAKER, 1);
        let (now, wall) = (clock.now(), 1_000_000);
        health.record(
            0,
            Event::Throttled {
                until: now + Duration::from_secs(20),
            },
            now,
        );
        health.merge(
            0,
            &shared(|s| s.throttled_until = Some(wall + 5_000)),
            now,
            wall,
        );
        assert_eq!(
            health.state(0, now).until(),
            Some(now + Duration::from_secs(20))
        );

        let health = HealthTable::new(1, BREAKER, 1);
        health.merge(
            0,
            &shared(|s| s.throttled_until = Some(wall + 7_000)),
            now,
            wall,
        );
        assert_eq!(
            health.state(0, now),
            State::Throttled {
                until: now + Duration::from_secs(7)
            }
        );
        health.merge(
            0,
            &shared(|s| {
                s.open_until = Some(wall + 9_000);
                s.open_ms = Some(9_000);
            }),
            now,
            wall,
        );
        assert_eq!(
            health.state(0, now),
            State::CircuitOpen {
                until: now + Duration::from_secs(9)
            }
        );
    }

    #[test]
    fn every_cooldown_the_fleet_shares_ends_in_a_trial_whenever_the_table_was_read() {
        let clock = ManualClock::default();
        let pool = one_deployment();
        let (t0, wall) = (clock.now(), 1_000_000);
        let cooldown = Duration::from_secs(7);
        let ended = |health: &HealthTable| {
            let now = t0 + cooldown;
            assert_eq!(
                health.state(0, now),
                State::HalfOpen,
                "not simply available"
            );
            let choice = health.choose(&[0], &pool, |_| false, now).unwrap();
            assert!(choice.trial && !choice.probe, "{choice:?}");
        };
        // Its own 429, told to the fleet; a read before the table shows it keeps the trial.
        let own = HealthTable::new(1, BREAKER, 1).shared_with_fleet();
        own.record(
            0,
            Event::Throttled {
                until: t0 + cooldown,
            },
            t0,
        );
        own.merge(
            0,
            &Shared::default(),
            t0 + Duration::from_secs(1),
            wall + 1_000,
        );
        ended(&own);
        // Another's, read while it was still in force: no read after it ended.
        let read_before = HealthTable::new(1, BREAKER, 1).shared_with_fleet();
        let shared = shared(|s| s.throttled_until = Some(wall + 7_000));
        read_before.merge(0, &shared, t0, wall);
        ended(&read_before);
        // The trial answered and the table forgot the cooldown: back to normal.
        let later = t0 + cooldown + Duration::from_secs(1);
        read_before.merge(0, &Shared::default(), later, wall + 8_000);
        assert_eq!(read_before.state(0, later), State::Available);
        // Alone (no fleet), a cooldown simply ends.
        let alone = HealthTable::new(1, BREAKER, 1);
        alone.record(
            0,
            Event::Throttled {
                until: t0 + cooldown,
            },
            t0,
        );
        assert_eq!(alone.state(0, t0 + cooldown), State::Available);
    }

    #[test]
    fn after_a_shared_cooldown_one_trial_goes_to_whoever_holds_the_lease() {
        let clock = ManualClock::default();
        let pool = one_deployment();
        let (now, wall) = (clock.now(), 1_000_000);
        let over = |lease: Option<(u64, bool)>| {
            shared(|s| {
                s.throttled_until = Some(wall - 1);
                if let Some((until, ours)) = lease {
                    (s.lease_until, s.lease_ours) = (Some(until), ours);
                }
            })
        };
        // Nobody holds it: the next call here is the trial, and needs the lease.
        let health = HealthTable::new(1, BREAKER, 1);
        health.merge(0, &over(None), now, wall);
        assert_eq!(health.state(0, now), State::HalfOpen);
        let choice = health.choose(&[0], &pool, |_| false, now).unwrap();
        assert!(choice.trial && !choice.probe && !choice.leased);
        assert_eq!(
            health.state(0, now),
            State::ProbeInFlight,
            "one trial here at a time"
        );

        // Another environment holds it: wait for its word.
        let health = HealthTable::new(1, BREAKER, 1);
        health.merge(0, &over(Some((wall + 3_000, false))), now, wall);
        assert_eq!(health.state(0, now), State::ProbeInFlight);
        assert_eq!(
            health.state(0, now + Duration::from_secs(3)),
            State::HalfOpen,
            "it lapsed"
        );

        // Ours: go ahead without asking the table again.
        let health = HealthTable::new(1, BREAKER, 1);
        health.merge(0, &over(Some((wall + 3_000, true))), now, wall);
        assert!(health.choose(&[0], &pool, |_| false, now).unwrap().leased);

        // Someone's trial answered and the table forgot it: back to normal.
        health.merge(0, &Shared::default(), now, wall);
        assert_eq!(health.state(0, now), State::Available);
        let choice = health.choose(&[0], &pool, |_| false, now).unwrap();
        assert!(!choice.trial && !choice.probe);
    }
}
