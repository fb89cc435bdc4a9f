//! The HTTP surface: which paths and methods exist, request -> question, outcome -> status +
//! JSON. With `openai.rs` (the OpenAI-compatible routes), the only modules that know HTTP statuses.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::Frame;
use lambda_http::http::{HeaderValue, StatusCode, header};
use lambda_http::{Body, Context, Request, RequestExt, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::App;
use crate::azure;
use crate::error::RequestError;
use crate::failover::{Answer, Attempt};
use crate::health::Clock;

/// Lambda never runs longer than 15 minutes: a deadline further away is not an epoch time
/// (as under `cargo lambda watch`), so the configured budget applies alone.
const MAX_LAMBDA_RUNTIME: Duration = Duration::from_secs(15 * 60);

#[derive(Serialize)]
struct Answered<'a> {
    /// The original Flask app's field name, so its clients keep working.
    chat_completion: Option<&'a str>,
    deployment: &'a str,
    model: &'a str,
    usage: &'a Option<Value>,
}

/// A response body: whole, or frames relayed as a stream produces them.
#[derive(Debug)]
pub enum Reply {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl http_body::Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Reply::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Reply::Stream(frames) => frames.poll_recv(cx).map(|f| f.map(|b| Ok(Frame::data(b)))),
        }
    }
}

impl Reply {
    /// The whole body, waiting for a stream to end.
    pub async fn collect(self) -> Bytes {
        match self {
            Reply::Full(bytes) => bytes.unwrap_or_default(),
            Reply::Stream(mut frames) => {
                let mut all = Vec::new();
                while let Some(frame) = frames.recv().await {
                    all.extend_from_slice(&frame);
                }
                Bytes::from(all)
            }
        }
    }
}

/// What one request came to, for its one summary log line.
pub(crate) struct Trace {
    pub route: String,
    pub attempts: Vec<Attempt>,
    pub tokens: Option<u64>,
    pub stream: bool,
    pub error: Option<String>,
}

impl Trace {
    pub fn new(route: &str) -> Self {
        Self {
            route: route.to_owned(),
            attempts: Vec::new(),
            tokens: None,
            stream: false,
            error: None,
        }
    }

    /// One line per request: route, status, who answered, each attempt's outcome, latency, tokens.
    pub fn log(&self, status: u16, deployment: Option<&str>, started: Instant) {
        let attempts = self
            .attempts
            .iter()
            .map(|a| format!("{}:{}", a.deployment, a.outcome))
            .collect::<Vec<_>>()
            .join(" ");
        let calls = self.attempts.iter().filter(|a| a.called()).count();
        tracing::info!(
            route = self.route,
            status,
            deployment,
            calls,
            attempts,
            latency_ms = started.elapsed().as_millis() as u64,
            total_tokens = self.tokens,
            stream = self.stream,
            error = self.error.as_deref(),
            "request"
        );
    }
}

/// `usage.total_tokens`, when the answer says.
pub(crate) fn total_tokens(usage: Option<&Value>) -> Option<u64> {
    usage
        .and_then(|u| u.get("total_tokens"))
        .and_then(Value::as_u64)
}

/// Which handler a path belongs to.
enum Endpoint<'a> {
    Ask,
    OpenAi,
    Azure { route: &'a str },
    Unknown,
}

fn endpoint(path: &str) -> Endpoint<'_> {
    match path {
        "/" => Endpoint::Ask,
        "/v1/chat/completions" => Endpoint::OpenAi,
        _ => match path
            .strip_prefix("/openai/deployments/")
            .and_then(|rest| rest.strip_suffix("/chat/completions"))
        {
            Some(route) if !route.is_empty() && !route.contains('/') => Endpoint::Azure { route },
            _ => Endpoint::Unknown,
        },
    }
}

impl<C: Clock> App<C> {
    /// Answers one HTTP request, streaming when the caller asked for a stream. Never fails:
    /// every problem becomes a JSON error response.
    pub async fn handle(self: &Arc<Self>, request: Request) -> Response<Reply> {
        let response = self.serve(request).await;
        // What the request recorded; a stream still running flushes its own when it ends.
        crate::telemetry::flush(self.metrics);
        response
    }

    async fn serve(self: &Arc<Self>, request: Request) -> Response<Reply> {
        let path = match request.raw_http_path() {
            "" => request.uri().path(),
            raw => raw,
        }
        .to_owned();
        let endpoint = endpoint(&path);
        if let Err(refusal) = self.auth.check(request.headers()) {
            tracing::info!(status = 401, path, reason = %refusal, "request refused");
            let mut response = match endpoint {
                Endpoint::OpenAi | Endpoint::Azure { .. } => crate::openai::unauthorized(refusal),
                _ => json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({ "error": refusal.to_string() }),
                ),
            };
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        match endpoint {
            Endpoint::OpenAi => self.chat_completions(&request, None).await,
            Endpoint::Azure { route } => self.chat_completions(&request, Some(route)).await,
            Endpoint::Ask | Endpoint::Unknown => self.ask(&request).await,
        }
    }

    /// [`App::handle`] with the whole body at once, as API Gateway, ALB and buffered Function
    /// URLs need it; a requested stream is sent complete, as `text/event-stream`.
    pub async fn handle_buffered(self: &Arc<Self>, request: Request) -> Response<Body> {
        let (parts, reply) = self.handle(request).await.into_parts();
        let bytes = reply.collect().await;
        let body = match String::from_utf8(bytes.to_vec()) {
            Ok(text) => Body::Text(text),
            Err(_) => Body::Binary(bytes.to_vec()),
        };
        Response::from_parts(parts, body)
    }

    /// `GET /?query=`: the original chatbot's interface.
    async fn ask(&self, request: &Request) -> Response<Reply> {
        let started = Instant::now();
        let result = self.route(request).await;
        let route = &self.config.pool.default_route().name;
        match result {
            Ok(answer) => {
                let tokens = total_tokens(answer.completion.usage.as_ref());
                let mut trace = Trace::new(route);
                trace.attempts = answer.attempts.clone();
                trace.tokens = tokens;
                trace.log(200, Some(&answer.deployment), started);
                answered(&answer)
            }
            Err(error) => {
                let response = error_response(&error);
                let mut trace = Trace::new(route);
                if let RequestError::Unavailable(exhausted) = &error {
                    trace.attempts = exhausted.attempts.clone();
                }
                trace.error = Some(error.to_string());
                trace.log(response.status().as_u16(), None, started);
                response
            }
        }
    }

    async fn route(&self, request: &Request) -> Result<Answer, RequestError> {
        let path = match request.raw_http_path() {
            "" => request.uri().path(),
            raw => raw,
        };
        if path != "/" {
            return Err(RequestError::NotFound {
                path: path.chars().take(200).collect(),
            });
        }
        if request.method() != lambda_http::http::Method::GET {
            return Err(RequestError::MethodNotAllowed {
                method: request.method().to_string(),
                path: path.to_owned(),
            });
        }
        let query = request
            .query_string_parameters_ref()
            .and_then(|q| q.first("query"))
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .ok_or(RequestError::MissingQuery)?;
        let chars = query.chars().count();
        if chars > self.config.max_query_chars {
            return Err(RequestError::QueryTooLong {
                chars,
                max: self.config.max_query_chars,
            });
        }
        let budget = self.budget(request.lambda_context_ref(), SystemTime::now());
        let body = azure::chat_body(&self.config.system_prompt, query);
        let answer = self
            .complete(self.config.pool.default_route(), &body, budget)
            .await?;
        // This interface has no way to show a filtered completion as such: say so plainly.
        match answer.completion.output_filter() {
            Some(filter) => Err(RequestError::ContentFiltered {
                deployment: answer.deployment,
                filter,
            }),
            None => Ok(answer),
        }
    }

    /// Time this request may spend upstream: the configured budget, cut to the Lambda deadline
    /// minus a margin for sending the response.
    pub fn budget(&self, context: Option<&Context>, now: SystemTime) -> Duration {
        let configured = self.config.request_timeout;
        let Some(deadline_ms) = context.map(|c| c.deadline) else {
            return configured;
        };
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let remaining = Duration::from_millis(deadline_ms.saturating_sub(now_ms));
        if remaining.is_zero() || remaining > MAX_LAMBDA_RUNTIME {
            return configured;
        }
        configured.min(remaining.saturating_sub(self.config.deadline_margin))
    }
}

fn answered(answer: &Answer) -> Response<Reply> {
    let c = &answer.completion;
    let mut response = json_response(
        StatusCode::OK,
        &Answered {
            chat_completion: c.content.as_deref(),
            deployment: &answer.deployment,
            model: &c.model,
            usage: &c.usage,
        },
    );
    fallback_headers(&mut response, &answer.deployment, answer.calls());
    response
}

/// Who answered, and after how many deployments were called.
pub(crate) fn fallback_headers<B>(response: &mut Response<B>, deployment: &str, calls: usize) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(deployment) {
        headers.insert("x-fallback-deployment", v);
    }
    headers.insert("x-fallback-attempts", HeaderValue::from(calls));
}

fn error_response(error: &RequestError) -> Response<Reply> {
    let message = error.to_string();
    match error {
        RequestError::MissingQuery | RequestError::QueryTooLong { .. } => {
            json_response(StatusCode::BAD_REQUEST, &json!({ "error": message }))
        }
        RequestError::NotFound { .. } => {
            json_response(StatusCode::NOT_FOUND, &json!({ "error": message }))
        }
        RequestError::MethodNotAllowed { .. } => {
            let mut r = json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({ "error": message }));
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            r
        }
        RequestError::ContentFiltered { deployment, filter } => json_response(
            StatusCode::BAD_REQUEST,
            &json!({
                "error": message,
                "code": filter.code,
                "target": filter.target,
                "deployment": deployment,
                "message": filter.message,
                "filtered_categories": filter.filtered_categories,
                "content_filter_result": filter.content_filter_result,
            }),
        ),
        RequestError::Unavailable(exhausted) => {
            // Retry-After is whole seconds; round up so a client never comes back too early.
            let seconds = exhausted.retry_after.as_millis().div_ceil(1000).max(1) as u64;
            let mut r = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "error": message,
                    "retry_after_seconds": seconds,
                    "attempts": exhausted.attempts,
                    "deployments": exhausted.deployments,
                }),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            r
        }
    }
}

pub(crate) fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Reply> {
    // Serialising these plain structures cannot fail; an empty object is the safe fallback.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Reply::Full(Some(Bytes::from(bytes))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
