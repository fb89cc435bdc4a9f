//! Embeddings on the OpenAI wire format: `POST /v1/embeddings`, `/openai/v1/embeddings` (the
//! route from `model`) and `/openai/deployments/{route}/embeddings` (from the path). The body
//! passes through untouched (`input` arrays, `dimensions`, `encoding_format`); the route's
//! deployments all serve one embedding model and dimension, so whichever answers, the vectors
//! are comparable.

use std::sync::Arc;

use lambda_http::{Request, Response};

use crate::clock::Clock;
use crate::reply::Reply;

use super::api::Operation;
use super::app::App;
use super::call::Call;
use super::summary::Summary;

impl<C: Clock> App<C> {
    pub(super) async fn embeddings(
        self: &Arc<Self>,
        request: &Request,
        path_route: Option<&str>,
        mut call: Call,
    ) -> Response<Reply> {
        let operation = Operation::Embeddings;
        let (route, body) = match self
            .accepted(request, path_route, operation, &mut call)
            .await
        {
            Ok(accepted) => accepted,
            Err((error, route)) => return self.refused(*error, route.as_deref(), operation, call),
        };
        let route = &*route;
        let deadline = self.deadline(request);
        match self.engine.embed(route, &body, deadline).await {
            Ok(answer) => {
                let summary =
                    Summary::answered(&answer, answer.output.tokens).operation(operation.label());
                self.document(answer, summary, call)
            }
            Err(error) => self.unanswered(&error, operation, false, call),
        }
    }
}
