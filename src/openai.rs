//! The OpenAI-compatible surface: `POST /v1/chat/completions` (OpenAI clients) and
//! `POST /openai/deployments/{route}/chat/completions` (Azure clients). The body passes through
//! untouched; `model` (or the path) picks the route; errors are OpenAI-style error objects.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use lambda_http::http::{HeaderValue, Method, StatusCode, header};
use lambda_http::{Request, RequestExt, Response};
use serde_json::{Map, Value, json};

use crate::App;
use crate::api::{Reply, Trace, fallback_headers, json_response, total_tokens};
use crate::auth::Refusal;
use crate::azure::ChatBody;
use crate::error::RequestError;
use crate::failover::Exhausted;
use crate::health::Clock;
use crate::pool::Route;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code", ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<String>,
    param: Option<&'static str>,
    /// Further fields inside `error` (Azure's filter verdicts, the attempts of a 503).
    extra: Map<String, Value>,
    retry_after: Option<u64>,
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Box<Self> {
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

    fn invalid(message: impl Into<String>, param: Option<&'static str>, code: &str) -> Box<Self> {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = param;
        e.code = Some(code.to_owned());
        e
    }

    fn into_response(self) -> Response<Reply> {
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

impl From<RequestError> for Box<ApiError> {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::ContentFiltered { deployment, filter } => {
                let mut e = ApiError::invalid(filter.message, Some("prompt"), &filter.code);
                e.extra.insert(
                    "innererror".into(),
                    json!({
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": filter.content_filter_result,
                    }),
                );
                e.extra
                    .insert("deployment".into(), Value::String(deployment));
                e
            }
            RequestError::Unavailable(exhausted) => unavailable(exhausted),
            other => ApiError::invalid(other.to_string(), None, "invalid_request"),
        }
    }
}

/// A refused client key, in OpenAI's words.
pub(crate) fn unauthorized(refusal: Refusal) -> Response<Reply> {
    let mut e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        refusal.to_string(),
    );
    e.code = Some("invalid_api_key".into());
    e.into_response()
}

/// Nothing answered. When every deployment that was called refused the request itself (a 400
/// such as an unsupported parameter, or a context too long for all of them), that refusal is
/// the answer; otherwise a 503 with when to come back.
fn unavailable(exhausted: Exhausted) -> Box<ApiError> {
    let called: Vec<_> = exhausted.attempts.iter().filter(|a| a.called()).collect();
    let refused =
        |a: &&crate::failover::Attempt| matches!(a.outcome, "rejected" | "context_length_exceeded");
    if let Some(last) = called.last()
        && called.iter().all(refused)
    {
        let mut e = ApiError::invalid(
            last.message.clone().unwrap_or_default(),
            None,
            last.code.as_deref().unwrap_or("invalid_request"),
        );
        e.status = last
            .status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        e.extra.insert("attempts".into(), json!(exhausted.attempts));
        return e;
    }
    let seconds = exhausted.retry_after.as_millis().div_ceil(1000).max(1) as u64;
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        format!("All deployments are currently unavailable. Retry after {seconds} s."),
    );
    e.code = Some("all_deployments_unavailable".into());
    e.retry_after = Some(seconds);
    e.extra.insert("attempts".into(), json!(exhausted.attempts));
    e.extra
        .insert("deployments".into(), json!(exhausted.deployments));
    e
}

impl<C: Clock> App<C> {
    /// Chat completions on the OpenAI wire format, buffered or streamed.
    pub(crate) async fn chat_completions(
        self: &Arc<Self>,
        request: &Request,
        path_route: Option<&str>,
    ) -> Response<Reply> {
        let started = Instant::now();
        let mut trace = Trace::new(path_route.unwrap_or_default());
        let response = match self.openai(request, path_route, &mut trace).await {
            Ok(response) => response,
            Err(error) => {
                trace.error = Some(error.message.clone());
                (*error).into_response()
            }
        };
        let deployment = response
            .headers()
            .get("x-fallback-deployment")
            .and_then(|v| v.to_str().ok());
        trace.log(response.status().as_u16(), deployment, started);
        response
    }

    async fn openai(
        self: &Arc<Self>,
        request: &Request,
        path_route: Option<&str>,
        trace: &mut Trace,
    ) -> Result<Response<Reply>, Box<ApiError>> {
        if request.method() != Method::POST {
            let mut e = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("Method {} is not allowed here; use POST.", request.method()),
            );
            e.allow = Some("POST");
            return Err(e);
        }
        let raw: &[u8] = request.body().as_ref();
        if raw.len() > self.config.max_body_bytes {
            let mut e = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "The request body is {} bytes; the limit is {} (MAX_BODY_BYTES).",
                    raw.len(),
                    self.config.max_body_bytes
                ),
            );
            e.code = Some("request_too_large".into());
            return Err(e);
        }
        let body: ChatBody = match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(body)) => body,
            Ok(_) => {
                return Err(ApiError::invalid(
                    "The request body must be a JSON object.",
                    None,
                    "invalid_json",
                ));
            }
            Err(e) => {
                return Err(ApiError::invalid(
                    format!("We could not parse the JSON body of your request: {e}."),
                    None,
                    "invalid_json",
                ));
            }
        };
        check_messages(&body)?;
        let route = self.route_for(path_route, &body)?;
        trace.route.clone_from(&route.name);
        let budget = self.budget(request.lambda_context_ref(), SystemTime::now());
        // What the failover tried goes into the request's log line, whatever the outcome.
        let keep = |trace: &mut Trace, error: RequestError| {
            if let RequestError::Unavailable(exhausted) = &error {
                trace.attempts = exhausted.attempts.clone();
            }
            Box::<ApiError>::from(error)
        };

        if body.get("stream") == Some(&Value::Bool(true)) {
            trace.stream = true;
            let streaming = self
                .stream(route, &body, budget)
                .await
                .map_err(|e| keep(trace, e))?;
            trace.attempts = streaming.attempts.clone();
            let calls = streaming.attempts.iter().filter(|a| a.called()).count();
            let mut response = Response::new(Reply::Stream(streaming.frames));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            fallback_headers(&mut response, &streaming.deployment, calls);
            return Ok(response);
        }

        let answer = self
            .complete(route, &body, budget)
            .await
            .map_err(|e| keep(trace, e))?;
        trace.attempts = answer.attempts.clone();
        trace.tokens = total_tokens(answer.completion.usage.as_ref());
        let mut response = Response::new(Reply::Full(Some(answer.completion.raw.clone())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        fallback_headers(&mut response, &answer.deployment, answer.calls());
        Ok(response)
    }

    /// The route a request names: the Azure path's deployment, else the body's `model`. A pool
    /// without named routes serves every model from its one route.
    fn route_for(
        &self,
        path_route: Option<&str>,
        body: &ChatBody,
    ) -> Result<&Route, Box<ApiError>> {
        let pool = &self.config.pool;
        let name = path_route.or_else(|| body.get("model").and_then(Value::as_str));
        match name {
            Some(name) => pool
                .route(name)
                .or(pool.open_routes.then(|| pool.default_route())),
            None => Some(pool.default_route()),
        }
        .ok_or_else(|| {
            let known: Vec<&str> = pool.routes.iter().map(|r| r.name.as_str()).collect();
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{}` does not exist here; use one of: {}.",
                    name.unwrap_or_default(),
                    known.join(", ")
                ),
            );
            e.param = Some("model");
            e.code = Some("model_not_found".into());
            e
        })
    }
}

fn check_messages(body: &ChatBody) -> Result<(), Box<ApiError>> {
    let messages = match body.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "Missing required parameter: 'messages'.",
                Some("messages"),
                "missing_required_parameter",
            ));
        }
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(_) => {
            return Err(ApiError::invalid(
                "'messages' must be a non-empty array of messages.",
                Some("messages"),
                "invalid_type",
            ));
        }
    };
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(ApiError::invalid(
                format!("Missing required parameter: 'messages[{i}].role'."),
                Some("messages"),
                "missing_required_parameter",
            ));
        }
    }
    Ok(())
}
