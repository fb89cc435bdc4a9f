//! The Responses API on the OpenAI wire format: `POST /v1/responses` (and Azure's
//! `/openai/v1/responses`), the route from `model`, the body passed through untouched (tools,
//! reasoning, `text.format`, fields never heard of); and the calls on a stored response,
//! `GET`/`DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`, which go to
//! where it is stored (`routing::state`).

use std::sync::Arc;

use lambda_http::http::{Method, StatusCode};
use lambda_http::{Request, Response};
use serde_json::Value;

use crate::clock::Clock;
use crate::reply::Reply;
use crate::routing::{Delivery, StateError};
use crate::upstream::{StoredOp, is_response_id};

use super::api::{ApiError, Operation};
use super::app::App;
use super::call::Call;
use super::openai::state_error;
use super::summary::Summary;

impl<C: Clock> App<C> {
    pub(super) async fn responses(
        self: &Arc<Self>,
        request: &Request,
        delivery: Delivery,
        mut call: Call,
    ) -> Response<Reply> {
        let operation = Operation::Responses;
        let (route, body) = match self.accepted(request, None, operation, &mut call).await {
            Ok(accepted) => accepted,
            Err((error, route)) => return self.refused(*error, route.as_deref(), operation, call),
        };
        let route = &*route;
        let deadline = self.deadline(request);
        let previous = body
            .get("previous_response_id")
            .is_some_and(|v| !v.is_null());
        if body.get("stream") == Some(&Value::Bool(true)) {
            return match self
                .engine
                .stream_response(route, &body, deadline, delivery)
                .await
            {
                Ok(answer) => self.streamed(answer, operation, delivery, call).await,
                Err(error) => self.state_failed(&error, &route.name, previous, true, call),
            };
        }
        match self.engine.respond(route, &body, deadline).await {
            Ok(answer) => {
                let summary =
                    Summary::answered(&answer, answer.output.tokens).operation(operation.label());
                self.document(answer, summary, call)
            }
            Err(error) => self.state_failed(&error, &route.name, previous, false, call),
        }
    }

    /// `GET` or `DELETE` on stored response `id`, or `GET` of its input items (`op`).
    pub(super) async fn stored(
        self: &Arc<Self>,
        request: &Request,
        id: &str,
        op: StoredOp,
        mut call: Call,
    ) -> Response<Reply> {
        let operation = Operation::Responses;
        let (op, allow) = match (request.method(), op) {
            (&Method::GET, op) => (op, ""),
            (&Method::DELETE, StoredOp::Get) => (StoredOp::Delete, ""),
            (_, StoredOp::InputItems) => (op, "GET"),
            _ => (op, "GET, DELETE"),
        };
        if !allow.is_empty() {
            let mut e = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!(
                    "Method {} is not allowed here; use {allow}.",
                    request.method()
                ),
            );
            e.allow = Some(allow);
            return self.refused(*e, None, operation, call);
        }
        if !is_response_id(id) {
            let mut e = ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("Invalid response id '{id}': expected an ID that begins with 'resp'."),
            );
            e.code = Some("invalid_value".into());
            return self.refused(*e, None, operation, call);
        }
        // A request that costs no tokens, but a request; the id says where it goes.
        if let Err(error) = self.admit(&mut call, None, (0, 0)).await {
            return self.refused(*error, None, operation, call);
        }
        // The caller's paging and `include` parameters pass on; Azure's v1 takes no api-version.
        let query: Vec<&str> = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("api-version="))
            .collect();
        let query = query.join("&");
        let deadline = self.deadline(request);
        match self
            .engine
            .stored(op, id, Some(query.as_str()), deadline)
            .await
        {
            Ok(answer) => {
                let summary = Summary::answered(&answer, None).operation(operation.label());
                self.document(answer, summary, call)
            }
            Err(error) => self.state_failed(&error, "", false, false, call),
        }
    }

    /// A request about a stored response (or a new one) that got no answer: its error and its
    /// summary line.
    fn state_failed(
        &self,
        error: &StateError,
        route: &str,
        previous: bool,
        stream: bool,
        call: Call,
    ) -> Response<Reply> {
        let api_error = state_error(error, previous);
        let summary = Summary::failed(route, error.attempts(), api_error.message.clone())
            .operation(Operation::Responses.label())
            .streamed(stream);
        self.finish(call, summary, api_error.status.as_u16());
        api_error.into_response()
    }
}
