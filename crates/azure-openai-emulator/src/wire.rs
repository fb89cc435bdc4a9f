//! Azure OpenAI wire shapes: completion bodies, error envelopes and their headers.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};

use crate::behavior::{Behavior, RetryAfter};

/// A response before the common headers (`x-request-id`, ...) are added.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(&'static str, String)>,
    /// Serialised JSON; a string so field order stays Azure's.
    pub body: String,
}

impl Reply {
    fn json(status: StatusCode, body: &impl Serialize) -> Self {
        let body = serde_json::to_string(body).unwrap_or_default(); // plain structs always serialise
        Reply {
            status,
            headers: Vec::new(),
            body,
        }
    }

    fn header(mut self, name: &'static str, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }
}

/// A generated chat completion; kept apart from its wire forms so a streaming form can be added.
pub(crate) struct Completion {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// `None` when the output was filtered.
    pub content: Option<String>,
    /// The answer, filtered or not (a filtered stream shows its beginning).
    pub text: String,
    pub finish_reason: &'static str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// What a conversation asks: the question, and whether it asks to continue a partial answer.
pub(crate) struct Conversation {
    /// The last user message (before the partial answer, when there is one).
    pub question: String,
    /// A partial assistant answer to continue: the beginning of some deployment's answer to
    /// the question, as the last message (a prefill) or followed by one user message (an
    /// instruction to continue).
    pub partial: Option<String>,
    /// The last message is an assistant message.
    pub prefill: bool,
}

fn role(message: &Value) -> Option<&str> {
    message.get("role").and_then(Value::as_str)
}

/// Every deployment's answer to `question` reads `[<deployment>] You said: <question>`.
pub(crate) fn canonical(deployment: &str, question: &str) -> String {
    format!("[{deployment}] You said: {question}")
}

impl Conversation {
    /// Reads `messages` (already validated as non-empty); `deployments` are the registered ones,
    /// whose answers a partial answer may be the beginning of.
    pub fn read(messages: &[Value], deployments: &[String]) -> Self {
        let prefill = messages.last().and_then(role) == Some("assistant");
        // The assistant message that may be a partial answer: last, or followed by one user message.
        let candidate = match messages {
            [.., a] if role(a) == Some("assistant") => Some(messages.len() - 1),
            [.., a, u] if role(a) == Some("assistant") && role(u) == Some("user") => {
                Some(messages.len() - 2)
            }
            _ => None,
        };
        let last_user_before = |end: usize| {
            messages[..end]
                .iter()
                .rev()
                .find(|m| role(m) == Some("user"))
                .map(|m| content_text(m.get("content")))
                .unwrap_or_default()
        };
        if let Some(k) = candidate {
            let question = last_user_before(k);
            let partial = content_text(messages[k].get("content"));
            let continues = !partial.is_empty()
                && deployments.iter().any(|d| {
                    let answer = canonical(d, &question);
                    answer.len() > partial.len() && answer.starts_with(&partial)
                });
            if continues {
                return Self {
                    question,
                    partial: Some(partial),
                    prefill,
                };
            }
        }
        Self {
            question: last_user_before(messages.len()),
            partial: None,
            prefill,
        }
    }

    /// The text of `deployment`'s answer: its canonical answer, or the rest of the answer the
    /// partial one began (first repeating its last `overlap` words, as models sometimes do).
    pub(crate) fn answer(
        &self,
        deployment: &str,
        deployments: &[String],
        overlap: usize,
    ) -> String {
        let Some(partial) = &self.partial else {
            return canonical(deployment, &self.question);
        };
        let whole = deployments
            .iter()
            .map(|d| canonical(d, &self.question))
            .find(|a| a.starts_with(partial.as_str()))
            .unwrap_or_else(|| canonical(deployment, &self.question));
        let words = words_with_spaces(partial);
        let repeated: String = words[words.len().saturating_sub(overlap)..].concat();
        format!("{repeated}{}", &whole[partial.len()..])
    }
}

impl Completion {
    /// The deterministic answer of `deployment` to `conversation`.
    pub fn new(
        deployment: &str,
        model: &str,
        messages: &[Value],
        conversation: &Conversation,
        deployments: &[String],
        overlap: usize,
        filtered: bool,
    ) -> Self {
        let answer = conversation.answer(deployment, deployments, overlap);
        let prompt_tokens = messages
            .iter()
            .map(|m| word_count(&content_text(m.get("content"))) + 3) // +3: per-message framing, as tiktoken counts it
            .sum::<u64>();
        Completion {
            id: format!("chatcmpl-{:016x}{:016x}", random_u64(), random_u64()),
            created: unix_now(),
            model: model.to_owned(),
            completion_tokens: word_count(&answer),
            content: (!filtered).then(|| answer.clone()),
            text: answer,
            finish_reason: if filtered { "content_filter" } else { "stop" },
            prompt_tokens,
        }
    }

    /// A 200 reply with the non-streaming `chat.completion` object and the remaining-quota headers.
    pub fn reply(&self, remaining_requests: u64, remaining_tokens: u64) -> Reply {
        let output_filter = match self.content {
            Some(_) => FilterResults::SAFE,
            None => FilterResults::VIOLENCE,
        };
        let body = ChatCompletion {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            system_fingerprint: "fp_emu",
            prompt_filter_results: [PromptFilter {
                prompt_index: 0,
                content_filter_results: FilterResults::SAFE,
            }],
            choices: [Choice {
                index: 0,
                finish_reason: self.finish_reason,
                logprobs: None,
                message: Message {
                    role: "assistant",
                    content: self.content.as_deref(),
                    refusal: None,
                },
                content_filter_results: output_filter,
            }],
            usage: self.usage(),
        };
        Reply::json(StatusCode::OK, &body)
            .header("x-ratelimit-remaining-requests", remaining_requests)
            .header("x-ratelimit-remaining-tokens", remaining_tokens)
    }

    /// The server-sent events of the streamed form (keys sorted, as Azure sends chunks). A filtered
    /// answer shows its first half, then a `content_filter` finish chunk.
    pub fn stream_events(&self, include_usage: bool) -> StreamEvents {
        let chunk = |choices: Value| {
            json!({
                "choices": choices,
                "created": self.created,
                "id": self.id,
                "model": self.model,
                "object": "chat.completion.chunk",
                "system_fingerprint": "fp_emu",
            })
        };
        let choice = |delta: Value, finish_reason: Option<&str>, filter: Value| {
            json!([{
                "content_filter_results": filter,
                "delta": delta,
                "finish_reason": finish_reason,
                "index": 0,
                "logprobs": null,
            }])
        };
        let words = words_with_spaces(&self.text);
        let (shown, finish_filter) = match self.content {
            Some(_) => (words.len(), json!({})),
            None => (words.len() / 2, json!(FilterResults::VIOLENCE)),
        };
        let usage = include_usage.then(|| {
            let mut usage = chunk(json!([]));
            usage["usage"] = json!(self.usage());
            event(&usage)
        });
        StreamEvents {
            opening: event(&json!({
                "choices": [],
                "created": 0,
                "id": "",
                "model": "",
                "object": "",
                "prompt_filter_results": [PromptFilter {
                    prompt_index: 0,
                    content_filter_results: FilterResults::SAFE,
                }],
            })),
            role: event(&chunk(choice(
                json!({"content": "", "refusal": null, "role": "assistant"}),
                None,
                json!({}),
            ))),
            content: words[..shown]
                .iter()
                .map(|word| {
                    let safe = json!(FilterResults::SAFE);
                    event(&chunk(choice(json!({ "content": word }), None, safe)))
                })
                .collect(),
            finish: event(&chunk(choice(
                json!({}),
                Some(self.finish_reason),
                finish_filter,
            ))),
            usage,
        }
    }

    /// A streamed tool call (`lookup` with JSON arguments) whose arguments stop after `after`
    /// pieces: the role chunk, then the pieces. The caller cuts the connection after them.
    pub fn tool_call_events(&self, after: usize) -> Vec<String> {
        let chunk = |delta: Value| {
            event(&json!({
                "choices": [{"delta": delta, "finish_reason": null, "index": 0, "logprobs": null}],
                "created": self.created,
                "id": self.id,
                "model": self.model,
                "object": "chat.completion.chunk",
                "system_fingerprint": "fp_emu",
            }))
        };
        let mut events = vec![chunk(
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_emu", "type": "function", "function": {"name": "lookup", "arguments": ""}}
            ]}),
        )];
        let arguments = format!(r#"{{"query": "{}"}}"#, self.text.replace('"', "'"));
        for piece in words_with_spaces(&arguments).into_iter().take(after) {
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
            ));
        }
        events
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
        }
    }
}

/// A streamed completion's events, each `data: <json>\n\n`, apart so behaviours can act between them.
pub(crate) struct StreamEvents {
    /// Azure's first event: empty `choices`, `id` and `model`, with `prompt_filter_results`.
    pub opening: String,
    pub role: String,
    /// One per word of the answer (with its following space).
    pub content: Vec<String>,
    pub finish: String,
    /// With `stream_options.include_usage`: empty `choices` and `usage`.
    pub usage: Option<String>,
}

pub(crate) const DONE: &str = "data: [DONE]\n\n";

/// `StreamError`: the error event a deployment sends when it fails mid-answer.
pub(crate) const STREAM_ERROR_EVENT: &str = "data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":\"server_error\"}}\n\n";

/// `StreamCorrupt`: an event that is not JSON, then one that is JSON but not a chunk.
pub(crate) const CORRUPT_EVENTS: [&str; 2] = [
    "data: {\"choices\":[{\"delta\":{\"content\": BROKEN\n\n",
    "data: {\"unexpected\":true}\n\n",
];

/// Azure's asynchronous-filter event: no `id`, only filter results for a span of the output.
pub(crate) fn async_filter_event() -> String {
    event(&json!({
        "choices": [{
            "index": 0,
            "finish_reason": null,
            "delta": {},
            "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 20},
            "content_filter_results": FilterResults::SAFE,
        }],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
    }))
}

fn event(data: &Value) -> String {
    format!("data: {data}\n\n")
}

// Wire structs: serde keeps declaration order, which is Azure's order.

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    prompt_filter_results: [PromptFilter; 1],
    choices: [Choice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct PromptFilter {
    prompt_index: u32,
    content_filter_results: FilterResults,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    finish_reason: &'a str,
    logprobs: Option<()>,
    message: Message<'a>,
    content_filter_results: FilterResults,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct FilterResults {
    hate: Severity,
    self_harm: Severity,
    sexual: Severity,
    violence: Severity,
}

impl FilterResults {
    const SAFE: FilterResults = FilterResults {
        hate: Severity::SAFE,
        self_harm: Severity::SAFE,
        sexual: Severity::SAFE,
        violence: Severity::SAFE,
    };
    /// What a filtered output reports.
    const VIOLENCE: FilterResults = FilterResults {
        violence: Severity::hit("medium"),
        ..FilterResults::SAFE
    };
}

#[derive(Serialize)]
struct Severity {
    filtered: bool,
    severity: &'static str,
}

impl Severity {
    const SAFE: Severity = Severity {
        filtered: false,
        severity: "safe",
    };

    const fn hit(severity: &'static str) -> Self {
        Severity {
            filtered: true,
            severity,
        }
    }
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct Envelope<T> {
    error: T,
}

#[derive(Serialize)]
struct GatewayError<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// Text of a message `content`: a string, or the `text` parts of an array of parts.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// `"a b  c"` -> `["a ", "b  ", "c"]`: each word with the whitespace after it.
pub(crate) fn words_with_spaces(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let (mut start, mut after_space) = (0, false);
    for (i, c) in text.char_indices() {
        if after_space && !c.is_whitespace() {
            words.push(&text[start..i]);
            start = i;
        }
        after_space = c.is_whitespace();
    }
    words.push(&text[start..]);
    words
}

pub(crate) fn word_count(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Azure's gateway envelope: `{"error":{"code":"...","message":"..."}}`.
pub(crate) fn gateway_error(status: StatusCode, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        &Envelope {
            error: GatewayError { code, message },
        },
    )
}

/// The OpenAI envelope: `{"error":{"message","type","param","code"}}`.
pub(crate) fn openai_error(
    status: StatusCode,
    message: &str,
    kind: Option<&str>,
    param: Option<&str>,
    code: Option<&str>,
) -> Reply {
    let error = OpenAiError {
        message,
        kind,
        param,
        code,
    };
    Reply::json(status, &Envelope { error })
}

pub(crate) fn resource_not_found() -> Reply {
    gateway_error(StatusCode::NOT_FOUND, "404", "Resource not found")
}

pub(crate) fn unauthorized() -> Reply {
    gateway_error(
        StatusCode::UNAUTHORIZED,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
    )
}

pub(crate) fn deployment_not_found() -> Reply {
    gateway_error(
        StatusCode::NOT_FOUND,
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
    )
}

pub(crate) fn bad_request(message: &str, param: &str) -> Reply {
    openai_error(
        StatusCode::BAD_REQUEST,
        message,
        Some("invalid_request_error"),
        Some(param),
        None,
    )
}

/// The reply for a behaviour that answers with an error, `None` for the others.
pub(crate) fn error_reply(behavior: &Behavior, api_version: Option<&str>) -> Option<Reply> {
    Some(match behavior {
        Behavior::Throttled(retry) => throttled(retry, api_version),
        Behavior::ServerError => openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request. Sorry about that!",
            Some("server_error"),
            None,
            None,
        ),
        Behavior::Unavailable => unavailable(),
        Behavior::UnavailableRetryAfter(secs) => unavailable().header("retry-after", secs),
        Behavior::RequestTimeout => gateway_error(
            StatusCode::REQUEST_TIMEOUT,
            "Timeout",
            "The operation was timeout.",
        ),
        Behavior::ContentFilter => content_filter(),
        Behavior::ContentPolicy => openai_error(
            StatusCode::BAD_REQUEST,
            "Your request was rejected as a result of our safety system. Your prompt may contain text that is not allowed by our safety system.",
            Some("invalid_request_error"),
            None,
            Some("content_policy_violation"),
        ),
        Behavior::ContextLengthExceeded => openai_error(
            StatusCode::BAD_REQUEST,
            "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens. Please reduce the length of the messages.",
            Some("invalid_request_error"),
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        Behavior::DeploymentNotFound => deployment_not_found(),
        Behavior::Unauthorized => unauthorized(),
        Behavior::Healthy
        | Behavior::OutputFiltered
        | Behavior::Hang
        | Behavior::ResetConnection
        | Behavior::StreamCut { .. }
        | Behavior::StreamStall { .. }
        | Behavior::StreamError { .. }
        | Behavior::StreamCorrupt { .. }
        | Behavior::StreamNoDone
        | Behavior::StreamSlowStart { .. }
        | Behavior::StreamAsyncFilter
        | Behavior::NoPrefill
        | Behavior::RefuseContinuation
        | Behavior::ContinueOverlap { .. }
        | Behavior::StreamToolCut { .. }
        | Behavior::Chaos(_) => {
            return None;
        }
    })
}

fn unavailable() -> Reply {
    gateway_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "503",
        "The service is temporarily unable to process your request. Please try again later.",
    )
}

fn throttled(retry: &RetryAfter, api_version: Option<&str>) -> Reply {
    let under = api_version
        .map(|v| format!(" under Azure OpenAI API version {v}"))
        .unwrap_or_default();
    let after = match retry.seconds() {
        Some(n) => format!(
            "Please retry after {n} second{}.",
            if n == 1 { "" } else { "s" }
        ),
        None => "Please retry after a while.".to_owned(),
    };
    let message = format!(
        "Requests to the ChatCompletions_Create Operation{under} have exceeded token rate limit of your current OpenAI S0 pricing tier. {after} Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
    );
    let reply = gateway_error(StatusCode::TOO_MANY_REQUESTS, "429", &message)
        .header("x-ratelimit-remaining-requests", 0);
    match *retry {
        RetryAfter::Milliseconds(ms) => reply
            .header("retry-after-ms", ms)
            .header("retry-after", ms.div_ceil(1000)),
        RetryAfter::Seconds(n) => reply.header("retry-after", n),
        RetryAfter::HttpDate(n) => reply.header(
            "retry-after",
            httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(n)),
        ),
        RetryAfter::ResetRequests(n) => reply.header("x-ratelimit-reset-requests", n),
        RetryAfter::ResetTokens(n) => reply.header("x-ratelimit-reset-tokens", n),
        RetryAfter::None => reply,
    }
}

fn content_filter() -> Reply {
    Reply {
        status: StatusCode::BAD_REQUEST,
        headers: Vec::new(),
        body: CONTENT_FILTER_BODY.to_owned(),
    }
}

/// Verbatim, as Azure sends it (note `type: null` and the extra `status`).
const CONTENT_FILTER_BODY: &str = r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"severity":"high"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}}}"#;

/// The model version Azure reports for a deployment named after a well-known model.
pub(crate) fn default_model_version(deployment: &str) -> String {
    let version = match deployment {
        "gpt-4o" => "gpt-4o-2024-08-06",
        "gpt-4o-mini" => "gpt-4o-mini-2024-07-18",
        "gpt-4" => "gpt-4-0613",
        "gpt-4.1" => "gpt-4.1-2025-04-14",
        "gpt-35-turbo" => "gpt-35-turbo-0125",
        other => other,
    };
    version.to_owned()
}

/// A random-looking UUID (v4 layout) for `x-request-id` / `apim-request-id`.
pub(crate) fn request_id() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// Unpredictable enough for ids, without a rand dependency: std's randomly keyed hasher over a counter.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
