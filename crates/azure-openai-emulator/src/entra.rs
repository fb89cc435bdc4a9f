//! Keyless auth, as far as a function that authenticates to Azure OpenAI with Microsoft Entra ID
//! needs it: Entra's token endpoint (`POST /{tenant}/oauth2/v2.0/token`, the client credentials
//! grant with a client secret or a `client_assertion`), AWS STS's `GetWebIdentityToken` (the
//! signed JWT an AWS role presents as that assertion; moto does not serve it), and the check of
//! the Bearer tokens it issued on the deployments, which may refuse keys altogether (Azure's
//! `disableLocalAuth`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

/// The app registration the token endpoint knows, and how it answers.
#[derive(Clone, Debug)]
pub struct EntraConfig {
    pub tenant: String,
    pub client_id: String,
    /// The client secret it accepts, if any.
    pub client_secret: Option<String>,
    /// Whether it accepts, as `client_assertion`, a web identity token this emulator's STS
    /// issued for the audience `api://AzureADTokenExchange` (a federated credential).
    pub federation: bool,
    /// The issued tokens' lifetime (`expires_in`).
    pub lifetime: Duration,
}

impl EntraConfig {
    pub fn new(tenant: &str, client_id: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: None,
            federation: false,
            lifetime: Duration::from_secs(3599),
        }
    }
}

/// How the token endpoint answers from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    Healthy,
    /// 503, as an unreachable or failing authority looks from behind a proxy.
    Unavailable,
    /// Answers after this delay.
    Slow(Duration),
    /// `invalid_client` with AADSTS7000215 (a wrong secret) whatever the request says.
    InvalidClient,
}

/// The audience Entra expects in a federated assertion.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

pub(crate) struct EntraState {
    pub(crate) config: Option<EntraConfig>,
    pub(crate) mode: TokenMode,
    /// Access tokens issued, and when each expires.
    issued: HashMap<String, Instant>,
    /// Web identity tokens STS issued.
    assertions: HashSet<String>,
    pub(crate) token_requests: usize,
    pub(crate) sts_requests: usize,
    /// Every request to the token endpoint, as form fields (for tests).
    pub(crate) token_forms: Vec<HashMap<String, String>>,
    counter: u64,
}

impl Default for EntraState {
    fn default() -> Self {
        Self {
            config: None,
            mode: TokenMode::Healthy,
            issued: HashMap::new(),
            assertions: HashSet::new(),
            token_requests: 0,
            sts_requests: 0,
            token_forms: Vec::new(),
            counter: 0,
        }
    }
}

/// An Entra error body: `{"error", "error_description": "AADSTS...: ...", "error_codes", ...}`.
fn aadsts(status: u16, error: &str, code: u32, description: &str) -> (u16, String) {
    (
        status,
        json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description} Trace ID: 00000000-0000-0000-0000-000000000000 Correlation ID: 00000000-0000-0000-0000-000000000000 Timestamp: 2026-12-01 00:00:00Z"),
            "error_codes": [code],
            "timestamp": "2026-12-01 00:00:00Z",
            "trace_id": "00000000-0000-0000-0000-000000000000",
            "correlation_id": "00000000-0000-0000-0000-000000000000",
            "error_uri": "https://login.microsoftonline.com/error?code=".to_owned() + &code.to_string(),
        })
        .to_string(),
    )
}

impl EntraState {
    /// `POST /{tenant}/oauth2/v2.0/token` with `form`: the status and JSON body.
    pub(crate) fn token(&mut self, tenant: &str, form: HashMap<String, String>) -> (u16, String) {
        self.token_requests += 1;
        self.token_forms.push(form.clone());
        let Some(config) = self.config.clone() else {
            return (404, json!({"error": "not_found"}).to_string());
        };
        match self.mode {
            TokenMode::Unavailable => {
                return (503, json!({"error": "temporarily_unavailable", "error_description": "AADSTS90033: A transient error has occurred. Please try again."}).to_string());
            }
            TokenMode::InvalidClient => {
                return aadsts(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                );
            }
            TokenMode::Healthy | TokenMode::Slow(_) => {}
        }
        if tenant != config.tenant {
            return aadsts(
                400,
                "invalid_request",
                90002,
                &format!(
                    "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID."
                ),
            );
        }
        let field = |name: &str| form.get(name).map(String::as_str);
        if field("grant_type") != Some("client_credentials") {
            return aadsts(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            );
        }
        if field("client_id") != Some(config.client_id.as_str()) {
            return aadsts(
                400,
                "unauthorized_client",
                700016,
                &format!(
                    "Application with identifier '{}' was not found in the directory.",
                    field("client_id").unwrap_or_default()
                ),
            );
        }
        if field("scope") != Some("https://cognitiveservices.azure.com/.default") {
            return aadsts(
                400,
                "invalid_scope",
                1002012,
                "The provided value for scope is not valid.",
            );
        }
        let accepted = match (field("client_secret"), field("client_assertion")) {
            (Some(secret), None) => config.client_secret.as_deref() == Some(secret),
            (None, Some(assertion)) => {
                config.federation
                    && field("client_assertion_type")
                        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                    && self.assertions.contains(assertion)
            }
            _ => false,
        };
        if !accepted {
            return match field("client_assertion") {
                Some(_) => aadsts(
                    400,
                    "invalid_client",
                    70021,
                    "No matching federated identity record found for presented assertion.",
                ),
                None => aadsts(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                ),
            };
        }
        self.counter += 1;
        let token = format!("eyJ0eXAiOiJKV1QifQ.emulator-entra-token-{}", self.counter);
        self.issued
            .insert(token.clone(), Instant::now() + config.lifetime);
        let body = json!({
            "token_type": "Bearer",
            "expires_in": config.lifetime.as_secs(),
            "ext_expires_in": config.lifetime.as_secs(),
            "access_token": token,
        });
        (200, body.to_string())
    }

    /// STS `GetWebIdentityToken` (awsQuery: a form in, XML out).
    pub(crate) fn web_identity_token(&mut self, form: &HashMap<String, String>) -> (u16, String) {
        self.sts_requests += 1;
        let audience = form.get("Audience.member.1").cloned().unwrap_or_default();
        let algorithm = form.get("SigningAlgorithm").map(String::as_str);
        if !matches!(algorithm, Some("RS256" | "ES384")) {
            return (
                400,
                sts_error("ValidationError", "SigningAlgorithm must be RS256 or ES384"),
            );
        }
        let seconds: u64 = form
            .get("DurationSeconds")
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        self.counter += 1;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(
            json!({
                "iss": "https://abc-123.tokens.sts.global.api.aws",
                "sub": "arn:aws:iam::123456789012:role/fallback-chat",
                "aud": audience,
                "n": self.counter,
            })
            .to_string(),
        );
        let jwt = format!("{header}.{payload}.c2lnbmF0dXJl");
        if audience == TOKEN_EXCHANGE_AUDIENCE {
            self.assertions.insert(jwt.clone());
        }
        let expires = iso8601(std::time::SystemTime::now() + Duration::from_secs(seconds));
        let xml = format!(
            r#"<GetWebIdentityTokenResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetWebIdentityTokenResult>
    <WebIdentityToken>{jwt}</WebIdentityToken>
    <Expiration>{expires}</Expiration>
  </GetWebIdentityTokenResult>
  <ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ResponseMetadata>
</GetWebIdentityTokenResponse>"#
        );
        (200, xml)
    }

    /// Whether `token` is one this endpoint issued and it has not expired.
    pub(crate) fn valid(&self, token: &str) -> bool {
        self.issued
            .get(token)
            .is_some_and(|expires| Instant::now() < *expires)
    }

    /// Every token issued so far stops being accepted (a revoked role assignment).
    pub(crate) fn revoke(&mut self) {
        self.issued.clear();
    }
}

fn sts_error(code: &str, message: &str) -> String {
    format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"#
    )
}

/// `2026-12-01T00:05:00Z`, as STS writes timestamps.
fn iso8601(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A form body's fields (later repeats win).
pub(crate) fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}
