//! What one call to one deployment came to, as typed values: the completion, or why there was
//! none. The upstream client produces them, routing decides on them. Imports nothing from the
//! crate.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

/// A request body, as JSON fields: built for GET /?query=, passed through (with `model` set
/// where the upstream API needs it) for the OpenAI-compatible API.
pub type JsonBody = Map<String, Value>;

/// One call: the HTTP status when a response arrived, the quota the deployment says it has
/// left, and the answer or why there was none.
#[derive(Debug)]
pub struct Called<T> {
    pub status: Option<u16>,
    pub quota: Quota,
    pub result: Result<T, Failure>,
}

impl<T> Called<T> {
    /// A call that ended before any response arrived.
    pub fn failed(failure: Failure) -> Self {
        Self {
            status: None,
            quota: Quota::default(),
            result: Err(failure),
        }
    }
}

/// Why a call produced no answer.
#[derive(Debug)]
pub enum Failure {
    /// 429. `retry_after` is `None` when the deployment gave no hint at all.
    Throttled { retry_after: Option<Duration> },
    /// Worth trying elsewhere (and, later, here again): 408, 5xx, connection errors, timeouts.
    Transient(Transient),
    /// No Entra ID token could be had for the deployment (the token endpoint or STS down, or
    /// refusing: `message` says why, with Entra's AADSTS code).
    NoToken { message: String },
    /// 401, 403 or 404: this deployment will not answer until someone fixes the configuration.
    Misconfigured {
        status: u16,
        code: String,
        message: String,
    },
    /// The provider's safety system refused the prompt: never retried, never sent elsewhere.
    ContentFiltered(Box<ContentFilter>),
    /// 400 context_length_exceeded: only a deployment with a larger window can help.
    ContextLengthExceeded { message: String },
    /// Any other 4xx: never resent to the same deployment.
    Rejected { code: String, message: String },
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

/// A provider's reason for blocking a prompt or a completion, in any dialect: Azure's
/// `content_filter` (with its `innererror`), OpenAI's `content_policy_violation`, or a completion
/// that finished with `content_filter`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContentFilter {
    /// `prompt` or `completion`.
    pub target: &'static str,
    pub code: String,
    pub message: String,
    /// The request parameter the provider named (`prompt` for Azure), if any.
    pub param: Option<String>,
    /// Azure's `innererror` as sent (`ResponsibleAIPolicyViolation` and its verdicts), if any.
    pub innererror: Option<Value>,
    /// The categories that were filtered, e.g. `["hate"]`.
    pub filtered_categories: Vec<String>,
    /// The provider's per-category verdicts as sent.
    pub content_filter_result: Value,
}

/// The quota a deployment reports left after a call (`x-ratelimit-remaining-*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

/// A whole answer passed through exactly as the deployment sent it (embeddings, a response):
/// its bytes, its id and the tokens it used.
#[derive(Debug, Clone)]
pub struct Document {
    /// The body exactly as the deployment sent it.
    pub raw: Bytes,
    /// Its `id`, when it has one: a stored response's, which the fleet remembers the
    /// deployment of.
    pub id: Option<String>,
    /// `usage.total_tokens`, when the answer says.
    pub tokens: Option<u64>,
}

/// A successful chat completion, with the raw body kept for callers that pass it through.
#[derive(Debug)]
pub struct Completion {
    pub content: Option<String>,
    pub finish_reason: Option<String>,
    pub model: String,
    pub usage: Option<Value>,
    pub content_filter_results: Option<Value>,
    /// The body exactly as the deployment sent it.
    pub raw: Bytes,
}

impl Completion {
    /// `usage.total_tokens`, when the answer says.
    pub fn total_tokens(&self) -> Option<u64> {
        total_tokens(self.usage.as_ref())
    }

    /// A completion filtered on output (200 with `finish_reason: content_filter`).
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
            param: None,
            innererror: None,
            filtered_categories: filtered_categories(&result),
            content_filter_result: result,
        })
    }
}

/// `usage.total_tokens` of a usage object.
pub fn total_tokens(usage: Option<&Value>) -> Option<u64> {
    usage
        .and_then(|u| u.get("total_tokens"))
        .and_then(Value::as_u64)
}

/// The categories a content-filter verdict marks as filtered, e.g. `["hate"]`.
pub fn filtered_categories(result: &Value) -> Vec<String> {
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
