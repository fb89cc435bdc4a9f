//! Chaos: a deployment that switches at random, seeded and reproducible, between healthy and every
//! kind of failure, in phases of 0.5 to 3 s (`chaos:<seed>`, `chaos:<seed>:<healthy-percent>`).
//!
//! The schedule is a pure function of the seed, the deployment's name and the time since the
//! emulator started: the same seed gives the same phases on every run, and two deployments with
//! the same seed get independent ones (the name is mixed into the seed). Within a phase every call
//! gets the same behaviour, with its parameters (a Retry-After, where a stream is cut) drawn when
//! the phase is.

use std::time::Duration;

use crate::behavior::{Behavior, RetryAfter};

/// The shortest and longest phase.
pub const PHASE_MIN: Duration = Duration::from_millis(500);
pub const PHASE_MAX: Duration = Duration::from_millis(3000);

/// The share of time a `chaos:<seed>` deployment is healthy, in percent.
pub const DEFAULT_HEALTHY_PERCENT: u8 = 50;

/// A deployment's chaos: what [`Behavior::Chaos`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chaos {
    seed: u64,
    healthy_percent: u8,
}

/// The kinds of behaviour a chaos phase can take, healthy included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChaosKind {
    Healthy,
    /// 429, `retry-after` or `retry-after-ms` of 1 to 4 s.
    Throttled,
    /// 500.
    ServerError,
    /// 503.
    Unavailable,
    /// A TCP reset, no response.
    ResetConnection,
    /// No response, connection open.
    Hang,
    /// Streamed calls: 1 to 5 content chunks, then a reset (others: healthy).
    StreamCut,
    /// Streamed calls: 1 to 5 content chunks, then silence (others: healthy).
    StreamStall,
    /// Streamed calls: complete but without `[DONE]` (others: healthy).
    StreamNoDone,
    /// Streamed calls: a malformed event before one of the first content chunks (others: healthy).
    StreamCorrupt,
    /// 400 `content_filter` on the prompt.
    ContentFilter,
    /// 200 with `finish_reason: content_filter`.
    OutputFiltered,
}

/// The failures and their weights: their shares of the time a deployment is not healthy.
const FAULTS: [(ChaosKind, u32); 11] = [
    (ChaosKind::Throttled, 16),
    (ChaosKind::ServerError, 10),
    (ChaosKind::Unavailable, 6),
    (ChaosKind::ResetConnection, 10),
    (ChaosKind::Hang, 8),
    (ChaosKind::StreamCut, 14),
    (ChaosKind::StreamStall, 10),
    (ChaosKind::StreamNoDone, 6),
    (ChaosKind::StreamCorrupt, 6),
    (ChaosKind::ContentFilter, 6),
    (ChaosKind::OutputFiltered, 8),
];

impl ChaosKind {
    /// Every kind, healthy first.
    pub const ALL: [ChaosKind; 12] = [
        ChaosKind::Healthy,
        ChaosKind::Throttled,
        ChaosKind::ServerError,
        ChaosKind::Unavailable,
        ChaosKind::ResetConnection,
        ChaosKind::Hang,
        ChaosKind::StreamCut,
        ChaosKind::StreamStall,
        ChaosKind::StreamNoDone,
        ChaosKind::StreamCorrupt,
        ChaosKind::ContentFilter,
        ChaosKind::OutputFiltered,
    ];

    /// The kind of a behaviour a chaos phase can take; `None` for the others.
    pub fn of(behavior: &Behavior) -> Option<ChaosKind> {
        Some(match behavior {
            Behavior::Healthy => ChaosKind::Healthy,
            Behavior::Throttled(_) => ChaosKind::Throttled,
            Behavior::ServerError => ChaosKind::ServerError,
            Behavior::Unavailable => ChaosKind::Unavailable,
            Behavior::ResetConnection => ChaosKind::ResetConnection,
            Behavior::Hang => ChaosKind::Hang,
            Behavior::StreamCut { .. } => ChaosKind::StreamCut,
            Behavior::StreamStall { .. } => ChaosKind::StreamStall,
            Behavior::StreamNoDone => ChaosKind::StreamNoDone,
            Behavior::StreamCorrupt { .. } => ChaosKind::StreamCorrupt,
            Behavior::ContentFilter => ChaosKind::ContentFilter,
            Behavior::OutputFiltered => ChaosKind::OutputFiltered,
            _ => return None,
        })
    }
}

impl Chaos {
    /// Seeded chaos, healthy `healthy_percent` of the time (at most 100).
    pub fn new(seed: u64, healthy_percent: u8) -> Self {
        Self {
            seed,
            healthy_percent: healthy_percent.min(100),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The share of phases that are healthy, in percent.
    pub fn healthy_percent(&self) -> u8 {
        self.healthy_percent
    }

    /// `deployment`'s phases, from the emulator's start.
    pub fn schedule(&self, deployment: &str) -> Schedule {
        Schedule {
            chaos: *self,
            rng: SplitMix64(self.seed ^ fnv1a(deployment.as_bytes())),
            phases: Vec::new(),
        }
    }
}

/// One phase of a schedule: `behavior` from `start` (inclusive) to `end`, since the emulator
/// started.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub start: Duration,
    pub end: Duration,
    pub behavior: Behavior,
}

/// A deployment's phases, drawn as time reaches them and kept.
#[derive(Clone, Debug)]
pub struct Schedule {
    chaos: Chaos,
    rng: SplitMix64,
    phases: Vec<Phase>,
}

impl Schedule {
    /// The chaos this schedule acts out.
    pub fn chaos(&self) -> Chaos {
        self.chaos
    }

    /// The phase in force at `t`.
    pub fn at(&mut self, t: Duration) -> &Phase {
        self.extend_to(t);
        // Phases are contiguous from zero, so the first that ends after `t` holds it.
        let i = self.phases.partition_point(|p| p.end <= t);
        &self.phases[i]
    }

    /// Every phase that begins before `until`, oldest first.
    pub fn phases_until(&mut self, until: Duration) -> &[Phase] {
        self.extend_to(until);
        let n = self.phases.partition_point(|p| p.start < until);
        &self.phases[..n]
    }

    fn extend_to(&mut self, t: Duration) {
        while self.phases.last().is_none_or(|p| p.end <= t) {
            let start = self.phases.last().map_or(Duration::ZERO, |p| p.end);
            let span = (PHASE_MAX - PHASE_MIN).as_millis() as u64;
            let length = PHASE_MIN + Duration::from_millis(self.rng.below(span + 1));
            let behavior = self.draw();
            self.phases.push(Phase {
                start,
                end: start + length,
                behavior,
            });
        }
    }

    fn draw(&mut self) -> Behavior {
        if self.rng.below(100) < u64::from(self.chaos.healthy_percent) {
            return Behavior::Healthy;
        }
        let total: u32 = FAULTS.iter().map(|(_, w)| w).sum();
        let mut pick = self.rng.below(u64::from(total)) as u32;
        let kind = FAULTS
            .iter()
            .find_map(|&(kind, weight)| {
                if pick < weight {
                    return Some(kind);
                }
                pick -= weight;
                None
            })
            .unwrap_or(ChaosKind::ServerError);
        let chunks = 1 + self.rng.below(5) as usize;
        match kind {
            ChaosKind::Healthy => Behavior::Healthy,
            ChaosKind::Throttled => {
                if self.rng.below(2) == 0 {
                    Behavior::Throttled(RetryAfter::Seconds(1 + self.rng.below(4)))
                } else {
                    Behavior::Throttled(RetryAfter::Milliseconds(1000 + self.rng.below(3001)))
                }
            }
            ChaosKind::ServerError => Behavior::ServerError,
            ChaosKind::Unavailable => Behavior::Unavailable,
            ChaosKind::ResetConnection => Behavior::ResetConnection,
            ChaosKind::Hang => Behavior::Hang,
            ChaosKind::StreamCut => Behavior::StreamCut { after: chunks },
            ChaosKind::StreamStall => Behavior::StreamStall { after: chunks },
            ChaosKind::StreamNoDone => Behavior::StreamNoDone,
            ChaosKind::StreamCorrupt => Behavior::StreamCorrupt { at: chunks - 1 },
            ChaosKind::ContentFilter => Behavior::ContentFilter,
            ChaosKind::OutputFiltered => Behavior::OutputFiltered,
        }
    }
}

/// SplitMix64: small, fast, and the same numbers on every platform for a seed.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0), without modulo bias worth measuring for small `n`.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// FNV-1a: a deployment name's stable hash (std's hashers are randomly keyed or unspecified).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_same_seed_gives_the_same_phases_and_another_seed_others() {
        let a = Chaos::new(42, 50)
            .schedule("gpt-4o")
            .phases_until(HOUR)
            .to_vec();
        let b = Chaos::new(42, 50)
            .schedule("gpt-4o")
            .phases_until(HOUR)
            .to_vec();
        assert_eq!(a, b);
        let other_seed = Chaos::new(43, 50)
            .schedule("gpt-4o")
            .phases_until(HOUR)
            .to_vec();
        assert_ne!(a, other_seed);
        // The name is part of the seed: deployments with one seed fail independently.
        let other_name = Chaos::new(42, 50)
            .schedule("gpt-35-turbo")
            .phases_until(HOUR)
            .to_vec();
        assert_ne!(a, other_name);
    }

    #[test]
    fn looking_a_time_up_gives_the_same_phase_in_any_order() {
        let mut forwards = Chaos::new(7, 40).schedule("d");
        let mut backwards = Chaos::new(7, 40).schedule("d");
        let times: Vec<Duration> = (0..2000).map(|i| Duration::from_millis(i * 37)).collect();
        let seen: Vec<Phase> = times.iter().map(|t| forwards.at(*t).clone()).collect();
        for (t, phase) in times.iter().zip(&seen).rev() {
            assert_eq!(backwards.at(*t), phase);
            assert!(phase.start <= *t && *t < phase.end, "{t:?} in {phase:?}");
        }
    }

    #[test]
    fn phases_are_contiguous_and_last_half_a_second_to_three() {
        let mut schedule = Chaos::new(1, 50).schedule("gpt-4o");
        let phases = schedule.phases_until(HOUR);
        assert_eq!(phases[0].start, Duration::ZERO);
        for pair in phases.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        for p in phases {
            let length = p.end - p.start;
            assert!((PHASE_MIN..=PHASE_MAX).contains(&length), "{p:?}");
        }
    }

    #[test]
    fn every_fault_kind_appears_and_healthy_takes_its_share() {
        for (seed, healthy) in [(1, 40), (2, 50), (3, 70)] {
            let mut schedule = Chaos::new(seed, healthy).schedule("gpt-4o");
            let phases = schedule.phases_until(HOUR);
            let mut by_kind = BTreeMap::new();
            for p in phases {
                let kind = ChaosKind::of(&p.behavior).expect("a chaos kind");
                *by_kind.entry(kind).or_insert(0usize) += 1;
            }
            for kind in ChaosKind::ALL {
                assert!(by_kind.contains_key(&kind), "{kind:?} missing: {by_kind:?}");
            }
            let share = 100.0 * by_kind[&ChaosKind::Healthy] as f64 / phases.len() as f64;
            assert!(
                (share - f64::from(healthy)).abs() < 5.0,
                "healthy {share:.1}% of {} phases, wanted {healthy}%",
                phases.len()
            );
        }
    }

    #[test]
    fn parameters_stay_in_their_ranges() {
        let mut schedule = Chaos::new(9, 0).schedule("gpt-4o");
        for p in schedule.phases_until(HOUR) {
            match p.behavior {
                Behavior::Throttled(RetryAfter::Seconds(n)) => assert!((1..=4).contains(&n)),
                Behavior::Throttled(RetryAfter::Milliseconds(n)) => {
                    assert!((1000..=4000).contains(&n))
                }
                Behavior::StreamCut { after } | Behavior::StreamStall { after } => {
                    assert!((1..=5).contains(&after))
                }
                Behavior::StreamCorrupt { at } => assert!(at < 5),
                ref other => assert!(ChaosKind::of(other).is_some(), "{other:?}"),
            }
        }
    }

    #[test]
    fn all_healthy_and_never_healthy_are_possible() {
        let mut always = Chaos::new(5, 100).schedule("d");
        assert!(
            always
                .phases_until(HOUR)
                .iter()
                .all(|p| p.behavior == Behavior::Healthy)
        );
        let mut never = Chaos::new(5, 0).schedule("d");
        assert!(
            never
                .phases_until(HOUR)
                .iter()
                .all(|p| p.behavior != Behavior::Healthy)
        );
        assert_eq!(Chaos::new(5, 250).healthy_percent(), 100);
    }
}
