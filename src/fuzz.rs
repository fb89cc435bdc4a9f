//! Fuzz targets: every place that reads input from outside, as the function reads it, fed
//! arbitrary bytes. `fuzz/` runs them under libFuzzer (`make fuzz`, cargo-fuzz); tests/fuzz.rs
//! replays the committed corpus and short mutation runs of it in `make test`. Each target panics
//! only where the code under it would, or where an answer breaks what must hold for any input
//! (a real status and no 500, JSON where it says JSON, no secret in it, a Retry-After within its
//! cap). Not part of the function's API.
//!
//! | target     | input                                         | what reads it                  |
//! |------------|-----------------------------------------------|--------------------------------|
//! | `event`    | a Lambda event (JSON: API Gateway, ALB, URL)  | lambda_http, then the handler  |
//! | `request`  | a raw HTTP request (query, headers, body)     | the handler, both deliveries   |
//! | `body`     | an OpenAI request body (chat, Responses)      | continuation of a cut stream   |
//! | `response` | an upstream answer (status, headers, body)    | every kind's answer, errors    |
//! | `stream`   | an upstream event stream, in pieces           | SSE, chat's and Responses' events |
//! | `config`   | environment variables, one `NAME=value` a line | the pool, keys, every setting |

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use base64::prelude::{BASE64_STANDARD, Engine as _};
use serde_json::{Map, Value, json};

use crate::config::Config;
use crate::http::App;
use crate::http::fuzz::UPSTREAM_KEY;
use crate::{http, upstream};

/// The client key the fuzzing App accepts: the one in events/, which the seed corpus carries.
pub const CLIENT_KEY: &str = "fc-example-client-key-0000";

/// Names [`config`] never reads: they name files, and the file system is not outside input.
const FILES: &[&str] = &[
    "FALLBACK_POOL_FILE",
    "FALLBACK_CLIENTS_FILE",
    "EXTRA_CA_CERTS",
    "LAMBDA_TASK_ROOT",
];

thread_local! {
    // One runtime per fuzzing thread, current-thread as Lambda's own.
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|cell| {
        let mut cell = cell.borrow_mut();
        let runtime = cell.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
        });
        runtime.block_on(future)
    })
}

/// The App every request target uses: two deployments on a loopback port nothing listens on
/// (refused at once, so a valid request costs a connection attempt and ends in a 503), a client
/// key, an upstream key that must never show.
fn app() -> &'static Arc<App> {
    static APP: OnceLock<Arc<App>> = OnceLock::new();
    APP.get_or_init(|| {
        let vars = [
            ("AZURE_OPENAI_ENDPOINT", "http://127.0.0.1:1"),
            ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o,gpt-35-turbo"),
            ("AZURE_OPENAI_API_KEY", UPSTREAM_KEY),
            ("CLIENT_API_KEYS", CLIENT_KEY),
            ("REQUEST_TIMEOUT_MS", "2000"),
            ("ATTEMPT_TIMEOUT_MS", "500"),
        ];
        let config = Config::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .expect("the fuzzing configuration");
        Arc::new(App::new(config).expect("the fuzzing App"))
    })
}

/// A Lambda event, answered buffered through the runtime's adapter.
pub fn event(data: &[u8]) {
    let app = app();
    block_on(http::fuzz::event(app, data, false));
}

/// A raw HTTP request (`METHOD /path?query`, header lines, a blank line, the body), sent as
/// API Gateway's HTTP API sends it (payload 2.0, its raw query string parsed by lambda_http),
/// answered buffered and streamed.
pub fn request(data: &[u8]) {
    let Some(event) = http_api_event(data) else {
        return;
    };
    let app = app();
    block_on(async {
        http::fuzz::event(app, &event, false).await;
        http::fuzz::event(app, &event, true).await;
    });
}

/// An OpenAI chat request body, continued as a cut stream would be.
pub fn body(data: &[u8]) {
    if let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(data) {
        upstream::fuzz::continuation(&body, "the text so far");
    }
}

/// An upstream's whole answer: a status line, `name: value` headers, a blank line, the body.
pub fn response(data: &[u8]) {
    upstream::fuzz::response(data);
}

/// An upstream's event stream: the first byte sets the size of the pieces it arrives in.
pub fn stream(data: &[u8]) {
    block_on(upstream::fuzz::stream(data));
}

/// The function's configuration, `NAME=value` per line: read, and the App built from it.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let lookup = |name: &str| {
        if FILES.contains(&name) {
            return None;
        }
        vars.iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| (*v).to_owned())
    };
    if let Ok(config) = Config::from_lookup(lookup) {
        let _ = App::new(config);
    }
}

/// The HTTP API (payload 2.0) event API Gateway would send for a raw request; `None` when the
/// request line is not one.
fn http_api_event(data: &[u8]) -> Option<Vec<u8>> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, target) = lines.next()?.trim().split_once(' ')?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Map::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            // API Gateway joins repeated headers with commas and lowercases names.
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            match headers.get_mut(&name) {
                Some(Value::String(v)) => {
                    v.push(',');
                    v.push_str(value);
                }
                _ => {
                    headers.insert(name, Value::String(value.to_owned()));
                }
            }
        }
    }
    let (body, base64) = match std::str::from_utf8(body) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => (BASE64_STANDARD.encode(body), true),
    };
    let event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012", "apiId": "fuzz", "domainName": "fuzz.example",
            "domainPrefix": "fuzz",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "203.0.113.10", "userAgent": "fuzz"},
            "requestId": "fuzz", "routeKey": "$default", "stage": "$default",
            "time": "03/Dec/2026:07:00:00 +0000", "timeEpoch": 1796281200000u64
        },
        "body": body,
        "isBase64Encoded": base64,
    });
    serde_json::to_vec(&event).ok()
}
