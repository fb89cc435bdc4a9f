//! A small, real HTTP server on 127.0.0.1 speaking Azure OpenAI's chat-completions wire format,
//! scriptable per deployment: healthy answers, 429s with each `retry-after` header variant,
//! 5xx, content filtering, hangs and connection resets, and for `"stream": true` requests
//! Azure-style server-sent events that can be cut, stalled, corrupted or left without `[DONE]`.
//!
//! ```no_run
//! use azure_openai_emulator::{Behavior, Emulator, RetryAfter};
//!
//! # async fn demo() -> std::io::Result<()> {
//! let emu = Emulator::builder()
//!     .deployment("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7)))
//!     .deployment("gpt-35-turbo", Behavior::Healthy)
//!     .start()
//!     .await?;
//! // POST {emu.url()}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
//! // with header `api-key: {emu.api_key()}` now answers 429 with `retry-after: 7`.
//! emu.push("gpt-35-turbo", Behavior::ServerError); // the next call only
//! assert_eq!(emu.calls("gpt-4o"), 0);
//! # Ok(()) }
//! ```
//!
//! Routes: `POST /openai/deployments/{deployment}/chat/completions?api-version=V` and
//! `POST /openai/v1/chat/completions` (deployment from the body's `model`). Auth: `api-key: KEY`
//! or `Authorization: Bearer KEY`. Every call is counted and recorded first; then come, in order,
//! the api-version check (classic route), the key, the deployment (registered?), the body
//! (`messages`), and only then the deployment's scripted behaviour.
//!
//! Chaos: [`Behavior::Chaos`] (`chaos:<seed>`) makes a deployment switch at random, seeded and
//! reproducible, between healthy and every kind of failure, in phases of 0.5 to 3 s counted from
//! the emulator's start; each call acts out the phase in force when it arrives ([`Chaos`]).
//!
//! Every deployment answers `[<deployment>] You said: <last user message>`. A request whose
//! last assistant message is the beginning of such an answer (as the last message, or followed by
//! one user message asking to continue) gets the rest of it: that is how the emulator continues a
//! partial answer.
//!
//! A streamed answer is `data: <json>\n\n` events: Azure's `prompt_filter_results` event (empty
//! `id`), a role chunk, one `chat.completion.chunk` per word of the answer, a finish chunk, a usage
//! chunk if `stream_options.include_usage` is true, then `data: [DONE]`. Error behaviours answer
//! streamed requests with the same JSON errors as others, before any event.
//!
//! HTTPS: [`EmulatorBuilder::tls`] serves the same routes, streams and faults over TLS, so a
//! client's TLS path (cold start, the first request's handshake, trusting an extra CA) can be
//! tested and measured on loopback. Each start generates a test CA ("fallback-chat test CA") and a
//! certificate it signs for `localhost`, `127.0.0.1` and `::1`; nothing trusts that CA until the
//! client is given [`Emulator::ca_pem`]. ALPN offers `http/1.1` only. The binary does the same
//! with `--tls-ca-out PATH`, writing the CA's PEM to PATH before its `listening on https://…` line.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use azure_openai_emulator::{Behavior, Emulator};
//!
//! let emu = Emulator::builder()
//!     .deployment("gpt-4o", Behavior::Healthy)
//!     .tls()
//!     .start()
//!     .await?;
//! assert!(emu.url().starts_with("https://127.0.0.1:"));
//! let ca_pem: &str = emu.ca_pem().expect("serving HTTPS");
//! // Add `ca_pem` to the client's root store (e.g. rustls `RootCertStore::add`), then call
//! // {emu.url()}/openai/deployments/gpt-4o/chat/completions?api-version=... as over HTTP.
//! # let _ = ca_pem;
//! # Ok(()) }
//! ```

mod behavior;
pub mod chaos;
mod embeddings;
mod entra;
mod responses;
mod server;
mod tls;
mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use behavior::{Behavior, RetryAfter};
pub use chaos::Chaos;
pub use entra::{EntraConfig, TOKEN_EXCHANGE_AUDIENCE, TokenMode};

/// One request received on a chat-completions route, as recorded by the emulator.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// The URL path, e.g. `/openai/deployments/gpt-4o/chat/completions`.
    pub path: String,
    /// The raw query string (without `?`), e.g. `api-version=2024-10-21`.
    pub query: Option<String>,
    /// Headers by lowercase name; repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The JSON body, or the raw text as a JSON string when it was not JSON.
    pub body: serde_json::Value,
    /// When it arrived, since the emulator started.
    pub at: Duration,
}

/// A running emulator. Dropping it stops the server: the listener closes and every connection,
/// including hung ones, is dropped (immediately on a multi-thread runtime, at the next scheduling
/// point on a current-thread one).
pub struct Emulator {
    addr: SocketAddr,
    /// The test CA's certificate in PEM when serving HTTPS.
    ca_pem: Option<String>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Emulator {
    /// A builder with key `emulator-key`, no deployments, bound to `127.0.0.1:0`.
    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder {
            api_key: "emulator-key".to_owned(),
            deployments: Vec::new(),
            models: Vec::new(),
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            log_calls: false,
            tls: false,
            entra: None,
            local_auth: true,
        }
    }

    /// The base URL, `http://127.0.0.1:PORT`, or `https://127.0.0.1:PORT` when serving HTTPS
    /// ([`EmulatorBuilder::tls`]); no trailing slash.
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The test CA's certificate in PEM when serving HTTPS ([`EmulatorBuilder::tls`]), for the
    /// client to trust; `None` when serving plain HTTP.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The key accepted in `api-key` or `Authorization: Bearer`.
    pub fn api_key(&self) -> &str {
        &self.shared.api_key
    }

    /// Sets the steady behaviour of `deployment` from now on, registering it if new.
    /// Queued one-shot behaviours (see [`Emulator::push`]) still come first.
    pub fn set(&self, deployment: &str, behavior: Behavior) {
        self.shared.lock().entry(deployment).steady = Some(behavior);
    }

    /// Queues a one-shot behaviour (FIFO) for the next call to `deployment`, before the steady one
    /// applies again. Registers the deployment as [`Behavior::Healthy`] if new.
    /// Calls rejected before the behaviour applies (wrong key, bad body) do not consume it.
    pub fn push(&self, deployment: &str, behavior: Behavior) {
        let mut state = self.shared.lock();
        let d = state.entry(deployment);
        d.steady.get_or_insert(Behavior::Healthy);
        d.queue.push_back(behavior);
    }

    /// Delay added before answering a successful (200) call of `deployment`.
    pub fn set_latency(&self, deployment: &str, latency: Duration) {
        self.shared.lock().entry(deployment).latency = latency;
    }

    /// Pause between consecutive events of a streamed (`"stream": true`) answer of `deployment`
    /// (default zero); [`Emulator::set_latency`] still applies before the response headers.
    pub fn set_chunk_delay(&self, deployment: &str, delay: Duration) {
        self.shared.lock().entry(deployment).chunk_delay = delay;
    }

    /// Values of `x-ratelimit-remaining-requests` / `-tokens` on successful answers
    /// (default 99 and 99000).
    pub fn set_remaining(&self, deployment: &str, requests: u64, tokens: u64) {
        let mut state = self.shared.lock();
        let d = state.entry(deployment);
        (d.remaining_requests, d.remaining_tokens) = (requests, tokens);
    }

    /// Calls received for `deployment` (any outcome, including rejected, hung and reset ones).
    pub fn calls(&self, deployment: &str) -> usize {
        self.shared
            .lock()
            .deployments
            .get(deployment)
            .map_or(0, |d| d.calls)
    }

    /// Requests made to the Entra token endpoint.
    pub fn token_requests(&self) -> usize {
        self.shared.entra().token_requests
    }

    /// Each token request's form fields, in order.
    pub fn token_forms(&self) -> Vec<HashMap<String, String>> {
        self.shared.entra().token_forms.clone()
    }

    /// Requests made to STS's `GetWebIdentityToken`.
    pub fn sts_requests(&self) -> usize {
        self.shared.entra().sts_requests
    }

    /// How the token endpoint answers from now on.
    pub fn set_token_mode(&self, mode: TokenMode) {
        self.shared.entra().mode = mode;
    }

    /// Every token issued so far is refused from now on (401), as after a revoked role.
    pub fn revoke_tokens(&self) {
        self.shared.entra().revoke();
    }

    /// Calls received on the chat-completions routes, for any deployment or none.
    /// Calls on stored responses (`GET`/`DELETE /openai/v1/responses/{id}`, `input_items`),
    /// which name no deployment.
    pub fn stored_calls(&self) -> usize {
        self.shared.lock().stored_calls
    }

    /// Whether this resource stores response `id`.
    pub fn has_response(&self, id: &str) -> bool {
        self.shared.stored(id).is_some()
    }

    pub fn total_calls(&self) -> usize {
        self.shared.lock().total_calls
    }

    /// The requests received for `deployment`, oldest first.
    pub fn requests(&self, deployment: &str) -> Vec<RecordedRequest> {
        let state = self.shared.lock();
        state
            .deployments
            .get(deployment)
            .map_or_else(Vec::new, |d| d.requests.clone())
    }

    /// When each call for `deployment` arrived, oldest first, since the emulator started.
    pub fn call_times(&self, deployment: &str) -> Vec<Duration> {
        let state = self.shared.lock();
        state
            .deployments
            .get(deployment)
            .map_or_else(Vec::new, |d| d.requests.iter().map(|r| r.at).collect())
    }

    /// Time since the emulator started, the clock of [`RecordedRequest::at`].
    pub fn elapsed(&self) -> Duration {
        self.shared.elapsed()
    }

    /// Sets every call counter to zero and forgets recorded requests (behaviours are kept).
    pub fn reset_counters(&self) {
        let mut state = self.shared.lock();
        state.total_calls = 0;
        for d in state.deployments.values_mut() {
            d.calls = 0;
            d.requests.clear();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // The accept task owns the listener and a JoinSet of connections: aborting it drops them all.
        self.task.abort();
    }
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .field("tls", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Configures and starts an [`Emulator`].
#[derive(Clone, Debug)]
pub struct EmulatorBuilder {
    api_key: String,
    deployments: Vec<(String, Behavior)>,
    models: Vec<(String, String)>,
    bind: SocketAddr,
    log_calls: bool,
    tls: bool,
    entra: Option<EntraConfig>,
    local_auth: bool,
}

impl EmulatorBuilder {
    /// Also serves Entra ID's token endpoint for this app registration (and STS's
    /// `GetWebIdentityToken`), and accepts the Bearer tokens it issues on every deployment.
    pub fn entra(mut self, config: EntraConfig) -> Self {
        self.entra = Some(config);
        self
    }

    /// Refuses keys on every deployment, as a resource with `disableLocalAuth` does: only
    /// Entra tokens are accepted.
    pub fn disable_local_auth(mut self) -> Self {
        self.local_auth = false;
        self
    }

    /// The key to accept (default `emulator-key`).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = key.into();
        self
    }

    /// Registers a deployment with its steady behaviour.
    pub fn deployment(mut self, name: impl Into<String>, behavior: Behavior) -> Self {
        self.deployments.push((name.into(), behavior));
        self
    }

    /// The `model` reported for `deployment` (default derived from the name:
    /// `gpt-4o` -> `gpt-4o-2024-08-06`, `gpt-35-turbo` -> `gpt-35-turbo-0125`, else the name).
    pub fn model_version(mut self, deployment: &str, model: impl Into<String>) -> Self {
        self.models.push((deployment.to_owned(), model.into()));
        self
    }

    /// The address to listen on (default `127.0.0.1:0`, an ephemeral port).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Logs one line per call to stderr (deployment, behaviour, status); off by default.
    pub fn log_calls(mut self, on: bool) -> Self {
        self.log_calls = on;
        self
    }

    /// Serves HTTPS instead of HTTP, with a certificate for `localhost`, `127.0.0.1` and `::1`
    /// signed by a test CA generated at [`EmulatorBuilder::start`]: trust
    /// [`Emulator::ca_pem`] in the client. ALPN offers `http/1.1` only. Off by default.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Binds the listener and starts serving on the current tokio runtime.
    pub async fn start(self) -> std::io::Result<Emulator> {
        // Generated before binding, so a failure leaves no listener behind.
        let tls = self.tls.then(tls::TestTls::generate).transpose()?;
        let listener = TcpListener::bind(self.bind).await?;
        let addr = listener.local_addr()?;
        let mut state = StateInner::default();
        for (name, behavior) in self.deployments {
            state.entry(&name).steady = Some(behavior);
        }
        for (name, model) in self.models {
            state.entry(&name).model = Some(model);
        }
        let mut entra = entra::EntraState::default();
        entra.config = self.entra;
        let shared = Arc::new(Shared {
            api_key: self.api_key,
            local_auth: self.local_auth,
            entra: Mutex::new(entra),
            log_calls: self.log_calls,
            started: Instant::now(),
            state: Mutex::new(state),
        });
        let (ca_pem, acceptor) = match tls {
            Some(tls) => (Some(tls.ca_pem), Some(tls.acceptor)),
            None => (None, None),
        };
        let task = tokio::spawn(server::accept_loop(
            listener,
            server::router(shared.clone()),
            acceptor,
        ));
        Ok(Emulator {
            addr,
            ca_pem,
            shared,
            task,
        })
    }
}

/// State shared by the handle and the server.
pub(crate) struct Shared {
    api_key: String,
    /// Keys are accepted (not a `disableLocalAuth` resource).
    local_auth: bool,
    entra: Mutex<entra::EntraState>,
    log_calls: bool,
    /// When the emulator started: requests are timed from it.
    started: Instant,
    state: Mutex<StateInner>,
}

#[derive(Default)]
struct StateInner {
    deployments: HashMap<String, DeploymentState>,
    total_calls: usize,
    /// The resource's stored responses (the Responses API keeps them per resource).
    responses: HashMap<String, responses::StoredResponse>,
    /// Calls on stored responses (`GET`, `DELETE`, `input_items`).
    stored_calls: usize,
}

impl StateInner {
    fn entry(&mut self, name: &str) -> &mut DeploymentState {
        self.deployments
            .entry(name.to_owned())
            .or_insert_with(|| DeploymentState {
                steady: None,
                queue: VecDeque::new(),
                latency: Duration::ZERO,
                chunk_delay: Duration::ZERO,
                model: None,
                remaining_requests: 99,
                remaining_tokens: 99_000,
                calls: 0,
                requests: Vec::new(),
                chaos: None,
            })
    }
}

/// Per deployment name; an entry exists for unregistered names too (calls, latency, model).
struct DeploymentState {
    /// `None`: not registered, calls answer 404 DeploymentNotFound.
    steady: Option<Behavior>,
    queue: VecDeque<Behavior>,
    latency: Duration,
    chunk_delay: Duration,
    model: Option<String>,
    remaining_requests: u64,
    remaining_tokens: u64,
    calls: usize,
    requests: Vec<RecordedRequest>,
    /// The schedule of the last [`Behavior::Chaos`] acted out, kept so phases are drawn once.
    chaos: Option<chaos::Schedule>,
}

impl DeploymentState {
    /// What `behavior` does at `at`: a chaos behaviour's phase then, any other as it is.
    fn resolve(&mut self, name: &str, behavior: Behavior, at: Duration) -> Behavior {
        let Behavior::Chaos(wanted) = behavior else {
            return behavior;
        };
        let schedule = match &mut self.chaos {
            Some(schedule) if schedule.chaos() == wanted => schedule,
            other => other.insert(wanted.schedule(name)),
        };
        schedule.at(at).behavior.clone()
    }
}

/// What the server should do with one call of a registered deployment.
pub(crate) struct Plan {
    pub behavior: Behavior,
    pub model: String,
    pub latency: Duration,
    pub chunk_delay: Duration,
    pub remaining_requests: u64,
    pub remaining_tokens: u64,
}

impl Shared {
    pub(crate) fn entra(&self) -> MutexGuard<'_, entra::EntraState> {
        self.entra
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a data-plane request may go on: the key (`api-key`, or as a v1 Bearer) where
    /// keys are accepted, or a Bearer token the emulator's Entra issued and that has not expired.
    pub(crate) fn authorized(&self, headers: &axum::http::HeaderMap) -> bool {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let key = headers
            .get("api-key")
            .is_some_and(|v| v.as_bytes() == self.api_key.as_bytes())
            || bearer == Some(self.api_key.as_str());
        (self.local_auth && key) || bearer.is_some_and(|token| self.entra().valid(token))
    }

    /// Whether a control request (`/_emulator/...`) carries the emulator's key.
    pub(crate) fn control(&self, headers: &axum::http::HeaderMap) -> bool {
        headers
            .get("api-key")
            .is_some_and(|v| v.as_bytes() == self.api_key.as_bytes())
    }

    fn lock(&self) -> MutexGuard<'_, StateInner> {
        // A panic elsewhere cannot leave this plain data inconsistent, so ignore poisoning.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Time since the emulator started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn record(&self, deployment: Option<&str>, request: RecordedRequest) {
        let mut state = self.lock();
        state.total_calls += 1;
        if let Some(name) = deployment {
            let d = state.entry(name);
            d.calls += 1;
            d.requests.push(request);
        }
    }

    /// How `deployment` answers from now on (registering it if it was not).
    pub(crate) fn set_behavior(&self, deployment: &str, behavior: Behavior) {
        self.lock().entry(deployment).steady = Some(behavior);
    }

    /// Stored response `id`, when this resource has it.
    pub(crate) fn stored(&self, id: &str) -> Option<responses::StoredResponse> {
        self.lock().responses.get(id).cloned()
    }

    pub(crate) fn store(&self, id: String, response: responses::StoredResponse) {
        self.lock().responses.insert(id, response);
    }

    /// Removes stored response `id`; whether there was one.
    pub(crate) fn forget(&self, id: &str) -> bool {
        self.lock().responses.remove(id).is_some()
    }

    pub(crate) fn count_stored_call(&self) {
        self.lock().stored_calls += 1;
    }

    pub(crate) fn is_registered(&self, deployment: &str) -> bool {
        let state = self.lock();
        state
            .deployments
            .get(deployment)
            .is_some_and(|d| d.steady.is_some())
    }

    /// The registered deployments' names.
    pub(crate) fn deployments(&self) -> Vec<String> {
        let state = self.lock();
        state
            .deployments
            .iter()
            .filter(|(_, d)| d.steady.is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Consumes the next one-shot behaviour (or the steady one), a chaos one resolved to its phase
    /// at `at` (when the call arrived); `None` if not registered.
    pub(crate) fn next_behavior(&self, deployment: &str, at: Duration) -> Option<Plan> {
        let mut state = self.lock();
        let d = state.deployments.get_mut(deployment)?;
        let steady = d.steady.clone()?;
        let behavior = d.queue.pop_front().unwrap_or(steady);
        let behavior = d.resolve(deployment, behavior, at);
        Some(Plan {
            behavior,
            model: d
                .model
                .clone()
                .unwrap_or_else(|| wire::default_model_version(deployment)),
            latency: d.latency,
            chunk_delay: d.chunk_delay,
            remaining_requests: d.remaining_requests,
            remaining_tokens: d.remaining_tokens,
        })
    }

    pub(crate) fn log(&self, deployment: &str, behavior: &str, status: &str) {
        if self.log_calls {
            eprintln!(
                "azure-openai-emulator: deployment={deployment} behavior={behavior} status={status} t={:.3}",
                self.elapsed().as_secs_f64()
            );
        }
    }
}
