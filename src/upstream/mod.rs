//! The upstream client: the only code that knows reqwest and Azure OpenAI's wire format. It
//! builds each deployment's requests once, makes one call when asked, and reads the answer into
//! a typed [`Called`]. It never retries and never sleeps; routing decides what happens next.
//! What differs between kinds of call is in one file per kind (`chat.rs`, `embeddings.rs`,
//! `responses.rs`), behind the traits of `kind.rs`.

mod chat;
mod embeddings;
mod entra;
mod events;
pub(crate) mod fuzz;
mod kind;
mod responses;
mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::Value;

use crate::clock::Clock;
use crate::net::Http;
use crate::outcome::{Called, Document, Failure, JsonBody, Quota, Transient};
use crate::pool::{ApiStyle, Auth, Deployment, Pool};

pub use entra::{Token, TokenError, TokenSource};

pub use chat::Chat;
pub use embeddings::Embeddings;
pub use events::{Chunk, EventStream, Next, Opened, StreamEvent};
pub use kind::{Edit, Kind, KindId, Spent, Streaming};
pub use responses::{Responses, Stored, StoredOp, is_response_id, stores};
use wire::{classify, quota};

/// Where and how to call one deployment, prepared once at cold start.
struct Target {
    /// Each kind's URL ([`KindId::slot`]), parsed once here: reqwest would otherwise parse the
    /// string again on every call. The configuration has checked it; a URL that still does not
    /// parse fails its calls.
    urls: Vec<Option<reqwest::Url>>,
    /// Each kind's `model` for the body, where the API wants one.
    models: Vec<Option<String>>,
    auth: Credential,
    /// Its API takes `stream_options` (v1, and api-version 2024-09-01-preview or later).
    stream_usage: bool,
}

/// How one deployment's requests say who sends them.
enum Credential {
    /// Nothing (an OpenAI-compatible server that takes no key).
    None,
    /// Its key, as `api-key` or `Authorization: Bearer`.
    Key(HeaderName, HeaderValue),
    /// An Entra ID token, shared by every deployment of the same app and scope.
    Entra(Arc<TokenSource>),
}

/// Kind `id`'s URL and `model` for deployment `d`: the one list of every kind of call.
fn prepare(id: KindId, d: &Deployment) -> (Option<reqwest::Url>, Option<String>) {
    fn of<K: Kind>(d: &Deployment) -> (Option<reqwest::Url>, Option<String>) {
        (
            reqwest::Url::parse(&K::url(d)).ok(),
            K::model(d).map(str::to_owned),
        )
    }
    match id {
        KindId::Chat => of::<Chat>(d),
        KindId::Embeddings => of::<Embeddings>(d),
        KindId::Responses => of::<Responses>(d),
    }
}

/// The Azure OpenAI (and OpenAI-compatible) client for every deployment in the pool. Built once
/// at cold start over the environment's one client ([`Http`]), keys turned into sensitive header
/// values.
pub struct Upstream {
    client: Client,
    targets: Vec<Target>,
}

impl Upstream {
    /// The calls of every deployment in `pool` over `http`; `aws` reaches STS for deployments
    /// that authenticate with Entra ID through the function's AWS role.
    pub fn new(pool: &Pool, http: &Http, aws: Option<&SdkConfig>) -> Self {
        let client = http.client().clone();
        let mut sources: HashMap<(String, String, String, String), Arc<TokenSource>> =
            HashMap::new();
        let targets = pool
            .deployments
            .iter()
            .map(|d| {
                let (urls, models) = KindId::ALL.iter().map(|&id| prepare(id, d)).unzip();
                let stream_usage = match &d.api {
                    ApiStyle::V1 => true,
                    ApiStyle::Classic { api_version } => api_version.as_str() >= "2024-09-01",
                };
                if let Auth::Entra(app) = &d.auth {
                    let source = sources.entry(app.cache_key()).or_insert_with(|| {
                        Arc::new(TokenSource::new(app.clone(), client.clone(), aws))
                    });
                    return Target {
                        urls,
                        models,
                        auth: Credential::Entra(Arc::clone(source)),
                        stream_usage,
                    };
                }
                let (header, value) = match d.api {
                    ApiStyle::Classic { .. } => (
                        HeaderName::from_static("api-key"),
                        d.key.as_ref().map(|k| k.expose().to_owned()),
                    ),
                    ApiStyle::V1 => (
                        AUTHORIZATION,
                        d.key.as_ref().map(|k| format!("Bearer {}", k.expose())),
                    ),
                };
                let auth = value.and_then(|v| HeaderValue::from_str(&v).ok()).map_or(
                    Credential::None,
                    |mut v| {
                        // Keeps the key out of any debug output of the request.
                        v.set_sensitive(true);
                        Credential::Key(header, v)
                    },
                );
                Target {
                    urls,
                    models,
                    auth,
                    stream_usage,
                }
            })
            .collect();
        Self { client, targets }
    }

    /// The POST of kind `K` for deployment `index`: URL, key, body (with `model` set where the
    /// API wants it).
    fn request<K: Kind>(
        &self,
        index: usize,
        body: &JsonBody,
        token: Option<&Token>,
    ) -> Option<RequestBuilder> {
        let target = self.targets.get(index)?;
        let slot = K::ID.slot();
        let url = target.urls.get(slot)?.clone()?;
        let bytes = match target.models.get(slot).and_then(Option::as_ref) {
            Some(model) => {
                let mut body = body.clone();
                body.insert("model".into(), Value::String(model.clone()));
                serde_json::to_vec(&body)
            }
            None => serde_json::to_vec(body),
        }
        // Serialising a JSON map cannot fail.
        .unwrap_or_default();
        let request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(bytes);
        Some(authorize(request, &target.auth, token))
    }

    /// The Entra ID token deployment `index`'s calls carry now (`None` for a deployment with a
    /// key), obtained within `limit`: no token is a failed attempt of its own.
    async fn token(
        &self,
        clock: &impl Clock,
        index: usize,
        limit: Duration,
    ) -> Result<Option<Token>, Failure> {
        let Some(Credential::Entra(source)) = self.targets.get(index).map(|t| &t.auth) else {
            return Ok(None);
        };
        match clock.timeout(limit, source.token(clock)).await {
            Some(Ok(token)) => Ok(Some(token)),
            Some(Err(error)) => Err(Failure::NoToken {
                message: error.to_string(),
            }),
            None => Err(Failure::NoToken {
                message: "no Entra ID token within the attempt's time".into(),
            }),
        }
    }

    /// After a 401 with `stale`, a renewed token (within `limit`), if one can be had.
    async fn renewed(
        &self,
        clock: &impl Clock,
        index: usize,
        stale: &Token,
        limit: Duration,
    ) -> Option<Token> {
        let Some(Credential::Entra(source)) = self.targets.get(index).map(|t| &t.auth) else {
            return None;
        };
        tracing::warn!(
            deployment = index,
            "a 401 with an Entra ID token that should be valid: renewing it and trying once more"
        );
        clock
            .timeout(limit, source.renew(clock, stale))
            .await
            .and_then(Result::ok)
    }

    /// Whether any deployment authenticates with Entra ID, and a token for each app: for
    /// `--check` and for warming up at cold start (errors say why none could be had).
    pub async fn tokens(&self, clock: &impl Clock) -> Vec<Result<(), TokenError>> {
        let mut seen: Vec<*const TokenSource> = Vec::new();
        let mut out = Vec::new();
        for target in &self.targets {
            if let Credential::Entra(source) = &target.auth {
                if seen.contains(&Arc::as_ptr(source)) {
                    continue;
                }
                seen.push(Arc::as_ptr(source));
                out.push(source.token(clock).await.map(|_| ()));
            }
        }
        out
    }

    /// One call of kind `K` to deployment `index` for a whole answer, bounded by `timeout` from
    /// start to the last body byte.
    pub async fn call<K: Kind>(
        &self,
        clock: &impl Clock,
        index: usize,
        body: &JsonBody,
        timeout: Duration,
    ) -> Called<K::Answer> {
        let started = clock.now();
        let token = match self.token(clock, index, timeout).await {
            Ok(token) => token,
            Err(failure) => return Called::failed(failure),
        };
        let called = match self.request::<K>(index, body, token.as_ref()) {
            Some(request) => whole::<K>(clock, request, left(clock, started, timeout)).await,
            None => return Called::failed(Failure::Transient(Transient::Connect)),
        };
        // A token that should be valid was refused: renewed once, and the call made once more.
        if let (Some(401), Some(stale)) = (called.status, &token)
            && let Some(fresh) = self
                .renewed(clock, index, stale, left(clock, started, timeout))
                .await
            && let Some(request) = self.request::<K>(index, body, Some(&fresh))
        {
            return whole::<K>(clock, request, left(clock, started, timeout)).await;
        }
        called
    }

    /// One call `op` on the response `id` stored at deployment `index` (an id checked by
    /// [`is_response_id`]), the caller's `query` passed on, bounded by `timeout`.
    pub async fn stored(
        &self,
        clock: &impl Clock,
        index: usize,
        op: StoredOp,
        id: &str,
        query: Option<&str>,
        timeout: Duration,
    ) -> Called<Document> {
        let Some(target) = self.targets.get(index) else {
            return Called::failed(Failure::Transient(Transient::Connect));
        };
        let Some(mut url) = target.urls.get(KindId::Responses.slot()).cloned().flatten() else {
            return Called::failed(Failure::Transient(Transient::Connect));
        };
        if let Ok(mut path) = url.path_segments_mut() {
            path.push(id);
            if op == StoredOp::InputItems {
                path.push("input_items");
            }
        }
        url.set_query(query.filter(|q| !q.is_empty()));
        let method = match op {
            StoredOp::Delete => Method::DELETE,
            StoredOp::Get | StoredOp::InputItems => Method::GET,
        };
        let started = clock.now();
        let token = match self.token(clock, index, timeout).await {
            Ok(token) => token,
            Err(failure) => return Called::failed(failure),
        };
        let request = self.client.request(method.clone(), url.clone());
        let request = authorize(request, &target.auth, token.as_ref());
        let called = whole::<Stored>(clock, request, left(clock, started, timeout)).await;
        if let (Some(401), Some(stale)) = (called.status, &token)
            && let Some(fresh) = self
                .renewed(clock, index, stale, left(clock, started, timeout))
                .await
        {
            let request = authorize(self.client.request(method, url), &target.auth, Some(&fresh));
            return whole::<Stored>(clock, request, left(clock, started, timeout)).await;
        }
        called
    }

    /// One streaming call of kind `K` to deployment `index`, read up to its first content, which
    /// must come (headers included) within `first_token` of the call's start; an error answer
    /// within `timeout`. The rest of the stream is left to the caller, which bounds it event by
    /// event.
    pub async fn open<K: Streaming>(
        &self,
        clock: &impl Clock,
        index: usize,
        body: &JsonBody,
        timeout: Duration,
        first_token: Duration,
    ) -> Called<Opened> {
        // Usage asked for where the deployment's API version knows `stream_options`.
        let asked = self
            .targets
            .get(index)
            .filter(|t| t.stream_usage)
            .and_then(|_| K::with_usage(body));
        let body = asked.as_ref().unwrap_or(body);
        let started = clock.now();
        // No content this long after the request, headers included, is a failed attempt.
        let first_token = first_token.min(timeout);
        let token = match self.token(clock, index, first_token).await {
            Ok(token) => token,
            Err(failure) => return Called::failed(failure),
        };
        let send = |token: Option<&Token>| {
            let request = self.request::<K>(index, body, token);
            let limit = left(clock, started, first_token);
            async move {
                let Some(request) = request else {
                    return Err(Called::failed(Failure::Transient(Transient::Connect)));
                };
                match clock.timeout(limit, request.send()).await {
                    None => Err(Called::failed(Failure::Transient(
                        Transient::FirstTokenTimeout,
                    ))),
                    Some(Err(e)) => Err(Called::failed(Failure::Transient(transport_failure(&e)))),
                    Some(Ok(response)) => Ok(response),
                }
            }
        };
        let mut response = match send(token.as_ref()).await {
            Ok(response) => response,
            Err(called) => return called,
        };
        if response.status() == reqwest::StatusCode::UNAUTHORIZED
            && let Some(stale) = &token
            && let Some(fresh) = self
                .renewed(clock, index, stale, left(clock, started, first_token))
                .await
        {
            response = match send(Some(&fresh)).await {
                Ok(response) => response,
                Err(called) => return called,
            };
        }
        let status = Some(response.status().as_u16());
        if !response.status().is_success() {
            // An error answer is short: the attempt's time limit bounds reading it too.
            let failure = match clock
                .timeout(timeout, read::<K>(response, clock.wall()))
                .await
            {
                Some(Called {
                    result: Err(failure),
                    ..
                }) => failure,
                // Only a 2xx classifies as an answer.
                Some(Called { result: Ok(_), .. }) => Failure::Transient(Transient::BadResponse),
                None => Failure::Transient(Transient::Timeout),
            };
            return Called {
                status,
                quota: Quota::default(),
                result: Err(failure),
            };
        }
        let quota = quota(response.headers());
        // The first-token limit counts from the start of the call.
        let left = first_token.saturating_sub(clock.now() - started);
        let result = clock
            .timeout(
                left,
                events::first_content(EventStream::new(response, K::event)),
            )
            .await
            .unwrap_or(Err(Failure::Transient(Transient::FirstTokenTimeout)));
        Called {
            status,
            quota,
            result,
        }
    }
}

/// What is left of `limit` since `started`.
fn left(clock: &impl Clock, started: std::time::Instant, limit: Duration) -> Duration {
    limit.saturating_sub(clock.now() - started)
}

/// `request` with the deployment's credential: its key, or the Entra ID `token`.
fn authorize(
    request: RequestBuilder,
    credential: &Credential,
    token: Option<&Token>,
) -> RequestBuilder {
    match (credential, token) {
        (Credential::Key(name, value), _) => request.header(name, value.clone()),
        (Credential::Entra(_), Some(token)) => request.header(AUTHORIZATION, token.header.clone()),
        (Credential::Entra(_), None) | (Credential::None, _) => request,
    }
}

/// Sends `request` and reads its whole answer as kind `K`, within `timeout` from start to the
/// last body byte.
async fn whole<K: Kind>(
    clock: &impl Clock,
    request: RequestBuilder,
    timeout: Duration,
) -> Called<K::Answer> {
    let now = clock.wall();
    let call = async {
        match request.send().await {
            Ok(response) => read::<K>(response, now).await,
            Err(e) => Called::failed(Failure::Transient(transport_failure(&e))),
        }
    };
    clock
        .timeout(timeout, call)
        .await
        .unwrap_or_else(|| Called::failed(Failure::Transient(Transient::Timeout)))
}

/// Reads a whole answer and classifies it.
async fn read<K: Kind>(response: Response, now: SystemTime) -> Called<K::Answer> {
    let status = response.status();
    let headers = response.headers().clone();
    let result = match response.bytes().await {
        Ok(bytes) => classify::<K>(status, &headers, bytes, now),
        Err(e) => Err(Failure::Transient(transport_failure(&e))),
    };
    Called {
        status: Some(status.as_u16()),
        quota: quota(&headers),
        result,
    }
}

fn transport_failure(e: &reqwest::Error) -> Transient {
    if e.is_timeout() {
        Transient::Timeout
    } else if e.is_connect() {
        // What failed (refused, DNS, a certificate) is the fix a user needs, so it is logged
        // here, the one place that has it. The chain names the URL, never the key (a header).
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        let hint = reason.contains("certificate").then_some(
            "the server's certificate is not trusted; if a proxy or private CA signs it, name that CA's PEM file in EXTRA_CA_CERTS",
        );
        tracing::warn!(%reason, hint, "could not connect to a deployment");
        Transient::Connect
    } else {
        Transient::Reset
    }
}
