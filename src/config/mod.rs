//! Environment -> typed [`Config`], read once at cold start. Every mistake is found here, with a
//! message that names the variable and says what to set. `Config` is data: the HTTP client, the
//! AWS SDK and the App are built from it in lib.rs.

pub mod clients;
pub mod keys;
mod pool;
mod reference;

use std::time::Duration;

use crate::error::ConfigError;
use crate::net::ExtraRoots;
use crate::pool::Auth;
use crate::pool::Pool;
use crate::secret::Secret;

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
pub const DEFAULT_CIRCUIT_FAILURES: u32 = 3;
/// Short, so a blip ends within seconds: a probe after a fast failure costs its caller
/// milliseconds.
pub const DEFAULT_CIRCUIT_OPEN_MS: u64 = 5_000;
/// While probes keep timing out, each opening doubles up to this.
pub const DEFAULT_CIRCUIT_MAX_OPEN_MS: u64 = 60_000;
pub const DEFAULT_HEALTH_REFRESH_MS: u64 = 1_000;
/// DynamoDB answers a GetItem in single-digit milliseconds in-region; this bounds what a slow
/// table can add to a request.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 50;
pub const DEFAULT_FIRST_TOKEN_TIMEOUT_MS: u64 = 6_000;
pub const DEFAULT_STREAM_IDLE_TIMEOUT_MS: u64 = 10_000;
/// A second break of the same answer is rare; a third, a sign to stop trying.
pub const DEFAULT_STREAM_CONTINUATIONS: u32 = 2;
/// Lambda's own request payload limit is 6 MB; a chat request is far smaller.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// The completion a request that sets no `max_tokens` is counted at until its usage is known.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 1_000;
/// How many execution environments share a limit when the table cannot say (each then spends
/// this share of every limit on its own).
pub const DEFAULT_LIMITS_ENVIRONMENTS: u64 = 10;
/// Below this many remaining tokens (as a deployment reports them), batch clients keep off it.
pub const DEFAULT_BATCH_RESERVE_TOKENS: u64 = 10_000;

/// How the named clients' limits are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    pub default_completion_tokens: u64,
    /// The execution environments expected to share a limit: each environment's share while
    /// the table is unavailable, and the size of its leases, are worked out from it.
    pub environments: u64,
    pub batch_reserve_tokens: u64,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Every deployment and the routes over them.
    pub pool: Pool,
    pub system_prompt: String,
    pub attempt_timeout: Duration,
    pub request_timeout: Duration,
    pub throttle_cooldown: Duration,
    /// Kept free before the Lambda deadline so the response can still be sent.
    pub deadline_margin: Duration,
    pub max_query_chars: usize,
    /// Consecutive failures (5xx, resets, timeouts) that open a deployment's circuit.
    pub circuit_failures: u32,
    /// How long an open circuit keeps a deployment out before one probe is let through.
    pub circuit_open: Duration,
    /// The longest an open circuit stays out while its probes keep timing out.
    pub circuit_max_open: Duration,
    /// A stream that has sent no content this long after its request is a failed attempt.
    pub first_token_timeout: Duration,
    /// A stream that sends nothing this long once it has started is cut.
    pub stream_idle_timeout: Duration,
    /// How many times, at most, a stream cut after its first content is continued on another
    /// deployment (0: never).
    pub stream_continuations: u32,
    /// Largest accepted request body on the OpenAI-compatible routes.
    pub max_body_bytes: usize,
    /// Run under Lambda response streaming (a Function URL with InvokeMode RESPONSE_STREAM)
    /// rather than returning one buffered response per invocation.
    pub response_streaming: bool,
    /// `CLIENT_API_KEYS` as given: keys separated by commas or newlines, or a reference to a
    /// Secrets Manager secret or SSM SecureString holding them.
    pub client_keys: Option<Secret>,
    /// The named clients (`FALLBACK_CLIENTS`): keys, limits, routes, priority.
    pub clients: Vec<clients::Client>,
    /// How the clients' limits are counted.
    pub limits: LimitSettings,
    /// What authenticates callers in front of the function, when something does:
    /// `iam` (Function URL with AWS_IAM) or `authorizer` (an API Gateway authorizer).
    pub auth_in_front: Option<&'static str>,
    /// The DynamoDB table the fleet shares its health in (`HEALTH_TABLE`), if any.
    pub health_table: Option<String>,
    /// How often, at most, an execution environment reads the shared health on the request path.
    pub health_refresh: Duration,
    /// The longest any call to the shared health table may take.
    pub health_timeout: Duration,
    /// CAs trusted beyond the compiled-in public roots (`EXTRA_CA_CERTS`, a PEM file, read and
    /// checked here); the HTTP client is built with them when the App is.
    pub extra_roots: ExtraRoots,
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

        let api_version = match get("AZURE_OPENAI_API_VERSION") {
            Some(v) if pool::is_api_version(&v) => v,
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
        let endpoint = get("AZURE_OPENAI_ENDPOINT")
            .map(|e| {
                pool::parse_endpoint(&e).map_err(|reason| ConfigError::Invalid {
                    var: "AZURE_OPENAI_ENDPOINT",
                    reason,
                })
            })
            .transpose()?;

        let entra = pool::EntraDefaults::from_vars(&get)?;
        let auth = pool::auth_from_vars(&get, &entra)?;
        let pool = match source(&get, "FALLBACK_POOL", "FALLBACK_POOL_FILE")? {
            Some((json, var)) => {
                if get("AZURE_OPENAI_DEPLOYMENTS").is_some() {
                    return Err(ConfigError::Invalid {
                        var: "AZURE_OPENAI_DEPLOYMENTS",
                        reason: format!(
                            "set either it or {var}, not both: list the deployments in the pool"
                        ),
                    });
                }
                let defaults = pool::Defaults {
                    endpoint,
                    api_version: &api_version,
                    auth: auth.clone(),
                    entra: entra.clone(),
                };
                pool::parse(&json, var, &defaults, &get)?
            }
            None => {
                let endpoint = endpoint.ok_or(ConfigError::Missing {
                    var: "AZURE_OPENAI_ENDPOINT",
                    hint: "set it to your resource URL, e.g. https://my-resource.openai.azure.com (or describe several in FALLBACK_POOL)",
                })?;
                let api_key = match (&auth, get("AZURE_OPENAI_API_KEY")) {
                    (Auth::Entra(_), _) => None,
                    (Auth::Key, Some(key)) => Some(Secret::new(key)),
                    (Auth::Key, None) => {
                        return Err(ConfigError::Missing {
                            var: "AZURE_OPENAI_API_KEY",
                            hint: "set it to one of the two keys under 'Keys and Endpoint' of your Azure OpenAI resource (or authenticate with Entra ID: AZURE_OPENAI_AUTH)",
                        });
                    }
                };
                let names = parse_deployments(
                    get("AZURE_OPENAI_DEPLOYMENTS")
                        .as_deref()
                        .unwrap_or(DEFAULT_DEPLOYMENTS),
                )?;
                pool::ordered(endpoint, api_key, auth, names, &api_version)
            }
        };

        let system_prompt = lookup("SYSTEM_PROMPT")
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_owned());
        let attempt_timeout = millis(&get, "ATTEMPT_TIMEOUT_MS", DEFAULT_ATTEMPT_TIMEOUT_MS)?;
        let request_timeout = millis(&get, "REQUEST_TIMEOUT_MS", DEFAULT_REQUEST_TIMEOUT_MS)?;
        let throttle_cooldown = millis(&get, "THROTTLE_COOLDOWN_MS", DEFAULT_THROTTLE_COOLDOWN_MS)?;
        let deadline_margin = millis(&get, "DEADLINE_MARGIN_MS", DEFAULT_DEADLINE_MARGIN_MS)?;
        let circuit_open = millis(&get, "CIRCUIT_OPEN_MS", DEFAULT_CIRCUIT_OPEN_MS)?;
        let circuit_max_open = millis(
            &get,
            "CIRCUIT_MAX_OPEN_MS",
            DEFAULT_CIRCUIT_MAX_OPEN_MS.max(circuit_open.as_millis() as u64),
        )?;
        if circuit_max_open < circuit_open {
            return Err(ConfigError::Invalid {
                var: "CIRCUIT_MAX_OPEN_MS",
                reason: format!(
                    "{} ms is shorter than CIRCUIT_OPEN_MS ({} ms); it is the longest an opening may grow to",
                    circuit_max_open.as_millis(),
                    circuit_open.as_millis()
                ),
            });
        }
        let health_table = get("HEALTH_TABLE")
            .map(|name| {
                table_name(&name)
                    .then_some(name)
                    .ok_or_else(|| ConfigError::Invalid {
                        var: "HEALTH_TABLE",
                        reason: "expected a DynamoDB table name (3-255 letters, digits, '_', '-', '.') or a table ARN".into(),
                    })
            })
            .transpose()?;
        let health_refresh = millis(&get, "HEALTH_REFRESH_MS", DEFAULT_HEALTH_REFRESH_MS)?;
        let health_timeout = millis(&get, "HEALTH_TIMEOUT_MS", DEFAULT_HEALTH_TIMEOUT_MS)?;
        let first_token_timeout = millis(
            &get,
            "FIRST_TOKEN_TIMEOUT_MS",
            DEFAULT_FIRST_TOKEN_TIMEOUT_MS,
        )?;
        let stream_idle_timeout = millis(
            &get,
            "STREAM_IDLE_TIMEOUT_MS",
            DEFAULT_STREAM_IDLE_TIMEOUT_MS,
        )?;
        let max_body_bytes = count(&get, "MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)?;
        let stream_continuations = match get("STREAM_CONTINUATIONS") {
            None => DEFAULT_STREAM_CONTINUATIONS,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= 10)
                .ok_or_else(|| ConfigError::Invalid {
                    var: "STREAM_CONTINUATIONS",
                    reason: format!(
                        "expected how many times a cut stream may be continued, 0 (never) to 10, got {v:?}"
                    ),
                })?,
        };
        let client_keys = get("CLIENT_API_KEYS").map(Secret::new);
        let clients = match source(&get, "FALLBACK_CLIENTS", "FALLBACK_CLIENTS_FILE")? {
            Some((json, var)) => clients::parse(&json, var, &pool, &get, &|r| {
                reference::reference(r).is_some()
            })?,
            None => Vec::new(),
        };
        let limits = LimitSettings {
            default_completion_tokens: count(
                &get,
                "LIMITS_DEFAULT_COMPLETION_TOKENS",
                DEFAULT_COMPLETION_TOKENS as usize,
            )? as u64,
            environments: count(
                &get,
                "LIMITS_ENVIRONMENTS",
                DEFAULT_LIMITS_ENVIRONMENTS as usize,
            )? as u64,
            batch_reserve_tokens: match get("BATCH_RESERVE_TOKENS") {
                Some(v) if v == "0" => 0,
                _ => count(
                    &get,
                    "BATCH_RESERVE_TOKENS",
                    DEFAULT_BATCH_RESERVE_TOKENS as usize,
                )? as u64,
            },
        };
        let auth_in_front = match get("AUTH_PROVIDED_BY").as_deref() {
            None => None,
            Some("iam") => Some("iam"),
            Some("authorizer") => Some("authorizer"),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    var: "AUTH_PROVIDED_BY",
                    reason: format!(
                        "{other:?}: expected \"iam\" (the Function URL uses AWS_IAM auth) or \"authorizer\" (an API Gateway authorizer)"
                    ),
                });
            }
        };
        if client_keys.is_none() && clients.is_empty() && auth_in_front.is_none() {
            return Err(ConfigError::Closed);
        }
        let response_streaming = match get("RESPONSE_MODE").as_deref() {
            None | Some("buffered") => false,
            Some("streaming") => true,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    var: "RESPONSE_MODE",
                    reason: format!(
                        "{other:?}: expected \"buffered\" (API Gateway, ALB) or \"streaming\" (Function URL with RESPONSE_STREAM)"
                    ),
                });
            }
        };
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
        let max_query_chars = count(&get, "MAX_QUERY_CHARS", DEFAULT_MAX_QUERY_CHARS)?;
        let circuit_failures = count(&get, "CIRCUIT_FAILURES", DEFAULT_CIRCUIT_FAILURES as usize)?;
        let extra_roots = match get("EXTRA_CA_CERTS") {
            None => ExtraRoots::default(),
            Some(path) => ExtraRoots::from_pem_file(std::path::Path::new(&path)).map_err(|e| {
                ConfigError::Invalid {
                    var: "EXTRA_CA_CERTS",
                    reason: format!("{e}; expected a PEM file of CA certificates to trust beyond the public roots"),
                }
            })?,
        };
        Ok(Self {
            pool,
            system_prompt,
            attempt_timeout,
            request_timeout,
            throttle_cooldown,
            deadline_margin,
            max_query_chars,
            circuit_failures: u32::try_from(circuit_failures).unwrap_or(u32::MAX),
            circuit_open,
            circuit_max_open,
            first_token_timeout,
            stream_idle_timeout,
            stream_continuations,
            max_body_bytes,
            response_streaming,
            client_keys,
            clients,
            limits,
            auth_in_front,
            health_table,
            health_refresh,
            health_timeout,
            extra_roots,
        })
    }
}

/// A DynamoDB table name, or a table's ARN.
fn table_name(name: &str) -> bool {
    let plain = |n: &str| {
        (3..=255).contains(&n.len())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    match name.strip_prefix("arn:") {
        Some(rest) => rest
            .split_once(":table/")
            .is_some_and(|(prefix, table)| prefix.contains(":dynamodb:") && plain(table)),
        None => plain(name),
    }
}

/// JSON from variable `var` or from the file `file_var` names, and the variable it came from,
/// if either is set (the pool's and the clients' configuration).
fn source(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    file_var: &'static str,
) -> Result<Option<(String, &'static str)>, ConfigError> {
    match (get(var), get(file_var)) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid {
            var: file_var,
            reason: format!("set either {var} or {file_var}, not both"),
        }),
        (Some(json), None) => Ok(Some((json, var))),
        (None, Some(path)) => {
            // A relative path is inside the deployment package, which Lambda unpacks at LAMBDA_TASK_ROOT.
            let full = match get("LAMBDA_TASK_ROOT") {
                Some(root) if std::path::Path::new(&path).is_relative() => format!("{root}/{path}"),
                _ => path,
            };
            std::fs::read_to_string(&full)
                .map(|json| Some((json, file_var)))
                .map_err(|e| ConfigError::Invalid {
                    var: file_var,
                    reason: format!("cannot read {full}: {e}"),
                })
        }
        (None, None) => Ok(None),
    }
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
        pool::check_deployment_name(name).map_err(invalid)?;
        if names.iter().any(|n| n == name) {
            return Err(invalid(format!("{name:?} is listed twice")));
        }
        names.push(name.to_owned());
    }
    Ok(names)
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

fn count(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    match get(var) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| ConfigError::Invalid {
                var,
                reason: format!("expected a positive whole number, got {v:?}"),
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

    const BASE: [(&str, &str); 3] = [
        ("AZURE_OPENAI_ENDPOINT", "https://res.openai.azure.com/"),
        ("AZURE_OPENAI_API_KEY", "sk-very-secret"),
        ("AUTH_PROVIDED_BY", "authorizer"),
    ];

    #[test]
    fn defaults_match_the_original_app_with_its_mistakes_fixed() {
        let c = config(&BASE).unwrap();
        let d = &c.pool.deployments;
        assert_eq!(d[0].endpoint, "https://res.openai.azure.com");
        let ids: Vec<&str> = d.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["gpt-4o", "gpt-35-turbo"]);
        assert!(
            d[0].url("chat/completions")
                .ends_with("?api-version=2024-10-21")
        );
        assert_eq!(c.system_prompt, "You are a helpful assistant.");
        assert_eq!(c.max_query_chars, 4000);
        assert!(c.attempt_timeout <= c.request_timeout);
    }

    #[test]
    fn missing_or_malformed_variables_are_named() {
        let err =
            config(&[("AZURE_OPENAI_API_KEY", "k"), ("AUTH_PROVIDED_BY", "iam")]).unwrap_err();
        assert!(err.to_string().contains("AZURE_OPENAI_ENDPOINT"), "{err}");

        let err = config(&[
            ("AZURE_OPENAI_ENDPOINT", "https://x.openai.azure.com"),
            ("AUTH_PROVIDED_BY", "iam"),
        ])
        .unwrap_err();
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
            ("CIRCUIT_FAILURES", "0"),
            ("FALLBACK_POOL", "[]"),
            ("FALLBACK_POOL_FILE", "/no/such/pool.json"),
            ("AUTH_PROVIDED_BY", "nobody"),
            ("HEALTH_TABLE", "no spaces allowed"),
            ("HEALTH_TABLE", "arn:aws:s3:::bucket"),
            ("HEALTH_REFRESH_MS", "0"),
            ("CIRCUIT_MAX_OPEN_MS", "1000"),
            ("STREAM_CONTINUATIONS", "-1"),
            ("STREAM_CONTINUATIONS", "many"),
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
    fn an_open_configuration_is_refused_with_what_to_set() {
        let err = config(&BASE[..2]).unwrap_err().to_string();
        for needed in ["closed by default", "CLIENT_API_KEYS", "AUTH_PROVIDED_BY"] {
            assert!(err.contains(needed), "{err}");
        }
        let mut vars = BASE[..2].to_vec();
        vars.push(("CLIENT_API_KEYS", "a-client-key-of-some-length"));
        assert!(config(&vars).unwrap().client_keys.is_some());
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let c = config(&BASE).unwrap();
        assert!(!format!("{c:?}").contains("sk-very-secret"));
    }

    #[test]
    fn api_versions_accept_ga_and_preview_dates() {
        for ok in ["2024-10-21", "2025-04-01-preview"] {
            assert!(pool::is_api_version(ok), "{ok}");
        }
        for bad in ["2024-10", "v1", "2024-10-21-beta", "20241021xx"] {
            assert!(!pool::is_api_version(bad), "{bad}");
        }
    }

    #[test]
    fn a_pool_replaces_the_deployment_list_and_may_come_from_a_file() {
        let json = r#"{"deployments":[{"deployment":"gpt-4o"},{"id":"west","deployment":"gpt-4o","endpoint":"https://west.openai.azure.com"}]}"#;
        let mut vars = BASE.to_vec();
        vars.push(("FALLBACK_POOL", json));
        let c = config(&vars).unwrap();
        assert_eq!(c.pool.deployments.len(), 2);
        assert_eq!(
            c.pool.deployments[0].endpoint,
            "https://res.openai.azure.com"
        );

        vars.push(("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o"));
        let err = config(&vars).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");

        let dir = std::env::temp_dir().join(format!("fallback-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pool.json"), json).unwrap();
        let root = dir.to_string_lossy().into_owned();
        let mut vars = BASE.to_vec();
        vars.push(("FALLBACK_POOL_FILE", "pool.json"));
        vars.push(("LAMBDA_TASK_ROOT", &root));
        assert_eq!(config(&vars).unwrap().pool.deployments[1].id, "west");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
