//! The accept loop, per-connection serving (TLS handshake when on, abrupt reset) and the
//! chat-completions handlers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::behavior::Behavior;
use crate::responses;
use crate::wire::{self, Completion, Conversation, Reply, StreamEvents};
use crate::{Plan, RecordedRequest, Shared};

/// Lets a handler ask its connection task to drop the TCP connection with an RST.
#[derive(Clone)]
struct ConnHandle(Arc<Notify>);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        // POST chat/completions and embeddings on a deployment; on v1, responses too.
        .route(
            "/openai/deployments/{deployment}/{*operation}",
            post(classic).fallback(not_found),
        )
        .route("/openai/v1/{*operation}", post(v1).fallback(not_found))
        .route(
            "/openai/v1/responses/{id}",
            get(get_response)
                .delete(delete_response)
                .fallback(not_found),
        )
        .route(
            "/openai/v1/responses/{id}/input_items",
            get(response_input_items).fallback(not_found),
        )
        // Entra ID's token endpoint, and STS (awsQuery: POST / with an Action).
        .route(
            "/{tenant}/oauth2/v2.0/token",
            post(token).fallback(not_found),
        )
        .route("/", post(sts).fallback(not_found))
        .route(
            "/_emulator/deployments/{deployment}",
            axum::routing::put(set_behavior).fallback(not_found),
        )
        .fallback(not_found)
        .with_state(shared)
}

/// How long a client has to complete the TLS handshake, so a connection that never does (a port
/// probe, a client speaking plain HTTP and waiting) does not hold a task until the emulator stops.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the task is aborted; the JoinSet aborts every connection when dropped.
/// With `tls`, each connection's handshake runs in its own task, so a slow or failed handshake
/// never delays the loop or other connections.
pub(crate) async fn accept_loop(listener: TcpListener, router: Router, tls: Option<TlsAcceptor>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(stream, router.clone(), tls.clone()));
                }
                // e.g. EMFILE: back off instead of spinning
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, router: Router, tls: Option<TlsAcceptor>) {
    let _ = stream.set_nodelay(true);
    // A second handle on the same socket, so SO_LINGER can be set after hyper (or TLS) owns the
    // stream.
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let Ok(guard) = std_stream.try_clone() else {
        return;
    };
    let Ok(stream) = TcpStream::from_std(std_stream) else {
        return;
    };
    match tls {
        None => serve_http(stream, router, &guard).await,
        Some(acceptor) => {
            // A failed or timed-out handshake drops this connection only.
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            if let Ok(Ok(stream)) = handshake.await {
                serve_http(stream, router, &guard).await;
            }
        }
    }
}

/// Serves HTTP/1.1 on `io` (the TCP stream, or the TLS stream over it) until the connection ends
/// or a handler asks for a reset, which `guard`, a handle on the same socket, turns into an RST.
async fn serve_http<I>(io: I, router: Router, guard: &std::net::TcpStream)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let kill = Arc::new(Notify::new());
    let handle = ConnHandle(kill.clone());
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(handle.clone());
        router.clone().call(req)
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = conn => {}
        _ = kill.notified() => {
            // Linger 0 turns the close into an RST; the connection (hyper's fd) is dropped here,
            // `guard` when the caller returns. Under TLS too: no close_notify, just the RST.
            let _ = socket2::SockRef::from(guard).set_linger(Some(Duration::ZERO));
        }
    }
}

async fn not_found() -> Response {
    respond(wire::resource_not_found())
}

async fn classic(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    Extension(conn): Extension<ConnHandle>,
    body: Bytes,
) -> Response {
    let Ok(Path((deployment, operation))) = path else {
        return respond(wire::resource_not_found());
    };
    let call = Call {
        shared: &shared,
        uri: &uri,
        headers: &headers,
        body: &body,
        conn: &conn,
    };
    call.operation(Some(deployment), &operation).await
}

async fn v1(
    State(shared): State<Arc<Shared>>,
    Path(operation): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    Extension(conn): Extension<ConnHandle>,
    body: Bytes,
) -> Response {
    let call = Call {
        shared: &shared,
        uri: &uri,
        headers: &headers,
        body: &body,
        conn: &conn,
    };
    call.operation(None, &operation).await
}

/// One POST, as it came.
struct Call<'a> {
    shared: &'a Shared,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: &'a [u8],
    conn: &'a ConnHandle,
}

impl Call<'_> {
    /// The operation the path names after the deployment (classic, `path_deployment`) or after
    /// `/openai/v1/` (the deployment from the body's `model`).
    async fn operation(&self, path_deployment: Option<String>, operation: &str) -> Response {
        let Call {
            shared,
            uri,
            headers,
            body,
            conn,
        } = *self;
        match operation {
            "chat/completions" => handle(shared, path_deployment, uri, headers, body, conn).await,
            "embeddings" => embeddings(shared, path_deployment, uri, headers, body, conn).await,
            "responses" if path_deployment.is_none() => {
                create_response(shared, uri, headers, conn, body).await
            }
            _ => respond(wire::resource_not_found()),
        }
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`: Entra's client credentials grant.
async fn token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    let form = crate::entra::form(&body);
    let slow = match shared.entra().mode {
        crate::TokenMode::Slow(delay) => Some(delay),
        _ => None,
    };
    if let Some(delay) = slow {
        tokio::time::sleep(delay).await;
    }
    let (status, body) = shared.entra().token(&tenant, form);
    text_response(status, "application/json; charset=utf-8", body)
}

/// `POST /` with `Action=GetWebIdentityToken`: STS's signed JWT for the caller's role.
async fn sts(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = crate::entra::form(&body);
    let signed = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256 "));
    let (status, body) = match form.get("Action").map(String::as_str) {
        Some("GetWebIdentityToken") if signed => shared.entra().web_identity_token(&form),
        Some("GetWebIdentityToken") => (403, "<ErrorResponse><Error><Code>MissingAuthenticationToken</Code><Message>Request is missing Authentication Token</Message></Error></ErrorResponse>".to_owned()),
        _ => (400, "<ErrorResponse><Error><Code>InvalidAction</Code><Message>Only GetWebIdentityToken is emulated</Message></Error></ErrorResponse>".to_owned()),
    };
    text_response(status, "text/xml", body)
}

fn text_response(status: u16, content_type: &'static str, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// `PUT /_emulator/deployments/{name}` with a behaviour (`healthy`, `throttled:7`, ...) as the
/// body: how the deployment answers from now on. For scripts that drive a running emulator
/// (`make emulator`, the e2e tests); the emulator's key is required.
async fn set_behavior(
    State(shared): State<Arc<Shared>>,
    Path(deployment): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !shared.control(&headers) {
        return respond(wire::unauthorized());
    }
    let text = String::from_utf8_lossy(&body);
    match text.trim().parse::<Behavior>() {
        Ok(behavior) => {
            shared.set_behavior(&deployment, behavior);
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        Err(e) => respond(wire::bad_request(&e.to_string(), "behavior")),
    }
}

/// `POST /openai/v1/responses`: healthy behaviours answer (and store) a response, streamed
/// or not; failures as for chat.
async fn create_response(
    shared: &Shared,
    uri: &Uri,
    headers: &HeaderMap,
    conn: &ConnHandle,
    body: &[u8],
) -> Response {
    let check = |body: Option<&Value>| responses::check(body, |id| shared.stored(id).is_some());
    let admitted = match admit(shared, None, uri, headers, body, conn, check).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let Admitted {
        deployment,
        body,
        plan,
        label,
    } = admitted;
    let body = body.unwrap_or(Value::Null);
    let history = body
        .get("previous_response_id")
        .and_then(Value::as_str)
        .and_then(|id| shared.stored(id))
        .map(|stored| stored.history)
        .unwrap_or_default();
    let overlap = match plan.behavior {
        Behavior::ContinueOverlap { words } => words,
        _ => 0,
    };
    let made = responses::make(
        &deployment,
        &plan.model,
        &body,
        history,
        &shared.deployments(),
        overlap,
    );
    if !plan.latency.is_zero() {
        tokio::time::sleep(plan.latency).await;
    }
    // Stored as soon as it is made: Azure keeps even a response whose stream broke.
    if responses::Made::stored(&body) {
        shared.store(made.id.clone(), made.keep());
    }
    if body.get("stream") == Some(&TRUE) {
        shared.log(&deployment, &label, "200 stream");
        return response_stream(made.events(), &plan, conn.clone());
    }
    finish(shared, &deployment, &label, made.reply())
}

async fn get_response(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    stored_call(&shared, responses::StoredOp::Get, &id, &headers)
}

async fn delete_response(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    stored_call(&shared, responses::StoredOp::Delete, &id, &headers)
}

async fn response_input_items(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    stored_call(&shared, responses::StoredOp::InputItems, &id, &headers)
}

/// A call on a stored response: the resource's, whatever deployment made it (no behaviour).
fn stored_call(
    shared: &Shared,
    op: responses::StoredOp,
    id: &str,
    headers: &HeaderMap,
) -> Response {
    shared.count_stored_call();
    if !shared.authorized(headers) {
        return finish(shared, "-", "bad-key", wire::unauthorized());
    }
    let stored = shared.stored(id);
    if op == responses::StoredOp::Delete && stored.is_some() {
        shared.forget(id);
    }
    let reply = responses::stored_reply(op, id, stored);
    finish(shared, "-", &format!("{op:?} {id}"), reply)
}

/// A Responses stream acting out the plan's behaviour.
fn response_stream(events: responses::ResponseEvents, plan: &Plan, conn: ConnHandle) -> Response {
    let (tx, rx) = mpsc::channel(1);
    let out = Events {
        tx,
        delay: plan.chunk_delay,
        started: false,
    };
    tokio::spawn(produce_response(out, events, plan.behavior.clone(), conn));
    let headers = vec![("cache-control", "no-cache".to_owned())];
    with_headers(
        StatusCode::OK,
        headers,
        Body::new(EventBody(rx)),
        "text/event-stream",
    )
}

async fn produce_response(
    mut out: Events,
    events: responses::ResponseEvents,
    behavior: Behavior,
    conn: ConnHandle,
) -> Option<()> {
    for event in events.preamble {
        out.send(event).await?;
    }
    if let Behavior::StreamSlowStart { ms } = behavior {
        out.pause(Duration::from_millis(ms)).await?;
    }
    let count = events.deltas.len();
    let stop = match behavior {
        Behavior::StreamCut { after }
        | Behavior::StreamStall { after }
        | Behavior::StreamError { after } => after.min(count),
        _ => count,
    };
    for delta in events.deltas.into_iter().take(stop) {
        out.send(delta).await?;
    }
    match behavior {
        Behavior::StreamCut { .. } => {
            drop(out.tx.reserve().await.ok()?);
            out.pause(Duration::from_millis(50)).await?;
            conn.0.notify_one();
            out.tx.closed().await;
            return None;
        }
        Behavior::StreamStall { .. } => {
            out.tx.closed().await;
            return None;
        }
        Behavior::StreamError { .. } => {
            out.send(events.error).await?;
            return Some(());
        }
        _ => {}
    }
    for event in events.closing {
        out.send(event).await?;
    }
    Some(())
}

/// A call that got past what every operation checks first, with its behaviour drawn.
struct Admitted {
    deployment: String,
    body: Option<Value>,
    plan: Plan,
    label: String,
}

/// What every operation does first, as Azure does it: record the call, check the api-version
/// (classic paths), the key, the deployment, then the body (`check`); only a call that gets
/// this far consumes a one-shot behaviour. The behaviour's error answers, hang and reset are
/// acted out here too. `Err`: the call's response.
async fn admit(
    shared: &Shared,
    path_deployment: Option<String>,
    uri: &Uri,
    headers: &HeaderMap,
    raw_body: &[u8],
    conn: &ConnHandle,
    check: impl Fn(Option<&Value>) -> Result<(), Reply>,
) -> Result<Admitted, Response> {
    let classic = path_deployment.is_some();
    let body: Option<Value> = serde_json::from_slice(raw_body).ok();
    let deployment = path_deployment.or_else(|| {
        let model = body.as_ref()?.get("model")?.as_str()?;
        Some(model.to_owned())
    });
    let name = deployment.as_deref().unwrap_or("-");

    // Count and record first, so every call (even a rejected or hung one) is visible to tests.
    let at = shared.elapsed();
    shared.record(
        deployment.as_deref(),
        RecordedRequest {
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: record_headers(headers),
            body: body
                .clone()
                .unwrap_or_else(|| Value::String(String::from_utf8_lossy(raw_body).into_owned())),
            at,
        },
    );

    let api_version = uri.query().and_then(api_version);
    if classic && api_version.is_none() {
        return Err(finish(
            shared,
            name,
            "missing-api-version",
            wire::resource_not_found(),
        ));
    }
    if !shared.authorized(headers) {
        return Err(finish(shared, name, "bad-key", wire::unauthorized()));
    }
    let Some(deployment) = deployment.as_deref() else {
        let reply = match body {
            Some(Value::Object(_)) => {
                wire::bad_request("you must provide a model parameter", "model")
            }
            _ => wire::bad_request("We could not parse the JSON body of your request.", "model"),
        };
        return Err(finish(shared, name, "bad-request", reply));
    };
    // Azure resolves the deployment before it looks at the body.
    if !shared.is_registered(deployment) {
        return Err(finish(
            shared,
            name,
            "unknown-deployment",
            wire::deployment_not_found(),
        ));
    }
    if let Err(reply) = check(body.as_ref()) {
        return Err(finish(shared, name, "bad-request", reply));
    }
    let Some(plan) = shared.next_behavior(deployment, at) else {
        return Err(finish(
            shared,
            name,
            "unknown-deployment",
            wire::deployment_not_found(),
        ));
    };
    let label = plan.behavior.to_string();
    if let Some(reply) = wire::error_reply(&plan.behavior, api_version.as_deref()) {
        return Err(finish(shared, name, &label, reply));
    }
    match plan.behavior {
        Behavior::Hang => {
            shared.log(name, &label, "no response");
            std::future::pending().await
        }
        Behavior::ResetConnection => {
            shared.log(name, &label, "connection reset");
            conn.0.notify_one();
            std::future::pending().await
        }
        _ => Ok(Admitted {
            deployment: deployment.to_owned(),
            body,
            plan,
            label,
        }),
    }
}

/// One embeddings call: healthy behaviours answer with the deployment model's vectors (after its
/// latency); failures as for chat.
async fn embeddings(
    shared: &Shared,
    path_deployment: Option<String>,
    uri: &Uri,
    headers: &HeaderMap,
    raw_body: &[u8],
    conn: &ConnHandle,
) -> Response {
    let check = |body: Option<&Value>| crate::embeddings::inputs(body).map(drop);
    let admitted = match admit(shared, path_deployment, uri, headers, raw_body, conn, check).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let Admitted {
        deployment,
        body,
        plan,
        label,
    } = admitted;
    let body = body.unwrap_or(Value::Null);
    let inputs = crate::embeddings::inputs(Some(&body)).unwrap_or_default();
    if !plan.latency.is_zero() {
        tokio::time::sleep(plan.latency).await;
    }
    let reply = crate::embeddings::reply(
        &plan.model,
        &body,
        &inputs,
        plan.remaining_requests,
        plan.remaining_tokens,
    );
    finish(shared, &deployment, &label, reply)
}

/// One chat-completions call; `path_deployment` is `None` on the v1 route (name from body `model`).
async fn handle(
    shared: &Shared,
    path_deployment: Option<String>,
    uri: &Uri,
    headers: &HeaderMap,
    raw_body: &[u8],
    conn: &ConnHandle,
) -> Response {
    let check = |body: Option<&Value>| match body.map(|b| b.get("messages")) {
        None => Err(wire::bad_request(
            "We could not parse the JSON body of your request.",
            "messages",
        )),
        Some(Some(Value::Array(m))) if !m.is_empty() => Ok(()),
        Some(Some(Value::Array(_))) => Err(wire::bad_request(
            "[] is too short - 'messages'",
            "messages",
        )),
        Some(_) => Err(wire::bad_request(
            "'messages' is a required property",
            "messages",
        )),
    };
    let admitted = match admit(shared, path_deployment, uri, headers, raw_body, conn, check).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let Admitted {
        deployment,
        body,
        plan,
        label,
    } = admitted;
    let (name, deployment) = (deployment.as_str(), deployment.as_str());
    let empty = Vec::new();
    let messages = body
        .as_ref()
        .and_then(|b| b.get("messages"))
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let deployments = shared.deployments();
    let conversation = Conversation::read(messages, &deployments);
    match plan.behavior {
        Behavior::NoPrefill if conversation.prefill => {
            let reply = wire::bad_request(
                "This model does not support assistant message prefill. The conversation must end with a user message.",
                "messages",
            );
            return finish(shared, name, &label, reply);
        }
        Behavior::RefuseContinuation if conversation.partial.is_some() => {
            let reply = wire::bad_request(
                "This deployment does not continue a partial answer; send the conversation without it.",
                "messages",
            );
            return finish(shared, name, &label, reply);
        }
        _ => {}
    }
    // Healthy, OutputFiltered or a stream behaviour: a completion
    let filtered = plan.behavior == Behavior::OutputFiltered;
    let overlap = match plan.behavior {
        Behavior::ContinueOverlap { words } => words,
        _ => 0,
    };
    let completion = Completion::new(
        deployment,
        &plan.model,
        messages,
        &conversation,
        &deployments,
        overlap,
        filtered,
    );
    let flag = |pointer| body.as_ref().and_then(|b| b.pointer(pointer)) == Some(&TRUE);
    let (stream, include_usage) = (flag("/stream"), flag("/stream_options/include_usage"));
    if !plan.latency.is_zero() {
        tokio::time::sleep(plan.latency).await;
    }
    if stream {
        shared.log(name, &label, "200 stream");
        let mut events = completion.stream_events(include_usage);
        if let Behavior::StreamToolCut { after } = plan.behavior {
            // A tool call instead of text: its pieces are the stream's content.
            let mut calls = completion.tool_call_events(after);
            events.role = calls.remove(0);
            events.content = calls;
        }
        return stream_response(events, &plan, conn.clone());
    }
    let reply = completion.reply(plan.remaining_requests, plan.remaining_tokens);
    finish(shared, name, &label, reply)
}

const TRUE: Value = Value::Bool(true);

/// A 200 `text/event-stream` fed by a spawned task that acts out the plan's behaviour.
fn stream_response(events: StreamEvents, plan: &Plan, conn: ConnHandle) -> Response {
    // Capacity 1: once the sender can reserve again, hyper has taken the previous event.
    let (tx, rx) = mpsc::channel(1);
    let out = Events {
        tx,
        delay: plan.chunk_delay,
        started: false,
    };
    tokio::spawn(produce(out, events, plan.behavior.clone(), conn));
    let headers = vec![
        ("cache-control", "no-cache".to_owned()),
        (
            "x-ratelimit-remaining-requests",
            plan.remaining_requests.to_string(),
        ),
        (
            "x-ratelimit-remaining-tokens",
            plan.remaining_tokens.to_string(),
        ),
    ];
    let body = Body::new(EventBody(rx));
    with_headers(StatusCode::OK, headers, body, "text/event-stream")
}

/// Sends the events in order with the behaviour's faults; `None` once the body is gone.
async fn produce(
    mut out: Events,
    events: StreamEvents,
    behavior: Behavior,
    conn: ConnHandle,
) -> Option<()> {
    out.send(events.opening).await?;
    if let Behavior::StreamSlowStart { ms } = behavior {
        out.pause(Duration::from_millis(ms)).await?;
    }
    out.send(events.role).await?;
    let count = events.content.len();
    let stop = match behavior {
        Behavior::StreamCut { after }
        | Behavior::StreamStall { after }
        | Behavior::StreamError { after } => after.min(count),
        _ => count,
    };
    for (i, chunk) in events.content.into_iter().enumerate().take(stop) {
        if behavior == (Behavior::StreamCorrupt { at: i }) {
            out.send_corrupt().await?;
        }
        out.send(chunk).await?;
        if i == 1 && behavior == Behavior::StreamAsyncFilter {
            out.send(wire::async_filter_event()).await?;
        }
    }
    match behavior {
        Behavior::StreamCut { .. } | Behavior::StreamToolCut { .. } => {
            // Wait until hyper took the last event, and give it a moment to reach the socket.
            drop(out.tx.reserve().await.ok()?);
            out.pause(Duration::from_millis(50)).await?;
            conn.0.notify_one();
            // Dropping the sender before the reset would let hyper end the body cleanly.
            out.tx.closed().await;
            return None;
        }
        Behavior::StreamStall { .. } => {
            out.tx.closed().await;
            return None;
        }
        Behavior::StreamError { .. } => {
            out.send(wire::STREAM_ERROR_EVENT).await?;
            return Some(());
        }
        Behavior::StreamCorrupt { at } if at >= count => out.send_corrupt().await?,
        _ => {}
    }
    out.send(events.finish).await?;
    if let Some(usage) = events.usage {
        out.send(usage).await?;
    }
    if behavior != Behavior::StreamNoDone {
        out.send(wire::DONE).await?;
    }
    Some(())
}

/// The producing end of a streamed body, pausing `delay` between events.
struct Events {
    tx: mpsc::Sender<Bytes>,
    delay: Duration,
    started: bool,
}

impl Events {
    async fn send(&mut self, event: impl Into<Bytes>) -> Option<()> {
        if std::mem::replace(&mut self.started, true) {
            self.pause(self.delay).await?;
        }
        self.tx.send(event.into()).await.ok()
    }

    async fn send_corrupt(&mut self) -> Option<()> {
        for event in wire::CORRUPT_EVENTS {
            self.send(event).await?;
        }
        Some(())
    }

    /// Sleeps, but gives up (`None`) as soon as the client or the emulator drops the body.
    async fn pause(&self, duration: Duration) -> Option<()> {
        if duration.is_zero() {
            return Some(());
        }
        tokio::select! {
            _ = tokio::time::sleep(duration) => Some(()),
            _ = self.tx.closed() => None,
        }
    }
}

/// A response body fed one event per frame through a channel; ends cleanly when the sender drops.
struct EventBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn finish(shared: &Shared, deployment: &str, label: &str, reply: Reply) -> Response {
    shared.log(deployment, label, reply.status.as_str());
    respond(reply)
}

fn respond(reply: Reply) -> Response {
    let body = Body::from(reply.body);
    with_headers(reply.status, reply.headers, body, "application/json")
}

/// Adds the headers every Azure response carries.
fn with_headers(
    status: StatusCode,
    extra: Vec<(&'static str, String)>,
    body: Body,
    content_type: &'static str,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for name in ["x-request-id", "apim-request-id"] {
        if let Ok(v) = HeaderValue::try_from(wire::request_id()) {
            headers.insert(name, v);
        }
    }
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    }
    response
}

/// A non-empty `api-version` query parameter.
fn api_version(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Header names are already lowercase in `HeaderMap`; repeated headers are joined with ", ".
fn record_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        out.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    out
}
