//! One request as the surface follows it from its key to its summary line: who sent it, what
//! its client's limits reserved for it, and, when it ends, what it used. A named client's
//! request is admitted ([`App::admit`]) before any upstream call, or refused with the 403 or 429
//! that says why; every response of a limited client carries OpenAI's `x-ratelimit-*` headers.

use std::time::Instant;

use lambda_http::Response;
use lambda_http::http::{HeaderName, HeaderValue, StatusCode};
use serde_json::Value;

use crate::clock::Clock;
use crate::config::clients::Priority;
use crate::limits::{Level, OverLimit, Ticket, openai_duration};
use crate::outcome::JsonBody;
use crate::pool::Route;
use crate::reply::Reply;

use super::api::{ApiError, Operation};
use super::app::App;
use super::auth::Caller;
use super::summary::Summary;

/// A token is about four characters of English; JSON's framing and other scripts make three
/// bytes of body per token the safer guess before the call (the real usage settles it after).
const BYTES_PER_TOKEN: usize = 3;

/// One request, from its key check to its summary line.
pub(super) struct Call {
    /// When it came: every summary line's latency counts from here.
    pub started: Instant,
    pub caller: Caller,
    ticket: Option<Ticket>,
    /// The prompt's estimated tokens: with the answer's text, what an answer that says no usage
    /// is counted at.
    prompt: u64,
}

impl Call {
    pub fn new(started: Instant, caller: Caller) -> Self {
        Self {
            started,
            caller,
            ticket: None,
            prompt: 0,
        }
    }
}

/// What a request is estimated to use, before the call: its prompt (from the body's size) and
/// the completion it allows (`max_tokens`, `max_completion_tokens`, `max_output_tokens`, times
/// `n` choices), or `default_completion` when it sets none; embeddings complete nothing.
pub(super) fn estimate(
    body: &JsonBody,
    raw_len: usize,
    operation: Operation,
    default_completion: u64,
) -> (u64, u64) {
    let prompt = raw_len.div_ceil(BYTES_PER_TOKEN) as u64;
    let completion = match operation {
        Operation::Embeddings => 0,
        Operation::Chat | Operation::Responses => {
            let asked = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
                .iter()
                .find_map(|field| body.get(*field).and_then(Value::as_u64))
                .unwrap_or(default_completion);
            let choices = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
            asked.saturating_mul(choices)
        }
    };
    (prompt, completion)
}

impl<C: Clock> App<C> {
    /// Whether `call`'s client may use `route` (if the request has one), and its limits admit `prompt + completion`
    /// estimated tokens: the reservation is kept in `call`; a refusal is the error to answer
    /// with, before any upstream call.
    pub(super) async fn admit(
        &self,
        call: &mut Call,
        route: Option<&Route>,
        (prompt, completion): (u64, u64),
    ) -> Result<(), Box<ApiError>> {
        let Caller::Client(i) = call.caller else {
            return Ok(());
        };
        let Some(client) = self.clients.get(i) else {
            return Ok(());
        };
        if let (Some(routes), Some(route)) = (&client.routes, route)
            && !routes.contains(&route.name)
        {
            let mut e = ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "Client '{}' may not use the model `{}`; it may use: {}.",
                    client.name,
                    route.name,
                    routes.join(", ")
                ),
            );
            e.code = Some("model_not_allowed".into());
            e.param = Some("model".into());
            return Err(e);
        }
        call.prompt = prompt;
        match self.limits.admit(i, prompt + completion).await {
            Ok(ticket) => {
                call.ticket = Some(ticket);
                Ok(())
            }
            Err(over) => Err(over_limit(&over)),
        }
    }

    /// The route as `caller` may use it: a batch client's keeps off deployments whose
    /// remaining quota is under the reserve.
    pub(super) fn route_for_caller(&self, caller: Caller, route: &Route) -> Option<Route> {
        let Caller::Client(i) = caller else {
            return None;
        };
        let reserve = self.surface.limits.batch_reserve_tokens;
        (self.clients.get(i)?.priority == Priority::Batch && reserve > 0)
            .then(|| route.keeping(reserve))
    }

    /// The request is over: its summary line (with its client), and its reservation settled
    /// with what it used: the usage the answer reported, else an estimate from its prompt and
    /// the text it got, or nothing when no deployment answered.
    pub(super) fn finish(&self, call: Call, summary: Summary, status: u16) {
        let now = self.engine.clock().now();
        let client = match call.caller {
            Caller::Client(i) => self.clients.get(i).map(|c| c.name.as_str()),
            Caller::Unnamed => None,
        };
        if let Some(ticket) = call.ticket {
            let used = summary.tokens().unwrap_or_else(|| {
                if summary.was_answered() {
                    call.prompt + summary.text_chars().div_ceil(4) as u64
                } else {
                    0
                }
            });
            self.limits.settle(ticket, used);
        }
        summary.client(client).log(status, now - call.started);
    }

    /// OpenAI's `x-ratelimit-*` headers, for a client with limits: its requests and tokens
    /// limit, what is left of them and when they reset (the shortest window of each).
    pub(super) fn rate_headers(&self, caller: Caller, response: &mut Response<Reply>) {
        let Caller::Client(i) = caller else {
            return;
        };
        if !self.limits.limited(i) {
            return;
        }
        let standing = self.limits.standing(i);
        let headers = response.headers_mut();
        let mut put = |what: &str, level: Option<Level>| {
            let Some(level) = level else {
                return;
            };
            let values = [
                ("limit", level.limit.to_string()),
                ("remaining", level.remaining.to_string()),
                ("reset", openai_duration(level.reset)),
            ];
            for (field, value) in values {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::try_from(format!("x-ratelimit-{field}-{what}")),
                    HeaderValue::try_from(value),
                ) {
                    headers.insert(name, value);
                }
            }
        };
        put("requests", standing.requests);
        put("tokens", standing.tokens);
    }
}

/// A limit that refuses the request, in OpenAI's shape: `rate_limit_exceeded` for a rate,
/// `insufficient_quota` for a spent day's or month's quota (API Management's distinction), with
/// a Retry-After for when the window frees.
pub(super) fn over_limit(over: &OverLimit) -> Box<ApiError> {
    let quota = over.counter.is_quota() && over.retry_after.is_some();
    let kind = if quota {
        "insufficient_quota"
    } else {
        match over.counter.measure {
            crate::limits::Measure::Requests => "requests",
            crate::limits::Measure::Tokens => "tokens",
        }
    };
    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, kind, over.message());
    e.code = Some(
        if quota {
            "insufficient_quota"
        } else {
            "rate_limit_exceeded"
        }
        .into(),
    );
    e.retry_after = over
        .retry_after
        .map(|wait| wait.as_millis().div_ceil(1000).max(1) as u64);
    e.extra
        .insert("limit".into(), Value::from(over.counter.name()));
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_estimate_counts_the_body_and_the_completion_it_allows() {
        let body = |v: Value| v.as_object().cloned().unwrap();
        let chat = body(json!({"messages": [], "max_tokens": 50, "n": 2}));
        assert_eq!(estimate(&chat, 300, Operation::Chat, 1000), (100, 100));
        let open = body(json!({"input": "hi"}));
        assert_eq!(estimate(&open, 10, Operation::Responses, 1000), (4, 1000));
        let capped = body(json!({"input": "hi", "max_output_tokens": 64}));
        assert_eq!(estimate(&capped, 10, Operation::Responses, 1000), (4, 64));
        assert_eq!(estimate(&open, 10, Operation::Embeddings, 1000), (4, 0));
    }
}
