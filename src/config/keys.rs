//! Keys held in AWS. Any key variable (`AZURE_OPENAI_API_KEY`, the variables pool entries name
//! with `key_env`, `CLIENT_API_KEYS`) may hold a reference to a Secrets Manager secret or an SSM
//! SecureString instead of the key; [`resolve`] fetches every reference's value once, at cold
//! start, and returns them ([`Resolved`]) for the `App` to be built with.
//!
//! Accepted references:
//! - `arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-SUFFIX`, or `secretsmanager:NAME_OR_ARN`:
//!   the secret's SecretString. A `#field` suffix picks one string field of a JSON SecretString.
//! - `arn:aws:ssm:REGION:ACCOUNT:parameter/PATH`, or `ssm:/PATH`: the parameter, decrypted.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{Region, SdkConfig};
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::error::ConfigError;
use crate::pool::{Auth, EntraApp, EntraCredential};
use crate::secret::Secret;

pub use super::reference::{SecretRef, reference};
use super::reference::{Source, arn_region};

/// Bounds each fetch, retries included: Lambda allows 10 s for init, and an unreachable endpoint
/// (a VPC without a NAT gateway or endpoint) must fail with this module's message before then.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A key slot in the config that holds a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Index into `config.pool.deployments`.
    Pool(usize),
    ClientKeys,
    /// Named client `.0`'s key number `.1`.
    Client(usize, usize),
    /// The Entra ID client secret of pool entry `.0`.
    Entra(usize),
}

/// What went wrong with one reference, and what the operator should do about it. Never holds a
/// fetched value.
struct Problem {
    what: String,
    fix: String,
}

impl Problem {
    fn new(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            fix: fix.into(),
        }
    }
}

/// What [`resolve`] fetched: the value of every key variable that held a reference.
#[derive(Debug, Default)]
pub struct Resolved {
    /// By index into `config.pool.deployments`.
    deployments: Vec<(usize, Secret)>,
    client_keys: Option<Secret>,
    /// By (index into `config.clients`, index into its keys).
    clients: Vec<(usize, usize, Secret)>,
    /// Entra ID client secrets, by index into `config.pool.deployments`.
    entra: Vec<(usize, Secret)>,
}

impl Resolved {
    /// `config` with every referenced key replaced by its value.
    pub fn apply(self, mut config: Config) -> Config {
        for (i, key) in self.deployments {
            if let Some(d) = config.pool.deployments.get_mut(i) {
                d.key = Some(key);
            }
        }
        if let Some(keys) = self.client_keys {
            config.client_keys = Some(keys);
        }
        for (i, value) in self.entra {
            if let Some(Auth::Entra(EntraApp {
                credential: EntraCredential::ClientSecret { secret, .. },
                ..
            })) = config.pool.deployments.get_mut(i).map(|d| &mut d.auth)
            {
                *secret = value;
            }
        }
        for (i, j, key) in self.clients {
            if let Some(slot) = config.clients.get_mut(i).and_then(|c| c.keys.get_mut(j)) {
                *slot = key;
            }
        }
        config
    }
}

/// Whether any key variable of `config` holds a reference (and so needs the AWS SDK).
pub fn referenced(config: &Config) -> bool {
    !references(config).is_empty()
}

/// Fetches every referenced key of `config` (pool keys and client keys) through `aws` (region,
/// credentials from the Lambda environment; AWS_ENDPOINT_URL honoured). Each distinct reference
/// is fetched once (pool entries often share one), concurrently, and references to different
/// `#field`s of one secret share a single GetSecretValue call. Nothing is called when no
/// variable holds a reference. Errors name the variable/pool entry and the reference (the
/// ARN/name is not a secret; never a fetched value or the AWS error's raw body) and say what to
/// fix (missing secret, access denied -> "give the function secretsmanager:GetSecretValue on
/// it", etc.).
pub async fn resolve(config: &Config, aws: &SdkConfig) -> Result<Resolved, ConfigError> {
    let wanted = references(config);
    if wanted.is_empty() {
        return Ok(Resolved::default());
    }
    let mut sources: Vec<Source> = Vec::new();
    for (_, reference) in &wanted {
        let source = reference.source();
        if !sources.contains(&source) {
            sources.push(source);
        }
    }
    let fetched = futures_util::future::join_all(sources.iter().map(|source| async {
        let started = SystemClock.now();
        let result = fetch(aws, source).await;
        (result, SystemClock.now() - started)
    }))
    .await;
    let fetched: HashMap<&Source, (Result<String, Problem>, Duration)> =
        sources.iter().zip(fetched).collect();

    // Every failure is reported in the order the slots appear, so the message is stable.
    let mut values: HashMap<&SecretRef, String> = HashMap::new();
    for (_, reference) in &wanted {
        if values.contains_key(reference) {
            continue;
        }
        let source = reference.source();
        let (result, elapsed) = &fetched[&source];
        let value = match result {
            Ok(text) => pick(text, reference.field()).map_err(|problem| {
                let users: Vec<Slot> = slots_of(&wanted, |r| r == reference);
                let field = reference
                    .field()
                    .map(|f| format!("#{f}"))
                    .unwrap_or_default();
                failure(config, &users, &format!("{source}{field}"), &problem)
            })?,
            Err(problem) => {
                let users: Vec<Slot> = slots_of(&wanted, |r| r.source() == source);
                return Err(failure(config, &users, &source.to_string(), problem));
            }
        };
        tracing::info!(
            %reference,
            elapsed_ms = elapsed.as_millis() as u64,
            "key reference resolved"
        );
        values.insert(reference, value);
    }

    let mut resolved = Resolved::default();
    for (slot, reference) in &wanted {
        let key = Secret::new(values[reference].clone());
        match slot {
            Slot::Pool(i) => resolved.deployments.push((*i, key)),
            Slot::ClientKeys => resolved.client_keys = Some(key),
            Slot::Client(i, j) => resolved.clients.push((*i, *j, key)),
            Slot::Entra(i) => resolved.entra.push((*i, key)),
        }
    }
    Ok(resolved)
}

/// Every key slot of `config` that holds a reference, pool entries first.
fn references(config: &Config) -> Vec<(Slot, SecretRef)> {
    let pool = config
        .pool
        .deployments
        .iter()
        .enumerate()
        .filter_map(|(i, d)| Some((Slot::Pool(i), reference(d.key.as_ref()?.expose())?)));
    let client = config
        .client_keys
        .as_ref()
        .and_then(|keys| reference(keys.expose()))
        .map(|r| (Slot::ClientKeys, r));
    let named = config.clients.iter().enumerate().flat_map(|(i, c)| {
        c.keys
            .iter()
            .enumerate()
            .filter_map(move |(j, key)| Some((Slot::Client(i, j), reference(key.expose())?)))
    });
    let entra = config
        .pool
        .deployments
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match &d.auth {
            Auth::Entra(EntraApp {
                credential: EntraCredential::ClientSecret { secret, .. },
                ..
            }) => Some((Slot::Entra(i), reference(secret.expose())?)),
            _ => None,
        });
    pool.chain(client).chain(named).chain(entra).collect()
}

fn slots_of(wanted: &[(Slot, SecretRef)], matches: impl Fn(&SecretRef) -> bool) -> Vec<Slot> {
    wanted
        .iter()
        .filter(|(_, r)| matches(r))
        .map(|(slot, _)| *slot)
        .collect()
}

/// The error for a reference that could not be resolved, attributed to the variable it came from.
fn failure(config: &Config, users: &[Slot], reference: &str, problem: &Problem) -> ConfigError {
    let pool = &config.pool.deployments;
    let var = match users.first() {
        Some(Slot::Pool(i)) => pool[*i].key_var.clone(),
        Some(Slot::Client(i, j)) => config.clients[*i].key_vars[*j].clone(),
        Some(Slot::Entra(i)) => match &pool[*i].auth {
            Auth::Entra(EntraApp {
                credential: EntraCredential::ClientSecret { var, .. },
                ..
            }) => var.clone(),
            _ => "AZURE_CLIENT_SECRET".to_owned(),
        },
        _ => "CLIENT_API_KEYS".to_owned(),
    };
    let entries: Vec<String> = users
        .iter()
        .filter_map(|slot| match slot {
            Slot::Pool(i) => Some(format!("{:?}", pool[*i].id)),
            Slot::ClientKeys | Slot::Client(..) | Slot::Entra(_) => None,
        })
        .collect();
    let mut who: Vec<String> = Vec::new();
    // Name the entries when the variable is not the one every entry uses.
    if !entries.is_empty() && pool.iter().any(|d| d.key_var != var) {
        let noun = if entries.len() == 1 {
            "the key of pool entry"
        } else {
            "the keys of pool entries"
        };
        who.push(format!("{noun} {}", entries.join(", ")));
    }
    if users.contains(&Slot::ClientKeys) && var != "CLIENT_API_KEYS" {
        who.push("CLIENT_API_KEYS".to_owned());
    }
    for slot in users {
        if let Slot::Client(i, j) = slot {
            let client = &config.clients[*i];
            if client.key_vars[*j] != var {
                who.push(format!("a key of client {:?}", client.name));
            }
        }
    }
    let reference = if who.is_empty() {
        reference.to_owned()
    } else {
        format!("{} ({reference})", who.join(" and "))
    };
    ConfigError::InvalidKey {
        var,
        reason: format!("{reference}: {}; {}", problem.what, problem.fix),
    }
}

/// The value a reference stands for: the whole (trimmed) text, or one string field of it.
fn pick(text: &str, field: Option<&str>) -> Result<String, Problem> {
    let value = match field {
        None => text.trim().to_owned(),
        Some(field) => {
            // serde_json's messages are left out: some quote the text they could not parse.
            let Ok(serde_json::Value::Object(object)) = serde_json::from_str(text) else {
                return Err(Problem::new(
                    format!("its SecretString is not a JSON object, so #{field} selects nothing"),
                    format!(
                        "store a JSON object such as {{\"{field}\": \"<key>\"}} in it, or drop #{field} to use the whole string"
                    ),
                ));
            };
            match object.get(field) {
                Some(serde_json::Value::String(value)) => value.trim().to_owned(),
                Some(_) => {
                    return Err(Problem::new(
                        format!("its field {field:?} is not a string"),
                        "store the key as a JSON string",
                    ));
                }
                None => {
                    return Err(Problem::new(
                        format!("its JSON has no field {field:?}"),
                        "add the field to the secret, or correct the name after '#'",
                    ));
                }
            }
        }
    };
    if value.is_empty() {
        return Err(Problem::new("holds an empty value", "store the key in it"));
    }
    Ok(value)
}

/// Each fetch, retries included, within [`FETCH_TIMEOUT`].
fn fetch_timeout() -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_timeout(FETCH_TIMEOUT)
        .build()
}

/// Fetches one secret's SecretString or one parameter's decrypted value.
async fn fetch(aws: &SdkConfig, source: &Source) -> Result<String, Problem> {
    match source {
        Source::Secret(id) => {
            let mut conf =
                aws_sdk_secretsmanager::config::Builder::from(aws).timeout_config(fetch_timeout());
            if let Some(region) = arn_region(id) {
                conf = conf.region(Region::new(region.to_owned()));
            }
            let client = aws_sdk_secretsmanager::Client::from_conf(conf.build());
            let output = client
                .get_secret_value()
                .secret_id(id)
                .send()
                .await
                .map_err(|e| aws_problem(&e, aws, id, SECRETS_MANAGER))?;
            output.secret_string.ok_or_else(|| {
                Problem::new(
                    "holds a SecretBinary, not a SecretString",
                    "store the key as a string (plaintext) secret",
                )
            })
        }
        Source::Parameter(name) => {
            let mut conf = aws_sdk_ssm::config::Builder::from(aws).timeout_config(fetch_timeout());
            if let Some(region) = arn_region(name) {
                conf = conf.region(Region::new(region.to_owned()));
            }
            let client = aws_sdk_ssm::Client::from_conf(conf.build());
            let output = client
                .get_parameter()
                .name(name)
                .with_decryption(true)
                .send()
                .await
                .map_err(|e| aws_problem(&e, aws, name, SSM))?;
            output
                .parameter
                .and_then(|p| p.value)
                .ok_or_else(|| Problem::new("came back without a value", "check the parameter"))
        }
    }
}

/// What the error messages say about one service.
struct Service {
    name: &'static str,
    action: &'static str,
    not_found: &'static [&'static str],
    kms: &'static [&'static str],
}

const SECRETS_MANAGER: Service = Service {
    name: "Secrets Manager",
    action: "secretsmanager:GetSecretValue",
    not_found: &["ResourceNotFoundException"],
    kms: &["DecryptionFailure"],
};

const SSM: Service = Service {
    name: "SSM",
    action: "ssm:GetParameter",
    not_found: &["ParameterNotFound", "ParameterVersionNotFound"],
    kms: &["InvalidKeyId"],
};

/// Turns an SDK error into a message that says what to fix. A failed Get* response carries no
/// value, so the service's error code and message are safe to quote; raw bodies are never quoted.
fn aws_problem<E, R>(error: &SdkError<E, R>, aws: &SdkConfig, id: &str, service: Service) -> Problem
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    let region = arn_region(id)
        .map(str::to_owned)
        .or_else(|| aws.region().map(|r| r.to_string()))
        .unwrap_or_else(|| "(no region: AWS_REGION is not set)".to_owned());
    let Some(err) = error.as_service_error() else {
        return match error {
            SdkError::ResponseError(_) => Problem::new(
                format!("{} sent a response that could not be read", service.name),
                "retry; if it persists, check AWS_ENDPOINT_URL points at the real service",
            ),
            _ => Problem::new(
                format!(
                    "could not call {} in {region} ({})",
                    service.name,
                    causes(error)
                ),
                "check the function's region, credentials and network access (a function in a VPC needs a NAT gateway or a VPC endpoint for the service)",
            ),
        };
    };
    let code = err.code().unwrap_or("unknown error");
    let detail = match err.message() {
        Some(message) => format!("{code}: {message}"),
        None => code.to_owned(),
    };
    if service.not_found.contains(&code) {
        Problem::new(
            format!("does not exist in {region} ({detail})"),
            "create it, or correct the reference",
        )
    } else if service.kms.contains(&code) {
        Problem::new(
            format!("cannot be decrypted ({detail})"),
            "give the function kms:Decrypt on its KMS key",
        )
    } else if code.contains("AccessDenied") || code == "UnrecognizedClientException" {
        Problem::new(
            format!("access denied ({detail})"),
            format!("give the function {} on it", service.action),
        )
    } else if code == "InvalidRequestException" {
        Problem::new(
            format!("cannot be read ({detail})"),
            "restore it if it is scheduled for deletion, or point at another secret",
        )
    } else {
        Problem::new(
            format!("{} refused the request ({detail})", service.name),
            "correct the reference, or check the function's role and the service's health",
        )
    }
}

/// An error and its causes on one line; the SDK's own formatting adds a `Debug` dump.
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(id: &str, field: Option<&str>) -> Option<SecretRef> {
        Some(SecretRef::SecretsManager {
            id: id.into(),
            field: field.map(Into::into),
        })
    }

    fn ssm(name: &str) -> Option<SecretRef> {
        Some(SecretRef::Parameter { name: name.into() })
    }

    const ARN: &str = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:azure-keys-AbCdEf";
    const PARAM_ARN: &str = "arn:aws:ssm:eu-west-1:123456789012:parameter/fallback/azure-key";

    #[test]
    fn secrets_manager_arns_are_references() {
        assert_eq!(reference(ARN), sm(ARN, None));
        assert_eq!(reference(&format!("  {ARN}\n")), sm(ARN, None));
        assert_eq!(reference(&format!("{ARN}#east")), sm(ARN, Some("east")));
        assert_eq!(reference(&format!("{ARN}#")), sm(ARN, None));
        let gov = "arn:aws-us-gov:secretsmanager:us-gov-west-1:123456789012:secret:k-AbCdEf";
        assert_eq!(reference(gov), sm(gov, None));
    }

    #[test]
    fn secrets_manager_short_forms_are_references() {
        assert_eq!(reference("secretsmanager:azure/key"), sm("azure/key", None));
        assert_eq!(
            reference("secretsmanager:azure-keys#west"),
            sm("azure-keys", Some("west"))
        );
        assert_eq!(
            reference(&format!("secretsmanager:{ARN}#east")),
            sm(ARN, Some("east"))
        );
    }

    #[test]
    fn ssm_parameters_are_references() {
        assert_eq!(
            reference("ssm:/fallback/azure-key"),
            ssm("/fallback/azure-key")
        );
        assert_eq!(reference("ssm:azure-key"), ssm("azure-key"));
        assert_eq!(reference(PARAM_ARN), ssm(PARAM_ARN));
        assert_eq!(reference(&format!("ssm:{PARAM_ARN}")), ssm(PARAM_ARN));
    }

    #[test]
    fn plain_keys_stay_plain() {
        for plain in [
            "",
            "0123456789abcdef0123456789abcdef",
            "sk-abc:def",
            "sk-proj-abc#def",
            "arn:aws:s3:::my-bucket",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:",
            "arn:aws:secretsmanager:eu-west-1:123456789012:other:x",
            "arn:aws:secretsmanager::123456789012:secret:x",
            "arn:aws:ssm:eu-west-1:123456789012:document/x",
            "arn:aws:ssm:eu-west-1:123456789012:parameter/",
            "arn:aws:secretsmanager",
            "notaws:x:secretsmanager:r:a:secret:x",
            "secretsmanager:",
            "secretsmanager:arn:aws:ssm:eu-west-1:123456789012:parameter/x",
            "ssm:",
            "ssm:/has space",
            "SSM:/upper",
            "key ssm:/x",
        ] {
            assert_eq!(reference(plain), None, "{plain:?}");
        }
    }

    #[test]
    fn references_print_as_written() {
        for written in [
            ARN.to_owned(),
            format!("{ARN}#east"),
            "secretsmanager:azure-keys#west".to_owned(),
            "ssm:/fallback/azure-key".to_owned(),
            PARAM_ARN.to_owned(),
        ] {
            assert_eq!(reference(&written).unwrap().to_string(), written);
        }
    }

    #[test]
    fn arn_regions_are_read() {
        assert_eq!(arn_region(ARN), Some("eu-west-1"));
        assert_eq!(arn_region(PARAM_ARN), Some("eu-west-1"));
        assert_eq!(arn_region("/fallback/azure-key"), None);
    }

    #[test]
    fn values_are_trimmed_picked_and_never_echoed() {
        assert_eq!(pick("  sk-1 \n", None).ok().as_deref(), Some("sk-1"));
        let json = r#"{"east": " sk-east ", "west": "sk-west", "n": 3}"#;
        assert_eq!(pick(json, Some("east")).ok().as_deref(), Some("sk-east"));
        for (text, field, expected) in [
            ("   ", None, "empty"),
            (json, Some("north"), "no field \"north\""),
            (json, Some("n"), "not a string"),
            ("sk-not-json", Some("east"), "not a JSON object"),
            (r#"{"east": "  "}"#, Some("east"), "empty"),
        ] {
            let problem = pick(text, field).err().unwrap();
            let message = format!("{}; {}", problem.what, problem.fix);
            assert!(message.contains(expected), "{message}");
            for value in ["sk-east", "sk-west", "sk-not-json"] {
                assert!(!message.contains(value), "{message}");
            }
        }
    }

    #[test]
    fn aws_errors_say_what_to_fix() {
        use aws_sdk_secretsmanager::config::http::HttpResponse;
        use aws_sdk_secretsmanager::error::{ConnectorError, ErrorMetadata};
        use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;

        let aws = SdkConfig::builder()
            .region(Region::new("us-east-1"))
            .build();
        let refused = |code: &str| {
            let error = GetSecretValueError::generic(
                ErrorMetadata::builder()
                    .code(code)
                    .message("not authorized to perform secretsmanager:GetSecretValue")
                    .build(),
            );
            let response = HttpResponse::new(400.try_into().unwrap(), "{}".into());
            let problem = aws_problem(
                &SdkError::service_error(error, response),
                &aws,
                ARN,
                SECRETS_MANAGER,
            );
            format!("{}; {}", problem.what, problem.fix)
        };
        let denied = refused("AccessDeniedException");
        assert!(
            denied.starts_with("access denied (AccessDeniedException"),
            "{denied}"
        );
        assert!(
            denied.ends_with("give the function secretsmanager:GetSecretValue on it"),
            "{denied}"
        );
        let kms = refused("DecryptionFailure");
        assert!(kms.contains("kms:Decrypt"), "{kms}");
        let missing = refused("ResourceNotFoundException");
        assert!(missing.contains("does not exist in eu-west-1"), "{missing}");

        let unreachable: SdkError<GetSecretValueError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io("connection refused".into()));
        let problem = aws_problem(&unreachable, &aws, "azure-key", SECRETS_MANAGER);
        assert!(
            problem
                .what
                .starts_with("could not call Secrets Manager in us-east-1"),
            "{}",
            problem.what
        );
        assert!(problem.fix.contains("VPC"), "{}", problem.fix);
    }
}
