//! The Engine and the fleet's shared health: read on the request path at most once per refresh
//! period and never for longer than the table's time limit; the lease taken before a probe or a
//! trial; what a call taught written concurrently with the next attempt and finished (or given
//! up) before the response. A table that is slow or down costs at most its time limit, and the
//! Engine decides on what this environment knows: counted in a metric, logged once a minute.

use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::future::join_all;
use tokio::task::JoinHandle;

use crate::clock::{Clock, millis};
use crate::health::{Change, Choice, Written};
use crate::telemetry;

use super::engine::Engine;
use super::link::{FleetLink, LEASE_MARGIN, Outcome, Published, WARN_EVERY, Writes};

impl<C: Clock> Engine<C> {
    /// The epoch time (ms) of `at`, a moment on this Engine's clock.
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
    pub(super) async fn refresh(&self, limit: Duration, force: bool) {
        let Some(link) = &self.fleet else {
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
                telemetry::health_table("read", "ok", ms);
            }
            Some(Err(error)) => self.unavailable(link, "read", "error", &error.to_string(), ms),
            None => self.unavailable(link, "read", "timeout", "no answer in time", ms),
        }
    }

    /// Takes the fleet's lease on `choice`'s probe or trial, so one environment of the fleet
    /// makes it; `call` is how long the call may take. False when another environment holds it.
    /// Without a table, or when the table cannot answer, this environment goes ahead alone.
    pub(super) async fn lease(&self, choice: &Choice, call: Duration) -> bool {
        let Some(link) = &self.fleet else {
            return true;
        };
        if !(choice.probe || choice.trial) || choice.leased {
            return true;
        }
        let key = &link.keys[choice.index];
        let now = self.clock.now();
        let until = now + call + LEASE_MARGIN;
        let (until_ms, now_ms) = (self.epoch_ms(until), self.epoch_ms(now));
        let taken = self
            .clock
            .timeout(link.limit, link.fleet.lease(key, until_ms, now_ms))
            .await;
        let ms = millis(self.clock.now() - now);
        match taken {
            Some(Ok(Written::Applied)) => {
                telemetry::health_table("lease", "ok", ms);
                self.health.leased(choice.index, until, true);
                true
            }
            Some(Ok(Written::Superseded)) => {
                telemetry::health_table("lease", "held_elsewhere", ms);
                // Until the next read says how long the other environment holds it.
                self.health.leased(choice.index, now + link.refresh, false);
                false
            }
            Some(Err(error)) => {
                self.unavailable(link, "lease", "error", &error.to_string(), ms);
                true
            }
            None => {
                self.unavailable(link, "lease", "timeout", "no answer in time", ms);
                true
            }
        }
    }

    /// Starts writing what a call taught (`change`, about deployment `index`) to the table, in
    /// the background: it runs while the next attempt does.
    pub(super) fn publish(&self, index: usize, change: Change, writes: &mut Writes) {
        let Some(link) = &self.fleet else {
            return;
        };
        if change == Change::None {
            return;
        }
        let now = self.clock.now();
        let now_ms = self.epoch_ms(now);
        let (fleet, key, clock) = (
            link.fleet.clone(),
            link.keys[index].clone(),
            self.clock.clone(),
        );
        let threshold = self.settings.breaker.failures;
        let opening = self.settings.breaker.open_for;
        let open_until_ms = self.epoch_ms(now + opening);
        let change = match change {
            Change::Throttled { until } => Published::Throttle(self.epoch_ms(until)),
            Change::Opened { until, period } => Published::Open(self.epoch_ms(until), period),
            Change::Recovered => Published::Recovered,
            Change::Failed => Published::Failed,
            Change::None => return,
        };
        writes.0.push(tokio::spawn(async move {
            let started = clock.now();
            let (operation, result) = match change {
                Published::Recovered => (
                    "recovered",
                    fleet.recovered(&key, now_ms).await.map(|_| None),
                ),
                Published::Throttle(until) => (
                    "throttle",
                    fleet.throttle(&key, until, now_ms).await.map(|_| None),
                ),
                Published::Open(until, period) => (
                    "open",
                    fleet
                        .open(&key, until, millis(period), now_ms)
                        .await
                        .map(|_| None),
                ),
                Published::Failed => match fleet.failed(&key, now_ms).await {
                    // The fleet's failures reached the threshold: open it for everyone.
                    Ok(n) if n >= threshold => (
                        "failure",
                        fleet
                            .open(&key, open_until_ms, millis(opening), now_ms)
                            .await
                            .map(|_| Some((open_until_ms, opening))),
                    ),
                    counted => ("failure", counted.map(|_| None)),
                },
            };
            Outcome {
                index,
                operation,
                result,
                ms: millis(clock.now() - started),
            }
        }));
    }

    /// Waits for the request's table writes, at most the table's time limit, and gives up on
    /// any still running.
    pub(super) async fn finish(&self, writes: Writes) {
        let Some(link) = &self.fleet else {
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
            self.unavailable(link, "write", "timeout", "no answer in time", ms);
            return;
        };
        for outcome in done.into_iter().flatten() {
            match outcome.result {
                Ok(opened) => {
                    telemetry::health_table(outcome.operation, "ok", outcome.ms);
                    if let Some((until_ms, period)) = opened {
                        let now = self.clock.now();
                        let wait = until_ms.saturating_sub(self.epoch_ms(now));
                        self.health.opened(
                            outcome.index,
                            now + Duration::from_millis(wait),
                            period,
                        );
                    }
                }
                Err(error) => self.unavailable(
                    link,
                    outcome.operation,
                    "error",
                    &error.to_string(),
                    outcome.ms,
                ),
            }
        }
    }

    /// The table could not answer: counted every time, logged at most once a minute.
    fn unavailable(&self, link: &FleetLink, operation: &str, reason: &str, detail: &str, ms: u64) {
        telemetry::health_table(operation, reason, ms);
        let now = self.clock.now();
        let mut warned = link.warned.lock().unwrap_or_else(|p| p.into_inner());
        let (last, since) = &mut *warned;
        if last.is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY) {
            *since += 1;
            return;
        }
        tracing::warn!(
            table = link.fleet.table(),
            operation,
            reason,
            detail,
            unlogged_since_last = *since,
            "shared health table unavailable: deciding on this execution environment's own knowledge"
        );
        (*last, *since) = (Some(now), 0);
    }
}
