//! A pool over two Azure resources ("east" and "west"), two deployments each, through the real
//! handler: priority spill-over, weights, circuit breaking, Retry-After extension, budgets.

use crate::common;

use std::time::{Duration, Instant};

use common::{Behavior, Emulator, Harness, RetryAfter};
use serde_json::{Value, json};

const EAST_KEY: &str = "east-key-0000";
const WEST_KEY: &str = "west-key-1111";

/// east: gpt-4o (provisioned, priority 0) and gpt-4o-paygo (priority 1, weight 1);
/// west: gpt-4o over the v1 API (priority 1, weight 3) and gpt-4o-mini (priority 2).
async fn two_regions(env: &[(&str, &str)], seed: Option<u64>) -> Harness {
    let east = Emulator::builder()
        .api_key(EAST_KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .deployment("gpt-4o-paygo", Behavior::Healthy)
        .start()
        .await
        .unwrap();
    let west = Emulator::builder()
        .api_key(WEST_KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .deployment("gpt-4o-mini", Behavior::Healthy)
        .start()
        .await
        .unwrap();
    let pool = json!({
        "deployments": [
            {"id": "east-ptu", "endpoint": east.url(), "deployment": "gpt-4o", "key_env": "KEY_EAST",
             "priority": 0, "context_window": 8192},
            {"id": "east-paygo", "endpoint": east.url(), "deployment": "gpt-4o-paygo", "key_env": "KEY_EAST",
             "priority": 1, "weight": 1, "context_window": 8192},
            {"id": "west-gpt4o", "endpoint": west.url(), "deployment": "gpt-4o", "key_env": "KEY_WEST",
             "api": "v1", "priority": 1, "weight": 3, "context_window": 128000},
            {"id": "west-mini", "endpoint": west.url(), "deployment": "gpt-4o-mini", "key_env": "KEY_WEST",
             "priority": 2, "context_window": 128000}
        ],
        "routes": {"chat": ["east-ptu", "east-paygo", "west-gpt4o", "west-mini"], "mini": ["west-mini"]},
        "default_route": "chat"
    });
    let mut vars = vec![
        ("FALLBACK_POOL".to_string(), pool.to_string()),
        ("KEY_EAST".to_string(), EAST_KEY.to_string()),
        ("KEY_WEST".to_string(), WEST_KEY.to_string()),
    ];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Harness::build(east, vec![west], &vars, seed)
}

fn east(h: &Harness) -> &Emulator {
    &h.emulator
}

fn west(h: &Harness) -> &Emulator {
    &h.others[0]
}

#[tokio::test]
async fn each_resource_is_called_its_own_way_with_its_own_key() {
    let h = two_regions(&[], None).await;
    let reply = h.ask("hello").await;
    assert_eq!(reply.body["deployment"], "east-ptu");
    assert_eq!(reply.header("x-fallback-deployment"), Some("east-ptu"));
    let sent = &east(&h).requests("gpt-4o")[0];
    assert_eq!(
        sent.headers.get("api-key").map(String::as_str),
        Some(EAST_KEY)
    );
    assert_eq!(sent.query.as_deref(), Some("api-version=2024-10-21"));

    // Push the east resource out: west's v1 deployment gets the model in the body, a Bearer key.
    east(&h).set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(60)));
    east(&h).set("gpt-4o-paygo", Behavior::Throttled(RetryAfter::Seconds(60)));
    for _ in 0..3 {
        h.ask("hello").await;
    }
    let sent = &west(&h).requests("gpt-4o")[0];
    assert_eq!(sent.path, "/openai/v1/chat/completions");
    assert_eq!(sent.body["model"], "gpt-4o");
    assert_eq!(
        sent.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {WEST_KEY}").as_str())
    );
    assert!(!sent.headers.contains_key("api-key"));
}

#[tokio::test]
async fn traffic_spills_over_priority_groups_in_order() {
    let h = two_regions(&[], None).await;
    assert_eq!(h.ask("q").await.body["deployment"], "east-ptu");

    east(&h).set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(60)));
    let reply = h.ask("q").await;
    let second = reply.body["deployment"].as_str().unwrap();
    assert!(["east-paygo", "west-gpt4o"].contains(&second), "{second}");

    east(&h).set("gpt-4o-paygo", Behavior::Throttled(RetryAfter::Seconds(60)));
    west(&h).set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(60)));
    let reply = h.ask("q").await;
    assert_eq!(reply.body["deployment"], "west-mini");
    assert!(reply.status == 200);

    // Everything in priority 0 and 1 is now cooling down: straight to priority 2, no other calls.
    let before = east(&h).total_calls() + west(&h).calls("gpt-4o");
    assert_eq!(h.ask("q").await.body["deployment"], "west-mini");
    assert_eq!(east(&h).total_calls() + west(&h).calls("gpt-4o"), before);
    assert_eq!(h.ask("q").await.header("x-fallback-attempts"), Some("1"));
}

#[tokio::test]
async fn weights_share_a_priority_group_in_proportion() {
    let h = two_regions(&[], Some(7)).await;
    // The provisioned deployment is out for the whole test; priority 1 shares the load 1:3.
    east(&h).set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(3600)));
    let n = 400;
    for _ in 0..n {
        assert_eq!(h.ask("q").await.status, 200);
    }
    let paygo = east(&h).calls("gpt-4o-paygo") as f64;
    let west = west(&h).calls("gpt-4o") as f64;
    assert_eq!(paygo + west, n as f64);
    // Expected 0.75; four standard deviations of a binomial(400, 0.75) are 0.087.
    let share = west / n as f64;
    assert!((0.66..=0.84).contains(&share), "west share {share}");
}

#[tokio::test]
async fn remaining_quota_steers_load_before_a_deployment_throttles() {
    let h = two_regions(&[], Some(11)).await;
    east(&h).set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(3600)));
    // Same group; east-paygo reports nearly no requests left, west plenty.
    east(&h).set_remaining("gpt-4o-paygo", 1, 100);
    west(&h).set_remaining("gpt-4o", 1000, 100_000);
    for _ in 0..20 {
        h.ask("warm up").await;
    }
    east(&h).reset_counters();
    west(&h).reset_counters();
    for _ in 0..200 {
        h.ask("q").await;
    }
    let paygo = east(&h).calls("gpt-4o-paygo");
    assert!(
        paygo <= 10,
        "east-paygo got {paygo} of 200 with 1 request left"
    );
}

#[tokio::test]
async fn a_primary_down_for_a_while_is_probed_once_per_trip_and_back_right_after() {
    let h = two_regions(
        &[("CIRCUIT_FAILURES", "3"), ("CIRCUIT_OPEN_MS", "30000")],
        None,
    )
    .await;
    east(&h).set("gpt-4o", Behavior::Unavailable);

    // Served by the fallback meanwhile; the first three failures open the circuit.
    for _ in 0..3 {
        let reply = h.ask("q").await;
        assert_eq!(reply.status, 200);
        assert_ne!(reply.body["deployment"], "east-ptu");
    }
    assert_eq!(east(&h).calls("gpt-4o"), 3);
    for _ in 0..10 {
        h.advance(Duration::from_secs(2));
        assert_eq!(h.ask("q").await.status, 200);
    }
    assert_eq!(
        east(&h).calls("gpt-4o"),
        3,
        "not called while the circuit is open"
    );

    // Trip time over: exactly one probe, which fails, and the circuit opens again.
    h.advance(Duration::from_secs(10));
    for _ in 0..5 {
        assert_eq!(h.ask("q").await.status, 200);
    }
    assert_eq!(east(&h).calls("gpt-4o"), 4, "one probe per trip period");

    // Recovered: the next probe succeeds and the primary is back at once.
    east(&h).set("gpt-4o", Behavior::Healthy);
    h.advance(Duration::from_secs(30));
    assert_eq!(h.ask("q").await.body["deployment"], "east-ptu");
    for _ in 0..5 {
        assert_eq!(h.ask("q").await.body["deployment"], "east-ptu");
    }
}

#[tokio::test]
async fn a_longer_retry_after_extends_a_cooldown_and_a_shorter_one_never_shortens_it() {
    let h = two_regions(&[], None).await;
    east(&h).push("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(20)));
    east(&h).push("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(2)));
    // Both requests reach east-ptu before either 429 is recorded, as in a busy environment.
    let (a, b) = tokio::join!(h.ask("a"), h.ask("b"));
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(east(&h).calls("gpt-4o"), 2);

    h.advance(Duration::from_secs(5));
    assert_ne!(h.ask("c").await.body["deployment"], "east-ptu");
    assert_eq!(
        east(&h).calls("gpt-4o"),
        2,
        "the 2 s Retry-After did not shorten the 20 s one"
    );

    h.advance(Duration::from_secs(16));
    assert_eq!(h.ask("d").await.body["deployment"], "east-ptu");
}

#[tokio::test]
async fn a_context_length_error_moves_to_a_larger_window_and_never_back() {
    let h = two_regions(&[], None).await;
    east(&h).set("gpt-4o", Behavior::ContextLengthExceeded);
    let reply = h.ask("a very long conversation").await;
    assert_eq!(reply.status, 200);
    let answered = reply.body["deployment"].as_str().unwrap();
    assert!(
        ["west-gpt4o", "west-mini"].contains(&answered),
        "{answered}"
    );
    assert_eq!(east(&h).calls("gpt-4o"), 1, "a 400 is never retried");
    assert_eq!(
        east(&h).calls("gpt-4o-paygo"),
        0,
        "the same 8k window cannot help"
    );
}

#[tokio::test]
async fn a_single_500_is_retried_once_on_the_same_deployment() {
    let h = two_regions(&[], None).await;
    east(&h).push("gpt-4o", Behavior::ServerError);
    let reply = h.ask("q").await;
    assert_eq!(reply.body["deployment"], "east-ptu");
    assert_eq!(east(&h).calls("gpt-4o"), 2);
    assert_eq!(reply.header("x-fallback-attempts"), Some("1"));

    // A reset is retried too; a 503 is not (it is the deployment saying it is overloaded).
    east(&h).push("gpt-4o", Behavior::ResetConnection);
    assert_eq!(h.ask("q").await.body["deployment"], "east-ptu");
    assert_eq!(east(&h).calls("gpt-4o"), 4);
    east(&h).push("gpt-4o", Behavior::Unavailable);
    assert_ne!(h.ask("q").await.body["deployment"], "east-ptu");
    assert_eq!(east(&h).calls("gpt-4o"), 5);
}

#[tokio::test]
async fn attempt_timeouts_are_cut_from_one_budget_and_never_add_up() {
    let h = two_regions(
        &[
            ("ATTEMPT_TIMEOUT_MS", "400"),
            ("REQUEST_TIMEOUT_MS", "1000"),
        ],
        None,
    )
    .await;
    for (emulator, name) in [
        (east(&h), "gpt-4o"),
        (east(&h), "gpt-4o-paygo"),
        (west(&h), "gpt-4o"),
        (west(&h), "gpt-4o-mini"),
    ] {
        emulator.set(name, Behavior::Hang);
    }
    let started = Instant::now();
    let reply = h.ask("q").await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 503);
    // Four attempts of 400 ms would be 1.6 s; the budget stops them at 1 s.
    assert!(elapsed < Duration::from_millis(1_250), "{elapsed:?}");
    let outcomes: Vec<&str> = reply.body["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "timeout").count(),
        3,
        "{outcomes:?}"
    );
    assert_eq!(outcomes.last(), Some(&"deadline_exceeded"), "{outcomes:?}");
}

#[tokio::test]
async fn when_nothing_can_answer_the_503_shows_each_deployments_state() {
    let h = two_regions(
        &[("CIRCUIT_FAILURES", "1"), ("CIRCUIT_OPEN_MS", "45000")],
        None,
    )
    .await;
    east(&h).set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(20)));
    east(&h).set("gpt-4o-paygo", Behavior::Throttled(RetryAfter::Seconds(12)));
    west(&h).set("gpt-4o", Behavior::Unavailable);
    west(&h).set("gpt-4o-mini", Behavior::Unavailable);

    let reply = h.ask("q").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.header("retry-after"),
        Some("12"),
        "the soonest recovery"
    );
    let states: Vec<(String, String, u64)> = reply.body["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["deployment"].as_str().unwrap().to_owned(),
                d["state"].as_str().unwrap().to_owned(),
                d["recovers_in_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("east-ptu", "throttled", 20_000),
        ("east-paygo", "throttled", 12_000),
        ("west-gpt4o", "circuit_open", 45_000),
        ("west-mini", "circuit_open", 45_000),
    ];
    for ((id, state, ms), (eid, estate, ems)) in states.iter().zip(expected) {
        assert_eq!((id.as_str(), state.as_str(), *ms), (eid, estate, ems));
    }

    // Nothing is called while all of them are out, and the answer is immediate.
    h.advance(Duration::from_secs(2));
    let calls = east(&h).total_calls() + west(&h).total_calls();
    let reply = h.ask("q").await;
    assert_eq!(reply.header("retry-after"), Some("10"));
    assert_eq!(east(&h).total_calls() + west(&h).total_calls(), calls);
    let outcomes: Vec<&Value> = reply.body["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["outcome"])
        .collect();
    assert_eq!(
        outcomes,
        [
            "cooling_down",
            "cooling_down",
            "circuit_open",
            "circuit_open"
        ]
    );
}
