//! Environment -> typed [`Config`], read once at cold start. Every mistake is found here, with a
//! message that names the variable and says what to set.

use std::fmt;
use std::time::Duration;

use reqwest::Url;

use crate::error::ConfigError;

pub const DEFAULT_DEPLOYMENTS: &str = "gpt-4o,gpt-35-turbo";
/// Latest GA data-plane version (see the protocol notes); dated previews also work.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";
pub const DEFAULT_ATTEMPT_TIMEOUT_MS: u64 = 10_000;
/// API Gateway gives up at 29-30 s, so the whole request must be done well before.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 25_000;
pub const DEFAULT_THROTTLE_COOLDOWN_MS: u64 = 10_000;
pub const DEFAULT_DEADLINE_MARGIN_MS: u64 = 500;
/// About 1,000 tokens of English: a chat question, not a document.
pub const DEFAULT_MAX_QUERY_CHARS: usize = 4_000;

/// The Azure key: kept out of `Debug`/`Display` so it cannot leak through a log line or error.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Resource URL without a trailing slash, e.g. `https://my-resource.openai.azure.com`.
    pub endpoint: String,
    pub api_key: Secret,
    /// Deployment names in fallback order.
    pub deployments: Vec<String>,
    pub api_version: String,
    pub system_prompt: String,
    pub attempt_timeout: Duration,
    pub request_timeout: Duration,
    pub throttle_cooldown: Duration,
    /// Kept free before the Lambda deadline so the response can still be sent.
    pub deadline_margin: Duration,
    pub max_query_chars: usize,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads every setting through `lookup`, so tests need not touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };

        let endpoint = parse_endpoint(get("AZURE_OPENAI_ENDPOINT"))?;
        let api_key = get("AZURE_OPENAI_API_KEY")
            .map(Secret)
            .ok_or(ConfigError::Missing {
                var: "AZURE_OPENAI_API_KEY",
                hint: "set it to one of the two keys under 'Keys and Endpoint' of your Azure OpenAI resource",
            })?;
        let deployments = parse_deployments(
            get("AZURE_OPENAI_DEPLOYMENTS")
                .as_deref()
                .unwrap_or(DEFAULT_DEPLOYMENTS),
        )?;
        let api_version = match get("AZURE_OPENAI_API_VERSION") {
            Some(v) if is_api_version(&v) => v,
            Some(_) => {
                return Err(ConfigError::Invalid {
                    var: "AZURE_OPENAI_API_VERSION",
                    reason: format!(
                        "expected a date such as {DEFAULT_API_VERSION} or 2025-04-01-preview"
                    ),
                });
            }
            None => DEFAULT_API_VERSION.to_owned(),
        };
        let system_prompt = lookup("SYSTEM_PROMPT")
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_owned());

        let attempt_timeout = millis(&get, "ATTEMPT_TIMEOUT_MS", DEFAULT_ATTEMPT_TIMEOUT_MS)?;
        let request_timeout = millis(&get, "REQUEST_TIMEOUT_MS", DEFAULT_REQUEST_TIMEOUT_MS)?;
        let throttle_cooldown = millis(&get, "THROTTLE_COOLDOWN_MS", DEFAULT_THROTTLE_COOLDOWN_MS)?;
        let deadline_margin = millis(&get, "DEADLINE_MARGIN_MS", DEFAULT_DEADLINE_MARGIN_MS)?;
        if attempt_timeout > request_timeout {
            return Err(ConfigError::Invalid {
                var: "ATTEMPT_TIMEOUT_MS",
                reason: format!(
                    "{} ms is longer than REQUEST_TIMEOUT_MS ({} ms); one attempt cannot outlast the whole request",
                    attempt_timeout.as_millis(),
                    request_timeout.as_millis()
                ),
            });
        }
        let max_query_chars =
            match get("MAX_QUERY_CHARS") {
                None => DEFAULT_MAX_QUERY_CHARS,
                Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ConfigError::Invalid {
                        var: "MAX_QUERY_CHARS",
                        reason: format!("expected a positive whole number, got {v:?}"),
                    }
                })?,
            };

        Ok(Self {
            endpoint,
            api_key,
            deployments,
            api_version,
            system_prompt,
            attempt_timeout,
            request_timeout,
            throttle_cooldown,
            deadline_margin,
            max_query_chars,
        })
    }
}

fn parse_endpoint(value: Option<String>) -> Result<String, ConfigError> {
    let value = value.ok_or(ConfigError::Missing {
        var: "AZURE_OPENAI_ENDPOINT",
        hint: "set it to your resource URL, e.g. https://my-resource.openai.azure.com",
    })?;
    let invalid = |reason: String| ConfigError::Invalid {
        var: "AZURE_OPENAI_ENDPOINT",
        reason,
    };
    let url = Url::parse(&value).map_err(|e| {
        invalid(format!(
            "{e}; expected e.g. https://my-resource.openai.azure.com"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(
            "expected an http(s) URL such as https://my-resource.openai.azure.com".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            "must not carry a query or fragment; give the resource URL only".into(),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "must not embed credentials; put the key in AZURE_OPENAI_API_KEY".into(),
        ));
    }
    let mut base = url.as_str().trim_end_matches('/').to_owned();
    // A pasted ".../openai" suffix would double the path segment.
    if let Some(stripped) = base.strip_suffix("/openai") {
        base = stripped.to_owned();
    }
    Ok(base)
}

fn parse_deployments(list: &str) -> Result<Vec<String>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        var: "AZURE_OPENAI_DEPLOYMENTS",
        reason,
    };
    let mut names: Vec<String> = Vec::new();
    for name in list.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(invalid(format!(
                "empty name in {list:?}; expected a comma-separated list such as {DEFAULT_DEPLOYMENTS}"
            )));
        }
        // Azure deployment names: letters, digits, '-', '_' and '.', up to 64 characters.
        if name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(format!(
                "{name:?} is not a deployment name (letters, digits, '-', '_', '.', at most 64)"
            )));
        }
        if names.iter().any(|n| n == name) {
            return Err(invalid(format!("{name:?} is listed twice")));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

fn is_api_version(v: &str) -> bool {
    let (date, suffix) = v.split_at(v.len().min(10));
    let b = date.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
        && (suffix.is_empty() || suffix == "-preview")
}

fn millis(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: u64,
) -> Result<Duration, ConfigError> {
    match get(var) {
        None => Ok(Duration::from_millis(default)),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|ms| (1..=900_000).contains(ms))
            .map(Duration::from_millis)
            .ok_or_else(|| ConfigError::Invalid {
                var,
                reason: format!(
                    "expected milliseconds between 1 and 900000 (Lambda's 15-minute limit), got {v:?}"
                ),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    const BASE: [(&str, &str); 2] = [
        ("AZURE_OPENAI_ENDPOINT", "https://res.openai.azure.com/"),
        ("AZURE_OPENAI_API_KEY", "sk-very-secret"),
    ];

    #[test]
    fn defaults_match_the_original_app_with_its_mistakes_fixed() {
        let c = config(&BASE).unwrap();
        assert_eq!(c.endpoint, "https://res.openai.azure.com");
        assert_eq!(c.deployments, ["gpt-4o", "gpt-35-turbo"]);
        assert_eq!(c.api_version, "2024-10-21");
        assert_eq!(c.system_prompt, "You are a helpful assistant.");
        assert_eq!(c.max_query_chars, 4000);
        assert!(c.attempt_timeout <= c.request_timeout);
    }

    #[test]
    fn missing_or_malformed_variables_are_named() {
        let err = config(&[("AZURE_OPENAI_API_KEY", "k")]).unwrap_err();
        assert!(err.to_string().contains("AZURE_OPENAI_ENDPOINT"), "{err}");

        let err = config(&[("AZURE_OPENAI_ENDPOINT", "https://x.openai.azure.com")]).unwrap_err();
        assert!(err.to_string().contains("AZURE_OPENAI_API_KEY"), "{err}");

        for (var, value) in [
            ("AZURE_OPENAI_ENDPOINT", "not a url"),
            ("AZURE_OPENAI_ENDPOINT", "ftp://x"),
            ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o,,x"),
            ("AZURE_OPENAI_DEPLOYMENTS", "gpt 4o"),
            ("AZURE_OPENAI_DEPLOYMENTS", "a,a"),
            ("AZURE_OPENAI_API_VERSION", "latest"),
            ("ATTEMPT_TIMEOUT_MS", "ten"),
            ("REQUEST_TIMEOUT_MS", "0"),
            ("THROTTLE_COOLDOWN_MS", "-5"),
            ("MAX_QUERY_CHARS", "0"),
            ("ATTEMPT_TIMEOUT_MS", "60000"),
        ] {
            let mut vars = BASE.to_vec();
            vars.push((var, value));
            let err = config(&vars).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
            assert!(!err.contains("sk-very-secret"), "{err}");
        }
    }

    #[test]
    fn endpoint_with_embedded_credentials_is_refused_without_echoing_them() {
        let mut vars = BASE.to_vec();
        vars[0] = (
            "AZURE_OPENAI_ENDPOINT",
            "https://user:hunter2@x.openai.azure.com",
        );
        let err = config(&vars).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let c = config(&BASE).unwrap();
        assert!(!format!("{c:?}").contains("sk-very-secret"));
    }

    #[test]
    fn api_versions_accept_ga_and_preview_dates() {
        for ok in ["2024-10-21", "2025-04-01-preview"] {
            assert!(is_api_version(ok), "{ok}");
        }
        for bad in ["2024-10", "v1", "2024-10-21-beta", "20241021xx"] {
            assert!(!is_api_version(bad), "{bad}");
        }
    }
}
