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
        let (route, body) = match self.parse(request, path_route, operation) {
            Ok(parsed) => parsed,
            Err(error) => return self.refused(*error, path_route, operation, call),
        };
        let kept = match self
            .admitted(&mut call, request, route, &body, operation)
            .await
        {
            Ok(kept) => kept,
            Err(error) => return self.refused(*error, Some(&route.name), operation, call),
        };
        let route = kept.as_ref().unwrap_or(route);
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
