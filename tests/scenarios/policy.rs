//! Invariants of the routing policy, checked over random pools, health histories and budgets.

use crate::common;

use std::time::{Duration, Instant};

use common::{Behavior, Harness, RetryAfter};
use fallback_chat::clock::{Clock, ManualClock};
use fallback_chat::health::{Breaker, Event, HealthTable, State};
use fallback_chat::pool::{ApiStyle, Deployment};
use fallback_chat::secret::Secret;
use proptest::prelude::*;

const BREAKER: Breaker = Breaker {
    failures: 3,
    open_for: Duration::from_secs(30),
    probe_lease: Duration::from_secs(10),
};

fn pool(specs: &[(u32, u32)]) -> Vec<Deployment> {
    specs
        .iter()
        .enumerate()
        .map(|(i, &(priority, weight))| Deployment {
            id: format!("d{i}"),
            endpoint: "https://example.openai.azure.com".into(),
            deployment: format!("d{i}"),
            key: Some(Secret::new("k")),
            key_var: "K".into(),
            api: ApiStyle::V1,
            priority,
            weight: f64::from(weight),
            context_window: None,
            serves: Default::default(),
            auth: Default::default(),
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Throttle(usize, u64),
    Fail(usize),
    Succeed(usize, u64, Option<u64>),
    Answered(usize),
    Select,
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..40_000).prop_map(Op::Advance),
        (0..n, 0u64..60_000).prop_map(|(i, ms)| Op::Throttle(i, ms)),
        (0..n).prop_map(Op::Fail),
        (0..n).prop_map(Op::Fail),
        (0..n, 1u64..2_000, proptest::option::of(0u64..1_000))
            .prop_map(|(i, ms, r)| Op::Succeed(i, ms, r)),
        (0..n).prop_map(Op::Answered),
        Just(Op::Select),
        Just(Op::Select),
    ]
}

fn scenario() -> impl Strategy<Value = (Vec<(u32, u32)>, Vec<Op>)> {
    proptest::collection::vec((0u32..3, 1u32..5), 1..8).prop_flat_map(|specs| {
        let n = specs.len();
        (Just(specs), proptest::collection::vec(op(n), 0..80))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_choice_is_always_usable_and_from_the_best_usable_priority((specs, ops) in scenario()) {
        let pool = pool(&specs);
        let members: Vec<usize> = (0..pool.len()).collect();
        let clock = ManualClock::default();
        let health = HealthTable::new(pool.len(), BREAKER, 42);
        for op in ops {
            let now = clock.now();
            match op {
                Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                Op::Throttle(i, ms) => {
                    let until = now + Duration::from_millis(ms);
                    health.record(i, Event::Throttled { until }, now);
                    // A shorter Retry-After never shortens what is already known.
                    if ms > 0 {
                        prop_assert!(health.state(i, now).until().is_some_and(|u| u >= until), "cooldown shortened");
                    }
                }
                Op::Fail(i) => {
                    health.record(i, Event::Failure, now);
                    if let State::CircuitOpen { until } = health.state(i, now) {
                        prop_assert!(until <= now + BREAKER.open_for, "open too long");
                    }
                }
                Op::Succeed(i, ms, remaining) => {
                    health.record(i, Event::Success {
                        latency: Duration::from_millis(ms),
                        remaining_requests: remaining,
                        remaining_tokens: None,
                    }, now);
                    // A circuit that saw a success is closed, whatever happened before.
                    let state = health.state(i, now);
                    prop_assert!(matches!(state, State::Available | State::Throttled { .. }), "after a success: {:?}", state);
                }
                Op::Answered(i) => {
                    health.record(i, Event::Refused, now);
                    let state = health.state(i, now);
                    prop_assert!(matches!(state, State::Available | State::Throttled { .. }), "after an answer: {:?}", state);
                }
                Op::Select => {
                    let states: Vec<State> = members.iter().map(|&i| health.state(i, now)).collect();
                    let best = members
                        .iter()
                        .filter(|&&i| states[i].usable())
                        .map(|&i| pool[i].priority)
                        .min();
                    let chosen = health.select(&members, &pool, |_| false, now);
                    match (best, chosen) {
                        (None, None) => {}
                        (Some(p), Some(i)) => {
                            prop_assert!(states[i].usable(), "picked {:?}", states[i]);
                            prop_assert_eq!(pool[i].priority, p);
                            if states[i] == State::HalfOpen {
                                prop_assert_eq!(health.state(i, now), State::ProbeInFlight);
                            }
                        }
                        (best, chosen) => prop_assert!(false, "best {:?}, chosen {:?}, states {:?}", best, chosen, states),
                    }
                }
            }
        }
    }

    #[test]
    fn a_skipped_deployment_is_never_chosen(specs in proptest::collection::vec((0u32..3, 1u32..5), 1..8), mask in any::<u8>()) {
        let pool = pool(&specs);
        let members: Vec<usize> = (0..pool.len()).collect();
        let health = HealthTable::new(pool.len(), BREAKER, 7);
        let skip = |i: usize| mask & (1 << i) != 0;
        let chosen = health.select(&members, &pool, skip, Instant::now());
        prop_assert_eq!(chosen.is_some(), members.iter().any(|&i| !skip(i)));
        if let Some(i) = chosen {
            prop_assert!(!skip(i));
        }
    }
}

fn behavior() -> impl Strategy<Value = Behavior> {
    prop_oneof![
        Just(Behavior::Healthy),
        Just(Behavior::Hang),
        Just(Behavior::ServerError),
        Just(Behavior::Unavailable),
        Just(Behavior::ResetConnection),
        Just(Behavior::Throttled(RetryAfter::Seconds(5))),
    ]
}

proptest! {
    // Each case starts a real emulator and waits on real timeouts, so keep the count modest.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn a_request_never_outlives_its_budget(
        behaviors in proptest::collection::vec((behavior(), 0u64..300), 1..4),
        budget_ms in 150u64..700,
        attempt_share in 20u64..100,
    ) {
        let attempt_ms = (budget_ms * attempt_share / 100).max(1);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (status, elapsed) = runtime.block_on(async {
            let names: Vec<String> = (0..behaviors.len()).map(|i| format!("d{i}")).collect();
            let deployments: Vec<(&str, Behavior)> = names
                .iter()
                .zip(&behaviors)
                .map(|(n, (b, _))| (n.as_str(), b.clone()))
                .collect();
            let budget = budget_ms.to_string();
            let attempt = attempt_ms.to_string();
            let h = Harness::with(
                &deployments,
                &[("REQUEST_TIMEOUT_MS", &budget), ("ATTEMPT_TIMEOUT_MS", &attempt)],
            )
            .await;
            for (name, (_, latency)) in names.iter().zip(&behaviors) {
                h.emulator.set_latency(name, Duration::from_millis(*latency));
            }
            let started = Instant::now();
            let reply = h.ask("q").await;
            (reply.status, started.elapsed())
        });
        prop_assert!(status == 200 || status == 503, "{}", status);
        // The budget plus scheduling slack; the Lambda deadline margin (500 ms) covers this.
        prop_assert!(
            elapsed <= Duration::from_millis(budget_ms + 150),
            "{:?} for a {} ms budget", elapsed, budget_ms
        );
    }
}
