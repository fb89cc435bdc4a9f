//! What the fuzz targets ([`crate::fuzz`]) run of the surface: a Lambda event, read as the
//! runtime reads it, answered by the real handler in either delivery, and the answer checked for
//! what must hold whatever came in.

use std::convert::Infallible;
use std::sync::Arc;

use lambda_http::http::header;
use lambda_http::request::LambdaRequest;
use lambda_http::{Adapter, Context, LambdaEvent, Request, Service, service_fn};

use crate::clock::Clock;

use super::App;

/// What any answer must not contain: the upstream key the fuzzing App is configured with.
pub const UPSTREAM_KEY: &str = "sk-fuzz-upstream-3e1d-never-shown";

/// One Lambda event (JSON, any of the sources lambda_http reads), answered buffered through the
/// runtime's adapter (as `lambda_http::run` answers it) or streamed (as with RESPONSE_STREAM).
/// Returns the status, when the event was one lambda_http accepts at all.
pub async fn event<C: Clock>(app: &Arc<App<C>>, data: &[u8], streamed: bool) -> Option<u16> {
    let mut payload: LambdaRequest = serde_json::from_slice(data).ok()?;
    // As main.rs runs every event.
    super::event::repair(&mut payload);
    if streamed {
        let response = app.handle(Request::from(payload)).await;
        let status = response.status().as_u16();
        let json = is_json(response.headers());
        let body = response.into_body().collect().await;
        check(status, json, &body);
        return Some(status);
    }
    let app = Arc::clone(app);
    let handler = service_fn(move |request: Request| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(app.handle_buffered(request).await) }
    });
    let mut adapter = Adapter::from(handler);
    let response = adapter
        .call(LambdaEvent::new(payload, Context::default()))
        .await
        .ok()?;
    // What the runtime sends back to Lambda: it must serialise, and say what the handler said.
    let raw = serde_json::to_vec(&response).expect("a response the runtime can send");
    let sent: serde_json::Value = serde_json::from_slice(&raw).expect("the response is JSON");
    let status = sent
        .get("statusCode")
        .and_then(serde_json::Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .expect("a status code");
    let body = sent
        .get("body")
        .and_then(|b| b.as_str())
        .unwrap_or_default();
    let json = sent
        .pointer("/headers/content-type")
        .and_then(|v| v.as_str())
        == Some("application/json")
        || sent
            .pointer("/multiValueHeaders/content-type/0")
            .and_then(|v| v.as_str())
            == Some("application/json");
    // A body that is not UTF-8 goes base64-encoded; every JSON body is text.
    let encoded = sent.get("isBase64Encoded") == Some(&serde_json::Value::Bool(true));
    check(status, json && !encoded, body.as_bytes());
    Some(status)
}

fn is_json(headers: &lambda_http::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json")
}

/// Whatever the request: a real status, a JSON body where it says JSON, no secret in it.
fn check(status: u16, json: bool, body: &[u8]) {
    assert!((200..600).contains(&status), "status {status}");
    assert!(
        status != 500,
        "an internal error: {}",
        String::from_utf8_lossy(body)
    );
    if json {
        assert!(
            serde_json::from_slice::<serde_json::Value>(body).is_ok(),
            "a JSON response that is not JSON: {}",
            String::from_utf8_lossy(body)
        );
    }
    let leaked = body
        .windows(UPSTREAM_KEY.len())
        .any(|w| w == UPSTREAM_KEY.as_bytes());
    assert!(!leaked, "the upstream key in a response");
}
