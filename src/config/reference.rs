//! What a reference to a key held in AWS looks like: a Secrets Manager secret (by ARN or
//! `secretsmanager:NAME`, a `#field` of a JSON secret) or an SSM parameter (by ARN or
//! `ssm:/PATH`). A leaf of config/: telling a reference from a key needs nothing else.

use std::fmt;

/// Where a key is kept, when a key variable holds a reference rather than the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SecretRef {
    /// A Secrets Manager secret, by ARN or name; `field` picks a string field of a JSON secret.
    SecretsManager { id: String, field: Option<String> },
    /// An SSM parameter (normally a SecureString), by name (`/path`) or ARN.
    Parameter { name: String },
}

impl SecretRef {
    /// The secret or parameter to fetch: references that differ only by `#field` share it.
    pub(super) fn source(&self) -> Source {
        match self {
            Self::SecretsManager { id, .. } => Source::Secret(id.clone()),
            Self::Parameter { name } => Source::Parameter(name.clone()),
        }
    }

    pub(super) fn field(&self) -> Option<&str> {
        match self {
            Self::SecretsManager { field, .. } => field.as_deref(),
            Self::Parameter { .. } => None,
        }
    }
}

/// Written back in the form [`reference`] reads, so logs and errors show what was configured.
impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SecretsManager { id, field } => {
                if !id.starts_with("arn:") {
                    f.write_str("secretsmanager:")?;
                }
                f.write_str(id)?;
                match field {
                    Some(field) => write!(f, "#{field}"),
                    None => Ok(()),
                }
            }
            Self::Parameter { name } if name.starts_with("arn:") => f.write_str(name),
            Self::Parameter { name } => write!(f, "ssm:{name}"),
        }
    }
}

/// Recognises a reference; any other value is a plain key.
///
/// Only the shapes documented in the [module](self) are references: a key that merely contains
/// ':' (such as `sk-abc:def`) stays a plain key.
pub fn reference(value: &str) -> Option<SecretRef> {
    let value = value.trim();
    // References never hold whitespace; keys that do are not ours to reinterpret.
    if value.is_empty() || value.contains(char::is_whitespace) {
        return None;
    }
    if let Some(rest) = value.strip_prefix("secretsmanager:") {
        let (id, field) = split_field(rest);
        let id_ok = if id.starts_with("arn:") {
            arn_service(id) == Some("secretsmanager")
        } else {
            !id.is_empty()
        };
        return id_ok.then(|| SecretRef::SecretsManager {
            id: id.to_owned(),
            field,
        });
    }
    if let Some(name) = value.strip_prefix("ssm:") {
        let name_ok = if name.starts_with("arn:") {
            arn_service(name) == Some("ssm")
        } else {
            !name.is_empty()
        };
        return name_ok.then(|| SecretRef::Parameter {
            name: name.to_owned(),
        });
    }
    match arn_service(value)? {
        "secretsmanager" => {
            let (id, field) = split_field(value);
            Some(SecretRef::SecretsManager {
                id: id.to_owned(),
                field,
            })
        }
        "ssm" => Some(SecretRef::Parameter {
            name: value.to_owned(),
        }),
        _ => None,
    }
}

/// The service of a well-formed secret or parameter ARN
/// (`arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME`,
/// `arn:PARTITION:ssm:REGION:ACCOUNT:parameter/PATH`), `None` for anything else.
fn arn_service(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some(service), Some(region), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    if !partition.starts_with("aws") || region.is_empty() || account.is_empty() {
        return None;
    }
    let name = match service {
        "secretsmanager" => resource.strip_prefix("secret:"),
        "ssm" => resource.strip_prefix("parameter/"),
        _ => None,
    }?;
    let name = name.split('#').next().unwrap_or_default();
    (!name.is_empty()).then_some(service)
}

/// The region an ARN names: the request must go there, whatever the function's own region.
pub(super) fn arn_region(arn: &str) -> Option<&str> {
    arn.strip_prefix("arn:")?.split(':').nth(2)
}

/// Splits `ID#field`; a trailing `#` with no field name means the whole secret.
fn split_field(value: &str) -> (&str, Option<String>) {
    match value.split_once('#') {
        Some((id, field)) if !field.is_empty() => (id, Some(field.to_owned())),
        Some((id, _)) => (id, None),
        None => (value, None),
    }
}

/// One thing fetched from AWS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Source {
    Secret(String),
    Parameter(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret(id) => write!(f, "Secrets Manager secret {id}"),
            Self::Parameter(name) => write!(f, "SSM parameter {name}"),
        }
    }
}
