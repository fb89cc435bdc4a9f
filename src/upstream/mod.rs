//! The upstream client: the only code that knows reqwest and Azure OpenAI's wire format. It
//! builds each deployment's requests once, makes one call when asked, and reads the answer into
//! a typed [`Called`]. It never retries and never sleeps; routing decides what happens next.
//! What differs between kinds of call is in one file per kind (`chat.rs`, `embeddings.rs`,
//! `responses.rs`), behind the traits of `kind.rs`.

mod chat;
mod embeddings;
mod events;
pub(crate) mod fuzz;
mod kind;
mod responses;
mod wire;

use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::Value;

use crate::clock::Clock;
use crate::net::Http;
use crate::outcome::{Called, Document, Failure, JsonBody, Quota, Transient};
use crate::pool::{ApiStyle, Deployment, Pool};

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
    auth: Option<(HeaderName, HeaderValue)>,
    /// Its API takes `stream_options` (v1, and api-version 2024-09-01-preview or later).
    stream_usage: bool,
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
    pub fn new(pool: &Pool, http: &Http) -> Self {
        let client = http.client().clone();
        let targets = pool
            .deployments
            .iter()
            .map(|d| {
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
                let auth = value
                    .and_then(|v| HeaderValue::from_str(&v).ok())
                    .map(|mut v| {
                        // Keeps the key out of any debug output of the request.
                        v.set_sensitive(true);
                        (header, v)
                    });
                let (urls, models) = KindId::ALL.iter().map(|&id| prepare(id, d)).unzip();
                let stream_usage = match &d.api {
                    ApiStyle::V1 => true,
                    ApiStyle::Classic { api_version } => api_version.as_str() >= "2024-09-01",
                };
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
    fn request<K: Kind>(&self, index: usize, body: &JsonBody) -> Option<RequestBuilder> {
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
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(bytes);
        if let Some((name, value)) = &target.auth {
            request = request.header(name, value.clone());
        }
        Some(request)
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
        match self.request::<K>(index, body) {
            Some(request) => whole::<K>(clock, request, timeout).await,
            None => Called::failed(Failure::Transient(Transient::Connect)),
        }
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
        let mut request = self.client.request(method, url);
        if let Some((name, value)) = &target.auth {
            request = request.header(name, value.clone());
        }
        whole::<Stored>(clock, request, timeout).await
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
        let Some(request) = self.request::<K>(index, asked.as_ref().unwrap_or(body)) else {
            return Called::failed(Failure::Transient(Transient::Connect));
        };
        let started = clock.now();
        // No content this long after the request, headers included, is a failed attempt.
        let first_token = first_token.min(timeout);
        let response = match clock.timeout(first_token, request.send()).await {
            None => return Called::failed(Failure::Transient(Transient::FirstTokenTimeout)),
            Some(Err(e)) => return Called::failed(Failure::Transient(transport_failure(&e))),
            Some(Ok(response)) => response,
        };
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
