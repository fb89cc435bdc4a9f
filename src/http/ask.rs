//! `GET /?query=`: the original chatbot's interface. A question in, `{"chat_completion", ...}`
//! out, or a JSON error with the status that says what happened.

use std::sync::Arc;

use lambda_http::http::{HeaderValue, Method, StatusCode, header};
use lambda_http::{Request, RequestExt, Response};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::attempt::Answer;
use crate::clock::Clock;
use crate::outcome::{Completion, ContentFilter, JsonBody};
use crate::reply::Reply;
use crate::routing::RouteError;

use super::api::{ApiError, Operation};
use super::app::App;
use super::call::{Call, estimate};
use super::respond::{fallback_headers, json_response, path, retry_after_seconds};
use super::summary::Summary;

#[derive(Serialize)]
struct Answered<'a> {
    /// The original Flask app's field name, so its clients keep working.
    chat_completion: Option<&'a str>,
    deployment: &'a str,
    model: &'a str,
    usage: &'a Option<Value>,
}

/// Why a question got no answer.
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("Missing query: call GET /?query=<your question>.")]
    MissingQuery,
    #[error("The query is {chars} characters long; the limit is {max}.")]
    QueryTooLong { chars: usize, max: usize },
    #[error("No route for {path}: call GET /?query=<your question>.")]
    NotFound { path: String },
    #[error("Method {method} is not allowed on {path}; use GET.")]
    MethodNotAllowed { method: String, path: String },
    /// The answer itself was filtered: this interface has no way to show it as such.
    #[error("The provider's safety system refused the {}.", .filter.target)]
    CompletionFiltered {
        deployment: String,
        filter: ContentFilter,
    },
    #[error("{}", route_message(.0))]
    Route(RouteError),
    /// The client may not use the route, or is over a limit.
    #[error("{}", .0.message)]
    Refused(Box<ApiError>),
}

fn route_message(error: &RouteError) -> String {
    match error {
        RouteError::ContentFiltered { filter, .. } => {
            format!(
                "The provider's safety system refused the {}.",
                filter.target
            )
        }
        RouteError::Unavailable(_) => "All models are currently unavailable.".into(),
    }
}

/// The request body for one question: system prompt first, then the user's question.
pub(super) fn chat_body(system_prompt: &str, query: &str) -> JsonBody {
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

impl<C: Clock> App<C> {
    pub(super) async fn ask(
        self: &Arc<Self>,
        request: &Request,
        mut call: Call,
    ) -> Response<Reply> {
        let route = &self.engine.pool().default_route().name;
        let result = self.question(request, &mut call).await;
        match result {
            Ok(answer) => {
                let summary = Summary::answered(&answer, answer.output.total_tokens());
                self.finish(call, summary, 200);
                answered(&answer)
            }
            Err(error) => {
                let response = error_response(&error);
                let status = response.status().as_u16();
                let summary = match &error {
                    AskError::Route(route_error) => {
                        Summary::unanswered(route_error, error.to_string())
                    }
                    AskError::CompletionFiltered { deployment, .. } => {
                        // Answered, and its tokens spent, though not shown.
                        Summary::refused(route, error.to_string()).by(deployment)
                    }
                    _ => Summary::refused(route, error.to_string()),
                };
                self.finish(call, summary, status);
                response
            }
        }
    }

    /// Any path that is no endpoint.
    pub(super) fn not_found(&self, request: &Request, call: Call) -> Response<Reply> {
        let error = AskError::NotFound {
            path: path(request).chars().take(200).collect(),
        };
        let response = error_response(&error);
        let route = &self.engine.pool().default_route().name;
        let summary = Summary::refused(route, error.to_string());
        self.finish(call, summary, response.status().as_u16());
        response
    }

    async fn question(
        &self,
        request: &Request,
        call: &mut Call,
    ) -> Result<Answer<Completion>, AskError> {
        if request.method() != Method::GET {
            return Err(AskError::MethodNotAllowed {
                method: request.method().to_string(),
                path: path(request).to_owned(),
            });
        }
        let query = request
            .query_string_parameters_ref()
            .and_then(|q| q.first("query"))
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .ok_or(AskError::MissingQuery)?;
        let chars = query.chars().count();
        if chars > self.surface.max_query_chars {
            return Err(AskError::QueryTooLong {
                chars,
                max: self.surface.max_query_chars,
            });
        }
        let body = chat_body(&self.surface.system_prompt, query);
        let route = self.engine.pool().default_route();
        let size = self.surface.system_prompt.len() + query.len();
        let default = self.surface.limits.default_completion_tokens;
        self.admit(
            call,
            Some(route),
            estimate(&body, size, Operation::Chat, default),
        )
        .await
        .map_err(AskError::Refused)?;
        let kept = self.route_for_caller(call.caller, route);
        let answer = self
            .engine
            .complete(
                kept.as_ref().unwrap_or(route),
                &body,
                self.deadline(request),
            )
            .await
            .map_err(AskError::Route)?;
        match answer.output.output_filter() {
            Some(filter) => Err(AskError::CompletionFiltered {
                deployment: answer.deployment,
                filter,
            }),
            None => Ok(answer),
        }
    }
}

fn answered(answer: &Answer<Completion>) -> Response<Reply> {
    let c = &answer.output;
    let mut response = json_response(
        StatusCode::OK,
        &Answered {
            chat_completion: c.content.as_deref(),
            deployment: &answer.deployment,
            model: &c.model,
            usage: &c.usage,
        },
    );
    fallback_headers(&mut response, &answer.deployment, answer.called());
    response
}

fn filtered(message: String, deployment: &str, filter: &ContentFilter) -> Response<Reply> {
    json_response(
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
    )
}

fn error_response(error: &AskError) -> Response<Reply> {
    let message = error.to_string();
    match error {
        AskError::MissingQuery | AskError::QueryTooLong { .. } => {
            json_response(StatusCode::BAD_REQUEST, &json!({ "error": message }))
        }
        AskError::NotFound { .. } => {
            json_response(StatusCode::NOT_FOUND, &json!({ "error": message }))
        }
        AskError::MethodNotAllowed { .. } => {
            let mut r = json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({ "error": message }));
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            r
        }
        AskError::CompletionFiltered { deployment, filter } => {
            filtered(message, deployment, filter)
        }
        AskError::Route(RouteError::ContentFiltered {
            deployment, filter, ..
        }) => filtered(message, deployment, filter),
        AskError::Refused(e) => {
            let mut r = json_response(e.status, &json!({ "error": message, "code": e.code }));
            if let Some(seconds) = e.retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            r
        }
        AskError::Route(RouteError::Unavailable(exhausted)) => {
            let seconds = retry_after_seconds(exhausted.retry_after);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_prompt_comes_first() {
        let body = Value::Object(chat_body("sys", "q"));
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["role"], "user");
        assert_eq!(body["messages"][1]["content"], "q");
    }
}
