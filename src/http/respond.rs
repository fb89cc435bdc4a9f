//! Pieces every response of the surface is made of.

use std::time::Duration;

use lambda_http::http::{HeaderValue, StatusCode, header};
use lambda_http::{Request, RequestExt, Response};
use serde::Serialize;

use crate::reply::Reply;

/// The request's path as the caller sent it (API Gateway's raw path when there is one).
pub(super) fn path(request: &Request) -> &str {
    match request.raw_http_path() {
        "" => request.uri().path(),
        raw => raw,
    }
}

/// Who wrote the answer (`deployment`: one id, or several in order when a cut stream was
/// continued), and how many deployments were called for it (`attempts`).
pub(super) fn fallback_headers<B>(response: &mut Response<B>, deployment: &str, attempts: usize) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(deployment) {
        headers.insert("x-fallback-deployment", v);
    }
    headers.insert("x-fallback-attempts", HeaderValue::from(attempts));
}

pub(super) fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Reply> {
    let mut response = Response::new(Reply::json(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Retry-After is whole seconds; round up so a client never comes back too early.
pub(super) fn retry_after_seconds(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}
