//! What the fuzz targets ([`crate::fuzz`]) run of the upstream client: everything that reads an
//! answer from Azure (or from whatever answers in its place), as the client reads it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::outcome::{Failure, JsonBody};

use super::events::{EventStream, Next, first_content};
use super::kind::{Edit, Spent, Streaming};
use super::wire::{MAX_RETRY_AFTER, classify, quota, retry_after};
use super::{Chat, Embeddings, Responses, Stored, StreamEvent};

/// A fixed "now" for HTTP-dates: fuzzing must be repeatable.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_000_000)
}

/// Splits a raw answer written as a status line, `name: value` header lines, a blank line and
/// the body. Headers that HTTP could not carry are dropped, as the HTTP client would refuse them.
fn split(data: &[u8]) -> (StatusCode, HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let mut rest = data;
    let line = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        let end = rest.iter().position(|&b| b == b'\n')?;
        let line = rest[..end]
            .strip_suffix(b"\r")
            .unwrap_or(&rest[..end])
            .to_vec();
        *rest = &rest[end + 1..];
        Some(line)
    };
    let status = line(&mut rest)
        .and_then(|l| std::str::from_utf8(&l).ok()?.trim().parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    while let Some(header) = line(&mut rest) {
        if header.is_empty() {
            break;
        }
        let Some(colon) = header.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&header[..colon]),
            HeaderValue::from_bytes(header[colon + 1..].trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }
    (status, headers, rest)
}

/// A whole (not streamed) answer: its status, headers and body, read as the client reads them.
pub fn response(data: &[u8]) {
    let (status, headers, body) = split(data);
    let hint = retry_after(&headers, now());
    assert!(
        hint.is_none_or(|d| d <= MAX_RETRY_AFTER),
        "a Retry-After beyond the cap: {hint:?}"
    );
    let _ = quota(&headers);
    // Every kind reads its answers its own way; errors alike.
    let raw = Bytes::copy_from_slice(body);
    for ok in [
        classify::<Embeddings>(status, &headers, raw.clone(), now()).is_ok(),
        classify::<Responses>(status, &headers, raw.clone(), now()).is_ok(),
        classify::<Stored>(status, &headers, raw.clone(), now()).is_ok(),
    ] {
        assert!(!ok || status.is_success(), "an answer from a {status}");
    }
    match classify::<Chat>(status, &headers, raw, now()) {
        Ok(_) => assert!(status.is_success(), "an answer from a {status}"),
        Err(Failure::Throttled { retry_after }) => {
            assert_eq!(status.as_u16(), 429);
            assert!(retry_after.is_none_or(|d| d <= MAX_RETRY_AFTER));
        }
        Err(_) => {}
    }
}

/// A streamed answer's body, delivered in pieces of the size the first byte gives (1 to 64), read
/// to its end as the relay reads it, by every kind that streams: up to the first content, then
/// every event, each chunk rewritten as a continuation would rewrite it.
pub async fn stream(data: &[u8]) {
    stream_of::<Chat>(data).await;
    stream_of::<Responses>(data).await;
}

async fn stream_of<K: Streaming>(data: &[u8]) {
    let Some((&size, body)) = data.split_first() else {
        return;
    };
    let size = usize::from(size % 64) + 1;
    let pieces: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let response = http::Response::builder()
        .header("content-type", "text/event-stream")
        .body(reqwest::Body::wrap_stream(tokio_stream::iter(pieces)))
        .map(reqwest::Response::from);
    let Ok(response) = response else { return };
    let events = EventStream::new(response, <K as Streaming>::event);
    let Ok(mut opened) = first_content(events).await else {
        return;
    };
    let mut seen = std::mem::take(&mut opened.head);
    // A stream is bounded by its body; the loop by the events in it.
    loop {
        for event in seen.drain(..) {
            if let StreamEvent::Chunk(chunk) = event {
                let data = K::rewrite(
                    &chunk,
                    Edit {
                        id: Some("chatcmpl-fuzz"),
                        text: Some("trimmed"),
                        usage: chunk.usage.as_ref(),
                        item: Some("msg_fuzz"),
                        sequence: Some(7),
                        whole: Some("the whole text"),
                    },
                );
                let _ = K::frame(&data);
                if let Some(usage) = &chunk.usage {
                    let _ = K::usage(
                        usage,
                        Spent {
                            chunks: 3,
                            broken: 1,
                        },
                    );
                }
            }
        }
        match opened.events.next().await {
            Next::Event(event) => seen.push(event),
            Next::End | Next::Broken => break,
        }
    }
}

/// A request body as a continuation would rewrite it, when it can be continued at all.
pub fn continuation(body: &JsonBody, sent: &str) {
    if Chat::continuable(body) {
        let _ = Chat::continuation(body, sent, 7);
    }
    if Responses::continuable(body) {
        let _ = Responses::continuation(body, sent, 7);
    }
}
