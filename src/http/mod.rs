//! The HTTP surface: one table of endpoints, client keys checked before anything costs quota,
//! and each request's one summary log line. The only place that knows HTTP statuses.

mod api;
mod app;
mod ask;
pub(crate) mod auth;
mod call;
mod embeddings;
pub(crate) mod event;
pub(crate) mod fuzz;
mod openai;
mod respond;
mod responses;
mod summary;

pub use app::{App, Surface};

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_http::http::{HeaderValue, StatusCode, header};
use lambda_http::{Body, Context, Request, RequestExt, Response};
use serde_json::json;

use crate::clock::Clock;
use crate::reply::Reply;
use crate::routing::Delivery;
use crate::telemetry;
use crate::upstream::StoredOp;

use auth::Refusal;
use call::Call;
use respond::{json_response, path};

/// Lambda never runs longer than 15 minutes: a deadline further away is not an epoch time
/// (as under `cargo lambda watch`), so the configured budget applies alone.
const MAX_LAMBDA_RUNTIME: Duration = Duration::from_secs(15 * 60);

/// Which handler a path belongs to: the one table of endpoints.
enum Endpoint<'a> {
    /// `GET /?query=`: the original chatbot's interface.
    Ask,
    /// Chat completions: `POST /v1/chat/completions` and `/openai/v1/chat/completions` (OpenAI
    /// clients, the route from `model`), `POST /openai/deployments/{route}/chat/completions`
    /// (Azure clients, the route from the path).
    Chat {
        route: Option<&'a str>,
    },
    /// Embeddings: `POST /v1/embeddings`, `/openai/v1/embeddings`,
    /// `/openai/deployments/{route}/embeddings`.
    Embeddings {
        route: Option<&'a str>,
    },
    /// The Responses API: `POST /v1/responses` and `/openai/v1/responses`.
    Responses,
    /// A stored response: `GET`/`DELETE /v1/responses/{id}`, `GET .../{id}/input_items` (and
    /// under `/openai/v1/`).
    Stored {
        id: &'a str,
        op: StoredOp,
    },
    Unknown,
}

impl Endpoint<'_> {
    /// Whether its errors are in OpenAI's shape.
    fn openai(&self) -> bool {
        !matches!(self, Endpoint::Ask | Endpoint::Unknown)
    }
}

fn endpoint(path: &str) -> Endpoint<'_> {
    if path == "/" {
        return Endpoint::Ask;
    }
    // `/v1/{operation}` or Azure's `/openai/v1/{operation}`: the route from the body's `model`;
    // `/openai/deployments/{route}/{operation}`: from the path.
    let (route, operation) = match path
        .strip_prefix("/openai/v1/")
        .or_else(|| path.strip_prefix("/v1/"))
    {
        Some(operation) => (None, operation),
        None => match path
            .strip_prefix("/openai/deployments/")
            .and_then(|rest| rest.split_once('/'))
        {
            Some((route, operation)) if !route.is_empty() => (Some(route), operation),
            _ => return Endpoint::Unknown,
        },
    };
    match (operation, route) {
        ("chat/completions", _) => Endpoint::Chat { route },
        ("embeddings", _) => Endpoint::Embeddings { route },
        // Azure serves the Responses API on v1 only: no deployment in the path.
        ("responses", None) => Endpoint::Responses,
        (stored, None) => match stored
            .strip_prefix("responses/")
            .map(|rest| rest.split_once('/'))
        {
            Some(None) => Endpoint::Stored {
                id: &stored["responses/".len()..],
                op: StoredOp::Get,
            },
            Some(Some((id, "input_items"))) => Endpoint::Stored {
                id,
                op: StoredOp::InputItems,
            },
            _ => Endpoint::Unknown,
        },
        _ => Endpoint::Unknown,
    }
}

impl<C: Clock> App<C> {
    /// Answers one HTTP request, streaming when the caller asked for a stream. Never fails:
    /// every problem becomes a JSON error response.
    pub async fn handle(self: &Arc<Self>, request: Request) -> Response<Reply> {
        self.answer(request, Delivery::Streamed).await
    }

    async fn answer(self: &Arc<Self>, request: Request, delivery: Delivery) -> Response<Reply> {
        let response = self.serve(request, delivery).await;
        // What the request recorded; a stream still running flushes its own when it ends.
        telemetry::flush(self.metrics);
        response
    }

    async fn serve(self: &Arc<Self>, request: Request, delivery: Delivery) -> Response<Reply> {
        // Every summary line's latency counts from here.
        let started = self.engine.clock().now();
        let path = path(&request).to_owned();
        let endpoint = endpoint(&path);
        let caller = match self.keys.check(request.headers()) {
            Ok(caller) => caller,
            Err(refusal) => return self.unauthorized(&endpoint, &path, refusal),
        };
        let call = Call::new(started, caller);
        let mut response = match endpoint {
            Endpoint::Chat { route } => {
                self.chat_completions(&request, route, delivery, call).await
            }
            Endpoint::Embeddings { route } => self.embeddings(&request, route, call).await,
            Endpoint::Responses => self.responses(&request, delivery, call).await,
            Endpoint::Stored { id, op } => self.stored(&request, id, op, call).await,
            Endpoint::Ask => self.ask(&request, call).await,
            Endpoint::Unknown => self.not_found(&request, call),
        };
        self.rate_headers(caller, &mut response);
        response
    }

    /// A request whose key is missing or wrong: a 401, in OpenAI's shape on its routes.
    fn unauthorized(
        &self,
        endpoint: &Endpoint<'_>,
        path: &str,
        refusal: Refusal,
    ) -> Response<Reply> {
        {
            tracing::info!(status = 401, path, reason = %refusal, "request refused");
            let mut response = if endpoint.openai() {
                openai::unauthorized(refusal)
            } else {
                json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({ "error": refusal.to_string() }),
                )
            };
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }

    /// [`App::handle`] with the whole body at once, as API Gateway, ALB and buffered Function
    /// URLs need it; a requested stream is sent complete, as `text/event-stream`.
    pub async fn handle_buffered(self: &Arc<Self>, request: Request) -> Response<Body> {
        let (parts, reply) = self.answer(request, Delivery::Buffered).await.into_parts();
        // Bytes to Vec reuses the buffer when it is the only owner, as a collected body is.
        let body = match String::from_utf8(Vec::from(reply.collect().await)) {
            Ok(text) => Body::Text(text),
            Err(error) => Body::Binary(error.into_bytes()),
        };
        Response::from_parts(parts, body)
    }

    /// Time this request may spend upstream: the configured budget, cut to the Lambda deadline
    /// minus a margin for sending the response. `now` is the wall-clock time.
    pub fn budget(&self, context: Option<&Context>, now: SystemTime) -> Duration {
        let configured = self.surface.request_timeout;
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
        configured.min(remaining.saturating_sub(self.surface.deadline_margin))
    }

    /// The request's deadline, on the engine's clock.
    fn deadline(&self, request: &Request) -> std::time::Instant {
        let clock = self.engine.clock();
        let budget = self.budget(request.lambda_context_ref(), clock.wall());
        clock.now() + budget
    }
}
