//! Azure OpenAI's wire format, read: a complete answer (status, headers, body) becomes the
//! answer its kind of call reads from a 2xx, or a typed [`Failure`]: error envelopes, refusals,
//! Retry-After and the quota headers are the same for every kind. Pure functions; never
//! retries, never sleeps.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use crate::outcome::{ContentFilter, Failure, Quota, Transient, filtered_categories};

use super::kind::Kind;

/// A Retry-After longer than this is treated as this: guards against absurd values only.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// The refusal an error object (`{"error": {...}}`, as a stream's error event carries it) is, if
/// it is one.
pub fn refusal(event: &Value) -> Option<ContentFilter> {
    serde_json::from_value::<ErrorEnvelope>(event.clone())
        .ok()?
        .error
        .refusal()
}

/// Turns a complete HTTP answer into kind `K`'s answer or the reason there is none.
pub fn classify<K: Kind>(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
    now: SystemTime,
) -> Result<K::Answer, Failure> {
    if status.is_success() {
        return K::answer(body);
    }
    let error = serde_json::from_slice::<ErrorEnvelope>(&body)
        .map(|e| e.error)
        .unwrap_or_default();
    if (400..500).contains(&status.as_u16())
        && let Some(filter) = error.refusal()
    {
        return Err(Failure::ContentFiltered(Box::new(filter)));
    }
    let code = error.code_string();
    let message = error.message.clone().unwrap_or_default();
    Err(match status.as_u16() {
        429 => Failure::Throttled {
            retry_after: retry_after(headers, now).or_else(|| retry_after_in_message(&message)),
        },
        408 | 500..=599 => Failure::Transient(Transient::Status(status.as_u16())),
        s @ (401 | 403 | 404) => Failure::Misconfigured {
            status: s,
            code,
            message,
        },
        400 if code == "context_length_exceeded" => Failure::ContextLengthExceeded { message },
        // The status travels with the call (`Called::status`).
        _ => Failure::Rejected { code, message },
    })
}

/// The quota a deployment reports left (`x-ratelimit-remaining-requests`/`-tokens`).
pub fn quota(headers: &HeaderMap) -> Quota {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Quota {
        remaining_requests: number("x-ratelimit-remaining-requests"),
        remaining_tokens: number("x-ratelimit-remaining-tokens"),
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
    param: Option<String>,
    innererror: Option<Value>,
}

/// A provider's safety system refused the prompt: Azure's `content_filter` (and any error whose
/// `innererror` says `ResponsibleAIPolicyViolation`) or OpenAI's `content_policy_violation`.
const REFUSALS: [&str; 2] = ["content_filter", "content_policy_violation"];

impl WireError {
    /// The refusal this error is, if it is one.
    fn refusal(&self) -> Option<ContentFilter> {
        let code = self.code_string();
        let inner = self.innererror.as_ref();
        let policy = inner.and_then(|i| i.get("code")).and_then(Value::as_str)
            == Some("ResponsibleAIPolicyViolation");
        if !(REFUSALS.contains(&code.as_str()) || policy) {
            return None;
        }
        let result = inner
            .and_then(|i| i.get("content_filter_result"))
            .cloned()
            .unwrap_or(Value::Null);
        Some(ContentFilter {
            target: "prompt",
            filtered_categories: filtered_categories(&result),
            content_filter_result: result,
            code: if code.is_empty() {
                "content_filter".into()
            } else {
                code
            },
            message: self.message.clone().unwrap_or_default(),
            param: self.param.clone(),
            innererror: self.innererror.clone(),
        })
    }

    fn code_string(&self) -> String {
        match &self.code {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Deployment;
    use crate::upstream::kind::KindId;
    use reqwest::header::{HeaderName, HeaderValue};

    /// A kind whose answer is any JSON: error answers are what these tests are about.
    struct Chat;

    impl Kind for Chat {
        const ID: KindId = KindId::Chat;
        type Answer = Value;
        fn url(d: &Deployment) -> String {
            d.url("chat/completions")
        }
        fn answer(body: Bytes) -> Result<Value, Failure> {
            serde_json::from_slice(&body).map_err(|_| Failure::Transient(Transient::BadResponse))
        }
        fn tokens(_: &Value) -> Option<u64> {
            None
        }
    }

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
        let outcome = classify::<Chat>(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            Bytes::from_static(body),
            now(),
        )
        .unwrap_err();
        assert!(
            matches!(outcome, Failure::Throttled { retry_after: Some(d) } if d == Duration::from_secs(7))
        );
        assert_eq!(
            retry_after_in_message("Rate limit is exceeded. Try again in 50 seconds."),
            Some(Duration::from_secs(50))
        );
        assert_eq!(retry_after_in_message("Please retry after a while."), None);
        let outcome = classify::<Chat>(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            Bytes::new(),
            now(),
        )
        .unwrap_err();
        assert!(matches!(outcome, Failure::Throttled { retry_after: None }));
    }

    #[test]
    fn error_envelopes_of_both_styles_are_classified() {
        let c = |status: u16, body: &str| {
            classify::<Chat>(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                Bytes::copy_from_slice(body.as_bytes()),
                now(),
            )
            .unwrap_err()
        };
        assert!(matches!(
            c(404, r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#),
            Failure::Misconfigured { status: 404, code, .. } if code == "DeploymentNotFound"
        ));
        assert!(matches!(
            c(401, r#"{"error":{"code":"401","message":"Access denied"}}"#),
            Failure::Misconfigured { status: 401, .. }
        ));
        assert!(matches!(
            c(
                408,
                r#"{"error":{"code":"Timeout","message":"The operation was timeout."}}"#
            ),
            Failure::Transient(Transient::Status(408))
        ));
        assert!(matches!(
            c(
                500,
                r#"{"error":{"message":"x","type":"server_error","param":null,"code":null}}"#
            ),
            Failure::Transient(Transient::Status(500))
        ));
        assert!(matches!(
            c(503, "<html>busy</html>"),
            Failure::Transient(Transient::Status(503))
        ));
        assert!(matches!(
            c(
                400,
                r#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#
            ),
            Failure::ContextLengthExceeded { .. }
        ));
        assert!(matches!(
            c(
                400,
                r#"{"error":{"message":"bad","type":"invalid_request_error","param":"temperature","code":null}}"#
            ),
            Failure::Rejected { .. }
        ));
        let filtered = c(
            400,
            r#"{"error":{"message":"filtered","param":"prompt","code":"content_filter","status":400,
            "innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{
            "hate":{"filtered":true,"severity":"high"},"violence":{"filtered":false,"severity":"safe"}}}}}"#,
        );
        match filtered {
            Failure::ContentFiltered(f) => {
                assert_eq!(f.target, "prompt");
                assert_eq!(f.filtered_categories, ["hate"]);
                assert_eq!(f.content_filter_result["hate"]["severity"], "high");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refusal_is_recognised_in_every_dialect() {
        let c = |body: &str| {
            classify::<Chat>(
                StatusCode::BAD_REQUEST,
                &HeaderMap::new(),
                Bytes::copy_from_slice(body.as_bytes()),
                now(),
            )
            .unwrap_err()
        };
        let openai = c(
            r#"{"error":{"message":"Your request was rejected as a result of our safety system.","type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#,
        );
        match openai {
            Failure::ContentFiltered(f) => {
                assert_eq!(f.code, "content_policy_violation");
                assert!(f.message.contains("safety system"));
                assert!(f.innererror.is_none() && f.param.is_none());
            }
            other => panic!("{other:?}"),
        }
        // Azure's verdict under another code still says what it is.
        let nested = c(
            r#"{"error":{"message":"filtered","code":"invalid_prompt","innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"jailbreak":{"filtered":true,"detected":true}}}}}"#,
        );
        assert!(
            matches!(&nested, Failure::ContentFiltered(f) if f.filtered_categories == ["jailbreak"]),
            "{nested:?}"
        );
        assert!(matches!(
            refusal(&serde_json::json!({"error": {"code": "content_filter", "message": "m"}})),
            Some(f) if f.code == "content_filter"
        ));
        assert!(refusal(&serde_json::json!({"error": {"code": "server_error"}})).is_none());
    }
}
