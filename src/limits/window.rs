//! The windows limits are counted in: the UTC minute, day and calendar month an epoch time falls
//! in, the same for every execution environment whatever its own clock's offset.

use std::time::Duration;

use time::{Date, Month, OffsetDateTime, Time};

/// How long a limit's window is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Span {
    Minute,
    Day,
    Month,
}

impl Span {
    pub fn as_str(self) -> &'static str {
        match self {
            Span::Minute => "minute",
            Span::Day => "day",
            Span::Month => "month",
        }
    }

    /// The window `now_ms` (epoch milliseconds) falls in.
    pub fn window(self, now_ms: u64) -> Window {
        const MINUTE: u64 = 60_000;
        const DAY: u64 = 24 * 60 * MINUTE;
        match self {
            Span::Minute => {
                let start = now_ms - now_ms % MINUTE;
                Window {
                    start,
                    end: start + MINUTE,
                }
            }
            Span::Day => {
                let start = now_ms - now_ms % DAY;
                Window {
                    start,
                    end: start + DAY,
                }
            }
            Span::Month => {
                let date = OffsetDateTime::from_unix_timestamp((now_ms / 1000) as i64)
                    .map_or(OffsetDateTime::UNIX_EPOCH.date(), OffsetDateTime::date);
                let first = |year: i32, month: Month| {
                    Date::from_calendar_date(year, month, 1)
                        .map_or(0, |d| {
                            d.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp()
                        })
                        .max(0) as u64
                        * 1000
                };
                let (year, month) = (date.year(), date.month());
                let next_year = if month == Month::December {
                    year + 1
                } else {
                    year
                };
                Window {
                    start: first(year, month),
                    end: first(next_year, month.next()),
                }
            }
        }
    }
}

/// One window, as epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub end: u64,
}

impl Window {
    /// How long until the window ends, from `now_ms`.
    pub fn left(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.end.saturating_sub(now_ms))
    }
}

/// A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `120ms`, `17s`, `6m0s`,
/// `1h2m3s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_utc_minutes_days_and_calendar_months() {
        // 2026-02-28T23:59:30.500Z
        let now = 1_772_323_170_500;
        let minute = Span::Minute.window(now);
        assert_eq!(
            (minute.start, minute.end),
            (1_772_323_140_000, 1_772_323_200_000)
        );
        assert_eq!(minute.left(now), Duration::from_millis(29_500));
        let day = Span::Day.window(now);
        assert_eq!((day.start, day.end), (1_772_236_800_000, 1_772_323_200_000));
        // February 2026 has 28 days; the month ends with the day.
        let month = Span::Month.window(now);
        assert_eq!(
            (month.start, month.end),
            (1_769_904_000_000, 1_772_323_200_000)
        );
        // December rolls over into January of the next year.
        let december = Span::Month.window(1_796_083_200_000); // 2026-12-01T00:00:00Z
        assert_eq!(december.start, 1_796_083_200_000);
        assert_eq!(december.end, 1_798_761_600_000); // 2027-01-01T00:00:00Z
    }

    #[test]
    fn reset_durations_are_written_as_openai_writes_them() {
        assert_eq!(openai_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(openai_duration(Duration::from_millis(16_200)), "17s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
