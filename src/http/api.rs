//! The OpenAI wire shapes the surface answers in: the error object every OpenAI route returns
//! (`{"error": {"message", "type", "param", "code", ...}}`), and the operations a route may
//! serve. A leaf of http/: the handlers and the admission of a call both build on it.

use lambda_http::Response;
use lambda_http::http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::pool::{Route, Serves};
use crate::reply::Reply;

use super::respond::json_response;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code", ...}}`.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) kind: &'static str,
    pub(super) code: Option<String>,
    pub(super) param: Option<String>,
    /// Further fields inside `error` (Azure's filter verdicts, the attempts of a 503).
    pub(super) extra: Map<String, Value>,
    pub(super) retry_after: Option<u64>,
    pub(super) allow: Option<&'static str>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Box<Self> {
        Box::new(Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            extra: Map::new(),
            retry_after: None,
            allow: None,
        })
    }

    pub(super) fn invalid(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: &str,
    ) -> Box<Self> {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = param.map(str::to_owned);
        e.code = Some(code.to_owned());
        e
    }

    pub(super) fn into_response(self) -> Response<Reply> {
        let this = self;
        let mut error = Map::new();
        error.insert("message".into(), Value::String(this.message));
        error.insert("type".into(), Value::String(this.kind.into()));
        error.insert("param".into(), this.param.map_or(Value::Null, Value::from));
        error.insert("code".into(), this.code.map_or(Value::Null, Value::String));
        error.extend(this.extra);
        let mut response = json_response(this.status, &json!({ "error": error }));
        if let Some(seconds) = this.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(allow) = this.allow {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// What a request asks of its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operation {
    Chat,
    Embeddings,
    Responses,
}

impl Operation {
    /// As the summary log line names it.
    pub(super) fn label(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Operation::Chat => "chat completions",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
        }
    }

    /// A route whose deployments cannot do this: a 400 that says which they serve.
    pub(super) fn check_route(self, route: &Route) -> Result<(), Box<ApiError>> {
        let fits = match self {
            Operation::Chat | Operation::Responses => route.serves == Serves::Generation,
            Operation::Embeddings => matches!(route.serves, Serves::Embeddings { .. }),
        };
        if fits {
            return Ok(());
        }
        let fix = match self {
            Operation::Embeddings => {
                "; name a route of embedding deployments (entries with \"embeddings\": {\"model\", \"dimensions\"} in FALLBACK_POOL)"
            }
            Operation::Chat | Operation::Responses => "",
        };
        let e = ApiError::invalid(
            format!(
                "The model `{}` serves {}, not {}{fix}.",
                route.name,
                route.serves.describe(),
                self.name()
            ),
            Some("model"),
            "operation_not_supported",
        );
        Err(e)
    }
}
