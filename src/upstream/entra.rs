//! Microsoft Entra ID access tokens, for deployments that authenticate without a key: the
//! client credentials grant at `{authority}/{tenant}/oauth2/v2.0/token`, proving the app with a
//! client secret or with a web identity token AWS STS signs for the function's own role
//! (`GetWebIdentityToken`, presented as the assertion of a federated credential: no secret
//! anywhere).
//!
//! One [`TokenSource`] per (authority, tenant, client, scope), shared by every deployment that
//! uses it. A request takes the cached token; one near its end (the last half of its life, or
//! its last five minutes) is renewed in the background while it still serves; a request waits
//! only when there is no valid token, and then for one fetch, shared with every request that
//! needs it at the same time; the fetch runs in a task of its own, so one slower than the
//! request's attempt goes on and serves the next request. A failed renewal keeps the token that is still valid and tries
//! again after a back-off (1 s, doubling to 30 s); while no token can be had, requests fail at
//! once with the last error until the back-off ends, so a token endpoint that is down costs
//! them nothing but that. Errors carry Entra's AADSTS code and description, never the secret
//! or the assertion.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use reqwest::Client;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;

use crate::clock::Clock;
use crate::pool::{EntraApp, EntraCredential};

/// A token this close to its end is not used: a request that starts with it must still be able
/// to finish with it (at most a tenth of its life).
const END_MARGIN: Duration = Duration::from_secs(30);
/// Renewal starts this long before the end at the latest (Azure's SDKs renew 5 minutes early).
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long the STS token (the assertion) lives: it is used once, at once.
const ASSERTION_SECONDS: i32 = 300;
/// A fetch that does not finish in this long has failed (the caller bounds it further).
const FETCH_LIMIT: Duration = Duration::from_secs(10);

/// An access token, as the `Authorization` header carries it.
#[derive(Clone, Debug)]
pub struct Token {
    /// `Bearer <token>`, marked sensitive (kept out of any debug output of a request).
    pub header: HeaderValue,
    /// Which fetch produced it, to tell a stale token from its renewal.
    pub serial: u64,
    expires: Instant,
    renew_at: Instant,
}

/// Why no token could be had. Says what to fix; never holds a secret or an assertion.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("the Entra ID token endpoint {authority} could not be reached: {reason}")]
    Unreachable { authority: String, reason: String },
    #[error("Entra ID refused the token request ({error}): {description}")]
    Refused { error: String, description: String },
    #[error("Entra ID answered {status} without a token")]
    Malformed { status: u16 },
    #[error("AWS STS GetWebIdentityToken failed: {0}")]
    Sts(String),
    #[error("AWS STS is not configured for this function (no AWS SDK configuration)")]
    NoAws,
}

struct Cache {
    token: Option<Token>,
    /// The last fetch that failed, and when another may start.
    failure: Option<(TokenError, Instant)>,
    backoff: Duration,
    serial: u64,
    /// A background renewal is running.
    renewing: bool,
}

/// Tokens for one app registration and scope.
pub struct TokenSource {
    app: EntraApp,
    http: Client,
    sts: Option<aws_sdk_sts::Client>,
    cache: Mutex<Cache>,
    /// One fetch at a time; who waited for it reads its result.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenSource {
    pub fn new(app: EntraApp, http: Client, aws: Option<&SdkConfig>) -> Self {
        let sts = match app.credential {
            EntraCredential::AwsFederation { .. } => aws.map(aws_sdk_sts::Client::new),
            EntraCredential::ClientSecret { .. } => None,
        };
        Self {
            app,
            http,
            sts,
            cache: Mutex::new(Cache {
                token: None,
                failure: None,
                backoff: FIRST_BACKOFF,
                serial: 0,
                renewing: false,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Plain data: a panic elsewhere cannot leave it half-written.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A token valid now, fetching one only when none is (one fetch for every request waiting
    /// on it); a renewal started in the background when the token nears its end.
    pub async fn token(self: &Arc<Self>, clock: &impl Clock) -> Result<Token, TokenError> {
        let now = clock.now();
        let cached = {
            let mut cache = self.lock();
            let usable = cache.token.clone().filter(|t| now + margin(t) < t.expires);
            if let Some(token) = &usable {
                let retry_ok = cache.failure.as_ref().is_none_or(|(_, at)| now >= *at);
                if now >= token.renew_at && !cache.renewing && retry_ok {
                    cache.renewing = true;
                    let (this, clock) = (Arc::clone(self), clock.clone());
                    tokio::spawn(async move {
                        let _ = this.fetch(&clock, None).await;
                        this.lock().renewing = false;
                    });
                }
            }
            usable
        };
        match cached {
            Some(token) => Ok(token),
            None => self.fetch_detached(clock, None).await,
        }
    }

    /// After Azure refused `stale` (a 401 with a token that should be valid): a new one, unless
    /// another request has renewed it already.
    pub async fn renew(
        self: &Arc<Self>,
        clock: &impl Clock,
        stale: &Token,
    ) -> Result<Token, TokenError> {
        self.fetch_detached(clock, Some(stale.serial)).await
    }

    /// [`TokenSource::fetch`] in a task of its own: a caller that stops waiting (its attempt's
    /// time ran out) leaves the fetch running, so a token endpoint slower than an attempt still
    /// yields a token, for the next request.
    async fn fetch_detached(
        self: &Arc<Self>,
        clock: &impl Clock,
        stale: Option<u64>,
    ) -> Result<Token, TokenError> {
        let (this, clock) = (Arc::clone(self), clock.clone());
        let task = tokio::spawn(async move { this.fetch(&clock, stale).await });
        task.await.unwrap_or_else(|_| {
            Err(TokenError::Unreachable {
                authority: self.app.authority.clone(),
                reason: "the token request stopped".into(),
            })
        })
    }

    /// One fetch, shared: whoever waited for a fetch in flight takes its result. `stale`: the
    /// serial of a token that must not be returned again.
    async fn fetch(&self, clock: &impl Clock, stale: Option<u64>) -> Result<Token, TokenError> {
        let seen = self.lock().serial;
        let _one = self.fetching.lock().await;
        let now = clock.now();
        {
            let cache = self.lock();
            // A fetch finished while this one waited: its token, or its failure.
            if cache.serial != seen {
                if let Some(token) = cache
                    .token
                    .clone()
                    .filter(|t| Some(t.serial) != stale && now + margin(t) < t.expires)
                {
                    return Ok(token);
                }
                if let Some((error, _)) = &cache.failure {
                    return Err(error.clone());
                }
            }
            // Backing off after a failure: the still-valid token, or the failure, at once.
            if let Some((error, retry_at)) = &cache.failure
                && now < *retry_at
            {
                return match cache
                    .token
                    .clone()
                    .filter(|t| Some(t.serial) != stale && now + margin(t) < t.expires)
                {
                    Some(token) => Ok(token),
                    None => Err(error.clone()),
                };
            }
        }
        let result = match clock.timeout(FETCH_LIMIT, self.request()).await {
            Some(result) => result,
            None => Err(TokenError::Unreachable {
                authority: self.app.authority.clone(),
                reason: format!("no answer within {} s", FETCH_LIMIT.as_secs()),
            }),
        };
        let now = clock.now();
        let mut cache = self.lock();
        cache.serial += 1;
        match result {
            Ok((value, lifetime)) => {
                let mut header = HeaderValue::from_str(&format!("Bearer {value}"))
                    .map_err(|_| TokenError::Malformed { status: 200 })?;
                header.set_sensitive(true);
                let token = Token {
                    header,
                    serial: cache.serial,
                    expires: now + lifetime,
                    renew_at: now + lifetime - RENEW_BEFORE.min(lifetime / 2),
                };
                cache.token = Some(token.clone());
                cache.failure = None;
                cache.backoff = FIRST_BACKOFF;
                tracing::info!(
                    tenant = self.app.tenant,
                    client_id = self.app.client_id,
                    expires_in_s = lifetime.as_secs(),
                    "Entra ID token obtained"
                );
                Ok(token)
            }
            Err(error) => {
                let backoff = cache.backoff;
                cache.failure = Some((error.clone(), now + backoff));
                cache.backoff = (backoff * 2).min(MAX_BACKOFF);
                // A token that is still valid keeps serving.
                let still = cache
                    .token
                    .clone()
                    .filter(|t| Some(t.serial) != stale && now + margin(t) < t.expires);
                tracing::warn!(
                    tenant = self.app.tenant,
                    client_id = self.app.client_id,
                    %error,
                    retry_in_ms = backoff.as_millis() as u64,
                    still_valid = still.is_some(),
                    "Entra ID token not renewed"
                );
                still.ok_or(error)
            }
        }
    }

    /// The token request: the app's credential (a secret, or STS's assertion), then Entra.
    async fn request(&self) -> Result<(String, Duration), TokenError> {
        let assertion = match &self.app.credential {
            EntraCredential::AwsFederation { audience } => Some(self.assertion(audience).await?),
            EntraCredential::ClientSecret { .. } => None,
        };
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials")
                .append_pair("client_id", &self.app.client_id)
                .append_pair("scope", &self.app.scope);
            match (&self.app.credential, &assertion) {
                (EntraCredential::ClientSecret { secret, .. }, _) => {
                    form.append_pair("client_secret", secret.expose());
                }
                (EntraCredential::AwsFederation { .. }, Some(assertion)) => {
                    form.append_pair(
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    )
                    .append_pair("client_assertion", assertion);
                }
                (EntraCredential::AwsFederation { .. }, None) => {}
            }
            form.finish()
        };
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.app.authority, self.app.tenant
        );
        let unreachable = |e: reqwest::Error| TokenError::Unreachable {
            authority: self.app.authority.clone(),
            reason: causes(&e),
        };
        let response = self
            .http
            .post(url)
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .body(form)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(unreachable)?;
        if (200..300).contains(&status) {
            let answer: TokenAnswer =
                serde_json::from_slice(&body).map_err(|_| TokenError::Malformed { status })?;
            return Ok((answer.access_token, Duration::from_secs(answer.expires_in)));
        }
        match serde_json::from_slice::<ErrorAnswer>(&body) {
            Ok(e) => Err(TokenError::Refused {
                error: e.error,
                // The description's first line: the AADSTS code and what it means; the trace
                // and correlation ids after it are for Microsoft's support.
                description: e
                    .error_description
                    .split(" Trace ID:")
                    .next()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            }),
            Err(_) if status >= 500 => Err(TokenError::Unreachable {
                authority: self.app.authority.clone(),
                reason: format!("it answered {status}"),
            }),
            Err(_) => Err(TokenError::Malformed { status }),
        }
    }

    /// STS's signed JWT for the function's role, for `audience`.
    async fn assertion(&self, audience: &str) -> Result<String, TokenError> {
        let sts = self.sts.as_ref().ok_or(TokenError::NoAws)?;
        let output = sts
            .get_web_identity_token()
            .audience(audience)
            .signing_algorithm("RS256")
            .duration_seconds(ASSERTION_SECONDS)
            .send()
            .await
            .map_err(|e| {
                use aws_sdk_sts::error::ProvideErrorMetadata;
                let reason = match (e.code(), e.message()) {
                    (Some(code), Some(message)) => format!("{code}: {message}"),
                    (Some(code), None) => code.to_owned(),
                    _ => aws_sdk_sts::error::DisplayErrorContext(&e).to_string(),
                };
                let fix = match e.code() {
                    Some("OutboundWebIdentityFederationDisabledException") => {
                        "; enable it once for the account: aws iam enable-outbound-web-identity-federation"
                    }
                    Some("AccessDenied" | "AccessDeniedException") => {
                        "; give the function's role sts:GetWebIdentityToken"
                    }
                    _ => "",
                };
                TokenError::Sts(format!("{reason}{fix}"))
            })?;
        output
            .web_identity_token()
            .map(str::to_owned)
            .ok_or_else(|| TokenError::Sts("the answer held no token".into()))
    }
}

/// How close to its end a token stops being used.
fn margin(token: &Token) -> Duration {
    let life = token.expires.saturating_duration_since(token.renew_at) * 2;
    END_MARGIN.min(life / 10)
}

/// An error and its causes, as one line (the URL, never a header or a form field).
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
