//! Fleet memory: several execution environments (App instances, each with its own health table)
//! sharing one DynamoDB table in moto's server, in front of one Azure OpenAI emulator. What one
//! learns, the others know by their next read; one probe and one trial for the whole fleet; a
//! slow or missing table costs at most its time limit.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use common::moto::Moto;
use common::proxy::Proxy;
use common::{Behavior, Emulator, Logs, Reply, RetryAfter, http_api_get, invoke_app, wall_ms};
use fallback_chat::App;
use fallback_chat::clock::{Clock, ManualClock};
use fallback_chat::config::Config;
use fallback_chat::health::Fleet;
use fallback_chat::net::{ExtraRoots, Http};

const KEY: &str = "emulator-key";
const TABLE: &str = "fallback-chat-health";

/// One execution environment.
struct Environment {
    app: Arc<App<Arc<ManualClock>>>,
    logs: Logs,
}

/// A fleet of environments, the emulator they call, and the table they share (through a proxy
/// that can slow it down).
struct FleetUnderTest {
    emulator: Emulator,
    moto: Moto,
    proxy: Proxy,
    clock: Arc<ManualClock>,
    environments: Vec<Environment>,
}

fn client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .http_client(
            Http::new(&ExtraRoots::default())
                .expect("an HTTP client")
                .for_aws(),
        )
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

impl FleetUnderTest {
    /// `size` environments over gpt-4o then gpt-35-turbo, with `env` added to the settings.
    async fn start(size: usize, deployments: &[(&str, Behavior)], env: &[(&str, &str)]) -> Self {
        let mut builder = Emulator::builder().api_key(KEY);
        for (name, behavior) in deployments {
            builder = builder.deployment(*name, behavior.clone());
        }
        let emulator = builder.start().await.expect("emulator starts");
        let moto = Moto::start();
        client(&moto.endpoint())
            .create_table()
            .table_name(TABLE)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .expect("CreateTable");
        let proxy = Proxy::start(moto.endpoint().trim_start_matches("http://").to_owned()).await;
        let names: Vec<&str> = deployments.iter().map(|(n, _)| *n).collect();
        let mut vars: HashMap<String, String> = HashMap::from([
            ("AZURE_OPENAI_ENDPOINT".into(), emulator.url()),
            ("AZURE_OPENAI_API_KEY".into(), KEY.into()),
            ("AZURE_OPENAI_DEPLOYMENTS".into(), names.join(",")),
            ("AUTH_PROVIDED_BY".into(), "authorizer".into()),
            ("HEALTH_TABLE".into(), TABLE.into()),
            // moto on a busy CI machine: more time than DynamoDB needs.
            ("HEALTH_TIMEOUT_MS".into(), "300".into()),
        ]);
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("valid config");
        let clock = Arc::new(ManualClock::default());
        let environments = (0..size)
            .map(|i| {
                let fleet = Fleet::new(client(&proxy.url()), TABLE);
                let app =
                    App::with_fleet(config.clone(), Arc::clone(&clock), i as u64, Some(fleet))
                        .expect("app builds");
                Environment {
                    app: Arc::new(app),
                    logs: Logs::default(),
                }
            })
            .collect();
        Self {
            emulator,
            moto,
            proxy,
            clock,
            environments,
        }
    }

    /// `GET /?query=` through environment `i`, with client key `key`.
    async fn ask_as(&self, i: usize, key: &str, query: &str) -> Reply {
        let env = &self.environments[i];
        let deadline = wall_ms(&self.clock) + 30_000;
        let mut event: serde_json::Value =
            serde_json::from_str(&http_api_get(Some(query))).unwrap();
        event["headers"]["authorization"] = serde_json::Value::String(format!("Bearer {key}"));
        invoke_app(&env.app, &env.logs, &event.to_string(), deadline).await
    }

    /// `GET /?query=` through environment `i`.
    async fn ask(&self, i: usize, query: &str) -> Reply {
        let env = &self.environments[i];
        let deadline = wall_ms(&self.clock) + 30_000;
        invoke_app(&env.app, &env.logs, &http_api_get(Some(query)), deadline).await
    }

    fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    fn calls(&self, deployment: &str) -> usize {
        self.emulator.calls(deployment)
    }

    /// What the table holds about the emulator's `deployment`.
    async fn shared(&self, deployment: &str) -> fallback_chat::health::Shared {
        let key = Fleet::key(&self.emulator.url(), deployment);
        let fleet = Fleet::new(client(&self.moto.endpoint()), TABLE);
        fleet
            .read(&[key])
            .await
            .expect("the table answers")
            .remove(0)
    }
}

fn both() -> [(&'static str, Behavior); 2] {
    [
        ("gpt-4o", Behavior::Healthy),
        ("gpt-35-turbo", Behavior::Healthy),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_seen_by_one_environment_is_honoured_by_all_after_their_next_read() {
    let f = FleetUnderTest::start(3, &both(), &[]).await;
    for i in 0..3 {
        assert_eq!(f.ask(i, "warm").await.body["deployment"], "gpt-4o");
    }
    f.emulator
        .set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7)));
    f.emulator.reset_counters();

    // The first to meet the 429 writes it before its response returns.
    let first = f.ask(0, "one").await;
    assert_eq!(first.body["deployment"], "gpt-35-turbo");
    assert_eq!(f.calls("gpt-4o"), 1);
    let shared = f.shared("gpt-4o").await;
    let wall = wall_ms(&f.clock);
    assert!(
        shared
            .throttled_until
            .is_some_and(|t| (6_900..=7_100).contains(&(t - wall))),
        "{shared:?}"
    );

    // The others read the table (their last read is a second old) and skip it.
    f.advance(Duration::from_millis(1_100));
    for i in 1..3 {
        let reply = f.ask(i, "two").await;
        assert_eq!(reply.body["deployment"], "gpt-35-turbo");
        assert_eq!(reply.header("x-fallback-attempts"), Some("1"), "{i}");
    }
    assert_eq!(f.calls("gpt-4o"), 1, "called once for the whole fleet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_shared_cooldown_ends_one_environment_tries_it_and_the_others_wait_for_its_word() {
    let f = FleetUnderTest::start(3, &both(), &[]).await;
    f.emulator
        .set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7)));
    assert_eq!(f.ask(0, "one").await.body["deployment"], "gpt-35-turbo");
    f.advance(Duration::from_millis(1_100));
    for i in 1..3 {
        f.ask(i, "learn").await;
    }
    assert_eq!(f.calls("gpt-4o"), 1);

    // The cooldown ends; the deployment is well again, but slow to answer the first call.
    f.emulator.set("gpt-4o", Behavior::Healthy);
    f.emulator
        .set_latency("gpt-4o", Duration::from_millis(1_500));
    f.advance(Duration::from_millis(6_000));
    let trial = {
        let env = &f.environments[0];
        let (app, logs) = (Arc::clone(&env.app), env.logs.clone());
        let deadline = wall_ms(&f.clock) + 30_000;
        tokio::spawn(async move {
            invoke_app(&app, &logs, &http_api_get(Some("trial")), deadline).await
        })
    };
    let started = Instant::now();
    while f.calls("gpt-4o") < 2 {
        assert!(started.elapsed() < Duration::from_secs(5), "no trial began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While it is out, the others keep to the fallback.
    for i in 1..3 {
        assert_eq!(
            f.ask(i, "meanwhile").await.body["deployment"],
            "gpt-35-turbo"
        );
    }
    assert_eq!(f.calls("gpt-4o"), 2, "one trial for the fleet");

    // It answered: cleared for everyone, who use it again after their next read.
    assert_eq!(trial.await.unwrap().body["deployment"], "gpt-4o");
    assert_eq!(f.shared("gpt-4o").await.throttled_until, None);
    f.emulator.set_latency("gpt-4o", Duration::ZERO);
    f.advance(Duration::from_millis(1_100));
    for i in 1..3 {
        assert_eq!(f.ask(i, "after").await.body["deployment"], "gpt-4o");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_opened_by_one_environment_is_skipped_by_all_and_probed_once() {
    let f = FleetUnderTest::start(3, &both(), &[("CIRCUIT_FAILURES", "3")]).await;
    f.emulator.set("gpt-4o", Behavior::Unavailable);
    // Three failures, counted by the fleet, spread over the environments.
    for i in 0..3 {
        assert_eq!(f.ask(i, "fail").await.body["deployment"], "gpt-35-turbo");
    }
    assert_eq!(f.calls("gpt-4o"), 3);
    let shared = f.shared("gpt-4o").await;
    assert!(shared.open_until.is_some(), "{shared:?}");

    f.advance(Duration::from_millis(1_100));
    for i in 0..3 {
        assert_eq!(
            f.ask(i, "skip").await.header("x-fallback-attempts"),
            Some("1")
        );
    }
    assert_eq!(
        f.calls("gpt-4o"),
        3,
        "no environment calls it while it is open"
    );

    // The open period ends: one probe for the fleet (slow, so the others ask meanwhile).
    f.emulator.set("gpt-4o", Behavior::Healthy);
    f.emulator
        .set_latency("gpt-4o", Duration::from_millis(1_000));
    f.advance(Duration::from_millis(4_000));
    let probe = {
        let env = &f.environments[2];
        let (app, logs) = (Arc::clone(&env.app), env.logs.clone());
        let deadline = wall_ms(&f.clock) + 30_000;
        tokio::spawn(async move {
            invoke_app(&app, &logs, &http_api_get(Some("probe")), deadline).await
        })
    };
    let started = Instant::now();
    while f.calls("gpt-4o") < 4 {
        assert!(started.elapsed() < Duration::from_secs(5), "no probe began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..2 {
        assert_eq!(
            f.ask(i, "meanwhile").await.body["deployment"],
            "gpt-35-turbo"
        );
    }
    assert_eq!(f.calls("gpt-4o"), 4, "exactly one probe for the fleet");
    assert_eq!(probe.await.unwrap().body["deployment"], "gpt-4o");

    f.emulator.set_latency("gpt-4o", Duration::ZERO);
    f.advance(Duration::from_millis(1_100));
    for i in 0..2 {
        assert_eq!(f.ask(i, "back").await.body["deployment"], "gpt-4o");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_retry_after_written_later_never_shortens_a_longer_one() {
    let f = FleetUnderTest::start(3, &both(), &[]).await;
    // Environments 1 and 2 read the table before any 429.
    f.ask(1, "warm").await;
    f.ask(2, "warm").await;
    f.emulator
        .push("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(20)));
    f.emulator
        .push("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(2)));
    f.ask(0, "long").await;
    let long = f.shared("gpt-4o").await.throttled_until.unwrap();
    // Environment 1's read is not due yet: it meets the 429 itself, a shorter one.
    f.ask(1, "short").await;
    assert_eq!(f.calls("gpt-4o"), 4, "two warm-ups, then the two 429s");
    assert_eq!(
        f.shared("gpt-4o").await.throttled_until,
        Some(long),
        "the 2 s Retry-After did not shorten the 20 s one"
    );
    f.advance(Duration::from_secs(5));
    assert_eq!(f.ask(2, "later").await.body["deployment"], "gpt-35-turbo");
    assert_eq!(f.calls("gpt-4o"), 4);
}

/// Every request is answered from local knowledge, and none waits on the table longer than its
/// time limit (300 ms here, and the table's writes at most as long again).
async fn answered_locally_within_the_limit(f: &FleetUnderTest) {
    f.emulator
        .set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7)));
    for round in 0..6 {
        f.advance(Duration::from_millis(1_100));
        let started = Instant::now();
        let reply = f.ask(round % 2, "q").await;
        let elapsed = started.elapsed();
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert!(
            elapsed < Duration::from_millis(900),
            "round {round}: {elapsed:?}"
        );
    }
    // What each environment learned itself still holds: gpt-4o once per environment.
    assert_eq!(f.calls("gpt-4o"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_table_never_fails_a_request_nor_adds_more_than_its_time_limit() {
    let f = FleetUnderTest::start(2, &both(), &[]).await;
    f.proxy.slow_down(Duration::from_secs(2));
    answered_locally_within_the_limit(&f).await;
    // Said once, not once per request.
    let warnings = f.environments[0]
        .logs
        .text()
        .matches("shared health table unavailable")
        .count();
    assert_eq!(warnings, 1, "{}", f.environments[0].logs.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_is_down_leaves_every_environment_to_its_own_knowledge() {
    let mut f = FleetUnderTest::start(2, &both(), &[]).await;
    f.moto.stop();
    answered_locally_within_the_limit(&f).await;
}

/// Requests every 0.5 s, from `from` to `to` seconds on the test clock, through the
/// environments in turn; returns (second, deployment) for each.
async fn every_half_second(f: &FleetUnderTest, from: u64, to: u64) -> Vec<(f64, String)> {
    let started = f.clock.now();
    let mut answers = Vec::new();
    let mut at = Duration::from_secs(from);
    while at < Duration::from_secs(to) {
        let since = f.clock.now() - started;
        if since < at - Duration::from_secs(from) {
            f.advance(at - Duration::from_secs(from) - since);
        }
        let turn = answers.len() % f.environments.len();
        let reply = f.ask(turn, "q").await;
        let second = (f.clock.now() - started).as_secs_f64() + from as f64;
        answers.push((
            second,
            reply.body["deployment"].as_str().unwrap_or("").to_owned(),
        ));
        at += Duration::from_millis(500);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_down_for_8_s_answers_again_within_5_s_of_recovering() {
    for size in [1, 2] {
        let f = FleetUnderTest::start(size, &both(), &[]).await;
        f.emulator.set("gpt-4o", Behavior::Unavailable);
        let outage = every_half_second(&f, 0, 8).await;
        assert!(
            outage.iter().all(|(_, d)| d == "gpt-35-turbo"),
            "{outage:?}"
        );
        f.emulator.set("gpt-4o", Behavior::Healthy);
        let after = every_half_second(&f, 8, 20).await;
        let back = after
            .iter()
            .find(|(_, d)| d == "gpt-4o")
            .map(|(s, _)| *s)
            .expect("gpt-4o answers again");
        assert!(
            back <= 13.0,
            "{size} environment(s): back at {back} s: {after:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_hangs_for_60_s_is_probed_rarely_and_each_probe_is_short() {
    let f = FleetUnderTest::start(
        1,
        &both(),
        &[
            ("ATTEMPT_TIMEOUT_MS", "3000"),
            ("REQUEST_TIMEOUT_MS", "20000"),
        ],
    )
    .await;
    // Warm: its usual latency is known.
    for _ in 0..3 {
        assert_eq!(f.ask(0, "warm").await.body["deployment"], "gpt-4o");
    }
    f.emulator.set("gpt-4o", Behavior::Hang);
    f.emulator.reset_counters();
    let started = f.clock.now();
    let mut probes = Vec::new();
    while f.clock.now() - started < Duration::from_secs(60) {
        let calls = f.calls("gpt-4o");
        let real = Instant::now();
        let reply = f.ask(0, "q").await;
        assert_eq!(reply.status, 200);
        if f.calls("gpt-4o") > calls && calls >= 3 {
            probes.push(real.elapsed());
        }
        f.advance(Duration::from_millis(500));
    }
    let calls = f.calls("gpt-4o");
    assert!(calls <= 7, "{calls} calls to a hung deployment in 60 s");
    assert!(!probes.is_empty(), "it was probed");
    for probe in &probes {
        assert!(
            *probe < Duration::from_millis(2_000),
            "a probe took {probe:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_refused_while_the_table_holds_a_cooldown_or_an_opening_in_force() {
    let f = FleetUnderTest::start(1, &both(), &[]).await;
    let (a, b) = (
        Fleet::new(client(&f.moto.endpoint()), TABLE),
        Fleet::new(client(&f.moto.endpoint()), TABLE),
    );
    let key = "contoso.openai.azure.com/gpt-4o";
    let t = common::epoch_ms();
    use fallback_chat::health::Written::{Applied, Superseded};
    assert_eq!(a.throttle(key, t + 7_000, t).await.unwrap(), Applied);
    assert_eq!(
        b.lease(key, t + 12_000, t + 1_000).await.unwrap(),
        Superseded,
        "nothing to try while the cooldown is in force"
    );
    // It ended: one environment takes the trial, the other waits for its word.
    assert_eq!(b.lease(key, t + 20_000, t + 8_000).await.unwrap(), Applied);
    assert_eq!(
        a.lease(key, t + 20_000, t + 8_000).await.unwrap(),
        Superseded
    );
    // The trial met another 429, which ends its lease: nobody else may try before the new
    // cooldown ends, although no lease is held.
    assert_eq!(
        b.throttle(key, t + 15_000, t + 8_010).await.unwrap(),
        Applied
    );
    assert_eq!(
        a.lease(key, t + 20_000, t + 8_020).await.unwrap(),
        Superseded
    );
    assert_eq!(a.lease(key, t + 30_000, t + 15_001).await.unwrap(), Applied);
    // The same for an open circuit and its probe.
    assert_eq!(
        a.open(key, t + 20_000, 5_000, t + 15_010).await.unwrap(),
        Applied
    );
    assert_eq!(
        b.lease(key, t + 30_000, t + 15_020).await.unwrap(),
        Superseded
    );
    assert_eq!(b.lease(key, t + 30_000, t + 20_001).await.unwrap(), Applied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_stops_answering_leases_delays_a_trial_by_seconds_never_locks_it_out() {
    let f = FleetUnderTest::start(2, &both(), &[]).await;
    f.emulator
        .set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7)));
    assert_eq!(f.ask(0, "one").await.body["deployment"], "gpt-35-turbo");
    f.advance(Duration::from_millis(1_100));
    assert_eq!(f.ask(1, "learn").await.body["deployment"], "gpt-35-turbo");
    assert_eq!(f.calls("gpt-4o"), 1);

    // The cooldown ends while the table has stopped answering in time.
    f.emulator.set("gpt-4o", Behavior::Healthy);
    f.proxy.slow_down(Duration::from_secs(2));
    f.advance(Duration::from_millis(6_000));
    let ended = f.clock.now();
    let mut first = None;
    while first.is_none() {
        assert!(
            f.clock.now() - ended < Duration::from_secs(10),
            "the trial never came"
        );
        let reply = f.ask(1, "q").await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        if reply.body["deployment"] == "gpt-4o" {
            first = Some(f.clock.now() - ended);
        }
        f.advance(Duration::from_millis(500));
    }
    let waited = first.unwrap();
    // An unanswered lease is not taken (the stampede it would start is what makes tables slow)
    // until leases have gone unanswered for 3 s; then the environment goes ahead alone.
    assert!(
        (Duration::from_secs(3)..Duration::from_secs(6)).contains(&waited),
        "the trial came {waited:?} after the cooldown ended"
    );
    assert_eq!(f.calls("gpt-4o"), 2, "one call: the trial");
}

const CLIENT_KEY: &str = "fc-chatbot-0123456789abcdef";

/// A client with `limit` tokens a minute, counted over `LIMITS_ENVIRONMENTS=4`.
fn limited(limit: u64) -> [(&'static str, String); 4] {
    [
        (
            "FALLBACK_CLIENTS",
            format!(
                r#"[{{"name": "chatbot", "key_env": "KEY_CHATBOT", "tokens_per_minute": {limit}}}]"#
            ),
        ),
        ("KEY_CHATBOT", CLIENT_KEY.to_owned()),
        ("LIMITS_ENVIRONMENTS", "4".to_owned()),
        ("LIMITS_DEFAULT_COMPLETION_TOKENS", "40".to_owned()),
    ]
}

/// `rounds` requests from each environment at once (every environment busy at the same
/// time): per environment, the tokens its answers used and how many were refused.
async fn burst(f: &FleetUnderTest, rounds: usize) -> Vec<(u64, usize)> {
    let per_environment = (0..f.environments.len()).map(|i| async move {
        let (mut used, mut refused) = (0, 0);
        for n in 0..rounds {
            let reply = f.ask_as(i, CLIENT_KEY, &format!("question {n}")).await;
            match reply.status {
                200 => used += reply.body["usage"]["total_tokens"].as_u64().unwrap(),
                429 => refused += 1,
                other => panic!("{other}: {:?}", reply.body),
            }
        }
        (used, refused)
    });
    futures_util::future::join_all(per_environment).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_tokens_per_minute_hold_across_four_environments_sharing_the_table() {
    let vars = limited(1200);
    let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let f = FleetUnderTest::start(4, &both(), &env).await;
    f.moto.reset();
    let counts = burst(&f, 40).await;
    let used: u64 = counts.iter().map(|(u, _)| u).sum();
    let refused: usize = counts.iter().map(|(_, r)| r).sum();
    // The fleet's grants never pass the limit; every estimate is above the real usage.
    assert!(used <= 1200, "the fleet used {used} of 1200: {counts:?}");
    assert!(refused > 0, "the limit was reached: {counts:?}");
    assert!(
        counts.iter().all(|(u, _)| *u > 0),
        "every environment was served: {counts:?}"
    );
    // A lease serves several requests: far fewer table writes than requests.
    let writes = f.moto.calls("DynamoDB_20120810.UpdateItem");
    eprintln!("used {used} of 1200, {refused} refused, {writes} table writes: {counts:?}");
    assert!(
        writes > 0 && writes < 160 / 2,
        "{writes} writes for 160 requests"
    );
    // The next minute frees the limit for everyone.
    f.advance(Duration::from_secs(60));
    assert_eq!(f.ask_as(3, CLIENT_KEY, "again").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_table_stopped_mid_run_each_environment_spends_its_share_alone_and_says_so_once() {
    let vars = limited(4000);
    let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut f = FleetUnderTest::start(2, &both(), &env).await;
    for i in 0..2 {
        assert_eq!(f.ask_as(i, CLIENT_KEY, "warm").await.status, 200);
    }
    f.moto.stop();
    // Each environment's share is 4000 / LIMITS_ENVIRONMENTS = 1000 tokens, on top of what its
    // lease still holds; never an outage.
    let counts = burst(&f, 120).await;
    for (i, (used, refused)) in counts.iter().enumerate() {
        assert!(*used > 0, "environment {i} still served: {counts:?}");
        assert!(
            *refused > 0,
            "environment {i} kept to its share: {counts:?}"
        );
        assert!(*used <= 1000 + 4000 / 16, "environment {i} used {used}");
        let text = f.environments[i].logs.text();
        assert_eq!(
            text.matches("each execution environment now counts the clients' limits alone")
                .count(),
            1,
            "said once: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_that_shuts_down_gives_its_unspent_lease_back_to_the_fleet() {
    let vars = limited(1200);
    let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let f = FleetUnderTest::start(2, &both(), &env).await;
    let reply = f.ask_as(0, CLIENT_KEY, "hello").await;
    assert_eq!(reply.status, 200);
    let used = reply.body["usage"]["total_tokens"].as_u64().unwrap();
    let window = wall_ms(&f.clock) / 60_000 * 60_000;
    let granted = || async {
        let item = client(&f.moto.endpoint())
            .get_item()
            .table_name(TABLE)
            .key(
                "pk",
                aws_sdk_dynamodb::types::AttributeValue::S(format!(
                    "limit#chatbot#tokens_per_minute#{window}"
                )),
            )
            .send()
            .await
            .expect("GetItem");
        item.item().unwrap()["granted"]
            .as_n()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    // A lease is more than one request needs: the rest waits in environment 0.
    let leased = granted().await;
    assert!(leased > used, "leased {leased}, used {used}");
    assert!(f.environments[0].app.release_leases().await > 0);
    assert_eq!(
        granted().await,
        used,
        "what was not spent is the fleet's again"
    );
    // Nothing is left to give back, and the environment still serves (with a new lease).
    assert_eq!(f.environments[0].app.release_leases().await, 0);
    assert_eq!(f.ask_as(0, CLIENT_KEY, "again").await.status, 200);
}
