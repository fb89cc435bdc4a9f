//! The HTTP surface: which paths and methods exist, request -> question, outcome -> status + JSON.
//! The only module that knows about HTTP statuses.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lambda_http::http::{HeaderValue, StatusCode, header};
use lambda_http::{Body, Context, Request, RequestExt, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::App;
use crate::azure;
use crate::error::RequestError;
use crate::failover::Answer;
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

impl<C: Clock> App<C> {
    /// Answers one HTTP request. Never fails: every problem becomes a JSON error response.
    pub async fn handle(&self, request: Request) -> Response<Body> {
        let started = Instant::now();
        let result = self.route(&request).await;
        let latency_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(answer) => {
                let tokens = answer
                    .completion
                    .usage
                    .as_ref()
                    .and_then(|u| u.get("total_tokens"))
                    .and_then(Value::as_u64);
                tracing::info!(
                    status = 200,
                    deployment = answer.deployment,
                    calls = answer.calls(),
                    latency_ms,
                    total_tokens = tokens,
                    "request answered"
                );
                answered(&answer)
            }
            Err(error) => {
                let response = error_response(&error);
                tracing::info!(
                    status = response.status().as_u16(),
                    latency_ms,
                    error = %error,
                    "request refused"
                );
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

fn answered(answer: &Answer) -> Response<Body> {
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
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&answer.deployment) {
        headers.insert("x-fallback-deployment", v);
    }
    headers.insert("x-fallback-attempts", HeaderValue::from(answer.calls()));
    response
}

fn error_response(error: &RequestError) -> Response<Body> {
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

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    // Serialising these plain structures cannot fail; an empty object is the safe fallback.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
