//! Reads the named clients: JSON in `FALLBACK_CLIENTS` (or a file named by
//! `FALLBACK_CLIENTS_FILE`), a list of clients each with a name, its keys (never inline: the
//! variables holding them, `key_env`, or Secrets Manager / SSM references to them, `key_ref`,
//! resolved like the pool's keys), optional limits, the routes it may use and a priority. Every
//! mistake names the client and the field.

use std::collections::HashSet;

use serde::Deserialize;

use crate::error::ConfigError;
use crate::pool::Pool;
use crate::secret::Secret;

/// How urgently a client's calls must be answered when Azure's quota runs short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// A person waits on the answer.
    #[default]
    Interactive,
    /// Nobody waits: kept off deployments whose remaining quota is under the reserve.
    Batch,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }
}

/// What one client may spend. `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// One named client.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    /// Its keys, as the variables hold them (a reference until `keys::resolve` replaced it).
    pub keys: Vec<Secret>,
    /// Where each key came from (its variable, or the reference's place), for messages.
    pub key_vars: Vec<String>,
    pub limits: Limits,
    /// The routes it may use (`None`: all of them).
    pub routes: Option<Vec<String>>,
    pub priority: Priority,
}

/// `key_env`: one variable or several (a key being rotated has two).
#[derive(Deserialize)]
#[serde(untagged)]
enum KeyEnv {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSpec {
    name: String,
    key_env: Option<KeyEnv>,
    /// Secrets Manager or SSM references to the keys (a reference is not a secret).
    key_ref: Option<KeyEnv>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
    tokens_per_month: Option<u64>,
    routes: Option<Vec<String>>,
    priority: Option<String>,
}

/// Parses and validates the clients JSON against `pool` (the routes they name must exist).
/// `var` names where it came from; `lookup` reads the key variables; `is_reference` tells a
/// reference to a key held in AWS.
pub fn parse(
    json: &str,
    var: &'static str,
    pool: &Pool,
    lookup: &dyn Fn(&str) -> Option<String>,
    is_reference: &dyn Fn(&str) -> bool,
) -> Result<Vec<Client>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { var, reason };
    let specs: Vec<ClientSpec> = serde_json::from_str(json).map_err(|e| {
        let hint = if e.to_string().contains("unknown field `key") {
            " (keys are never written inline: name the variable that holds it with \"key_env\")"
        } else {
            ""
        };
        invalid(format!("{e}{hint}"))
    })?;
    if specs.is_empty() {
        return Err(invalid("holds no client".into()));
    }
    let mut names = HashSet::new();
    let mut clients = Vec::with_capacity(specs.len());
    for (i, spec) in specs.into_iter().enumerate() {
        let who = if spec.name.is_empty() {
            format!("clients[{i}]")
        } else {
            format!("client {:?}", spec.name)
        };
        let at = |field: &str, reason: String| invalid(format!("{who}, {field}: {reason}"));
        if !is_name(&spec.name) {
            return Err(at(
                "name",
                "use 1 to 64 letters, digits, '.', '_' or '-'".into(),
            ));
        }
        if !names.insert(spec.name.clone()) {
            return Err(at("name", "another client has the same name".into()));
        }
        let list = |k: Option<KeyEnv>| match k {
            None => Vec::new(),
            Some(KeyEnv::One(v)) => vec![v],
            Some(KeyEnv::Many(v)) => v,
        };
        let (vars, refs) = (list(spec.key_env), list(spec.key_ref));
        if vars.is_empty() && refs.is_empty() {
            return Err(at(
                "key_env",
                "missing: name the variable that holds the client's key (or give \"key_ref\", a Secrets Manager or SSM reference to it)".into(),
            ));
        }
        let mut keys = Vec::with_capacity(vars.len() + refs.len());
        let mut key_vars = Vec::with_capacity(keys.capacity());
        for v in vars {
            let value = lookup(&v)
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .ok_or_else(|| at("key_env", format!("the variable {v} it names is not set")))?;
            keys.push(Secret::new(value));
            key_vars.push(v);
        }
        for r in refs {
            if !is_reference(&r) {
                return Err(at(
                    "key_ref",
                    "expected a Secrets Manager or SSM reference (arn:aws:secretsmanager:..., secretsmanager:NAME#field, ssm:/PATH); a key itself goes in a variable named by \"key_env\"".into(),
                ));
            }
            key_vars.push(format!("{var} (client {:?}, key_ref)", spec.name));
            keys.push(Secret::new(r));
        }
        let limit = |field: &str, value: Option<u64>| match value {
            Some(0) => Err(at(
                field,
                "must be a positive number (leave it out for no limit)".into(),
            )),
            other => Ok(other),
        };
        let limits = Limits {
            requests_per_minute: limit("requests_per_minute", spec.requests_per_minute)?,
            tokens_per_minute: limit("tokens_per_minute", spec.tokens_per_minute)?,
            tokens_per_day: limit("tokens_per_day", spec.tokens_per_day)?,
            tokens_per_month: limit("tokens_per_month", spec.tokens_per_month)?,
        };
        if let Some(routes) = &spec.routes {
            if routes.is_empty() {
                return Err(at(
                    "routes",
                    "is empty (leave it out to allow every route)".into(),
                ));
            }
            if let Some(unknown) = routes.iter().find(|r| pool.route(r).is_none()) {
                let known: Vec<&str> = pool.routes.iter().map(|r| r.name.as_str()).collect();
                return Err(at(
                    "routes",
                    format!(
                        "no route is named {unknown:?} (the pool has {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        let priority = match spec.priority.as_deref() {
            None | Some("interactive") => Priority::Interactive,
            Some("batch") => Priority::Batch,
            Some(other) => {
                return Err(at(
                    "priority",
                    format!("{other:?}: expected \"interactive\" or \"batch\""),
                ));
            }
        };
        clients.push(Client {
            name: spec.name,
            keys,
            key_vars,
            limits,
            routes: spec.routes,
            priority,
        });
    }
    Ok(clients)
}

/// A client's name goes into logs, metrics' dimensions and the table's keys.
fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        super::super::pool::ordered(
            "https://x.openai.azure.com".into(),
            Some(Secret::new("k".to_owned())),
            crate::pool::Auth::Key,
            vec!["gpt-4o".into()],
            "2024-10-21",
        )
    }

    fn clients(json: &str) -> Result<Vec<Client>, String> {
        let lookup = |n: &str| match n {
            "KEY_A" => Some("fc-aaaaaaaaaaaaaaaaaaaa".to_owned()),
            "KEY_B" => Some("fc-bbbbbbbbbbbbbbbbbbbb".to_owned()),
            _ => None,
        };
        let is_reference = |r: &str| r.starts_with("secretsmanager:") || r.starts_with("ssm:");
        parse(json, "FALLBACK_CLIENTS", &pool(), &lookup, &is_reference).map_err(|e| e.to_string())
    }

    #[test]
    fn a_client_has_keys_limits_routes_and_a_priority() {
        let route = pool().routes[0].name.clone();
        let c = clients(&format!(
            r#"[{{"name": "chatbot", "key_env": "KEY_A", "tokens_per_minute": 60000,
                 "requests_per_minute": 600}},
                {{"name": "nightly", "key_env": ["KEY_A", "KEY_B"], "tokens_per_day": 2000000,
                 "routes": ["{route}"], "priority": "batch"}}]"#
        ))
        .unwrap();
        assert_eq!(c[0].limits.tokens_per_minute, Some(60000));
        assert_eq!(c[0].priority, Priority::Interactive);
        assert_eq!(c[0].routes, None);
        assert_eq!(c[1].keys.len(), 2);
        assert_eq!(c[1].key_vars, ["KEY_A", "KEY_B"]);
        assert_eq!(c[1].priority, Priority::Batch);
        assert_eq!(c[1].limits.tokens_per_day, Some(2_000_000));
        let held = clients(
            r#"[{"name": "c", "key_ref": ["secretsmanager:fallback-chat/clients#c", "ssm:/fc/c"]}]"#,
        )
        .unwrap();
        assert_eq!(
            held[0].keys[0].expose(),
            "secretsmanager:fallback-chat/clients#c"
        );
        assert_eq!(held[0].key_vars.len(), 2);
    }

    #[test]
    fn mistakes_name_the_client_and_the_field() {
        let cases = [
            (
                r#"[{"name": "a", "key_env": "NOPE"}]"#,
                "client \"a\", key_env: the variable NOPE",
            ),
            (
                r#"[{"name": "a", "key": "sk-123"}]"#,
                "never written inline",
            ),
            (
                r#"[{"name": "a b", "key_env": "KEY_A"}]"#,
                "client \"a b\", name",
            ),
            (
                r#"[{"name": "a", "key_env": "KEY_A"}, {"name": "a", "key_env": "KEY_B"}]"#,
                "same name",
            ),
            (
                r#"[{"name": "a", "key_env": "KEY_A", "tokens_per_minute": 0}]"#,
                "client \"a\", tokens_per_minute: must be a positive",
            ),
            (
                r#"[{"name": "a", "key_env": "KEY_A", "routes": ["nope"]}]"#,
                "client \"a\", routes: no route is named \"nope\"",
            ),
            (
                r#"[{"name": "a", "key_env": "KEY_A", "priority": "urgent"}]"#,
                "client \"a\", priority",
            ),
            (
                r#"[{"name": "a", "key_env": "KEY_A", "tokens_per_hour": 5}]"#,
                "unknown field `tokens_per_hour`",
            ),
            ("[]", "holds no client"),
            (r#"[{"name": "a"}]"#, "client \"a\", key_env: missing"),
            (
                r#"[{"name": "a", "key_ref": "fc-plain-key-000000000"}]"#,
                "client \"a\", key_ref: expected a Secrets Manager or SSM reference",
            ),
        ];
        for (json, expected) in cases {
            let err = clients(json).err().unwrap_or_default();
            assert!(err.contains(expected), "{json}: {err}");
            assert!(err.starts_with("FALLBACK_CLIENTS is invalid"), "{err}");
            assert!(!err.contains("fc-aaaa"), "{err}");
        }
    }
}
