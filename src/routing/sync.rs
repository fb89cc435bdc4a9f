//! [`FleetSync`]: the one owner, and the one writer, of what this execution environment knows
//! about each deployment (the [`HealthTable`]), and of its link to the fleet's shared table. The
//! failover loop and the stream relay both record through [`FleetSync::record`], which updates
//! the local table and starts telling the fleet in the same step.
//!
//! The fleet's table is read on the request path at most once per refresh period and never for
//! longer than its time limit; a lease is taken before a probe or a trial; what a call taught is
//! written concurrently with the next attempt and finished (or given up) before the response. A
//! table that is slow or down costs at most its time limit, and decisions fall back on what this
//! environment knows: counted in a metric, logged once a minute.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::future::join_all;
use tokio::task::JoinHandle;

use crate::clock::{Clock, millis};
use crate::health::{Change, Choice, Event, Fleet, FleetError, HealthTable, State, Written};
use crate::pool::Deployment;
use crate::telemetry::{self, TableOp, TableOutcome};

use super::settings::Settings;

/// A new environment reads the fleet's health before its first request, with more time than
/// the request path allows (its first connection to DynamoDB includes a TLS handshake).
const WARM_UP_LIMIT: Duration = Duration::from_secs(1);
/// How often, at most, the table's unavailability is logged (every occurrence is counted).
const WARN_EVERY: Duration = Duration::from_secs(60);
/// A probe's or trial's lease outlasts its call by this much, then lapses for another to try.
const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// A lease the table does not answer is not taken: the whole fleet asking at once is what
/// makes a table slow, and going ahead alone then is the stampede the lease is there to stop.
/// Only when its leases have gone unanswered this long (asked again at each refresh, none
/// answered) does the environment go ahead on its own knowledge.
const LEASE_PATIENCE: Duration = Duration::from_secs(3);

/// The fleet's table, as this environment uses it.
struct Link {
    fleet: Fleet,
    /// Each pool deployment's name in the table, indexed like the pool.
    keys: Vec<String>,
    refresh: Duration,
    limit: Duration,
    /// When unavailability was last logged, and how many times since.
    warned: Mutex<(Option<Instant>, u64)>,
    /// Per deployment: since when its lease calls have gone unanswered, and the last one.
    unanswered: Mutex<Vec<Option<(Instant, Instant)>>>,
}

impl Link {
    fn lock_unanswered(&self) -> std::sync::MutexGuard<'_, Vec<Option<(Instant, Instant)>>> {
        // Plain data: a panic elsewhere cannot leave it half-written.
        self.unanswered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stored responses this environment remembers the deployment of, at most this many (the
/// oldest forgotten first; the fleet's table remembers them all).
const MAX_PINS: usize = 10_000;

/// Which deployment holds each stored response this environment has seen.
#[derive(Default)]
struct Pins {
    holders: HashMap<String, usize>,
    order: VecDeque<String>,
}

impl Pins {
    fn insert(&mut self, id: &str, index: usize) {
        if self.holders.insert(id.to_owned(), index).is_none() {
            self.order.push_back(id.to_owned());
            while self.order.len() > MAX_PINS {
                if let Some(old) = self.order.pop_front() {
                    self.holders.remove(&old);
                }
            }
        }
    }
}

/// What this environment knows about each deployment, and what it shares with the fleet.
pub struct FleetSync<C: Clock> {
    health: HealthTable,
    link: Option<Link>,
    pins: Mutex<Pins>,
    clock: C,
    /// The fleet's failure count that opens a circuit, and for how long.
    failures: u32,
    open_for: Duration,
}

/// The table writes one request started, to be finished before its response.
#[derive(Default)]
pub struct Writes(Vec<JoinHandle<Settled>>);

/// A change, as the table is told it (epoch times in ms).
enum Published {
    Recovered,
    Throttle(u64),
    Open(u64, Duration),
    Failed,
}

/// What a background write came to: for the deployment at `index`, a fleet count that reached
/// the threshold (the opening's end and length) opens its circuit here too.
struct Settled {
    index: usize,
    op: TableOp,
    result: Result<Option<(u64, Duration)>, FleetError>,
    ms: u64,
}

impl<C: Clock> FleetSync<C> {
    /// The health of `deployments`, shared through `fleet` when a table is configured; `seed`
    /// seeds the weighted random choice.
    pub fn new(
        deployments: &[Deployment],
        settings: &Settings,
        clock: C,
        seed: u64,
        fleet: Option<Fleet>,
    ) -> Self {
        let link = fleet.map(|fleet| Link {
            keys: deployments
                .iter()
                .map(|d| Fleet::key(&d.endpoint, &d.deployment))
                .collect(),
            fleet,
            refresh: settings.health_refresh,
            limit: settings.health_timeout,
            warned: Mutex::new((None, 0)),
            unanswered: Mutex::new(vec![None; deployments.len()]),
        });
        let health = HealthTable::new(deployments.len(), settings.breaker, seed)
            .with_max_open(settings.max_open);
        let health = match link {
            Some(_) => health.shared_with_fleet(),
            None => health,
        };
        Self {
            health,
            link,
            pins: Mutex::default(),
            clock,
            failures: settings.breaker.failures,
            open_for: settings.breaker.open_for,
        }
    }

    /// Before the first request: what the fleet already knows (a new environment does not start
    /// blind), and the table's connection made.
    pub async fn warm_up(&self) {
        self.read(WARM_UP_LIMIT, true).await;
    }

    /// On the request path: the fleet's health, if a read is due.
    pub async fn refresh(&self) {
        if let Some(link) = &self.link {
            self.read(link.limit, false).await;
        }
    }

    /// The next deployment to call among `members` (minus those `skip` rejects), and what kind
    /// of call it is ([`HealthTable::choose`]).
    pub fn choose(
        &self,
        members: &[usize],
        pool: &[Deployment],
        skip: impl Fn(usize) -> bool,
    ) -> Option<Choice> {
        self.health.choose(members, pool, skip, self.clock.now())
    }

    /// Where deployment `index` stands now.
    pub fn state(&self, index: usize) -> State {
        self.health.state(index, self.clock.now())
    }

    /// The tokens deployment `index` last reported left.
    pub fn remaining_tokens(&self, index: usize) -> Option<u64> {
        self.health.remaining_tokens(index)
    }

    /// Deployment `index`'s average latency, when it has answered.
    pub fn latency(&self, index: usize) -> Option<Duration> {
        self.health.latency(index)
    }

    /// What one call to deployment `index` came to, at `now`: recorded here, and the fleet told
    /// what is news to it, in the background (the write runs while the next attempt does and is
    /// finished with `writes`).
    pub fn record(&self, index: usize, event: Event, now: Instant, writes: &mut Writes) {
        let change = self.health.record(index, event, now);
        self.publish(index, change, now, writes);
    }

    fn lock_pins(&self) -> std::sync::MutexGuard<'_, Pins> {
        // Plain data: a panic elsewhere cannot leave it half-written.
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stored response `id` lives on deployment `index`: remembered here and told to the fleet
    /// (within the table's time limit: a follow-up from another environment that finds no
    /// record looks the response up instead).
    pub async fn pin(&self, id: &str, index: usize) {
        self.lock_pins().insert(id, index);
        let Some(link) = &self.link else {
            return;
        };
        let started = self.clock.now();
        let now = self.epoch_ms(started);
        let write = link.fleet.pin(id, &link.keys[index], now);
        let written = self.clock.timeout(link.limit, write).await;
        let ms = millis(self.clock.now() - started);
        match written {
            Some(Ok(())) => telemetry::health_table(TableOp::Pin, TableOutcome::Ok, ms),
            Some(Err(error)) => self.unavailable(link, TableOp::Pin, &error.to_string(), ms),
            None => self.timed_out(link, TableOp::Pin, ms),
        }
    }

    /// The deployment that holds stored response `id`, if this environment or the fleet knows.
    pub async fn holder(&self, id: &str) -> Option<usize> {
        let known = self.lock_pins().holders.get(id).copied();
        if known.is_some() {
            return known;
        }
        let link = self.link.as_ref()?;
        let started = self.clock.now();
        let read = self.clock.timeout(link.limit, link.fleet.holder(id)).await;
        let ms = millis(self.clock.now() - started);
        let key = match read {
            Some(Ok(key)) => {
                telemetry::health_table(TableOp::Holder, TableOutcome::Ok, ms);
                key?
            }
            Some(Err(error)) => {
                self.unavailable(link, TableOp::Holder, &error.to_string(), ms);
                return None;
            }
            None => {
                self.timed_out(link, TableOp::Holder, ms);
                return None;
            }
        };
        // Another function's deployment, not in this pool: looked up like an unknown id.
        let index = link.keys.iter().position(|k| *k == key)?;
        self.lock_pins().insert(id, index);
        Some(index)
    }

    /// Stored response `id` is gone.
    pub async fn unpin(&self, id: &str) {
        {
            let mut pins = self.lock_pins();
            if pins.holders.remove(id).is_some() {
                pins.order.retain(|known| known != id);
            }
        }
        let Some(link) = &self.link else {
            return;
        };
        let started = self.clock.now();
        let deleted = self.clock.timeout(link.limit, link.fleet.unpin(id)).await;
        let ms = millis(self.clock.now() - started);
        match deleted {
            Some(Ok(())) => telemetry::health_table(TableOp::Unpin, TableOutcome::Ok, ms),
            Some(Err(error)) => self.unavailable(link, TableOp::Unpin, &error.to_string(), ms),
            None => self.timed_out(link, TableOp::Unpin, ms),
        }
    }

    /// The epoch time (ms) of `at`, a moment on this environment's clock.
    fn epoch_ms(&self, at: Instant) -> u64 {
        let now = self.clock.now();
        let wall = millis(
            self.clock
                .wall()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        if at >= now {
            wall.saturating_add(millis(at - now))
        } else {
            wall.saturating_sub(millis(now - at))
        }
    }

    /// Reads the fleet's health if it is due (or `force`d), within `limit`.
    async fn read(&self, limit: Duration, force: bool) {
        let Some(link) = &self.link else {
            return;
        };
        if !self.health.refresh_due(self.clock.now(), link.refresh) && !force {
            return;
        }
        let started = self.clock.now();
        let read = self.clock.timeout(limit, link.fleet.read(&link.keys)).await;
        let ms = millis(self.clock.now() - started);
        match read {
            Some(Ok(shared)) => {
                let now = self.clock.now();
                let wall = self.epoch_ms(now);
                for (index, shared) in shared.iter().enumerate() {
                    self.health.merge(index, shared, now, wall);
                }
                telemetry::health_table(TableOp::Read, TableOutcome::Ok, ms);
            }
            Some(Err(error)) => self.unavailable(link, TableOp::Read, &error.to_string(), ms),
            None => self.timed_out(link, TableOp::Read, ms),
        }
    }

    /// Takes the fleet's lease on `choice`'s probe or trial, so one environment of the fleet
    /// makes it; `call` is how long the call may take. False when another environment holds it,
    /// or when the table holds a cooldown or opening still in force (the last trial said how it
    /// went), or when the table did not answer (see [`LEASE_PATIENCE`]): until the next read,
    /// the deployment is treated as out. Without a table, or once the table has not answered
    /// leases for that long, this environment goes ahead alone.
    pub async fn lease(&self, choice: &Choice, call: Duration) -> bool {
        let Some(link) = &self.link else {
            return true;
        };
        if !(choice.probe || choice.trial) || choice.leased {
            return true;
        }
        let index = choice.index;
        let key = &link.keys[index];
        let now = self.clock.now();
        let until = now + call + LEASE_MARGIN;
        let (until_ms, now_ms) = (self.epoch_ms(until), self.epoch_ms(now));
        let taken = self
            .clock
            .timeout(link.limit, link.fleet.lease(key, until_ms, now_ms))
            .await;
        let ms = millis(self.clock.now() - now);
        let answered = match taken {
            Some(Ok(written)) => written,
            Some(Err(error)) => {
                self.unavailable(link, TableOp::Lease, &error.to_string(), ms);
                return self.unanswered(link, index, now);
            }
            None => {
                self.timed_out(link, TableOp::Lease, ms);
                return self.unanswered(link, index, now);
            }
        };
        if let Some(since) = link.lock_unanswered().get_mut(index) {
            *since = None;
        }
        match answered {
            Written::Applied => {
                telemetry::health_table(TableOp::Lease, TableOutcome::Ok, ms);
                self.health.leased(index, until, true);
                true
            }
            Written::Superseded => {
                telemetry::health_table(TableOp::Lease, TableOutcome::HeldElsewhere, ms);
                // Until the next read says how long the other environment holds it.
                self.health.leased(index, now + link.refresh, false);
                false
            }
        }
    }

    /// A lease the table did not answer: not taken, unless this deployment's leases have gone
    /// unanswered for [`LEASE_PATIENCE`] in a row (then this environment goes ahead on its own
    /// knowledge). A streak ends with an answer, or with a pause as long (another trial).
    fn unanswered(&self, link: &Link, index: usize, now: Instant) -> bool {
        let mut unanswered = link.lock_unanswered();
        let Some(streak) = unanswered.get_mut(index) else {
            return true;
        };
        let since = match *streak {
            Some((since, last)) if now.saturating_duration_since(last) < LEASE_PATIENCE => since,
            _ => now,
        };
        *streak = Some((since, now));
        if now.saturating_duration_since(since) >= LEASE_PATIENCE {
            return true;
        }
        self.health.leased(index, now + link.refresh, false);
        false
    }

    /// Starts writing what a call taught (`change`, about deployment `index`) to the table.
    fn publish(&self, index: usize, change: Change, now: Instant, writes: &mut Writes) {
        let Some(link) = &self.link else {
            return;
        };
        let change = match change {
            Change::None => return,
            Change::Throttled { until } => Published::Throttle(self.epoch_ms(until)),
            Change::Opened { until, period } => Published::Open(self.epoch_ms(until), period),
            Change::Recovered => Published::Recovered,
            Change::Failed => Published::Failed,
        };
        let now_ms = self.epoch_ms(now);
        let (fleet, key, clock) = (
            link.fleet.clone(),
            link.keys[index].clone(),
            self.clock.clone(),
        );
        let (threshold, opening) = (self.failures, self.open_for);
        let open_until_ms = self.epoch_ms(now + opening);
        writes.0.push(tokio::spawn(async move {
            let started = clock.now();
            let (op, result) = match change {
                Published::Recovered => (
                    TableOp::Recovered,
                    fleet.recovered(&key, now_ms).await.map(|_| None),
                ),
                Published::Throttle(until) => (
                    TableOp::Throttle,
                    fleet.throttle(&key, until, now_ms).await.map(|_| None),
                ),
                Published::Open(until, period) => (
                    TableOp::Open,
                    fleet
                        .open(&key, until, millis(period), now_ms)
                        .await
                        .map(|_| None),
                ),
                Published::Failed => match fleet.failed(&key, now_ms).await {
                    // The fleet's failures reached the threshold: open it for everyone.
                    Ok(n) if n >= threshold => (
                        TableOp::Failure,
                        fleet
                            .open(&key, open_until_ms, millis(opening), now_ms)
                            .await
                            .map(|_| Some((open_until_ms, opening))),
                    ),
                    counted => (TableOp::Failure, counted.map(|_| None)),
                },
            };
            Settled {
                index,
                op,
                result,
                ms: millis(clock.now() - started),
            }
        }));
    }

    /// Waits for the request's table writes, at most the table's time limit, and gives up on
    /// any still running.
    pub async fn finish(&self, writes: Writes) {
        let Some(link) = &self.link else {
            return;
        };
        if writes.0.is_empty() {
            return;
        }
        let aborts: Vec<_> = writes.0.iter().map(JoinHandle::abort_handle).collect();
        let started = self.clock.now();
        let done = self.clock.timeout(link.limit, join_all(writes.0)).await;
        let ms = millis(self.clock.now() - started);
        let Some(done) = done else {
            for abort in aborts {
                abort.abort();
            }
            self.timed_out(link, TableOp::Write, ms);
            return;
        };
        for settled in done.into_iter().flatten() {
            match settled.result {
                Ok(opened) => {
                    telemetry::health_table(settled.op, TableOutcome::Ok, settled.ms);
                    if let Some((until_ms, period)) = opened {
                        let now = self.clock.now();
                        let wait = until_ms.saturating_sub(self.epoch_ms(now));
                        self.health.opened(
                            settled.index,
                            now + Duration::from_millis(wait),
                            period,
                        );
                    }
                }
                Err(error) => self.unavailable(link, settled.op, &error.to_string(), settled.ms),
            }
        }
    }

    fn timed_out(&self, link: &Link, op: TableOp, ms: u64) {
        self.warn(link, op, TableOutcome::Timeout, "no answer in time", ms);
    }

    fn unavailable(&self, link: &Link, op: TableOp, detail: &str, ms: u64) {
        self.warn(link, op, TableOutcome::Error, detail, ms);
    }

    /// The table could not answer: counted every time, logged at most once a minute.
    fn warn(&self, link: &Link, op: TableOp, outcome: TableOutcome, detail: &str, ms: u64) {
        telemetry::health_table(op, outcome, ms);
        let now = self.clock.now();
        let mut warned = link.warned.lock().unwrap_or_else(|p| p.into_inner());
        let (last, since) = &mut *warned;
        if last.is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY) {
            *since += 1;
            return;
        }
        tracing::warn!(
            table = link.fleet.table(),
            operation = op.as_str(),
            reason = outcome.as_str(),
            detail,
            unlogged_since_last = *since,
            "shared health table unavailable: deciding on this execution environment's own knowledge"
        );
        (*last, *since) = (Some(now), 0);
    }
}
