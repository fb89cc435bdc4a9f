//! Where "now" comes from, and how long to wait. Every deadline, cooldown and latency in the
//! crate reads the injected [`Clock`], and every time limit on a wait goes through it, so tests
//! move time without sleeping ([`ManualClock`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Cheap to clone; clones read the same time.
pub trait Clock: Clone + Send + Sync + 'static {
    /// Monotonic time, for deadlines, cooldowns and latencies.
    fn now(&self) -> Instant;
    /// Wall-clock time, for HTTP-dates and the Lambda deadline (an epoch time).
    fn wall(&self) -> SystemTime;
    /// Runs `future` for at most `limit`: its output, or `None` when the limit came first.
    fn timeout<F: Future + Send>(
        &self,
        limit: Duration,
        future: F,
    ) -> impl Future<Output = Option<F::Output>> + Send;
}

/// The system's clocks and tokio's timers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
    async fn timeout<F: Future + Send>(&self, limit: Duration, future: F) -> Option<F::Output> {
        tokio::time::timeout(limit, future).await.ok()
    }
}

/// A clock for tests: its monotonic time stands still until told to
/// [`advance`](ManualClock::advance), or until a time limit set through it runs out, which moves
/// it to that limit's end. Limits run out in real time, so a real server gets real time to
/// answer; an answer that comes first takes no time on this clock, so what a request records can
/// be checked to the millisecond. Its wall time starts at the system's and moves with it, so
/// epoch times written by one execution environment of a test fleet agree with the others'.
/// Its clones are the same clock: what one is told, all read.
#[derive(Debug, Clone)]
pub struct ManualClock {
    start: Instant,
    start_wall: SystemTime,
    elapsed_ms: Arc<AtomicU64>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            start_wall: SystemTime::now(),
            elapsed_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl ManualClock {
    /// Moves this clock forward by `by`, at once.
    pub fn advance(&self, by: Duration) {
        self.elapsed_ms.fetch_add(millis(by), Ordering::SeqCst);
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
    async fn timeout<F: Future + Send>(&self, limit: Duration, future: F) -> Option<F::Output> {
        let ends = self.elapsed().saturating_add(limit);
        let output = tokio::time::timeout(limit, future).await.ok();
        if output.is_none() {
            // Limits that ran out together (parallel requests) end at the same moment.
            self.elapsed_ms.fetch_max(millis(ends), Ordering::SeqCst);
        }
        output
    }
}

impl<C: Clock> Clock for Arc<C> {
    fn now(&self) -> Instant {
        (**self).now()
    }
    fn wall(&self) -> SystemTime {
        (**self).wall()
    }
    fn timeout<F: Future + Send>(
        &self,
        limit: Duration,
        future: F,
    ) -> impl Future<Output = Option<F::Output>> + Send {
        (**self).timeout(limit, future)
    }
}

/// Whole milliseconds, saturating: how durations appear in logs and JSON.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_when_told_or_when_a_limit_runs_out() {
        let clock = ManualClock::default();
        let t0 = clock.now();
        clock.advance(Duration::from_secs(7));
        assert_eq!(clock.now() - t0, Duration::from_secs(7));

        // An answer within the limit takes no time on this clock.
        let answered = clock.timeout(Duration::from_secs(5), async { 42 }).await;
        assert_eq!(answered, Some(42));
        assert_eq!(clock.now() - t0, Duration::from_secs(7));

        // A limit that runs out moves it to the limit's end; two at once, once.
        let never = std::future::pending::<()>;
        let limit = Duration::from_millis(30);
        let (a, b) = tokio::join!(clock.timeout(limit, never()), clock.timeout(limit, never()));
        assert_eq!((a, b), (None, None));
        assert_eq!(clock.now() - t0, Duration::from_millis(7_030));
    }
}
