//! Drives the real handler in-process, as the Lambda runtime would, for `bench/run.sh`.
//!
//! `--mode app` (default): builds `fallback_chat::App` from the environment exactly as
//! `src/main.rs` does (`Config::from_env`, metrics installed, one `Arc<App>` shared by every
//! invocation) and feeds it real API Gateway HTTP API (v2) events for
//! `POST /v1/chat/completions`: the event text is deserialised, wrapped with a Lambda `Context`
//! (deadline 30 s away) by `lambda_http::Adapter`, answered by `App::handle_buffered`, and the
//! response serialised to the JSON the runtime would post back. Latency is measured from event
//! text to response text; there is no HTTP front.
//!
//! `--operation responses|embeddings` sends `POST /v1/responses` or `POST /v1/embeddings`
//! instead (direct: `/openai/v1/responses`, `/openai/deployments/{d}/embeddings`).
//!
//! `--mode direct`: the same requests sent straight to the Azure OpenAI (emulator) deployment
//! with a keep-alive `reqwest` client: the floor for the in-process figures.
//!
//! `--mode http --url URL [--header 'name: value']...`: the same requests, with the same client,
//! to any HTTP endpoint (a gateway's `/v1/chat/completions`): so that one generator drives every
//! row of the load table and the rows differ by the system alone.
//!
//! `--arrivals closed` (default): `--concurrency` tasks send back to back (at most `--rate` a
//! second between them), latency measured from each send. `--arrivals open`: the load table's
//! open loop: request i is due at `i / rate` seconds whatever became of the earlier ones, each
//! sent from a task of its own, and its latency counts from when it was due, so a system that
//! falls behind shows it in its latencies instead of slowing the generator down (no coordinated
//! omission, the flaw of closed-loop tools such as wrk). `--timeout` (30 s) bounds each request;
//! one that runs out is reported with status 0. A request line then also carries `lag_ms`, how
//! late the generator sent it, so that the figures show whether the generator kept up.
//!
//! Output, on stdout, JSON lines carrying a `"bench"` key (the function's own EMF metric lines
//! go to stdout too, as on Lambda, and are skipped by the harness; its logs go to stderr):
//!   {"bench":"request","t":0.012,"ms":1.234,"status":200,"attempts":1}   one per measured request
//!   (status 0: no HTTP answer: a refused or reset connection, or `--timeout` ran out)
//!   {"bench":"summary","requests":N,"seconds":S,"peak_rss_kib":K}        at the end
//!
//! Usage: cargo run --release -p inprocess -- [--mode app|direct|http] [--concurrency 1]
//!        [--requests 1000] [--seconds 10] [--warmup 20] [--rate 0] [--arrivals closed|open]
//!        [--timeout 30] [--url URL --header 'name: value' ...]  (http mode)
//!        [--model gpt-4o] [--client-key KEY] [--operation chat|responses|embeddings]
//!        [--endpoint URL --deployment NAME --api-key KEY --api-version 2024-10-21]  (direct mode)
//! App mode reads AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, AZURE_OPENAI_DEPLOYMENTS,
//! CLIENT_API_KEYS, ... from the environment, like the function itself.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fallback_chat::App;
use fallback_chat::config::Config;
use fallback_chat::net::{ExtraRoots, Http};
use fallback_chat::telemetry;
use lambda_http::request::LambdaRequest;
use lambda_http::{Adapter, Context, LambdaEvent, Request, Service, service_fn};
use serde_json::{Value, json};

/// The event template: a real HTTP API (v2) payload for `POST /v1/chat/completions`.
const EVENT: &str = include_str!("../../../events/http-api/openai-chat.json");

#[derive(Clone, Debug)]
struct Args {
    mode: Mode,
    concurrency: usize,
    requests: usize,
    seconds: f64,
    warmup: usize,
    /// Requests per second at most (0: back to back); with open arrivals, exactly.
    rate: f64,
    arrivals: Arrivals,
    /// Seconds each request may take before it counts as unanswered.
    timeout: f64,
    url: String,
    headers: Vec<(String, String)>,
    model: String,
    operation: Operation,
    client_key: String,
    endpoint: String,
    deployment: String,
    api_key: String,
    api_version: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    App,
    Direct,
    Http,
}

/// Which kind of call every request is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Operation {
    /// `POST /v1/chat/completions`; direct: the classic chat URL.
    Chat,
    /// `POST /v1/responses`; direct: `/openai/v1/responses`, the deployment as `model`.
    Responses,
    /// `POST /v1/embeddings`; direct: the classic embeddings URL.
    Embeddings,
}

impl Operation {
    /// The function's path, the body it is sent, and the URL and body of the direct call.
    fn request(self, args: &Args) -> (&'static str, String, String, String) {
        let endpoint = args.endpoint.trim_end_matches('/');
        let (d, v) = (&args.deployment, &args.api_version);
        match self {
            Operation::Chat => (
                "/v1/chat/completions",
                chat_body(&args.model),
                format!("{endpoint}/openai/deployments/{d}/chat/completions?api-version={v}"),
                chat_body(&args.model),
            ),
            Operation::Responses => {
                let body = |model: &str| {
                    json!({"model": model, "input": "How do I reset my password?", "store": false})
                        .to_string()
                };
                (
                    "/v1/responses",
                    body(&args.model),
                    format!("{endpoint}/openai/v1/responses"),
                    body(d),
                )
            }
            Operation::Embeddings => {
                let body = json!({"model": args.model, "input": ["How do I reset my password?", "Where is my order?"]})
                    .to_string();
                (
                    "/v1/embeddings",
                    body.clone(),
                    format!("{endpoint}/openai/deployments/{d}/embeddings?api-version={v}"),
                    body,
                )
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Arrivals {
    Closed,
    Open,
}

fn parse_args() -> Result<Args, String> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let mut a = Args {
        mode: Mode::App,
        concurrency: 1,
        requests: 1000,
        seconds: 10.0,
        warmup: 20,
        rate: 0.0,
        arrivals: Arrivals::Closed,
        timeout: 30.0,
        url: String::new(),
        headers: Vec::new(),
        model: "gpt-4o".into(),
        operation: Operation::Chat,
        client_key: env("CLIENT_API_KEYS", "")
            .split(',')
            .next()
            .unwrap_or("")
            .to_owned(),
        endpoint: env("AZURE_OPENAI_ENDPOINT", "http://127.0.0.1:8080"),
        deployment: "gpt-4o".into(),
        api_key: env("AZURE_OPENAI_API_KEY", "emulator-key"),
        api_version: env("AZURE_OPENAI_API_VERSION", "2024-10-21"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("{flag}: {v:?}"));
        match flag.as_str() {
            "--mode" => {
                a.mode = match value.as_str() {
                    "app" => Mode::App,
                    "direct" => Mode::Direct,
                    "http" => Mode::Http,
                    _ => return Err(format!("--mode: app, direct or http, not {value:?}")),
                }
            }
            "--arrivals" => {
                a.arrivals = match value.as_str() {
                    "closed" => Arrivals::Closed,
                    "open" => Arrivals::Open,
                    _ => return Err(format!("--arrivals: closed or open, not {value:?}")),
                }
            }
            "--timeout" => a.timeout = num(&value)?,
            "--url" => a.url = value,
            "--header" => {
                let (name, v) = value
                    .split_once(':')
                    .ok_or_else(|| format!("--header: 'name: value', not {value:?}"))?;
                a.headers
                    .push((name.trim().to_owned(), v.trim().to_owned()));
            }
            "--concurrency" => a.concurrency = num(&value)?.max(1.0) as usize,
            "--requests" => a.requests = num(&value)? as usize,
            "--seconds" => a.seconds = num(&value)?,
            "--warmup" => a.warmup = num(&value)? as usize,
            "--rate" => a.rate = num(&value)?,
            "--model" => a.model = value,
            "--operation" => {
                a.operation = match value.as_str() {
                    "chat" => Operation::Chat,
                    "responses" => Operation::Responses,
                    "embeddings" => Operation::Embeddings,
                    _ => {
                        return Err(format!(
                            "--operation: chat, responses or embeddings, not {value:?}"
                        ));
                    }
                }
            }
            "--client-key" => a.client_key = value,
            "--endpoint" => a.endpoint = value,
            "--deployment" => a.deployment = value,
            "--api-key" => a.api_key = value,
            "--api-version" => a.api_version = value,
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    Ok(a)
}

/// What one request came to.
struct Outcome {
    status: u16,
    attempts: Option<u64>,
}

/// What a send returns before the clock is read: the serialised Lambda response (read back
/// after the clock stopped), or the outcome of an HTTP call (to the deployment or a gateway).
enum Sent {
    Lambda(String),
    Http(Outcome),
}

impl Sent {
    fn outcome(self) -> Outcome {
        match self {
            Sent::Lambda(raw) => parse_outcome(&raw),
            Sent::Http(outcome) => outcome,
        }
    }
}

/// One way of sending a request: through the handler, or straight to the deployment.
#[derive(Clone)]
enum Target {
    App {
        app: Arc<App>,
        /// The event text, body and client key filled in once.
        event: Arc<String>,
    },
    /// Straight to the deployment (`--mode direct`) or to a gateway (`--mode http`).
    Http {
        client: reqwest::Client,
        url: Arc<String>,
        headers: Arc<Vec<(String, String)>>,
        body: Arc<String>,
    },
}

impl Target {
    async fn send(&self) -> Sent {
        match self {
            Target::App { app, event } => {
                // What the runtime does with each invocation: deserialise the event, attach the
                // context, call the handler, serialise the response it posts back.
                let payload: LambdaRequest = serde_json::from_str(event).expect("a Lambda event");
                let mut context = Context::default();
                context.request_id = format!("bench-{:x}", next_request_id());
                context.deadline = epoch_ms() + 30_000;
                context.invoked_function_arn =
                    "arn:aws:lambda:us-east-1:123456789012:function:fallback-chat".into();
                let app = Arc::clone(app);
                let handler = service_fn(move |request: Request| {
                    let app = Arc::clone(&app);
                    async move { Ok::<_, Infallible>(app.handle_buffered(request).await) }
                });
                let mut service = Adapter::from(handler);
                let response = service
                    .call(LambdaEvent::new(payload, context))
                    .await
                    .expect("the handler never fails");
                Sent::Lambda(serde_json::to_string(&response).expect("response serialises"))
            }
            Target::Http {
                client,
                url,
                headers,
                body,
            } => {
                let mut request = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .body(body.as_str().to_owned());
                for (name, value) in headers.iter() {
                    request = request.header(name, value);
                }
                let unanswered = Outcome {
                    status: 0,
                    attempts: None,
                };
                let Ok(response) = request.send().await else {
                    return Sent::Http(unanswered);
                };
                let status = response.status().as_u16();
                let attempts = response
                    .headers()
                    .get("x-fallback-attempts")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                // An answer counts once it has all arrived.
                match response.bytes().await {
                    Ok(_) => Sent::Http(Outcome { status, attempts }),
                    Err(_) => Sent::Http(unanswered),
                }
            }
        }
    }
}

fn parse_outcome(raw: &str) -> Outcome {
    let v: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
    let status = v["statusCode"].as_u64().unwrap_or(0) as u16;
    let attempts = v["headers"]["x-fallback-attempts"]
        .as_str()
        .and_then(|s| s.parse().ok());
    Outcome { status, attempts }
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// The request body every system is sent.
fn chat_body(model: &str) -> String {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "How do I reset my password?"}
        ]
    })
    .to_string()
}

/// Runs `count` requests (or until `seconds` pass) on `concurrency` tasks, at most `rate` per
/// second, and returns (offset from start, latency, outcome) for each.
async fn load(
    target: &Target,
    concurrency: usize,
    count: usize,
    seconds: f64,
    rate: f64,
) -> (Vec<Record>, Duration) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds.max(0.0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let target = target.clone();
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() >= deadline {
                    break;
                }
                if rate > 0.0 {
                    let slot = started + Duration::from_secs_f64(i as f64 / rate);
                    if slot >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(slot.into()).await;
                }
                let t0 = Instant::now();
                let sent = target.send().await;
                let latency = t0.elapsed();
                out.push(Record {
                    t: t0 - started,
                    latency,
                    lag: None,
                    outcome: sent.outcome(),
                });
            }
            out
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("load task"));
    }
    all.sort_by_key(|r| r.t);
    (all, started.elapsed())
}

/// One measured request: when it was due (offset from the start), its latency, how late the
/// generator sent it (open loop only) and what it came to.
struct Record {
    t: Duration,
    latency: Duration,
    lag: Option<Duration>,
    outcome: Outcome,
}

/// The open loop: request i is due at `started + i / rate` until `seconds` pass, each sent from
/// a task of its own as soon as it is due, however many are still in flight; its latency
/// counts from when it was due (so a generator that fell behind is charged to the system, and
/// shows in `lag`), and a request still unanswered after `timeout` counts as status 0.
async fn open_load(
    target: &Target,
    rate: f64,
    seconds: f64,
    timeout: Duration,
) -> (Vec<Record>, Duration) {
    let started = Instant::now();
    let count = (rate * seconds).floor() as usize;
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let sent_at = Instant::now();
            let outcome = match tokio::time::timeout(timeout, target.send()).await {
                Ok(sent) => sent.outcome(),
                Err(_) => Outcome {
                    status: 0,
                    attempts: None,
                },
            };
            Record {
                t: due - started,
                latency: due.elapsed(),
                lag: Some(sent_at - due),
                outcome,
            }
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.push(task.await.expect("load task"));
    }
    (all, started.elapsed())
}

/// A fresh Lambda request id per invocation, as the runtime gives each.
fn next_request_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("inprocess: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // One thread, as src/main.rs runs the function: the concurrent requests of `--concurrency`
    // are tasks on it, so the figures include their contention as they would on Lambda's vCPU.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args))
}

async fn run(args: Args) -> std::process::ExitCode {
    let (path, body, direct_url, direct_body) = args.operation.request(&args);
    let target = match args.mode {
        Mode::App => {
            // The function's logs as src/main.rs sets them up (JSON lines, with the harness's
            // AWS_LAMBDA_LOG_FORMAT=JSON), but to stderr: stdout carries the results.
            telemetry::init_logging(|name| std::env::var(name).ok(), std::io::stderr);
            let app = match Config::from_env().and_then(App::new) {
                Ok(app) => app,
                Err(error) => {
                    eprintln!("inprocess: fallback-chat cannot start: {error}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            let app = match telemetry::install(telemetry::DEFAULT_NAMESPACE) {
                Ok(collector) => app.with_metrics(collector),
                Err(_) => app,
            };
            let mut event: Value = serde_json::from_str(EVENT).expect("event template");
            event["rawPath"] = Value::from(path);
            event["requestContext"]["http"]["path"] = Value::from(path);
            event["routeKey"] = Value::from(format!("POST {path}"));
            event["body"] = Value::String(body.clone());
            let headers = &mut event["headers"];
            headers["content-length"] = Value::String(body.len().to_string());
            headers["authorization"] = Value::String(format!("Bearer {}", args.client_key));
            Target::App {
                app: Arc::new(app),
                event: Arc::new(event.to_string()),
            }
        }
        // The function's own client (HTTP/1.1, rustls, same pool settings): the floor differs
        // from the function by the handler alone, and every gateway is driven by it too.
        Mode::Direct | Mode::Http => {
            let client = Http::new(&ExtraRoots::default())
                .expect("an HTTP client")
                .client()
                .clone();
            let (url, headers, body) = if args.mode == Mode::Http {
                (args.url.clone(), args.headers.clone(), body)
            } else {
                let headers = vec![("api-key".to_owned(), args.api_key.clone())];
                (direct_url, headers, direct_body)
            };
            Target::Http {
                client,
                url: Arc::new(url),
                headers: Arc::new(headers),
                body: Arc::new(body),
            }
        }
    };

    if args.arrivals == Arrivals::Open && args.rate <= 0.0 {
        eprintln!("inprocess: --arrivals open needs a --rate");
        return std::process::ExitCode::from(2);
    }
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    if args.warmup > 0 {
        let _ = load(&target, args.concurrency, args.warmup, 60.0, 0.0).await;
    }
    let (results, elapsed) = match args.arrivals {
        Arrivals::Open => open_load(&target, args.rate, args.seconds, timeout).await,
        Arrivals::Closed => {
            load(
                &target,
                args.concurrency,
                args.requests,
                args.seconds,
                args.rate,
            )
            .await
        }
    };
    let mut out = String::new();
    for r in &results {
        let mut line = json!({
            "bench": "request",
            "t": r.t.as_secs_f64(),
            "ms": r.latency.as_secs_f64() * 1000.0,
            "status": r.outcome.status,
            "attempts": r.outcome.attempts,
        });
        if let Some(lag) = r.lag {
            line["lag_ms"] = json!(lag.as_secs_f64() * 1000.0);
        }
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.push_str(
        &json!({
            "bench": "summary",
            "requests": results.len(),
            "seconds": elapsed.as_secs_f64(),
            "peak_rss_kib": peak_rss_kib(),
        })
        .to_string(),
    );
    println!("{out}");
    std::process::ExitCode::SUCCESS
}
