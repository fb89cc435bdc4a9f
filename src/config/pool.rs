//! Reads the deployment pool: JSON in `FALLBACK_POOL` (or a file named by `FALLBACK_POOL_FILE`),
//! or the simple `AZURE_OPENAI_*` variables, which build a pool of one endpoint in a fixed order.
//! Every mistake is named with its entry and field.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use url::Url;

use crate::error::ConfigError;
use crate::pool::{ApiStyle, Auth, Deployment, EntraApp, EntraCredential, Pool, Route, Serves};
use crate::secret::Secret;

/// Defaults the pool's entries inherit from the simple variables.
pub struct Defaults<'a> {
    pub endpoint: Option<String>,
    pub api_version: &'a str,
    /// `AZURE_OPENAI_AUTH` and the Entra variables, when they choose Entra ID.
    pub auth: Auth,
    /// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_AUTHORITY_HOST`, `AZURE_OPENAI_SCOPE`,
    /// `AZURE_FEDERATION_AUDIENCE`: what an entry's `auth` leaves out.
    pub entra: EntraDefaults,
}

/// The Entra ID settings read from the simple variables.
#[derive(Debug, Clone, Default)]
pub struct EntraDefaults {
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    pub authority: String,
    pub scope: String,
    pub audience: String,
}

/// Entra ID's public cloud (Azure's SDKs name the variable that changes it `AZURE_AUTHORITY_HOST`).
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// Azure OpenAI's token scope.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
/// The audience Entra ID expects in a federated credential's assertion.
pub const DEFAULT_FEDERATION_AUDIENCE: &str = "api://AzureADTokenExchange";

impl EntraDefaults {
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let authority = match get("AZURE_AUTHORITY_HOST") {
            None => DEFAULT_AUTHORITY_HOST.to_owned(),
            Some(host) => parse_endpoint(&host).map_err(|reason| ConfigError::Invalid {
                var: "AZURE_AUTHORITY_HOST",
                reason,
            })?,
        };
        Ok(Self {
            tenant: get("AZURE_TENANT_ID"),
            client_id: get("AZURE_CLIENT_ID"),
            authority,
            scope: get("AZURE_OPENAI_SCOPE").unwrap_or_else(|| DEFAULT_SCOPE.to_owned()),
            audience: get("AZURE_FEDERATION_AUDIENCE")
                .unwrap_or_else(|| DEFAULT_FEDERATION_AUDIENCE.to_owned()),
        })
    }

    /// The app `credential` names (`aws_federation` or `client_secret`, its secret in
    /// `secret_var`), with `tenant`/`client_id` given or these defaults; `at` words errors.
    fn app(
        &self,
        spec: &AuthSpec,
        lookup: &dyn Fn(&str) -> Option<String>,
        at: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<EntraApp, ConfigError> {
        let tenant = spec
            .tenant_id
            .clone()
            .or_else(|| self.tenant.clone())
            .ok_or_else(|| at("auth.tenant_id", "missing (and AZURE_TENANT_ID is not set): the directory (tenant) ID of the app registration".into()))?;
        let client_id = spec
            .client_id
            .clone()
            .or_else(|| self.client_id.clone())
            .ok_or_else(|| at("auth.client_id", "missing (and AZURE_CLIENT_ID is not set): the application (client) ID of the app registration".into()))?;
        for (field, value) in [("auth.tenant_id", &tenant), ("auth.client_id", &client_id)] {
            if !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
                || value.is_empty()
            {
                return Err(at(
                    field,
                    format!("{value:?} is not an ID (a GUID) or a domain"),
                ));
            }
        }
        let credential = match spec.credential.as_deref() {
            Some("aws_federation") => EntraCredential::AwsFederation {
                audience: spec
                    .audience
                    .clone()
                    .unwrap_or_else(|| self.audience.clone()),
            },
            Some("client_secret") => {
                let var = spec
                    .client_secret_env
                    .clone()
                    .unwrap_or_else(|| "AZURE_CLIENT_SECRET".to_owned());
                let secret = lookup(&var)
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        at(
                            "auth.client_secret_env",
                            format!("the variable {var} it names is not set"),
                        )
                    })?;
                EntraCredential::ClientSecret {
                    secret: Secret::new(secret),
                    var,
                }
            }
            other => {
                return Err(at(
                    "auth.credential",
                    format!(
                        "{}: expected \"aws_federation\" (the function's AWS role, no secret) or \"client_secret\"",
                        other.map_or("missing".to_owned(), |o| format!("{o:?}"))
                    ),
                ));
            }
        };
        let authority = match &spec.authority_host {
            Some(host) => parse_endpoint(host).map_err(|r| at("auth.authority_host", r))?,
            None => self.authority.clone(),
        };
        Ok(EntraApp {
            authority,
            tenant,
            client_id,
            scope: spec.scope.clone().unwrap_or_else(|| self.scope.clone()),
            credential,
        })
    }
}

/// How a pool entry authenticates: `{"type": "key"}` (the default) or `{"type": "entra",
/// "credential": "aws_federation" | "client_secret", ...}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthSpec {
    #[serde(rename = "type")]
    kind: Option<String>,
    tenant_id: Option<String>,
    client_id: Option<String>,
    credential: Option<String>,
    client_secret_env: Option<String>,
    audience: Option<String>,
    scope: Option<String>,
    authority_host: Option<String>,
}

/// `AZURE_OPENAI_AUTH` (`key`, `aws_federation` or `client_secret`) and the Entra variables:
/// how the simple variables' deployments (and pool entries that say nothing) authenticate.
pub fn auth_from_vars(
    get: &dyn Fn(&str) -> Option<String>,
    entra: &EntraDefaults,
) -> Result<Auth, ConfigError> {
    let credential = match get("AZURE_OPENAI_AUTH").as_deref() {
        None | Some("key") => return Ok(Auth::Key),
        Some(c @ ("aws_federation" | "client_secret")) => c.to_owned(),
        Some(other) => {
            return Err(ConfigError::Invalid {
                var: "AZURE_OPENAI_AUTH",
                reason: format!(
                    "{other:?}: expected \"key\" (the default), \"aws_federation\" (Entra ID through the function's AWS role) or \"client_secret\" (Entra ID with AZURE_CLIENT_SECRET)"
                ),
            });
        }
    };
    let spec = AuthSpec {
        kind: Some("entra".into()),
        credential: Some(credential),
        ..AuthSpec::default()
    };
    let var_of = |field: &str| match field {
        "auth.tenant_id" => "AZURE_TENANT_ID",
        "auth.client_id" => "AZURE_CLIENT_ID",
        "auth.client_secret_env" => "AZURE_CLIENT_SECRET",
        _ => "AZURE_OPENAI_AUTH",
    };
    let at = |field: &str, reason: String| ConfigError::Invalid {
        var: var_of(field),
        reason,
    };
    Ok(Auth::Entra(entra.app(&spec, get, &at)?))
}

/// One deployment in the pool JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntrySpec {
    id: Option<String>,
    endpoint: Option<String>,
    deployment: String,
    key_env: Option<String>,
    api: Option<String>,
    api_version: Option<String>,
    priority: Option<u32>,
    weight: Option<f64>,
    context_window: Option<u32>,
    embeddings: Option<EmbeddingsSpec>,
    auth: Option<AuthSpec>,
}

/// An embeddings deployment's model and vector size: `{"model": "text-embedding-3-small",
/// "dimensions": 1536}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsSpec {
    model: String,
    dimensions: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSpec {
    deployments: Vec<EntrySpec>,
    #[serde(default)]
    routes: BTreeMap<String, Vec<String>>,
    default_route: Option<String>,
}

/// The key variable an entry uses when it names none.
pub const DEFAULT_KEY_ENV: &str = "AZURE_OPENAI_API_KEY";

/// Parses and validates the pool JSON. `var` names where it came from, for error messages;
/// `lookup` reads the key variables the entries name.
pub fn parse(
    json: &str,
    var: &'static str,
    defaults: &Defaults<'_>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Pool, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { var, reason };
    let spec: PoolSpec = serde_json::from_str(json).map_err(|e| {
        let hint = if e.to_string().contains("unknown field `key") {
            " (keys are never written inline: name the variable that holds it with \"key_env\")"
        } else {
            ""
        };
        invalid(format!("{e}{hint}"))
    })?;
    if spec.deployments.is_empty() {
        return Err(invalid("\"deployments\" is empty".into()));
    }

    let mut deployments = Vec::with_capacity(spec.deployments.len());
    for (i, entry) in spec.deployments.into_iter().enumerate() {
        let at =
            |field: &str, reason: String| invalid(format!("deployments[{i}].{field}: {reason}"));
        check_deployment_name(&entry.deployment).map_err(|r| at("deployment", r))?;
        let endpoint = entry
            .endpoint
            .or_else(|| defaults.endpoint.clone())
            .ok_or_else(|| {
                at(
                    "endpoint",
                    "missing (and AZURE_OPENAI_ENDPOINT is not set)".into(),
                )
            })
            .and_then(|e| parse_endpoint(&e).map_err(|r| at("endpoint", r)))?;
        let api = match entry.api.as_deref() {
            None | Some("classic") => ApiStyle::Classic {
                api_version: match entry.api_version {
                    Some(v) if is_api_version(&v) => v,
                    Some(v) => {
                        return Err(at(
                            "api_version",
                            format!("{v:?} is not a date such as 2024-10-21"),
                        ));
                    }
                    None => defaults.api_version.to_owned(),
                },
            },
            Some("v1") if entry.api_version.is_some() => {
                return Err(at(
                    "api_version",
                    "v1 takes no api-version; remove it".into(),
                ));
            }
            Some("v1") => ApiStyle::V1,
            Some(other) => {
                return Err(at(
                    "api",
                    format!("{other:?}: expected \"classic\" or \"v1\""),
                ));
            }
        };
        let auth = match &entry.auth {
            None => defaults.auth.clone(),
            Some(spec) => match spec.kind.as_deref() {
                Some("key") => Auth::Key,
                Some("entra") => Auth::Entra(defaults.entra.app(spec, lookup, &at)?),
                other => {
                    return Err(at(
                        "auth.type",
                        format!(
                            "{}: expected \"key\" or \"entra\"",
                            other.map_or("missing".to_owned(), |o| format!("{o:?}"))
                        ),
                    ));
                }
            },
        };
        let entra = matches!(auth, Auth::Entra(_));
        if entra && entry.key_env.is_some() {
            return Err(at(
                "key_env",
                "an entry that authenticates with Entra ID sends no key; remove key_env".into(),
            ));
        }
        let key_env = entry.key_env.unwrap_or_else(|| DEFAULT_KEY_ENV.to_owned());
        let key = lookup(&key_env)
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .filter(|_| !entra);
        if key.is_none() && !entra && matches!(api, ApiStyle::Classic { .. }) {
            return Err(at(
                "key_env",
                format!("the variable {key_env} it names is not set"),
            ));
        }
        let weight = entry.weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight > 0.0) {
            return Err(at("weight", format!("{weight} is not a positive number")));
        }
        if entry.context_window == Some(0) {
            return Err(at(
                "context_window",
                "must be a positive number of tokens".into(),
            ));
        }
        let serves = match entry.embeddings {
            None => Serves::Generation,
            Some(e) if e.model.trim().is_empty() => {
                return Err(at(
                    "embeddings.model",
                    "must name the embedding model".into(),
                ));
            }
            Some(e) if e.dimensions == 0 => {
                return Err(at(
                    "embeddings.dimensions",
                    "must be the positive number of dimensions its vectors have".into(),
                ));
            }
            Some(e) => Serves::Embeddings {
                model: e.model.trim().to_owned(),
                dimensions: e.dimensions,
            },
        };
        deployments.push(Deployment {
            id: entry.id.unwrap_or_else(|| entry.deployment.clone()),
            endpoint,
            deployment: entry.deployment,
            key: key.map(Secret::new),
            key_var: key_env,
            api,
            priority: entry.priority.unwrap_or(0),
            weight,
            context_window: entry.context_window,
            serves,
            auth,
        });
    }

    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, d) in deployments.iter().enumerate() {
        if let Some(first) = index.insert(&d.id, i) {
            return Err(invalid(format!(
                "deployments[{first}] and deployments[{i}] are both called {:?}; give each a distinct \"id\"",
                d.id
            )));
        }
    }

    let mut routes = Vec::new();
    let open_routes = spec.routes.is_empty();
    if open_routes {
        let members: Vec<usize> = (0..deployments.len()).collect();
        let serves = agreed(&deployments, &members).map_err(|(a, b)| {
            invalid(format!(
                "deployments {:?} and {:?} serve different things ({} and {}): name \"routes\" that keep them apart",
                deployments[a].id,
                deployments[b].id,
                deployments[a].serves.describe(),
                deployments[b].serves.describe(),
            ))
        })?;
        routes.push(Route {
            name: "default".into(),
            members,
            serves,
            reserve: None,
        });
    }
    for (name, ids) in &spec.routes {
        if ids.is_empty() {
            return Err(invalid(format!("routes.{name} lists no deployments")));
        }
        let members = ids
            .iter()
            .map(|id| {
                index.get(id.as_str()).copied().ok_or_else(|| {
                    invalid(format!(
                        "routes.{name} names {id:?}, which is not a deployment id"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let serves = agreed(&deployments, &members).map_err(|(a, b)| {
            invalid(format!(
                "routes.{name} mixes {:?}, which serves {}, with {:?}, which serves {}: a route fails over only between deployments that give the same kind of answer (embeddings: the same model and dimensions)",
                deployments[a].id,
                deployments[a].serves.describe(),
                deployments[b].id,
                deployments[b].serves.describe(),
            ))
        })?;
        routes.push(Route {
            name: name.clone(),
            members,
            serves,
            reserve: None,
        });
    }
    let default_route = match &spec.default_route {
        Some(name) => routes
            .iter()
            .position(|r| &r.name == name)
            .ok_or_else(|| invalid(format!("default_route {name:?} is not one of the routes")))?,
        None if routes.len() == 1 => 0,
        None => routes
            .iter()
            .position(|r| r.name == "default")
            .ok_or_else(|| {
                invalid(
                    "several routes and no \"default_route\": name the one GET /?query= uses"
                        .into(),
                )
            })?,
    };

    if routes[default_route].serves != Serves::Generation {
        return Err(invalid(format!(
            "the default route {:?} serves embeddings; GET /?query= needs a chat route: set \"default_route\"",
            routes[default_route].name
        )));
    }

    Ok(Pool {
        deployments,
        routes,
        default_route,
        open_routes,
    })
}

/// What every member of a route serves, or the first two that disagree.
fn agreed(deployments: &[Deployment], members: &[usize]) -> Result<Serves, (usize, usize)> {
    let first = members[0];
    let serves = &deployments[first].serves;
    match members.iter().find(|&&i| &deployments[i].serves != serves) {
        Some(&other) => Err((first, other)),
        None => Ok(serves.clone()),
    }
}

/// The simple variables' pool: one endpoint, the deployments tried strictly in the given order,
/// each with `key` (or, with Entra ID, none).
pub fn ordered(
    endpoint: String,
    key: Option<Secret>,
    auth: Auth,
    names: Vec<String>,
    api_version: &str,
) -> Pool {
    let deployments = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| Deployment {
            id: name.clone(),
            endpoint: endpoint.clone(),
            deployment: name,
            key: key.clone(),
            key_var: DEFAULT_KEY_ENV.to_owned(),
            api: ApiStyle::Classic {
                api_version: api_version.to_owned(),
            },
            priority: i as u32,
            weight: 1.0,
            context_window: None,
            serves: Serves::Generation,
            auth: auth.clone(),
        })
        .collect::<Vec<_>>();
    let members = (0..deployments.len()).collect();
    Pool {
        deployments,
        routes: vec![Route {
            name: "default".into(),
            members,
            serves: Serves::Generation,
            reserve: None,
        }],
        default_route: 0,
        open_routes: true,
    }
}

/// A base URL: http(s), a host, no query, fragment or credentials. Returned without trailing slash.
pub fn parse_endpoint(value: &str) -> Result<String, String> {
    let url = Url::parse(value)
        .map_err(|e| format!("{e}; expected e.g. https://my-resource.openai.azure.com"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("expected an http(s) URL such as https://my-resource.openai.azure.com".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not carry a query or fragment; give the resource URL only".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not embed credentials; keys go in their own variable".into());
    }
    let base = url.as_str().trim_end_matches('/');
    // A pasted ".../openai" suffix would double the path segment.
    Ok(base.strip_suffix("/openai").unwrap_or(base).to_owned())
}

/// Azure deployment names: letters, digits, '-', '_' and '.', up to 64 characters. v1 servers
/// use model names such as `llama3.1:8b` or `org/model`, so ':' and '/' pass too.
pub fn check_deployment_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a deployment name (letters, digits, '-', '_', '.', ':', '/')"
        ))
    }
}

pub fn is_api_version(v: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "KEY_EAST" => Some("east-secret".into()),
            "KEY_WEST" => Some("west-secret".into()),
            "AZURE_OPENAI_API_KEY" => Some("default-secret".into()),
            _ => None,
        }
    }

    fn pool(json: &str) -> Result<Pool, String> {
        let defaults = Defaults {
            endpoint: None,
            api_version: "2024-10-21",
            auth: Auth::Key,
            entra: EntraDefaults::from_vars(&|_| None).unwrap(),
        };
        parse(json, "FALLBACK_POOL", &defaults, &lookup).map_err(|e| e.to_string())
    }

    const TWO_REGIONS: &str = r#"{
      "deployments": [
        {"id": "east-ptu", "endpoint": "https://east.openai.azure.com/", "deployment": "gpt-4o",
         "key_env": "KEY_EAST", "priority": 0, "context_window": 128000},
        {"id": "east-paygo", "endpoint": "https://east.openai.azure.com", "deployment": "gpt-4o-paygo",
         "key_env": "KEY_EAST", "priority": 1, "weight": 3},
        {"id": "west", "endpoint": "https://west.openai.azure.com", "deployment": "gpt-4o",
         "key_env": "KEY_WEST", "api": "v1", "priority": 1},
        {"id": "local", "endpoint": "http://127.0.0.1:11434/v1", "deployment": "llama3.1:8b",
         "key_env": "NO_SUCH_KEY", "api": "v1", "priority": 2}
      ],
      "routes": {"chat": ["east-ptu", "east-paygo", "west", "local"], "mini": ["west"]},
      "default_route": "chat"
    }"#;

    #[test]
    fn a_two_region_pool_parses_with_urls_keys_and_routes() {
        let p = pool(TWO_REGIONS).unwrap();
        assert_eq!(p.deployments.len(), 4);
        let d = &p.deployments;
        assert_eq!(
            d[0].url("chat/completions"),
            "https://east.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            d[2].url("chat/completions"),
            "https://west.openai.azure.com/openai/v1/chat/completions"
        );
        assert_eq!(
            d[3].url("chat/completions"),
            "http://127.0.0.1:11434/v1/chat/completions"
        );
        assert_eq!(d[0].key.as_ref().unwrap().expose(), "east-secret");
        assert!(d[3].key.is_none(), "a v1 server may take no key");
        assert_eq!((d[1].priority, d[1].weight), (1, 3.0));
        assert_eq!(d[0].context_window, Some(128000));
        assert_eq!(p.default_route().name, "chat");
        assert_eq!(p.route("mini").unwrap().members, [2]);
    }

    #[test]
    fn entries_inherit_the_simple_variables() {
        let defaults = Defaults {
            endpoint: Some("https://res.openai.azure.com".into()),
            api_version: "2025-04-01-preview",
            auth: Auth::Key,
            entra: EntraDefaults::from_vars(&|_| None).unwrap(),
        };
        let p = parse(
            r#"{"deployments":[{"deployment":"gpt-4o"}]}"#,
            "FALLBACK_POOL",
            &defaults,
            &lookup,
        )
        .unwrap();
        let d = &p.deployments[0];
        assert_eq!(d.id, "gpt-4o");
        assert!(
            d.url("chat/completions")
                .starts_with("https://res.openai.azure.com/openai/deployments/gpt-4o/")
        );
        assert!(d.url("chat/completions").ends_with("2025-04-01-preview"));
        assert_eq!(d.key.as_ref().unwrap().expose(), "default-secret");
        assert_eq!(p.default_route().members, [0]);
    }

    #[test]
    fn mistakes_are_named_precisely() {
        for (json, expected) in [
            ("{", "FALLBACK_POOL is invalid"),
            (r#"{"deployments":[]}"#, "is empty"),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"https://x","key":"sk-1"}]}"#,
                "key_env",
            ),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"https://x","key_env":"NOPE"}]}"#,
                "deployments[0].key_env: the variable NOPE",
            ),
            (
                r#"{"deployments":[{"deployment":"a","key_env":"KEY_EAST"}]}"#,
                "deployments[0].endpoint: missing",
            ),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"ftp://x","key_env":"KEY_EAST"}]}"#,
                "deployments[0].endpoint",
            ),
            (
                r#"{"deployments":[{"deployment":"a b","endpoint":"https://x","key_env":"KEY_EAST"}]}"#,
                "deployments[0].deployment",
            ),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"https://x","key_env":"KEY_EAST","api":"v2"}]}"#,
                "deployments[0].api",
            ),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"https://x","key_env":"KEY_EAST","weight":0}]}"#,
                "deployments[0].weight",
            ),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"https://x","key_env":"KEY_EAST"},{"deployment":"a","endpoint":"https://y","key_env":"KEY_EAST"}]}"#,
                "distinct \"id\"",
            ),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"https://x","key_env":"KEY_EAST"}],"routes":{"chat":["b"]}}"#,
                "routes.chat names \"b\"",
            ),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"https://x","key_env":"KEY_EAST"}],"routes":{"x":["a"],"y":["a"]}}"#,
                "default_route",
            ),
            (
                r#"{"deployments":[{"deployment":"a","endpoint":"https://x","key_env":"KEY_EAST"}],"default_route":"z"}"#,
                "default_route \"z\"",
            ),
        ] {
            let err = pool(json).unwrap_err();
            assert!(err.contains(expected), "{json}\n  -> {err}");
            assert!(
                !err.contains("sk-1") && !err.contains("east-secret"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_simple_variables_mean_one_endpoint_in_this_order() {
        let p = ordered(
            "https://res.openai.azure.com".into(),
            Some(Secret::new("k")),
            Auth::Key,
            vec!["gpt-4o".into(), "gpt-35-turbo".into()],
            "2024-10-21",
        );
        let priorities: Vec<u32> = p.deployments.iter().map(|d| d.priority).collect();
        assert_eq!(priorities, [0, 1]);
        assert_eq!(p.default_route().members, [0, 1]);
    }
}
