//! The upstream client: builds the Azure OpenAI request, reads the answer, and turns status,
//! headers and error bodies into a typed [`Outcome`]. It never retries and never sleeps.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::pool::{ApiStyle, Pool};

/// A Retry-After longer than this is treated as this: guards against absurd values only.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// What one call to one deployment came to.
#[derive(Debug)]
pub enum Outcome {
    Answered(Completion),
    /// 429. `retry_after` is `None` when Azure gave no hint at all.
    Throttled {
        retry_after: Option<Duration>,
    },
    /// Worth trying elsewhere (and, later, here again): 408, 5xx, connection errors, timeouts.
    Transient(Transient),
    /// 401, 403 or 404: this deployment will not answer until someone fixes the configuration.
    Misconfigured {
        status: u16,
        code: String,
        message: String,
    },
    ContentFiltered(ContentFilter),
    /// 400 context_length_exceeded: only a deployment with a larger window can help.
    ContextLengthExceeded {
        message: String,
    },
    /// Any other 4xx: never resent to the same deployment.
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    Status(u16),
    Timeout,
    Connect,
    /// The connection broke before a whole response arrived.
    Reset,
    /// A 2xx whose body is not a chat completion (a proxy's page, a truncated body).
    BadResponse,
    /// A stream that sent no content within the time-to-first-token limit.
    FirstTokenTimeout,
}

/// Azure's reason for blocking a prompt or a completion.
#[derive(Debug, Clone, Serialize)]
pub struct ContentFilter {
    /// `prompt` or `completion`.
    pub target: &'static str,
    pub code: String,
    pub message: String,
    /// The categories that were filtered, e.g. `["hate"]`.
    pub filtered_categories: Vec<String>,
    /// Azure's per-category verdicts as sent.
    pub content_filter_result: Value,
}

/// A successful chat completion, with the raw body kept for callers that pass it through.
#[derive(Debug)]
pub struct Completion {
    pub content: Option<String>,
    pub finish_reason: Option<String>,
    pub model: String,
    pub usage: Option<Value>,
    pub content_filter_results: Option<Value>,
    /// Quota left on the deployment after this call, when Azure says.
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    /// The body exactly as the deployment sent it, for callers that pass it through.
    pub raw: Bytes,
}

/// A chat-completions request body, as JSON fields: built for GET /?query=, passed through
/// for the OpenAI-compatible API.
pub type ChatBody = Map<String, Value>;

/// The request body for one question: system prompt first, then the user's question.
pub fn chat_body(system_prompt: &str, query: &str) -> ChatBody {
    let mut body = Map::new();
    body.insert(
        "messages".into(),
        json!([
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": query},
        ]),
    );
    body
}

/// Where and how to call one deployment, prepared once at cold start.
struct Target {
    url: String,
    /// The deployment's name, sent as `model` to v1 servers (classic URLs carry it in the path).
    model: Option<String>,
    auth: Option<(HeaderName, HeaderValue)>,
}

/// The Azure OpenAI (and OpenAI-compatible) client for every deployment in the pool. Built once
/// at cold start: one connection pool, rustls, keys turned into sensitive header values.
pub struct Upstream {
    client: Client,
    targets: Vec<Target>,
}

impl Upstream {
    pub fn new(pool: &Pool) -> Result<Self, reqwest::Error> {
        let client = Client::builder()
            .user_agent(concat!("fallback-chat/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(50))
            .tcp_nodelay(true)
            .build()?;
        let targets = pool
            .deployments
            .iter()
            .map(|d| {
                let (header, value, model) = match d.api {
                    ApiStyle::Classic { .. } => (
                        HeaderName::from_static("api-key"),
                        d.key.as_ref().map(|k| k.expose().to_owned()),
                        None,
                    ),
                    ApiStyle::V1 => (
                        AUTHORIZATION,
                        d.key.as_ref().map(|k| format!("Bearer {}", k.expose())),
                        Some(d.deployment.clone()),
                    ),
                };
                let auth = value
                    .and_then(|v| HeaderValue::from_str(&v).ok())
                    .map(|mut v| {
                        // Keeps the key out of any debug output of the request.
                        v.set_sensitive(true);
                        (header, v)
                    });
                Target {
                    url: d.url(),
                    model,
                    auth,
                }
            })
            .collect();
        Ok(Self { client, targets })
    }

    /// The POST for deployment `index`: URL, key, body (with `model` set for v1 servers).
    fn request(&self, index: usize, body: &ChatBody) -> Option<RequestBuilder> {
        let target = self.targets.get(index)?;
        let bytes = match &target.model {
            Some(model) => {
                let mut body = body.clone();
                body.insert("model".into(), Value::String(model.clone()));
                serde_json::to_vec(&body)
            }
            None => serde_json::to_vec(body),
        }
        // Serialising a JSON map cannot fail.
        .unwrap_or_default();
        let mut request = self
            .client
            .post(&target.url)
            .header(CONTENT_TYPE, "application/json")
            .body(bytes);
        if let Some((name, value)) = &target.auth {
            request = request.header(name, value.clone());
        }
        Some(request)
    }

    /// One call to deployment `index`, bounded by `timeout` from start to the last body byte.
    pub async fn chat(
        &self,
        index: usize,
        body: &ChatBody,
        timeout: Duration,
        now: SystemTime,
    ) -> (Option<u16>, Outcome) {
        let Some(request) = self.request(index, body) else {
            return (None, Outcome::Transient(Transient::Connect));
        };
        match request.timeout(timeout).send().await {
            Ok(response) => read(response, now).await,
            Err(e) => (None, Outcome::Transient(transport_failure(&e))),
        }
    }

    /// Starts a streaming call: the response once its headers are in (within `timeout`) and
    /// its status is 2xx, or what the call came to otherwise. The body is left to the caller,
    /// which bounds it event by event.
    pub async fn open_stream(
        &self,
        index: usize,
        body: &ChatBody,
        timeout: Duration,
        now: SystemTime,
    ) -> Result<Response, (Option<u16>, Outcome)> {
        let Some(request) = self.request(index, body) else {
            return Err((None, Outcome::Transient(Transient::Connect)));
        };
        let response = match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => return Err((None, Outcome::Transient(Transient::Timeout))),
            Ok(Err(e)) => return Err((None, Outcome::Transient(transport_failure(&e)))),
            Ok(Ok(response)) => response,
        };
        if response.status().is_success() {
            return Ok(response);
        }
        // An error answer is short: the rest of the attempt's time bounds reading it.
        match tokio::time::timeout(timeout, read(response, now)).await {
            Ok(answer) => Err(answer),
            Err(_) => Err((None, Outcome::Transient(Transient::Timeout))),
        }
    }
}

/// Reads a whole answer and classifies it.
async fn read(response: Response, now: SystemTime) -> (Option<u16>, Outcome) {
    let status = response.status();
    let headers = response.headers().clone();
    match response.bytes().await {
        Ok(bytes) => (
            Some(status.as_u16()),
            classify(status, &headers, bytes, now),
        ),
        Err(e) => (
            Some(status.as_u16()),
            Outcome::Transient(transport_failure(&e)),
        ),
    }
}

fn transport_failure(e: &reqwest::Error) -> Transient {
    if e.is_timeout() {
        Transient::Timeout
    } else if e.is_connect() {
        Transient::Connect
    } else {
        Transient::Reset
    }
}

/// Turns a complete HTTP answer into an [`Outcome`].
pub fn classify(status: StatusCode, headers: &HeaderMap, body: Bytes, now: SystemTime) -> Outcome {
    if status.is_success() {
        return match serde_json::from_slice::<WireCompletion>(&body) {
            Ok(c) => c.into_completion(headers, body),
            Err(_) => Outcome::Transient(Transient::BadResponse),
        };
    }
    let error = serde_json::from_slice::<ErrorEnvelope>(&body)
        .map(|e| e.error)
        .unwrap_or_default();
    let code = error.code_string();
    let message = error.message.clone().unwrap_or_default();
    match status.as_u16() {
        429 => Outcome::Throttled {
            retry_after: retry_after(headers, now).or_else(|| retry_after_in_message(&message)),
        },
        408 | 500..=599 => Outcome::Transient(Transient::Status(status.as_u16())),
        s @ (401 | 403 | 404) => Outcome::Misconfigured {
            status: s,
            code,
            message,
        },
        400 if code == "content_filter" => {
            let result = error
                .innererror
                .and_then(|i| i.content_filter_result)
                .unwrap_or(Value::Null);
            Outcome::ContentFiltered(ContentFilter {
                target: "prompt",
                filtered_categories: filtered_categories(&result),
                content_filter_result: result,
                code,
                message,
            })
        }
        400 if code == "context_length_exceeded" => Outcome::ContextLengthExceeded { message },
        s => Outcome::Rejected {
            status: s,
            code,
            message,
        },
    }
}

/// Azure's throttling hint, in the order its headers deserve trust: `retry-after-ms`,
/// `retry-after` (seconds or HTTP-date), then `x-ratelimit-reset-requests`/`-tokens`.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let seconds = |v: &str| {
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(MAX_RETRY_AFTER.as_secs_f64())))
    };

    if let Some(ms) = header("retry-after-ms").and_then(|v| seconds(v).map(|d| d / 1000)) {
        return Some(ms);
    }
    if let Some(v) = header("retry-after") {
        if let Some(d) = seconds(v) {
            return Some(d);
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return Some(
                at.duration_since(now)
                    .unwrap_or_default()
                    .min(MAX_RETRY_AFTER),
            );
        }
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .into_iter()
        .filter_map(|name| header(name).and_then(seconds))
        .max()
}

/// Last resort before the default cooldown: "Please retry after 7 seconds." /
/// "Try again in 50 seconds." appear in 429 bodies that carry no timing header.
fn retry_after_in_message(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    ["retry after ", "try again in "].iter().find_map(|marker| {
        let rest = &lower[lower.find(marker)? + marker.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let secs: u64 = digits.parse().ok()?;
        rest[digits.len()..]
            .trim_start()
            .starts_with("second")
            .then(|| Duration::from_secs(secs).min(MAX_RETRY_AFTER))
    })
}

fn filtered_categories(result: &Value) -> Vec<String> {
    result
        .as_object()
        .map(|categories| {
            categories
                .iter()
                .filter(|(_, verdict)| verdict.get("filtered") == Some(&Value::Bool(true)))
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: WireError,
}

/// Both envelopes Azure sends: gateway style (`code` a string such as "429") and OpenAI style
/// (`type`, `param`, `code`).
#[derive(Deserialize, Default, Clone)]
struct WireError {
    #[serde(default)]
    code: Value,
    message: Option<String>,
    innererror: Option<InnerError>,
}

impl WireError {
    fn code_string(&self) -> String {
        match &self.code {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }
}

#[derive(Deserialize, Default, Clone)]
struct InnerError {
    content_filter_result: Option<Value>,
}

#[derive(Deserialize)]
struct WireCompletion {
    #[serde(default)]
    model: String,
    choices: Vec<WireChoice>,
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: Option<WireMessage>,
    finish_reason: Option<String>,
    content_filter_results: Option<Value>,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<String>,
}

impl WireCompletion {
    fn into_completion(self, headers: &HeaderMap, raw: Bytes) -> Outcome {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let Some(choice) = self.choices.into_iter().next() else {
            return Outcome::Transient(Transient::BadResponse);
        };
        Outcome::Answered(Completion {
            content: choice.message.and_then(|m| m.content),
            finish_reason: choice.finish_reason,
            model: self.model,
            usage: self.usage,
            content_filter_results: choice.content_filter_results,
            remaining_requests: number("x-ratelimit-remaining-requests"),
            remaining_tokens: number("x-ratelimit-remaining-tokens"),
            raw,
        })
    }
}

impl Completion {
    /// A completion Azure filtered on output (200 with `finish_reason: content_filter`).
    pub fn output_filter(&self) -> Option<ContentFilter> {
        if self.finish_reason.as_deref() != Some("content_filter") {
            return None;
        }
        let result = self.content_filter_results.clone().unwrap_or(Value::Null);
        Some(ContentFilter {
            target: "completion",
            code: "content_filter".into(),
            message: "The completion was filtered by Azure OpenAI's content management policy."
                .into(),
            filtered_categories: filtered_categories(&result),
            content_filter_result: result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn now() -> SystemTime {
        httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap()
    }

    #[test]
    fn retry_after_headers_are_read_in_order_of_trust() {
        let h = |pairs: &[(&str, &str)]| retry_after(&headers(pairs), now());
        assert_eq!(
            h(&[("retry-after-ms", "1500"), ("retry-after", "2")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(h(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            h(&[("retry-after", "Wed, 21 Oct 2026 07:28:09 GMT")]),
            Some(Duration::from_secs(9))
        );
        // A date in the past means "now", not an error.
        assert_eq!(
            h(&[("retry-after", "Wed, 21 Oct 2026 07:27:00 GMT")]),
            Some(Duration::ZERO)
        );
        assert_eq!(
            h(&[
                ("x-ratelimit-reset-requests", "3"),
                ("x-ratelimit-reset-tokens", "11")
            ]),
            Some(Duration::from_secs(11))
        );
        assert_eq!(h(&[("retry-after", "soon")]), None);
        assert_eq!(h(&[("x-ratelimit-remaining-requests", "0")]), None);
        assert_eq!(
            h(&[("retry-after", "99999999")]),
            Some(MAX_RETRY_AFTER),
            "absurd values are capped"
        );
    }

    #[test]
    fn a_429_without_headers_falls_back_to_its_message() {
        let body = br#"{"error":{"code":"429","message":"Requests ... Please retry after 7 seconds. Please go here"}}"#;
        let outcome = classify(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            Bytes::from_static(body),
            now(),
        );
        assert!(
            matches!(outcome, Outcome::Throttled { retry_after: Some(d) } if d == Duration::from_secs(7))
        );
        assert_eq!(
            retry_after_in_message("Rate limit is exceeded. Try again in 50 seconds."),
            Some(Duration::from_secs(50))
        );
        assert_eq!(retry_after_in_message("Please retry after a while."), None);
        let outcome = classify(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            Bytes::new(),
            now(),
        );
        assert!(matches!(outcome, Outcome::Throttled { retry_after: None }));
    }

    #[test]
    fn error_envelopes_of_both_styles_are_classified() {
        let c = |status: u16, body: &str| {
            classify(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                Bytes::copy_from_slice(body.as_bytes()),
                now(),
            )
        };
        assert!(matches!(
            c(404, r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#),
            Outcome::Misconfigured { status: 404, code, .. } if code == "DeploymentNotFound"
        ));
        assert!(matches!(
            c(401, r#"{"error":{"code":"401","message":"Access denied"}}"#),
            Outcome::Misconfigured { status: 401, .. }
        ));
        assert!(matches!(
            c(
                408,
                r#"{"error":{"code":"Timeout","message":"The operation was timeout."}}"#
            ),
            Outcome::Transient(Transient::Status(408))
        ));
        assert!(matches!(
            c(
                500,
                r#"{"error":{"message":"x","type":"server_error","param":null,"code":null}}"#
            ),
            Outcome::Transient(Transient::Status(500))
        ));
        assert!(matches!(
            c(503, "<html>busy</html>"),
            Outcome::Transient(Transient::Status(503))
        ));
        assert!(matches!(
            c(
                400,
                r#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#
            ),
            Outcome::ContextLengthExceeded { .. }
        ));
        assert!(matches!(
            c(
                400,
                r#"{"error":{"message":"bad","type":"invalid_request_error","param":"temperature","code":null}}"#
            ),
            Outcome::Rejected { status: 400, .. }
        ));
        let filtered = c(
            400,
            r#"{"error":{"message":"filtered","param":"prompt","code":"content_filter","status":400,
            "innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{
            "hate":{"filtered":true,"severity":"high"},"violence":{"filtered":false,"severity":"safe"}}}}}"#,
        );
        match filtered {
            Outcome::ContentFiltered(f) => {
                assert_eq!(f.target, "prompt");
                assert_eq!(f.filtered_categories, ["hate"]);
                assert_eq!(f.content_filter_result["hate"]["severity"], "high");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_success_without_choices_is_not_an_answer() {
        let outcome = classify(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::from_static(br#"{"choices":[]}"#),
            now(),
        );
        assert!(matches!(
            outcome,
            Outcome::Transient(Transient::BadResponse)
        ));
        let outcome = classify(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::from_static(b"<html>"),
            now(),
        );
        assert!(matches!(
            outcome,
            Outcome::Transient(Transient::BadResponse)
        ));
    }

    #[test]
    fn the_system_prompt_comes_first() {
        let body = Value::Object(chat_body("sys", "q"));
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["role"], "user");
        assert_eq!(body["messages"][1]["content"], "q");
    }
}
