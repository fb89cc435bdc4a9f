//! The errors of this crate. Their mapping to HTTP statuses lives in `api.rs`.

use crate::azure::ContentFilter;
use crate::failover::Exhausted;

/// A configuration mistake found at cold start. Never carries a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set: {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
    /// A key variable whose name comes from the configuration (a pool entry's `key_env`).
    #[error("{var} is invalid: {reason}")]
    InvalidKey { var: String, reason: String },
    #[error(
        "fallback-chat is closed by default and nothing authenticates its callers: set CLIENT_API_KEYS to one or more client keys (comma-separated, at least 16 characters each, or a Secrets Manager ARN / ssm: reference holding them), or, if IAM auth on the Function URL or an API Gateway authorizer already authenticates callers, set AUTH_PROVIDED_BY=iam or AUTH_PROVIDED_BY=authorizer"
    )]
    Closed,
    #[error("could not build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// Why one request was not answered with a completion.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("Missing query: call GET /?query=<your question>.")]
    MissingQuery,
    #[error("The query is {chars} characters long; the limit is {max}.")]
    QueryTooLong { chars: usize, max: usize },
    #[error("No route for {path}: call GET /?query=<your question>.")]
    NotFound { path: String },
    #[error("Method {method} is not allowed on {path}; use GET.")]
    MethodNotAllowed { method: String, path: String },
    #[error("Azure OpenAI's content filter blocked the {}.", .filter.target)]
    ContentFiltered {
        deployment: String,
        filter: ContentFilter,
    },
    #[error("All models are currently unavailable.")]
    Unavailable(Exhausted),
}
