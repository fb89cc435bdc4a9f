//! `make bench`'s fleet scenario (bench/harness.py runs it and writes the table): a fleet of
//! execution environments, each an in-process App with its own health table, requests spread
//! evenly across them, the fleet warm before the fault starts; once with each environment
//! learning alone, once sharing health through a DynamoDB table in moto's server.
//!
//! (a) gpt-4o answers 429 with Retry-After for a number of windows: calls to gpt-4o in each
//!     window, fleet-wide.
//! (b) gpt-4o hangs, then recovers: requests that waited for a whole attempt timeout (or a
//!     probe's), calls to gpt-4o during the outage, seconds from recovery until it answers again.
//! (c) the table's reads (GetItem of the shared item) against moto: p50 and p99.
//! (d) one client's tokens per minute, counted through the table by every environment with a
//!     request always in flight: tokens used against the limit (the overshoot), requests
//!     admitted and refused, table calls per request.
//!
//! The local-only and shared runs of (a) and of (b) run side by side, each against an emulator
//! of its own: what they report are counts and timeouts, not microseconds.
//!
//! Usage: fleet --moto http://127.0.0.1:PORT [--environments 16] [--rate 0] [--windows 4]
//!              [--retry-after 7] [--hang 30] [--attempt-timeout-ms 10000] [--reads 500]
//!              [--tokens-per-minute 20000] [--limit-seconds 10] [--only limits]
//! Prints one JSON object on stdout.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use azure_openai_emulator::{Behavior, Emulator, RetryAfter};
use fallback_chat::App;
use fallback_chat::config::Config;
use fallback_chat::health::Fleet;
use fallback_chat::net::{ExtraRoots, Http};
use serde_json::{Value, json};

const KEY: &str = "emulator-key";
/// A request that took this share of a time limit or more waited for it.
const WAITED: f64 = 0.9;

struct Args {
    moto: String,
    environments: usize,
    /// Requests per second per environment; 0: each environment always has one in flight.
    rate: f64,
    windows: u32,
    retry_after: u64,
    hang: u64,
    attempt_timeout_ms: u64,
    reads: usize,
    tokens_per_minute: u64,
    limit_seconds: u64,
    /// Only this scenario (`limits`), when given.
    only: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        moto: String::new(),
        environments: 16,
        rate: 0.0,
        windows: 4,
        retry_after: 7,
        hang: 30,
        attempt_timeout_ms: 10_000,
        reads: 500,
        tokens_per_minute: 20_000,
        limit_seconds: 10,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("{flag}: {v:?}"));
        match flag.as_str() {
            "--moto" => a.moto = value,
            "--environments" => a.environments = num(&value)? as usize,
            "--rate" => a.rate = num(&value)?,
            "--windows" => a.windows = num(&value)? as u32,
            "--retry-after" => a.retry_after = num(&value)? as u64,
            "--hang" => a.hang = num(&value)? as u64,
            "--attempt-timeout-ms" => a.attempt_timeout_ms = num(&value)? as u64,
            "--reads" => a.reads = num(&value)? as usize,
            "--tokens-per-minute" => a.tokens_per_minute = num(&value)? as u64,
            "--limit-seconds" => a.limit_seconds = num(&value)? as u64,
            "--only" => a.only = Some(value),
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    if a.moto.is_empty() {
        return Err("--moto URL is required".into());
    }
    Ok(a)
}

fn client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .http_client(
            Http::new(&ExtraRoots::default())
                .expect("an HTTP client")
                .for_aws(),
        )
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

async fn create_table(moto: &str, name: &str) {
    client(moto)
        .create_table()
        .table_name(name)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("an attribute definition"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .expect("a key schema"),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("CreateTable in moto");
}

/// One request's fate.
struct Sample {
    at: Duration,
    latency: Duration,
    deployment: String,
}

/// A fleet of environments over one emulator, and the requests it served.
struct FleetRun {
    emulator: Emulator,
    apps: Vec<Arc<App>>,
}

impl FleetRun {
    /// `table`: share health through it; `None`: each environment learns alone.
    async fn start(args: &Args, table: Option<&str>) -> Self {
        let emulator = Emulator::builder()
            .api_key(KEY)
            .deployment("gpt-4o", Behavior::Healthy)
            .deployment("gpt-35-turbo", Behavior::Healthy)
            .start()
            .await
            .expect("the emulator starts");
        let mut vars: HashMap<&str, String> = HashMap::from([
            ("AZURE_OPENAI_ENDPOINT", emulator.url()),
            ("AZURE_OPENAI_API_KEY", KEY.to_owned()),
            ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o,gpt-35-turbo".to_owned()),
            ("AUTH_PROVIDED_BY", "authorizer".to_owned()),
            ("ATTEMPT_TIMEOUT_MS", args.attempt_timeout_ms.to_string()),
            // moto answers in milliseconds, not DynamoDB's single digit: room for it.
            ("HEALTH_TIMEOUT_MS", "200".to_owned()),
        ]);
        if let Some(table) = table {
            create_table(&args.moto, table).await;
            vars.insert("HEALTH_TABLE", table.to_owned());
        }
        let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("a valid configuration");
        let apps = (0..args.environments)
            .map(|i| {
                let fleet = table.map(|t| Fleet::new(client(&args.moto), t));
                let app = App::with_fleet(
                    config.clone(),
                    fallback_chat::clock::SystemClock,
                    i as u64,
                    fleet,
                )
                .expect("the app builds");
                Arc::new(app)
            })
            .collect::<Vec<_>>();
        let run = Self { emulator, apps };
        // Warm: every environment has read the table and answered from gpt-4o.
        for app in &run.apps {
            for _ in 0..3 {
                ask(app).await;
            }
        }
        run.emulator.reset_counters();
        run
    }

    /// Sends requests to every environment at `rate` per second each (0: the next as soon as
    /// the last is answered, one always in flight, as a busy Lambda environment has), until
    /// `stop` is set.
    fn load(
        &self,
        rate: f64,
        stop: Arc<AtomicBool>,
        started: Instant,
    ) -> Vec<tokio::task::JoinHandle<Vec<Sample>>> {
        let gap = if rate > 0.0 {
            Duration::from_secs_f64(1.0 / rate)
        } else {
            Duration::ZERO
        };
        let share = 1.0 / self.apps.len() as f64;
        self.apps
            .iter()
            .enumerate()
            .map(|(i, app)| {
                let (app, stop) = (Arc::clone(app), Arc::clone(&stop));
                tokio::spawn(async move {
                    // Spread the environments' requests over the gap.
                    tokio::time::sleep(gap.mul_f64(i as f64 * share)).await;
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let sent = Instant::now();
                        let deployment = ask(&app).await;
                        samples.push(Sample {
                            at: sent - started,
                            latency: sent.elapsed(),
                            deployment,
                        });
                        tokio::time::sleep(gap.saturating_sub(sent.elapsed())).await;
                    }
                    samples
                })
            })
            .collect()
    }
}

/// `GET /?query=` through `app`, as API Gateway would send it; the deployment that answered.
async fn ask(app: &Arc<App>) -> String {
    let event = json!({
        "version": "2.0", "routeKey": "GET /", "rawPath": "/", "rawQueryString": "query=hello",
        "queryStringParameters": {"query": "hello"},
        "headers": {"host": "bench.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {"accountId": "123456789012", "apiId": "bench", "http": {"method": "GET",
            "path": "/", "protocol": "HTTP/1.1", "sourceIp": "203.0.113.10", "userAgent": "bench"},
            "requestId": "bench", "routeKey": "GET /", "stage": "$default", "timeEpoch": 0},
        "isBase64Encoded": false
    });
    let request = lambda_http::request::from_str(&event.to_string()).expect("an API Gateway event");
    let response = app.handle_buffered(request).await;
    response
        .headers()
        .get("x-fallback-deployment")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>) -> Vec<Sample> {
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    all
}

/// (a): calls to gpt-4o in each Retry-After window.
async fn throttle(args: &Args, table: Option<&str>) -> Value {
    let run = FleetRun::start(args, table).await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks = run.load(args.rate, Arc::clone(&stop), started);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = run.emulator.calls("gpt-4o");
    run.emulator.set(
        "gpt-4o",
        Behavior::Throttled(RetryAfter::Seconds(args.retry_after)),
    );
    let mut windows = Vec::new();
    let mut seen = before;
    for _ in 0..args.windows {
        tokio::time::sleep(Duration::from_secs(args.retry_after)).await;
        let now = run.emulator.calls("gpt-4o");
        windows.push(now - seen);
        seen = now;
    }
    run.emulator.set("gpt-4o", Behavior::Healthy);
    stop.store(true, Ordering::SeqCst);
    let samples = collect(tasks).await;
    json!({"calls_per_window": windows, "requests": samples.len()})
}

/// (b): a hang of `args.hang` seconds, then recovery.
async fn hang(args: &Args, table: Option<&str>) -> Value {
    let run = FleetRun::start(args, table).await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks = run.load(args.rate, Arc::clone(&stop), started);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault = started.elapsed();
    let before = run.emulator.calls("gpt-4o");
    run.emulator.set("gpt-4o", Behavior::Hang);
    tokio::time::sleep(Duration::from_secs(args.hang)).await;
    let during = run.emulator.calls("gpt-4o");
    run.emulator.set("gpt-4o", Behavior::Healthy);
    let recovered = started.elapsed();
    // Until gpt-4o answers again (or two minutes pass).
    let cap = Instant::now() + Duration::from_secs(120);
    while Instant::now() < cap {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if run.emulator.calls("gpt-4o") > during {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let samples = collect(tasks).await;
    let attempt = Duration::from_millis(args.attempt_timeout_ms).mul_f64(WAITED);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= fault).collect();
    let waited_attempt = after.iter().filter(|s| s.latency >= attempt).count();
    let waited_probe = after
        .iter()
        .filter(|s| s.latency >= Duration::from_millis(900) && s.latency < attempt)
        .count();
    let back = samples
        .iter()
        .filter(|s| s.at + s.latency >= recovered && s.deployment == "gpt-4o")
        .map(|s| (s.at + s.latency).saturating_sub(recovered))
        .min();
    json!({
        "requests": after.len(),
        "waited_attempt_timeout": waited_attempt,
        "waited_probe_timeout": waited_probe,
        "gpt4o_calls_during_outage": during - before,
        "seconds_to_answer_again": back.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
    })
}

/// (c): the table's reads against moto, as the request path makes them (one GetItem).
async fn reads(args: &Args) -> Value {
    let table = "fleet-reads";
    create_table(&args.moto, table).await;
    let fleet = Fleet::new(client(&args.moto), table);
    let keys: Vec<String> = ["gpt-4o", "gpt-35-turbo"]
        .iter()
        .map(|d| Fleet::key("http://127.0.0.1:8080", d))
        .collect();
    let mut ms = Vec::with_capacity(args.reads);
    for _ in 0..args.reads + 20 {
        let sent = Instant::now();
        fleet.read(&keys).await.expect("moto answers");
        ms.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    let mut ms = ms.split_off(20);
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    json!({"n": ms.len(), "p50_ms": at(0.5), "p99_ms": at(0.99)})
}

const CLIENT_KEY: &str = "fc-bench-client-0123456789";

/// (d): every environment with a request always in flight for one client whose tokens per
/// minute are counted through the table, within one minute window.
async fn limits(args: &Args) -> Value {
    let table = "fleet-limits";
    create_table(&args.moto, table).await;
    let emulator = Emulator::builder()
        .api_key(KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .start()
        .await
        .expect("the emulator starts");
    let clients = json!([{"name": "bench", "key_env": "KEY_BENCH",
                          "tokens_per_minute": args.tokens_per_minute}]);
    let vars: HashMap<&str, String> = HashMap::from([
        ("AZURE_OPENAI_ENDPOINT", emulator.url()),
        ("AZURE_OPENAI_API_KEY", KEY.to_owned()),
        ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o".to_owned()),
        ("FALLBACK_CLIENTS", clients.to_string()),
        ("KEY_BENCH", CLIENT_KEY.to_owned()),
        ("LIMITS_ENVIRONMENTS", args.environments.to_string()),
        ("HEALTH_TABLE", table.to_owned()),
        ("HEALTH_TIMEOUT_MS", "200".to_owned()),
    ]);
    let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("a valid configuration");
    let apps: Vec<Arc<App>> = (0..args.environments)
        .map(|i| {
            let fleet = Fleet::new(client(&args.moto), table);
            let app = App::with_fleet(
                config.clone(),
                fallback_chat::clock::SystemClock,
                i as u64,
                Some(fleet),
            )
            .expect("the app builds");
            Arc::new(app)
        })
        .collect();
    // The whole run within one minute window: start early in one.
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        % 60_000;
    if into_minute + args.limit_seconds * 1000 > 55_000 {
        tokio::time::sleep(Duration::from_millis(60_500 - into_minute)).await;
    }
    let until = Instant::now() + Duration::from_secs(args.limit_seconds);
    let tasks: Vec<_> = apps
        .iter()
        .map(|app| {
            let app = Arc::clone(app);
            tokio::spawn(async move {
                let (mut used, mut admitted, mut refused) = (0u64, 0u64, 0u64);
                while Instant::now() < until {
                    match ask_as_client(&app).await {
                        Some(tokens) => {
                            used += tokens;
                            admitted += 1;
                        }
                        None => refused += 1,
                    }
                }
                (used, admitted, refused)
            })
        })
        .collect();
    let (mut used, mut admitted, mut refused) = (0, 0, 0);
    for task in tasks {
        let (u, a, r) = task.await.unwrap_or_default();
        (used, admitted, refused) = (used + u, admitted + a, refused + r);
    }
    let table_calls: u64 = apps.iter().map(|a| a.limit_table_calls()).sum();
    let requests = admitted + refused;
    json!({
        "tokens_per_minute": args.tokens_per_minute,
        "seconds": args.limit_seconds,
        "used_tokens": used,
        "overshoot_tokens": used.saturating_sub(args.tokens_per_minute),
        "admitted": admitted,
        "refused": refused,
        "table_calls": table_calls,
        "table_calls_per_request": if requests > 0 { table_calls as f64 / requests as f64 } else { 0.0 },
        "table_calls_per_admitted": if admitted > 0 { table_calls as f64 / admitted as f64 } else { 0.0 },
    })
}

/// A chat completion as the limited client (40 tokens at most); the tokens it used, or `None`
/// when its limit refused it.
async fn ask_as_client(app: &Arc<App>) -> Option<u64> {
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 40});
    let event = json!({
        "version": "2.0", "routeKey": "$default", "rawPath": "/v1/chat/completions", "rawQueryString": "",
        "headers": {"host": "bench.execute-api.us-east-1.amazonaws.com", "content-type": "application/json",
                    "authorization": format!("Bearer {CLIENT_KEY}")},
        "requestContext": {"accountId": "123456789012", "apiId": "bench", "http": {"method": "POST",
            "path": "/v1/chat/completions", "protocol": "HTTP/1.1", "sourceIp": "203.0.113.10", "userAgent": "bench"},
            "requestId": "bench", "routeKey": "$default", "stage": "$default", "timeEpoch": 0},
        "body": body.to_string(),
        "isBase64Encoded": false
    });
    let request = lambda_http::request::from_str(&event.to_string()).expect("an API Gateway event");
    let response = app.handle_buffered(request).await;
    if response.status() != 200 {
        return None;
    }
    let body: Value = match response.body() {
        lambda_http::Body::Text(text) => serde_json::from_str(text).unwrap_or_default(),
        _ => Value::Null,
    };
    body["usage"]["total_tokens"].as_u64()
}

#[tokio::main]
async fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("fleet: {e}");
            std::process::exit(2);
        }
    };
    if args.only.as_deref() == Some("limits") {
        let limits = limits(&args).await;
        println!(
            "{}",
            json!({"environments": args.environments, "limits": limits})
        );
        return;
    }
    let (throttle_local, throttle_shared) = tokio::join!(
        throttle(&args, None),
        throttle(&args, Some("fleet-throttle"))
    );
    let (hang_local, hang_shared) =
        tokio::join!(hang(&args, None), hang(&args, Some("fleet-hang")));
    let reads = reads(&args).await;
    let limits = limits(&args).await;
    println!(
        "{}",
        json!({
            "environments": args.environments,
            "rate_per_environment": args.rate,
            "attempt_timeout_ms": args.attempt_timeout_ms,
            "throttle": {"retry_after_s": args.retry_after, "windows": args.windows,
                         "local": throttle_local, "shared": throttle_shared},
            "hang": {"seconds": args.hang, "local": hang_local, "shared": hang_shared},
            "table_reads": reads,
            "limits": limits,
        })
    );
}
