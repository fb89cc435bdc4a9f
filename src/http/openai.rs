//! The OpenAI-compatible surface: `POST /v1/chat/completions` (OpenAI clients) and
//! `POST /openai/deployments/{route}/chat/completions` (Azure clients). The body passes through
//! untouched; `model` (or the path) picks the route; errors are OpenAI-style error objects.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use lambda_http::http::{HeaderValue, Method, StatusCode, header};
use lambda_http::{Request, Response};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use crate::attempt::{Answer, Exhausted, called};
use crate::clock::Clock;
use crate::outcome::{Completion, Document, JsonBody};
use crate::pool::Route;
use crate::reply::Reply;
use crate::routing::{Delivery, Relayed, RouteError, StateError, StreamEnding, Streamed};
use crate::sse;
use crate::upstream::is_response_id;

use super::api::{ApiError, Operation};
use super::app::App;
use super::auth::Refusal;
use super::call::{Call, estimate};
use super::respond::{fallback_headers, retry_after_seconds};
use super::summary::Summary;

impl From<&RouteError> for Box<ApiError> {
    fn from(error: &RouteError) -> Self {
        match error {
            // The provider's refusal, in its own words: code, param and Azure's `innererror`.
            RouteError::ContentFiltered {
                deployment, filter, ..
            } => {
                let mut e = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    filter.message.clone(),
                );
                e.code = Some(filter.code.clone());
                e.param = filter.param.clone();
                if let Some(inner) = &filter.innererror {
                    e.extra.insert("innererror".into(), inner.clone());
                }
                e.extra
                    .insert("deployment".into(), Value::String(deployment.clone()));
                e
            }
            RouteError::Unavailable(exhausted) => unavailable(exhausted),
        }
    }
}

/// A refused client key, in OpenAI's words.
pub(super) fn unauthorized(refusal: Refusal) -> Response<Reply> {
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
fn unavailable(exhausted: &Exhausted) -> Box<ApiError> {
    if let Some(last) = exhausted.refusal() {
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
    let seconds = retry_after_seconds(exhausted.retry_after);
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
    /// Chat completions on the OpenAI wire format, buffered or streamed; one summary line each.
    pub(super) async fn chat_completions(
        self: &Arc<Self>,
        request: &Request,
        path_route: Option<&str>,
        delivery: Delivery,
        mut call: Call,
    ) -> Response<Reply> {
        let operation = Operation::Chat;
        let (route, body) = match self
            .accepted(request, path_route, operation, &mut call)
            .await
        {
            Ok(accepted) => accepted,
            Err((error, route)) => return self.refused(*error, route.as_deref(), operation, call),
        };
        let route = &*route;
        let deadline = self.deadline(request);
        let stream = body.get("stream") == Some(&Value::Bool(true));
        if stream {
            match self.engine.stream(route, &body, deadline, delivery).await {
                Ok(answer) => self.streamed(answer, operation, delivery, call).await,
                Err(error) => self.unanswered(&error, operation, true, call),
            }
        } else {
            match self.engine.complete(route, &body, deadline).await {
                Ok(answer) => self.whole(answer, call),
                Err(error) => self.unanswered(&error, operation, false, call),
            }
        }
    }

    /// A request checked ([`App::parse`]) and its client admitted to its route ([`App::admit`],
    /// the reservation kept in `call`), before any upstream call: the route as the client may
    /// use it (a batch client's keeps off deployments short of quota) and the body; or the
    /// error, with the route it was for when one was found.
    pub(super) async fn accepted(
        &self,
        request: &Request,
        path_route: Option<&str>,
        operation: Operation,
        call: &mut Call,
    ) -> Result<(Cow<'_, Route>, JsonBody), (Box<ApiError>, Option<String>)> {
        let (route, body) = self
            .parse(request, path_route, operation)
            .map_err(|e| (e, path_route.map(str::to_owned)))?;
        let raw = request.body().len();
        let default = self.surface.limits.default_completion_tokens;
        self.admit(call, Some(route), estimate(&body, raw, operation, default))
            .await
            .map_err(|e| (e, Some(route.name.clone())))?;
        let route = match self.route_for_caller(call.caller, route) {
            Some(kept) => Cow::Owned(kept),
            None => Cow::Borrowed(route),
        };
        Ok((route, body))
    }

    /// A request refused before any deployment was asked: its error, and its summary line.
    pub(super) fn refused(
        &self,
        error: ApiError,
        path_route: Option<&str>,
        operation: Operation,
        call: Call,
    ) -> Response<Reply> {
        let summary = Summary::refused(path_route.unwrap_or_default(), error.message.clone())
            .operation(operation.label());
        self.finish(call, summary, error.status.as_u16());
        error.into_response()
    }

    /// No deployment answered: the error (a 503 with the attempts, or the refusal that was
    /// the answer), and its summary line.
    pub(super) fn unanswered(
        &self,
        error: &RouteError,
        operation: Operation,
        stream: bool,
        call: Call,
    ) -> Response<Reply> {
        let api_error = Box::<ApiError>::from(error);
        let summary = Summary::unanswered(error, api_error.message.clone())
            .operation(operation.label())
            .streamed(stream);
        self.finish(call, summary, api_error.status.as_u16());
        api_error.into_response()
    }

    /// Checks method, size, JSON and what `operation` needs in the body, and finds the route:
    /// before any upstream call.
    pub(super) fn parse(
        &self,
        request: &Request,
        path_route: Option<&str>,
        operation: Operation,
    ) -> Result<(&Route, JsonBody), Box<ApiError>> {
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
        if raw.len() > self.surface.max_body_bytes {
            let mut e = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "The request body is {} bytes; the limit is {} (MAX_BODY_BYTES).",
                    raw.len(),
                    self.surface.max_body_bytes
                ),
            );
            e.code = Some("request_too_large".into());
            return Err(e);
        }
        let body: JsonBody = match serde_json::from_slice::<Value>(raw) {
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
        match operation {
            Operation::Chat => check_messages(&body)?,
            Operation::Embeddings => check_input(&body)?,
            Operation::Responses => check_response_request(&body)?,
        }
        let route = self.route_for(path_route, &body)?;
        operation.check_route(route)?;
        Ok((route, body))
    }

    /// The route a request names: the Azure path's deployment, else the body's `model`. A pool
    /// without named routes serves every model from its one route.
    fn route_for(
        &self,
        path_route: Option<&str>,
        body: &JsonBody,
    ) -> Result<&Route, Box<ApiError>> {
        let pool = self.engine.pool();
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
            e.param = Some("model".into());
            e.code = Some("model_not_found".into());
            e
        })
    }
}

impl<C: Clock> App<C> {
    /// A whole answer passed through exactly as the deployment sent it (embeddings, a response),
    /// its summary logged with the time since the request came (`started`).
    pub(super) fn document(
        &self,
        answer: Answer<Document>,
        summary: Summary,
        call: Call,
    ) -> Response<Reply> {
        let mut response = Response::new(Reply::full(answer.output.raw.clone()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        fallback_headers(&mut response, &answer.deployment, answer.called());
        self.finish(call, summary, 200);
        response
    }

    /// A whole completion, passed through exactly as the deployment sent it; its summary logged
    /// with the time since the request came.
    fn whole(&self, answer: Answer<Completion>, call: Call) -> Response<Reply> {
        let mut response = Response::new(Reply::full(answer.output.raw.clone()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        fallback_headers(&mut response, &answer.deployment, answer.called());
        let tokens = answer.output.total_tokens();
        let summary = Summary::answered(&answer, tokens).operation(Operation::Chat.label());
        self.finish(call, summary, 200);
        response
    }

    /// A stream, relayed as the deployment produces it; its summary is logged when it has ended
    /// (`started` is when the request came), naming every deployment that produced it. Behind a
    /// buffered front nothing reaches the caller before the stream has ended, so the headers
    /// wait for its report and name every deployment that wrote the answer (a continued one has
    /// two) and every deployment called for it; a streamed caller gets its headers at once.
    pub(super) async fn streamed(
        self: &Arc<Self>,
        answer: Answer<Streamed>,
        operation: Operation,
        delivery: Delivery,
        call: Call,
    ) -> Response<Reply> {
        let summary = Summary::answered(&answer, None)
            .operation(operation.label())
            .streamed(true);
        let (mut deployment, mut attempts) = (answer.deployment, called(&answer.attempts));
        let Streamed { frames, report } = answer.output;
        match delivery {
            Delivery::Buffered => {
                let report = report.await.ok();
                if let Some(report) = &report {
                    attempts += called(&report.attempts);
                    if !report.deployments.is_empty() {
                        deployment = report.deployments.join(", ");
                    }
                }
                self.finish(call, summary.ended(report), 200);
            }
            Delivery::Streamed => {
                let app = Arc::clone(self);
                let log = async move {
                    let report = report.await.ok();
                    app.finish(call, summary.ended(report), 200);
                };
                tokio::spawn(log.in_current_span().with_current_subscriber());
            }
        }
        let frame = match operation {
            Operation::Responses => responses_frame,
            Operation::Chat | Operation::Embeddings => chat_frame,
        };
        let frames = ReceiverStream::new(frames).filter_map(frame);
        let mut response = Response::new(Reply::stream(frames));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        fallback_headers(&mut response, &deployment, attempts);
        response
    }
}

/// A relayed chat stream, on the wire: its events, then `[DONE]` for a complete answer, or the
/// error event that says it is not.
fn chat_frame(item: Relayed) -> Option<Bytes> {
    match item {
        Relayed::Frame(frame) => Some(frame),
        Relayed::End(StreamEnding::Done) => Some(sse::done()),
        Relayed::End(StreamEnding::Interrupted {
            deployment,
            why,
            tries,
            reported: false,
        }) => Some(interrupted_event(&deployment, &why.to_string(), tries)),
        Relayed::End(
            StreamEnding::Interrupted { reported: true, .. }
            | StreamEnding::Refused
            | StreamEnding::Gone,
        ) => None,
    }
}

/// A relayed Responses stream, on the wire: its events (the last, `response.completed`, says it
/// is complete), or the `error` event that says it is not.
fn responses_frame(item: Relayed) -> Option<Bytes> {
    match item {
        Relayed::Frame(frame) => Some(frame),
        Relayed::End(StreamEnding::Interrupted {
            deployment,
            why,
            tries,
            reported: false,
        }) => {
            let message = interrupted_message(&deployment, &why.to_string(), tries);
            let event = json!({"type": "error", "code": "stream_interrupted", "message": message, "param": null});
            Some(sse::named_event("error", &event.to_string()))
        }
        Relayed::End(_) => None,
    }
}

/// What an interrupted answer says: the original failure (never the refusal of a rescue).
fn interrupted_message(deployment: &str, why: &str, tries: u32) -> String {
    let rescue = match tries {
        0 => String::new(),
        1 => "; it could not be continued on another deployment".to_owned(),
        n => format!("; {n} attempts to continue it on another deployment failed"),
    };
    format!(
        "The answer from deployment {deployment} was interrupted ({why}){rescue}; it is incomplete. Retry the request."
    )
}

/// The event that ends an interrupted stream instead of `[DONE]`: `stream_interrupted`, naming
/// the original failure (never the refusal of a rescue); the OpenAI SDKs raise it as an error.
fn interrupted_event(deployment: &str, why: &str, tries: u32) -> Bytes {
    let message = interrupted_message(deployment, why, tries);
    sse::event(
        &json!({"error": {"message": message, "type": "server_error", "code": "stream_interrupted"}})
            .to_string(),
    )
}

/// A Responses API request: something to answer (`input`, a `prompt`, or a conversation to go
/// on with), and a `previous_response_id` that can be one.
fn check_response_request(body: &JsonBody) -> Result<(), Box<ApiError>> {
    match body.get("previous_response_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if is_response_id(id) => {}
        Some(other) => {
            return Err(ApiError::invalid(
                format!(
                    "Invalid 'previous_response_id': {other}. Expected an ID that begins with 'resp'."
                ),
                Some("previous_response_id"),
                "invalid_value",
            ));
        }
    }
    match body.get("input") {
        None | Some(Value::Null) => {
            let other = ["previous_response_id", "prompt", "conversation"]
                .iter()
                .any(|field| body.get(*field).is_some_and(|v| !v.is_null()));
            if !other {
                return Err(ApiError::invalid(
                    "Missing required parameter: 'input'.",
                    Some("input"),
                    "missing_required_parameter",
                ));
            }
        }
        Some(Value::String(_) | Value::Array(_)) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "'input' must be a string or an array of input items.",
                Some("input"),
                "invalid_type",
            ));
        }
    }
    Ok(())
}

/// A request about a stored response that got no answer, in OpenAI's words. `previous`: the
/// id came as `previous_response_id` (a 400 when unknown, as OpenAI answers), else in the path
/// (a 404).
pub(super) fn state_error(error: &StateError, previous: bool) -> Box<ApiError> {
    match error {
        StateError::Route(error) => error.into(),
        StateError::NotFound { id } if previous => ApiError::invalid(
            format!("Previous response with id '{id}' not found."),
            Some("previous_response_id"),
            "previous_response_not_found",
        ),
        StateError::NotFound { id } => {
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Response with id '{id}' not found."),
            );
            e.code = Some("response_not_found".into());
            e
        }
        StateError::Elsewhere {
            id,
            deployment,
            route,
        } => ApiError::invalid(
            format!(
                "Response '{id}' is stored on the resource of deployment {deployment}, and the model `{route}` has no deployment there: continue the conversation with a model that does, or send its whole history with store: false."
            ),
            Some("previous_response_id"),
            "previous_response_elsewhere",
        ),
        StateError::Unavailable {
            id,
            deployment,
            error,
        } => {
            let mut e = Box::<ApiError>::from(error);
            let seconds = e.retry_after.unwrap_or(1);
            e.message = format!(
                "Response '{id}' (the conversation's state) is stored with deployment {deployment}, which cannot answer now; no other deployment has its history. Retry after {seconds} s."
            );
            e.code = Some("conversation_unavailable".into());
            e.extra
                .insert("deployment".into(), Value::String(deployment.clone()));
            e
        }
        StateError::Unknown { id, exhausted } => {
            let seconds = retry_after_seconds(exhausted.retry_after);
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!(
                    "Could not find where response '{id}' is stored: some deployments could not be asked. Retry after {seconds} s."
                ),
            );
            e.code = Some("response_lookup_failed".into());
            e.retry_after = Some(seconds);
            e.extra.insert("attempts".into(), json!(exhausted.attempts));
            e
        }
    }
}

/// Embeddings' `input`: a string, an array of strings, an array of token ids or an array of
/// arrays of token ids, never empty.
fn check_input(body: &JsonBody) -> Result<(), Box<ApiError>> {
    let fine = match body.get("input") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "Missing required parameter: 'input'.",
                Some("input"),
                "missing_required_parameter",
            ));
        }
        Some(Value::String(text)) => !text.is_empty(),
        Some(Value::Array(items)) => {
            let all = |f: fn(&Value) -> bool| items.iter().all(f);
            !items.is_empty()
                && (all(|v| v.as_str().is_some_and(|s| !s.is_empty()))
                    || all(|v| v.is_u64())
                    || all(|v| {
                        v.as_array()
                            .is_some_and(|t| !t.is_empty() && t.iter().all(Value::is_u64))
                    }))
        }
        Some(_) => false,
    };
    if !fine {
        return Err(ApiError::invalid(
            "'input' must be a non-empty string, an array of non-empty strings, an array of token ids or an array of arrays of token ids.",
            Some("input"),
            "invalid_value",
        ));
    }
    if let Some(dimensions) = body.get("dimensions")
        && dimensions.as_u64().is_none_or(|d| d == 0)
    {
        return Err(ApiError::invalid(
            "'dimensions' must be a positive integer.",
            Some("dimensions"),
            "invalid_value",
        ));
    }
    Ok(())
}

fn check_messages(body: &JsonBody) -> Result<(), Box<ApiError>> {
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
