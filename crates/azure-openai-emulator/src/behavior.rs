//! Scriptable deployment behaviours and their textual forms (`throttled:7`, `hang`, ...).

use std::fmt;
use std::str::FromStr;

use crate::chaos::{Chaos, DEFAULT_HEALTHY_PERCENT};

/// What a deployment does with the next call.
#[derive(Clone, Debug, PartialEq)]
pub enum Behavior {
    /// 200 with a deterministic completion.
    Healthy,
    /// 429 (gateway envelope) with the timing headers of the given variant.
    Throttled(RetryAfter),
    /// 500, OpenAI envelope, `type: server_error`.
    ServerError,
    /// 503, gateway envelope.
    Unavailable,
    /// 503, gateway envelope, plus `retry-after: <n>` (seconds).
    UnavailableRetryAfter(u64),
    /// 408 `{"error":{"code":"Timeout",...}}`.
    RequestTimeout,
    /// Read the request, never answer (until the client disconnects or the emulator stops).
    Hang,
    /// Close the TCP connection with an RST and no HTTP response at all.
    ResetConnection,
    /// 400 `content_filter` on the prompt (`ResponsibleAIPolicyViolation`).
    ContentFilter,
    /// 400 `context_length_exceeded`.
    ContextLengthExceeded,
    /// 404 `DeploymentNotFound`, even though the deployment is registered.
    DeploymentNotFound,
    /// 401 as for a wrong key, whatever key was sent.
    Unauthorized,
    /// 200 with `finish_reason: "content_filter"` and no content; streamed: a few content chunks,
    /// then a `content_filter` finish chunk.
    OutputFiltered,
    /// Streamed: the opening events and `after` content chunks, then a TCP reset (no finish, no
    /// `[DONE]`). Non-streaming calls: as [`Behavior::Healthy`], like every `Stream*` variant.
    StreamCut { after: usize },
    /// Streamed: the opening events and `after` content chunks, then silence with the connection
    /// open (until the client goes away or the emulator stops).
    StreamStall { after: usize },
    /// Streamed: the opening events and `after` content chunks, then the deployment's own
    /// error event (chat: `{"error": ...}`; Responses: an `error` event), and the body ends.
    StreamError { after: usize },
    /// Streamed: a full stream with a malformed event and a valid non-chunk event
    /// (`{"unexpected":true}`) right before content chunk `at` (0-based; past the end: before the
    /// finish chunk).
    StreamCorrupt { at: usize },
    /// Streamed: a full stream with its `stop` chunk, but the body ends cleanly without `[DONE]`.
    StreamNoDone,
    /// Streamed: headers and Azure's `prompt_filter_results` event at once, then `ms` milliseconds
    /// of silence before the role chunk (a slow time to first token).
    StreamSlowStart { ms: u64 },
    /// Streamed: a normal stream with Azure's asynchronous-filter event (`content_filter_offsets`,
    /// empty `id`) after the second content chunk.
    StreamAsyncFilter,
    /// 400 `content_policy_violation`, as OpenAI and OpenAI-compatible servers refuse a prompt.
    ContentPolicy,
    /// 400 for a request whose last message is an assistant message (a prefill), as models that
    /// want the conversation to end with a user message answer; healthy otherwise.
    NoPrefill,
    /// 400 for a request that asks to continue a partial answer, in any form; healthy otherwise.
    RefuseContinuation,
    /// Healthy, but a continuation first repeats the last `words` words of the partial answer.
    ContinueOverlap { words: usize },
    /// Streamed: a tool call whose arguments stop after `after` pieces, then a TCP reset.
    StreamToolCut { after: usize },
    /// Switches at random, seeded, between healthy and the failures above, in phases of 0.5 to
    /// 3 s: each call acts out the phase in force when it arrives ([`crate::chaos`]).
    Chaos(Chaos),
}

/// Which timing headers a 429 carries.
#[derive(Clone, Debug, PartialEq)]
pub enum RetryAfter {
    /// `retry-after-ms: <n>` and `retry-after: <ceil(n/1000)>` (Azure sends both).
    Milliseconds(u64),
    /// `retry-after: <n>` only.
    Seconds(u64),
    /// `retry-after: <IMF-fixdate now + n seconds>`.
    HttpDate(u64),
    /// `x-ratelimit-reset-requests: <n>` only.
    ResetRequests(u64),
    /// `x-ratelimit-reset-tokens: <n>` only.
    ResetTokens(u64),
    /// No timing header at all (only `x-ratelimit-remaining-requests: 0`).
    None,
}

impl RetryAfter {
    /// Whole seconds to mention in the 429 message, if this variant carries a delay.
    pub fn seconds(&self) -> Option<u64> {
        match *self {
            RetryAfter::Milliseconds(ms) => Some(ms.div_ceil(1000)),
            RetryAfter::Seconds(n)
            | RetryAfter::HttpDate(n)
            | RetryAfter::ResetRequests(n)
            | RetryAfter::ResetTokens(n) => Some(n),
            RetryAfter::None => None,
        }
    }
}

const VALID_FORMS: &str = "healthy, throttled, throttled:<secs>, throttled-ms:<ms>, \
throttled-date:<secs>, throttled-reset:<secs>, throttled-reset-tokens:<secs>, throttled-none, \
500|server-error, 503|unavailable, 503:<secs>|unavailable:<secs>, 408|timeout, hang, reset, \
content-filter, context-length, not-found, 401|unauthorized, output-filtered, stream-cut:<chunks>, \
stream-stall:<chunks>, stream-corrupt:<index>, stream-no-done, stream-slow-start:<ms>, \
stream-async-filter, content-policy, no-prefill, refuse-continuation, continue-overlap:<words>, \
stream-tool-cut:<pieces>, chaos:<seed>, chaos:<seed>:<healthy-percent>";

impl FromStr for Behavior {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, arg) = match s.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (s, None),
        };
        let bad = || format!("unknown behaviour {s:?}; valid forms: {VALID_FORMS}");
        let num =
            || -> Result<u64, String> { arg.ok_or_else(bad)?.trim().parse().map_err(|_| bad()) };
        let count =
            || -> Result<usize, String> { arg.ok_or_else(bad)?.trim().parse().map_err(|_| bad()) };
        let plain = |b: Behavior| if arg.is_none() { Ok(b) } else { Err(bad()) };
        match name.to_ascii_lowercase().as_str() {
            "healthy" => plain(Behavior::Healthy),
            "throttled" if arg.is_none() => Ok(Behavior::Throttled(RetryAfter::Seconds(7))),
            "throttled" => Ok(Behavior::Throttled(RetryAfter::Seconds(num()?))),
            "throttled-ms" => Ok(Behavior::Throttled(RetryAfter::Milliseconds(num()?))),
            "throttled-date" => Ok(Behavior::Throttled(RetryAfter::HttpDate(num()?))),
            "throttled-reset" => Ok(Behavior::Throttled(RetryAfter::ResetRequests(num()?))),
            "throttled-reset-tokens" => Ok(Behavior::Throttled(RetryAfter::ResetTokens(num()?))),
            "throttled-none" => plain(Behavior::Throttled(RetryAfter::None)),
            "500" | "server-error" => plain(Behavior::ServerError),
            "503" | "unavailable" if arg.is_none() => Ok(Behavior::Unavailable),
            "503" | "unavailable" => Ok(Behavior::UnavailableRetryAfter(num()?)),
            "408" | "timeout" => plain(Behavior::RequestTimeout),
            "hang" => plain(Behavior::Hang),
            "reset" => plain(Behavior::ResetConnection),
            "content-filter" => plain(Behavior::ContentFilter),
            "context-length" => plain(Behavior::ContextLengthExceeded),
            "not-found" => plain(Behavior::DeploymentNotFound),
            "401" | "unauthorized" => plain(Behavior::Unauthorized),
            "output-filtered" => plain(Behavior::OutputFiltered),
            "stream-cut" => Ok(Behavior::StreamCut { after: count()? }),
            "stream-stall" => Ok(Behavior::StreamStall { after: count()? }),
            "stream-error" => Ok(Behavior::StreamError { after: count()? }),
            "stream-corrupt" => Ok(Behavior::StreamCorrupt { at: count()? }),
            "stream-no-done" => plain(Behavior::StreamNoDone),
            "stream-slow-start" => Ok(Behavior::StreamSlowStart { ms: num()? }),
            "stream-async-filter" => plain(Behavior::StreamAsyncFilter),
            "content-policy" => plain(Behavior::ContentPolicy),
            "no-prefill" => plain(Behavior::NoPrefill),
            "refuse-continuation" => plain(Behavior::RefuseContinuation),
            "continue-overlap" => Ok(Behavior::ContinueOverlap { words: count()? }),
            "stream-tool-cut" => Ok(Behavior::StreamToolCut { after: count()? }),
            "chaos" => {
                let arg = arg.ok_or_else(bad)?;
                let (seed, healthy) = arg
                    .split_once(':')
                    .map_or((arg, None), |(seed, healthy)| (seed, Some(healthy)));
                let seed = seed.trim().parse().map_err(|_| bad())?;
                let healthy = match healthy {
                    Some(h) => h
                        .trim()
                        .parse()
                        .ok()
                        .filter(|h| *h <= 100)
                        .ok_or_else(bad)?,
                    None => DEFAULT_HEALTHY_PERCENT,
                };
                Ok(Behavior::Chaos(Chaos::new(seed, healthy)))
            }
            _ => Err(bad()),
        }
    }
}

/// The canonical textual form, accepted back by [`FromStr`].
impl fmt::Display for Behavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Behavior::Healthy => f.write_str("healthy"),
            Behavior::Throttled(RetryAfter::Seconds(n)) => write!(f, "throttled:{n}"),
            Behavior::Throttled(RetryAfter::Milliseconds(n)) => write!(f, "throttled-ms:{n}"),
            Behavior::Throttled(RetryAfter::HttpDate(n)) => write!(f, "throttled-date:{n}"),
            Behavior::Throttled(RetryAfter::ResetRequests(n)) => write!(f, "throttled-reset:{n}"),
            Behavior::Throttled(RetryAfter::ResetTokens(n)) => {
                write!(f, "throttled-reset-tokens:{n}")
            }
            Behavior::Throttled(RetryAfter::None) => f.write_str("throttled-none"),
            Behavior::ServerError => f.write_str("server-error"),
            Behavior::Unavailable => f.write_str("unavailable"),
            Behavior::UnavailableRetryAfter(n) => write!(f, "unavailable:{n}"),
            Behavior::RequestTimeout => f.write_str("timeout"),
            Behavior::Hang => f.write_str("hang"),
            Behavior::ResetConnection => f.write_str("reset"),
            Behavior::ContentFilter => f.write_str("content-filter"),
            Behavior::ContextLengthExceeded => f.write_str("context-length"),
            Behavior::DeploymentNotFound => f.write_str("not-found"),
            Behavior::Unauthorized => f.write_str("unauthorized"),
            Behavior::OutputFiltered => f.write_str("output-filtered"),
            Behavior::StreamCut { after } => write!(f, "stream-cut:{after}"),
            Behavior::StreamStall { after } => write!(f, "stream-stall:{after}"),
            Behavior::StreamError { after } => write!(f, "stream-error:{after}"),
            Behavior::StreamCorrupt { at } => write!(f, "stream-corrupt:{at}"),
            Behavior::StreamNoDone => f.write_str("stream-no-done"),
            Behavior::StreamSlowStart { ms } => write!(f, "stream-slow-start:{ms}"),
            Behavior::StreamAsyncFilter => f.write_str("stream-async-filter"),
            Behavior::ContentPolicy => f.write_str("content-policy"),
            Behavior::NoPrefill => f.write_str("no-prefill"),
            Behavior::RefuseContinuation => f.write_str("refuse-continuation"),
            Behavior::ContinueOverlap { words } => write!(f, "continue-overlap:{words}"),
            Behavior::StreamToolCut { after } => write!(f, "stream-tool-cut:{after}"),
            Behavior::Chaos(chaos) => {
                write!(f, "chaos:{}:{}", chaos.seed(), chaos.healthy_percent())
            }
        }
    }
}
