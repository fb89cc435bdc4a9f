//! Test harness: the real handler, wrapped exactly as `lambda_http::run` wraps it, fed real
//! Lambda events, talking to a real Azure OpenAI emulator on 127.0.0.1.
#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod moto;
pub mod proxy;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[allow(unused_imports)]
pub use azure_openai_emulator::{Behavior, Emulator, RetryAfter};
use fallback_chat::App;
use fallback_chat::clock::{Clock, ManualClock};
use fallback_chat::config::Config;
use lambda_http::request::LambdaRequest;
use lambda_http::{Adapter, Context, LambdaEvent, Request, Service, service_fn};
use lambda_runtime::layers::trace::request_span;
use serde_json::{Value, json};
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

/// Distinctive, so a leak anywhere in logs or responses is found by a plain search.
pub const API_KEY: &str = "sk-test-7f3a9c1e-never-log-me";

pub struct Harness {
    pub emulator: Emulator,
    /// Further Azure resources, for pools that span several.
    pub others: Vec<Emulator>,
    pub clock: Arc<ManualClock>,
    pub app: Arc<App<Arc<ManualClock>>>,
    pub logs: Logs,
}

/// One HTTP answer, whatever the event source's response shape.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// The serialised Lambda response, as the runtime would post it.
    pub raw: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

impl Harness {
    /// gpt-4o then gpt-35-turbo, both healthy, with the default settings.
    pub async fn new() -> Self {
        Self::with(&[], &[]).await
    }

    /// `deployments` replaces the default two; `env` adds or overrides variables.
    pub async fn with(deployments: &[(&str, Behavior)], env: &[(&str, &str)]) -> Self {
        let deployments: Vec<(&str, Behavior)> = if deployments.is_empty() {
            vec![
                ("gpt-4o", Behavior::Healthy),
                ("gpt-35-turbo", Behavior::Healthy),
            ]
        } else {
            deployments.to_vec()
        };
        let mut builder = Emulator::builder().api_key(API_KEY);
        for (name, behavior) in &deployments {
            builder = builder.deployment(*name, behavior.clone());
        }
        let emulator = builder.start().await.expect("emulator starts");
        let names: Vec<&str> = deployments.iter().map(|(n, _)| *n).collect();
        let mut vars: Vec<(String, String)> = vec![
            ("AZURE_OPENAI_ENDPOINT".into(), emulator.url()),
            ("AZURE_OPENAI_API_KEY".into(), API_KEY.into()),
            ("AZURE_OPENAI_DEPLOYMENTS".into(), names.join(",")),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::build(emulator, Vec::new(), &vars, None)
    }

    /// The real handler over whatever emulators a test started, configured by `vars` (later
    /// entries win), with the weighted choice seeded when `seed` is given.
    pub fn build(
        emulator: Emulator,
        others: Vec<Emulator>,
        vars: &[(String, String)],
        seed: Option<u64>,
    ) -> Self {
        let mut vars: HashMap<String, String> = vars.iter().cloned().collect();
        // Tests that are not about access control stand behind an (imagined) authorizer.
        if !vars.contains_key("CLIENT_API_KEYS") {
            vars.entry("AUTH_PROVIDED_BY".into())
                .or_insert_with(|| "authorizer".into());
        }
        let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("valid config");
        let clock = Arc::new(ManualClock::default());
        let app = match seed {
            Some(seed) => App::with_seed(config, Arc::clone(&clock), seed),
            None => App::with_clock(config, Arc::clone(&clock)),
        };
        Self {
            emulator,
            others,
            clock,
            app: Arc::new(app.expect("app builds")),
            logs: Logs::default(),
        }
    }

    /// Feeds one Lambda event (JSON text) through the handler as the runtime would, with a
    /// deadline 30 s away on the function's clock.
    pub async fn invoke(&self, event: &str) -> Reply {
        self.invoke_with_deadline(event, wall_ms(&self.clock) + 30_000)
            .await
    }

    pub async fn invoke_with_deadline(&self, event: &str, deadline_ms: u64) -> Reply {
        invoke_app(&self.app, &self.logs, event, deadline_ms).await
    }

    /// `GET /?query=...` through an HTTP API (v2) event.
    pub async fn ask(&self, query: &str) -> Reply {
        self.invoke(&http_api_get(Some(query))).await
    }

    /// `POST path` with a JSON body through an HTTP API (v2) event, buffered.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.invoke(&http_api_post(path, &body.to_string())).await
    }

    /// `POST path` straight into the handler, as response streaming would run it: the
    /// response arrives when its headers are ready; its body may still be streaming.
    pub async fn open(
        &self,
        path: &str,
        body: &Value,
    ) -> lambda_http::Response<fallback_chat::reply::Reply> {
        let request = lambda_http::request::from_str(&http_api_post(path, &body.to_string()))
            .expect("a Lambda HTTP event");
        // The relay runs on after this returns; it keeps the subscriber it started with.
        let _logs = tracing::subscriber::set_default(self.logs.subscriber());
        self.app.handle(request).await
    }

    /// Changes how the emulator answers this deployment from now on.
    pub fn set(&self, deployment: &str, behavior: Behavior) {
        self.emulator.set(deployment, behavior);
    }

    pub fn calls(&self, deployment: &str) -> usize {
        self.emulator.calls(deployment)
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

/// Feeds one Lambda event (JSON text) through `app` as the runtime would, wrapped exactly as
/// `lambda_http::run` wraps it, its log lines in `logs`.
pub async fn invoke_app(
    app: &Arc<App<Arc<ManualClock>>>,
    logs: &Logs,
    event: &str,
    deadline_ms: u64,
) -> Reply {
    let mut payload: LambdaRequest = serde_json::from_str(event).expect("a Lambda HTTP event");
    // As main.rs runs every event.
    fallback_chat::repair_event(&mut payload);
    let mut context = Context::default();
    context.request_id = format!("req-{:x}", rand_id());
    context.deadline = deadline_ms;
    context.invoked_function_arn =
        "arn:aws:lambda:us-east-1:123456789012:function:fallback-chat".into();

    let app = Arc::clone(app);
    let handler = service_fn(move |request: Request| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(app.handle_buffered(request).await) }
    });
    // The logs go to `logs` while this invocation is polled, whatever else the thread runs (a
    // test may drive several environments at once).
    let logs = tracing::Dispatch::new(logs.subscriber());
    // The span the runtime opens around each invocation, carrying the request id.
    let span = tracing::dispatcher::with_default(&logs, || request_span(&context));
    let mut service = Adapter::from(handler);
    let response = service
        .call(LambdaEvent::new(payload, context))
        .instrument(span)
        .with_subscriber(logs)
        .await
        .expect("the handler never fails");
    let raw = serde_json::to_string(&response).expect("response serialises");
    parse_reply(&raw)
}

/// The epoch time (ms) on `clock`.
pub fn wall_ms(clock: &impl Clock) -> u64 {
    clock.wall().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A minimal but real HTTP API payload v2 event for `GET /` with an optional query.
pub fn http_api_get(query: Option<&str>) -> String {
    let mut event = json!({
        "version": "2.0",
        "routeKey": "GET /",
        "rawPath": "/",
        "rawQueryString": "",
        "headers": {"accept": "application/json", "host": "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {
            "accountId": "123456789012", "apiId": "a1b2c3d4e5",
            "domainName": "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com", "domainPrefix": "a1b2c3d4e5",
            "http": {"method": "GET", "path": "/", "protocol": "HTTP/1.1", "sourceIp": "203.0.113.10", "userAgent": "test"},
            "requestId": "test", "routeKey": "GET /", "stage": "$default",
            "time": "24/Nov/2026:14:31:07 +0000", "timeEpoch": 1795530667123u64
        },
        "isBase64Encoded": false
    });
    if let Some(q) = query {
        event["rawQueryString"] = Value::String(format!("query={}", urlencode(q)));
        event["queryStringParameters"] = json!({ "query": q });
    }
    event.to_string()
}

/// An HTTP API payload v2 event for `POST path` (an optional `?query` included) with `body`.
pub fn http_api_post(path: &str, body: &str) -> String {
    http_api_request("POST", path, Some(body))
}

/// An HTTP API (v2) event for `method path` (with its query), with `body` when given.
pub fn http_api_request(method: &str, path: &str, body: Option<&str>) -> String {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {"content-type": "application/json", "host": "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {
            "accountId": "123456789012", "apiId": "a1b2c3d4e5",
            "domainName": "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com", "domainPrefix": "a1b2c3d4e5",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "203.0.113.10", "userAgent": "test"},
            "requestId": "test", "routeKey": "$default", "stage": "$default",
            "time": "24/Nov/2026:14:31:07 +0000", "timeEpoch": 1795530667123u64
        },
        "body": body,
        "isBase64Encoded": false
    })
    .to_string()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Reads statusCode, headers (single- and multi-value) and the JSON body out of any of the
/// response shapes (API Gateway v1/v2, ALB).
pub fn parse_reply(raw: &str) -> Reply {
    let v: Value = serde_json::from_str(raw).expect("response is JSON");
    let status = v["statusCode"].as_u64().expect("statusCode") as u16;
    let mut headers = HashMap::new();
    if let Some(h) = v["headers"].as_object() {
        for (k, val) in h {
            headers.insert(
                k.to_ascii_lowercase(),
                val.as_str().unwrap_or("").to_owned(),
            );
        }
    }
    if let Some(h) = v["multiValueHeaders"].as_object() {
        for (k, vals) in h {
            if let Some(first) = vals.get(0).and_then(Value::as_str) {
                headers.insert(k.to_ascii_lowercase(), first.to_owned());
            }
        }
    }
    let text = v["body"].as_str().unwrap_or("");
    assert_ne!(
        v["isBase64Encoded"],
        Value::Bool(true),
        "bodies are sent as text"
    );
    let body = if text.is_empty() {
        Value::Null
    } else if headers.get("content-type").map(String::as_str) == Some("text/event-stream") {
        Value::String(text.to_owned())
    } else {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
    };
    Reply {
        status,
        headers,
        body,
        raw: raw.to_owned(),
    }
}

pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(epoch_ms());
    h.finish()
}

/// Everything the handler logs, as JSON lines (the format Lambda uses with
/// AWS_LAMBDA_LOG_FORMAT=JSON), at every level, including the HTTP client's own.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::TRACE)
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(self.clone())
            .finish()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub fn lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The path of a file under events/.
pub fn event(path: &str) -> String {
    let full = format!("{}/events/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// The events of a finished stream: JSON payloads, plus "[DONE]" as a string.
pub fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|block| block.strip_prefix("data: "))
        .map(|data| {
            if data == "[DONE]" {
                Value::String(data.into())
            } else {
                serde_json::from_str(data)
                    .unwrap_or_else(|e| panic!("relayed malformed JSON ({e}): {data}"))
            }
        })
        .collect()
}

/// The text a stream's chunks carried.
pub fn content(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The whole body of a response, streamed or not.
pub async fn body(response: lambda_http::Response<fallback_chat::reply::Reply>) -> String {
    String::from_utf8(response.into_body().collect().await.to_vec()).unwrap()
}

/// The AWS SDK's configuration as the function loads it, every service pointed at `endpoint`
/// (moto, or the emulator standing in for STS) with test credentials, over the function's own
/// HTTP client.
pub async fn aws_sdk(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .http_client(
            fallback_chat::net::Http::new(&fallback_chat::net::ExtraRoots::default())
                .expect("an HTTP client")
                .for_aws(),
        )
        .load()
        .await
}
