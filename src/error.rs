//! Why the function cannot start. Every message names the variable to fix and never carries a
//! secret's value. Imports nothing from the crate.

/// A configuration mistake found at cold start.
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
    HttpClient(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ConfigError {
    /// The `errorType` reported to the Lambda Runtime API's init-error endpoint.
    pub fn error_type(&self) -> &'static str {
        match self {
            ConfigError::Missing { .. } => "ConfigError.Missing",
            ConfigError::Invalid { .. } | ConfigError::InvalidKey { .. } => "ConfigError.Invalid",
            ConfigError::Closed => "ConfigError.Closed",
            ConfigError::HttpClient(_) => "ConfigError.HttpClient",
        }
    }
}
