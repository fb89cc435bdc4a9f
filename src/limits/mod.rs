//! Each named client's share of the quota: requests and tokens per minute, tokens per day or
//! month, counted across the whole fleet.
//!
//! Before a call, [`Limiter::admit`] reserves the request's estimated tokens (and one request)
//! from every limit the client has, or refuses it with [`OverLimit`], before anything is spent
//! upstream. After it, [`Ticket::settle`] puts the difference between the estimate and the real
//! usage back (a failed call uses nothing), so what the next request may spend is exact.
//!
//! The fleet's count lives in the health table ([`Ledger`]): an execution environment takes a
//! lease of a limit's window (a slice of it, granted by a conditional `ADD` that keeps the
//! fleet's grants within the limit) and spends it locally, so a request calls the table only
//! when its environment's lease has run out. What a lease leaves unspent is spent by the
//! environment's next requests in the same window, or given back to the fleet when the
//! environment shuts down ([`Limiter::release`]). Without a table, each environment counts the
//! limit alone; with a table that is slow or down, each environment spends at most its share
//! of every limit (the limit over `LIMITS_ENVIRONMENTS`) on its own, and says so once.

mod ledger;
mod window;

pub use ledger::{Ledger, LedgerError};
pub use window::{Span, Window, openai_duration};

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use crate::clock::{Clock, millis};
use crate::config::LimitSettings;
use crate::config::clients::{Client, Limits};
use crate::telemetry::{self, TableOp, TableOutcome};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Requests,
    Tokens,
}

/// One limit of one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub measure: Measure,
    pub span: Span,
    pub limit: u64,
}

impl Counter {
    /// The limit's name in the table and in messages.
    pub fn name(&self) -> &'static str {
        match (self.measure, self.span) {
            (Measure::Requests, Span::Minute) => "requests_per_minute",
            (Measure::Requests, Span::Day) => "requests_per_day",
            (Measure::Requests, Span::Month) => "requests_per_month",
            (Measure::Tokens, Span::Minute) => "tokens_per_minute",
            (Measure::Tokens, Span::Day) => "tokens_per_day",
            (Measure::Tokens, Span::Month) => "tokens_per_month",
        }
    }

    /// A rate renews every minute; a quota is a day's or a month's allowance.
    pub fn is_quota(&self) -> bool {
        self.span != Span::Minute
    }

    /// How much an environment takes from the fleet's count at once: a quarter of its share of
    /// a minute's limit, a fiftieth of its share of a day's or a month's (a lease an environment
    /// does not spend stays unspent until the window ends).
    fn lease(&self, environments: u64) -> u64 {
        let parts = if self.is_quota() { 50 } else { 4 };
        self.limit.div_ceil(parts * environments.max(1)).max(1)
    }
}

fn counters(limits: &Limits) -> Vec<Counter> {
    let mut out = Vec::new();
    let mut add = |measure, span, limit: Option<u64>| {
        if let Some(limit) = limit {
            out.push(Counter {
                measure,
                span,
                limit,
            });
        }
    };
    add(Measure::Requests, Span::Minute, limits.requests_per_minute);
    add(Measure::Tokens, Span::Minute, limits.tokens_per_minute);
    add(Measure::Tokens, Span::Day, limits.tokens_per_day);
    add(Measure::Tokens, Span::Month, limits.tokens_per_month);
    out
}

/// What this environment holds of one limit's current window.
#[derive(Debug, Default)]
struct Held {
    /// The window's start (epoch ms).
    window: u64,
    /// Leased and not yet reserved; below zero when usage came out above the estimates.
    balance: i64,
    /// What the fleet has been granted in this window, as the table last said (this
    /// environment's grants included).
    granted: u64,
    /// Spent on its own while the table could not be reached.
    alone: u64,
    /// The table said the window is spent: no further lease is asked for until it ends.
    spent: bool,
}

struct Meter {
    counter: Counter,
    held: Mutex<Held>,
    /// One lease asked for at a time: concurrent requests wait for it rather than ask again.
    asking: tokio::sync::Mutex<()>,
}

impl Meter {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // Plain numbers: a panic elsewhere cannot leave them half-written.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The window at `now`, with what this environment holds of it (a new window holds nothing).
    fn current(&self, now: u64) -> (Window, std::sync::MutexGuard<'_, Held>) {
        let window = self.counter.span.window(now);
        let mut held = self.lock();
        if held.window != window.start {
            *held = Held {
                window: window.start,
                ..Held::default()
            };
        }
        (window, held)
    }

    /// Reserves `amount` from what this environment holds, if it holds enough.
    fn reserve_held(&self, amount: u64, now: u64) -> Option<u64> {
        let (window, mut held) = self.current(now);
        if held.balance >= amount as i64 {
            held.balance -= amount as i64;
            Some(window.start)
        } else {
            None
        }
    }
}

struct Named {
    name: String,
    meters: Vec<Meter>,
}

/// Why a request was refused before any call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverLimit {
    pub client: String,
    pub counter: Counter,
    /// What the request would have needed of the limit.
    pub requested: u64,
    /// When the window frees enough (`None`: the request needs more than the whole limit).
    pub retry_after: Option<Duration>,
}

impl OverLimit {
    /// What the caller reads, in OpenAI's words for the same case.
    pub fn message(&self) -> String {
        let name = self.counter.name().replace('_', " ");
        let Some(wait) = self.retry_after else {
            return format!(
                "Request too large for client '{}' on {name}: Limit {}, Requested {}. Ask for fewer tokens (max_tokens) or send a shorter input.",
                self.client, self.counter.limit, self.requested
            );
        };
        let wait = openai_duration(wait);
        if self.counter.is_quota() {
            format!(
                "Client '{}' has used its quota of {} {name}; it renews in {wait}.",
                self.client, self.counter.limit
            )
        } else {
            format!(
                "Rate limit reached for client '{}' on {name}: Limit {}, Requested {}. Please try again in {wait}.",
                self.client, self.counter.limit, self.requested
            )
        }
    }
}

/// What was reserved for one admitted request.
#[derive(Debug)]
pub struct Ticket {
    client: usize,
    /// (meter, window start, amount).
    reserved: Vec<(usize, u64, u64)>,
    /// The tokens reserved: the estimate.
    pub estimate: u64,
}

/// Where one measure of a client stands, for OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// The requests and tokens levels of a client (the shortest window each is limited over).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    pub requests: Option<Level>,
    pub tokens: Option<Level>,
}

/// Every named client's limits, as this execution environment counts them.
pub struct Limiter<C: Clock> {
    clients: Vec<Named>,
    ledger: Option<Ledger>,
    clock: C,
    settings: LimitSettings,
    /// The longest a call to the table may take.
    timeout: Duration,
    /// The table could not be reached; said once, until it answers again.
    alone: AtomicBool,
    /// Calls made to the table, for what a request costs in them.
    table_calls: AtomicU64,
}

impl<C: Clock> Limiter<C> {
    /// The limits of `clients` (indexed as the configuration lists them), counted through
    /// `ledger` when the fleet shares a table, each call to it bounded by `timeout`.
    pub fn new(
        clients: &[Client],
        settings: LimitSettings,
        clock: C,
        ledger: Option<Ledger>,
        timeout: Duration,
    ) -> Self {
        let clients = clients
            .iter()
            .map(|c| Named {
                name: c.name.clone(),
                meters: counters(&c.limits)
                    .into_iter()
                    .map(|counter| Meter {
                        counter,
                        held: Mutex::default(),
                        asking: tokio::sync::Mutex::new(()),
                    })
                    .collect(),
            })
            .collect();
        Self {
            clients,
            ledger,
            clock,
            settings,
            timeout,
            alone: AtomicBool::new(false),
            table_calls: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock
            .wall()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// Whether some client's limits are counted through the table (leases to give back).
    pub fn shared(&self) -> bool {
        self.ledger.is_some() && self.clients.iter().any(|c| !c.meters.is_empty())
    }

    /// How many calls this environment has made to the table for the clients' limits.
    pub fn table_calls(&self) -> u64 {
        self.table_calls.load(Ordering::Relaxed)
    }

    /// The client's name.
    pub fn name(&self, client: usize) -> &str {
        self.clients.get(client).map_or("", |c| c.name.as_str())
    }

    /// Whether the client has any limit.
    pub fn limited(&self, client: usize) -> bool {
        self.clients
            .get(client)
            .is_some_and(|c| !c.meters.is_empty())
    }

    /// Reserves one request and `tokens` (the estimate) from every limit of `client`, or says
    /// which limit refuses it (what was reserved from the others is put back).
    pub async fn admit(&self, client: usize, tokens: u64) -> Result<Ticket, OverLimit> {
        let mut ticket = Ticket {
            client,
            reserved: Vec::new(),
            estimate: tokens,
        };
        let Some(named) = self.clients.get(client) else {
            return Ok(ticket);
        };
        telemetry::client_request(&named.name);
        for (i, meter) in named.meters.iter().enumerate() {
            let amount = match meter.counter.measure {
                Measure::Requests => 1,
                Measure::Tokens => tokens,
            };
            match self.reserve(&named.name, meter, amount).await {
                Ok(window) => ticket.reserved.push((i, window, amount)),
                Err(retry_after) => {
                    self.give_back(&ticket, None);
                    telemetry::client_refused(&named.name, meter.counter.name());
                    return Err(OverLimit {
                        client: named.name.clone(),
                        counter: meter.counter,
                        requested: amount,
                        retry_after,
                    });
                }
            }
        }
        Ok(ticket)
    }

    /// Reserves `amount` of one limit: from this environment's lease, else from a new one.
    /// Refused: when the window frees (`None`: never, the amount is more than the limit).
    async fn reserve(
        &self,
        client: &str,
        meter: &Meter,
        amount: u64,
    ) -> Result<u64, Option<Duration>> {
        let counter = meter.counter;
        if amount > counter.limit {
            return Err(None);
        }
        if let Some(window) = meter.reserve_held(amount, self.now_ms()) {
            return Ok(window);
        }
        // One lease at a time; whoever waited may find it already taken for them.
        let _asking = meter.asking.lock().await;
        let now = self.now_ms();
        if let Some(window) = meter.reserve_held(amount, now) {
            return Ok(window);
        }
        let (window, spent, need, granted) = {
            let (window, held) = meter.current(now);
            let need = (amount as i64 - held.balance).max(0) as u64;
            (window, held.spent, need, held.granted)
        };
        let refused = Err(Some(window.left(now)));
        if spent {
            return refused;
        }
        let Some(ledger) = &self.ledger else {
            // This environment alone counts the whole limit.
            let (_, mut held) = meter.current(now);
            if held.granted + need > counter.limit {
                return refused;
            }
            held.granted += need;
            held.balance += need as i64 - amount as i64;
            return Ok(window.start);
        };
        let key = Ledger::key(client, counter.name(), window.start);
        // A full lease if the window has room for it, else just what this request needs.
        let lease = need
            .max(counter.lease(self.settings.environments))
            .min(counter.limit.saturating_sub(granted).max(need));
        let mut asked = vec![lease];
        if lease > need {
            asked.push(need);
        }
        for ask in asked {
            self.table_calls.fetch_add(1, Ordering::Relaxed);
            let started = self.clock.now();
            let result = self
                .clock
                .timeout(
                    self.timeout,
                    ledger.grant(&key, ask, counter.limit, window.end),
                )
                .await;
            let ms = millis(self.clock.now() - started);
            match result {
                Some(Ok(Some(total))) => {
                    telemetry::health_table(TableOp::Limit, TableOutcome::Ok, ms);
                    self.answered_again();
                    let (_, mut held) = meter.current(now);
                    held.granted = held.granted.max(total);
                    held.balance += ask as i64 - amount as i64;
                    return Ok(window.start);
                }
                Some(Ok(None)) => {
                    telemetry::health_table(TableOp::Limit, TableOutcome::Ok, ms);
                    self.answered_again();
                    let (_, mut held) = meter.current(now);
                    held.granted = held.granted.max(counter.limit.saturating_sub(ask) + 1);
                    if ask == need {
                        held.spent = true;
                    }
                }
                unreachable => {
                    let outcome = match unreachable {
                        None => TableOutcome::Timeout,
                        _ => TableOutcome::Error,
                    };
                    telemetry::health_table(TableOp::Limit, outcome, ms);
                    return self.alone(meter, window, need, amount, now);
                }
            }
        }
        refused
    }

    /// The table could not say: this environment's own share of the limit, spent alone.
    fn alone(
        &self,
        meter: &Meter,
        window: Window,
        need: u64,
        amount: u64,
        now: u64,
    ) -> Result<u64, Option<Duration>> {
        let counter = meter.counter;
        let share = counter.limit.div_ceil(self.settings.environments.max(1));
        if !self.alone.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                environments = self.settings.environments,
                "the health table cannot be reached: each execution environment now counts the clients' limits alone, at 1/LIMITS_ENVIRONMENTS of each"
            );
        }
        let (_, mut held) = meter.current(now);
        if held.alone + need > share {
            return Err(Some(window.left(now)));
        }
        held.alone += need;
        held.balance += need as i64 - amount as i64;
        Ok(window.start)
    }

    fn answered_again(&self) {
        if self.alone.swap(false, Ordering::Relaxed) {
            tracing::info!(
                "the health table answers again: the clients' limits are counted by the fleet"
            );
        }
    }

    /// After the call: `used` tokens (0 for a call that failed) instead of the estimate.
    pub fn settle(&self, ticket: Ticket, used: u64) {
        if let Some(named) = self.clients.get(ticket.client) {
            telemetry::client_tokens(&named.name, used);
        }
        self.give_back(&ticket, Some(used));
    }

    /// Puts back into this environment's lease, where the window is still the current one,
    /// everything reserved (`used` is `None`: the request was refused), or the difference
    /// between each token reservation and what was `used` (a request stays counted).
    fn give_back(&self, ticket: &Ticket, used: Option<u64>) {
        let Some(named) = self.clients.get(ticket.client) else {
            return;
        };
        let now = self.now_ms();
        for &(i, window, amount) in &ticket.reserved {
            let Some(meter) = named.meters.get(i) else {
                continue;
            };
            let returned = match (meter.counter.measure, used) {
                (_, None) => amount as i64,
                (Measure::Requests, Some(_)) => continue,
                (Measure::Tokens, Some(used)) => amount as i64 - used as i64,
            };
            let (current, mut held) = meter.current(now);
            if current.start == window {
                held.balance += returned;
            }
        }
    }

    /// Gives every lease this environment holds and has not spent back to the fleet, for the
    /// windows still current: when the environment shuts down, what it leased is not lost to
    /// the others. Each call bounded by the table's time limit; what could not be given back is
    /// lost to the window, as it would have been.
    pub async fn release(&self) -> u64 {
        let Some(ledger) = &self.ledger else {
            return 0;
        };
        let now = self.now_ms();
        let mut returns = Vec::new();
        for named in &self.clients {
            for meter in &named.meters {
                let (window, mut held) = meter.current(now);
                if held.balance > 0 {
                    let amount = held.balance as u64;
                    held.balance = 0;
                    let key = Ledger::key(&named.name, meter.counter.name(), window.start);
                    returns.push((key, amount));
                }
            }
        }
        let released = returns.iter().map(|(key, amount)| async move {
            self.table_calls.fetch_add(1, Ordering::Relaxed);
            let done = self
                .clock
                .timeout(self.timeout, ledger.release(key, *amount))
                .await;
            matches!(done, Some(Ok(()))).then_some(*amount).unwrap_or(0)
        });
        let total = futures_util::future::join_all(released)
            .await
            .into_iter()
            .sum();
        if total > 0 {
            tracing::info!(
                released = total,
                "unspent leases of the clients' limits given back"
            );
        }
        total
    }

    /// Where `client` stands now: the shortest window of each measure it is limited over.
    pub fn standing(&self, client: usize) -> Standing {
        let mut standing = Standing::default();
        let Some(named) = self.clients.get(client) else {
            return standing;
        };
        let now = self.now_ms();
        for meter in &named.meters {
            let slot = match meter.counter.measure {
                Measure::Requests => &mut standing.requests,
                Measure::Tokens => &mut standing.tokens,
            };
            if slot.is_some() {
                continue;
            }
            let (window, held) = meter.current(now);
            let limit = meter.counter.limit;
            let unleased = limit.saturating_sub(held.granted.max(held.alone));
            *slot = Some(Level {
                limit,
                remaining: (unleased + held.balance.max(0) as u64).min(limit),
                reset: window.left(now),
            });
        }
        standing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::clients::Priority;

    fn limiter(limits: Limits) -> (Limiter<ManualClock>, ManualClock) {
        let clock = ManualClock::default();
        let client = Client {
            name: "chatbot".into(),
            keys: Vec::new(),
            key_vars: Vec::new(),
            limits,
            routes: None,
            priority: Priority::Interactive,
        };
        let settings = LimitSettings {
            default_completion_tokens: 100,
            environments: 4,
            batch_reserve_tokens: 0,
        };
        let limiter = Limiter::new(
            &[client],
            settings,
            clock.clone(),
            None,
            Duration::from_millis(50),
        );
        (limiter, clock)
    }

    #[tokio::test]
    async fn a_window_admits_its_limit_and_settling_returns_what_was_not_used() {
        let (limiter, clock) = limiter(Limits {
            tokens_per_minute: Some(1000),
            requests_per_minute: Some(3),
            ..Limits::default()
        });
        let first = limiter.admit(0, 600).await.unwrap();
        let refused = limiter.admit(0, 600).await.unwrap_err();
        assert_eq!(refused.counter.name(), "tokens_per_minute");
        assert!(refused.retry_after.is_some());
        assert!(
            refused.message().contains("Limit 1000, Requested 600"),
            "{}",
            refused.message()
        );
        // It used 100 of the 600 reserved: 900 are free again.
        limiter.settle(first, 100);
        let standing = limiter.standing(0);
        assert_eq!(standing.tokens.unwrap().remaining, 900);
        assert_eq!(
            standing.requests.unwrap().remaining,
            2,
            "the refused request gave its request back"
        );
        let second = limiter.admit(0, 600).await.unwrap();
        limiter.settle(second, 0);
        let third = limiter.admit(0, 10).await.unwrap();
        limiter.settle(third, 10);
        let over = limiter.admit(0, 10).await.unwrap_err();
        assert_eq!(over.counter.name(), "requests_per_minute");
        // The next minute frees both.
        clock.advance(Duration::from_secs(60));
        assert!(limiter.admit(0, 1000).await.is_ok());
    }

    #[tokio::test]
    async fn a_request_larger_than_the_limit_is_never_admitted_and_quotas_say_when_they_renew() {
        let (limiter, _) = limiter(Limits {
            tokens_per_day: Some(500),
            ..Limits::default()
        });
        let too_large = limiter.admit(0, 501).await.unwrap_err();
        assert_eq!(too_large.retry_after, None);
        assert!(too_large.message().contains("Request too large"));
        let ticket = limiter.admit(0, 500).await.unwrap();
        limiter.settle(ticket, 700);
        let spent = limiter.admit(0, 1).await.unwrap_err();
        assert!(spent.counter.is_quota());
        assert!(spent.message().contains("renews in"), "{}", spent.message());
    }
}
