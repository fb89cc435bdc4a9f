//! Lambda events made safe for lambda_http before it turns them into requests.
//!
//! lambda_http builds each request's URI with `unwrap`/`expect` (lambda_http 1.3,
//! src/request.rs): an HTTP API event whose raw query string holds a character a URI cannot
//! (`GET /?query="hi"` as curl sends it, a space, a non-ASCII letter), or a `Host` or
//! `X-Forwarded-Proto` header that does not make a URI, panics the invocation, and the caller
//! gets a bare 502 instead of an answer. Found by the `request` fuzz target
//! (fuzz/corpus/request/regression-*). The repair keeps what the caller meant: the query is
//! percent-encoded where it must be (its parameters decode to the same text), and a host that
//! cannot be one is dropped (routing never reads it).

use std::borrow::Cow;

use lambda_http::http::HeaderMap;
use lambda_http::http::header::HOST;
use lambda_http::request::LambdaRequest;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

/// What a URI's query cannot hold as is (the rest of the WHATWG query set, `%` aside, is
/// accepted by the `http` crate); bytes beyond ASCII are always encoded.
const QUERY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'\\')
    .add(b'^')
    .add(b'`');

/// A path as a URL's path: these would end it or start a query or fragment.
const PATH: &AsciiSet = &QUERY.add(b'?');

/// Repairs what would make lambda_http panic; leaves every valid event as it was.
pub fn repair(event: &mut LambdaRequest) {
    match event {
        LambdaRequest::ApiGatewayV2(e) => {
            if let Some(query) = &mut e.raw_query_string {
                encode(query, QUERY);
            }
            if let Some(path) = &mut e.raw_path {
                rooted(path);
            }
            host(&mut e.headers, &mut e.request_context.domain_name);
        }
        LambdaRequest::ApiGatewayV1(e) => {
            if let Some(path) = &mut e.path {
                rooted(path);
            }
            host(&mut e.headers, &mut e.request_context.domain_name);
        }
        LambdaRequest::Alb(e) => {
            if let Some(path) = &mut e.path {
                rooted(path);
            }
            host(&mut e.headers, &mut None);
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

fn encode(text: &mut String, set: &'static AsciiSet) {
    // Borrowed when nothing needed encoding, but also when the whole text was one escaped byte.
    let encoded: Cow<'_, str> = utf8_percent_encode(text, set).into();
    if encoded != text.as_str() {
        *text = encoded.into_owned();
    }
}

/// A path that starts with `/` and has nothing that would end it.
fn rooted(path: &mut String) {
    encode(path, PATH);
    if !path.is_empty() && !path.starts_with('/') {
        path.insert(0, '/');
    }
}

/// The `Host` header (or, without one, the domain name) kept only when, with the scheme
/// `X-Forwarded-Proto` names, it makes a URL; a bad scheme is dropped first.
fn host(headers: &mut HeaderMap, domain: &mut Option<String>) {
    let proto = lambda_http::http::HeaderName::from_static("x-forwarded-proto");
    // As lambda_http builds the URI: a URL first, then the `http` crate's URI, which refuses
    // some characters a URL's host keeps (a backtick, a brace).
    let makes_url = |scheme: &str, host: &str| {
        url::Url::parse(&format!("{scheme}://{host}/"))
            .is_ok_and(|url| lambda_http::http::Uri::try_from(url.as_str()).is_ok())
    };
    let scheme = |headers: &HeaderMap| {
        headers
            .get(&proto)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("https")
            .to_owned()
    };
    if let Some(h) = headers.get(HOST) {
        let h = h.to_str().ok().map(str::to_owned);
        match h {
            Some(h) if makes_url(&scheme(headers), &h) => return,
            Some(h) if makes_url("https", &h) => {
                headers.remove(&proto);
                return;
            }
            _ => {
                headers.remove(HOST);
            }
        }
    }
    if let Some(d) = domain.as_deref() {
        if makes_url(&scheme(headers), d) {
            return;
        }
        if makes_url("https", d) {
            headers.remove(&proto);
            return;
        }
        *domain = None;
    }
}
