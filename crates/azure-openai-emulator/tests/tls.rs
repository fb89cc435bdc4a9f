//! HTTPS with the emulator's generated test CA (`EmulatorBuilder::tls`, `--tls-ca-out`): the
//! same answers and streams as plain HTTP, only to clients that trust that CA.

mod common;

use std::sync::Arc;
use std::time::Duration;

use azure_openai_emulator::{Behavior, Emulator};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

const TEXT: &str = "hello over tls";

fn chat_body(stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": TEXT}],
        "stream": stream,
    })
}

async fn start(behavior: Behavior) -> Emulator {
    Emulator::builder()
        .deployment("d", behavior)
        .tls()
        .start()
        .await
        .expect("emulator starts")
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!(
            "{url}/openai/deployments/d/chat/completions?api-version=2024-10-21"
        ))
        .header("api-key", "emulator-key")
        .json(body)
        .send()
        .await
}

/// The answer of a successful non-streamed call.
async fn answer(client: &reqwest::Client, url: &str) -> String {
    let resp = post(client, url, &chat_body(false))
        .await
        .expect("an answer");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned()
}

/// The rustls error somewhere down an error's source chain, looking inside `io::Error`s too (their
/// `source()` skips the error they wrap, and hyper wraps rustls' `io::Error` in another).
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    None
}

#[tokio::test]
async fn a_chat_completion_over_https_answers_200() {
    let emu = start(Behavior::Healthy).await;
    let port = emu.addr().port();
    assert_eq!(emu.url(), format!("https://127.0.0.1:{port}"));
    let ca = emu.ca_pem().expect("a CA when serving HTTPS");

    let client = common::trusting(ca);
    assert_eq!(
        answer(&client, &emu.url()).await,
        format!("[d] You said: {TEXT}")
    );
    // The same connection again: keep-alive works over TLS as over TCP.
    assert_eq!(
        answer(&client, &emu.url()).await,
        format!("[d] You said: {TEXT}")
    );
    assert_eq!(emu.calls("d"), 2);

    // Plain HTTP is unchanged: no CA, http scheme.
    let plain = Emulator::builder().start().await.expect("emulator starts");
    assert_eq!(plain.ca_pem(), None);
    assert!(
        plain.url().starts_with("http://127.0.0.1:"),
        "{}",
        plain.url()
    );
}

#[tokio::test]
async fn a_streamed_answer_arrives_whole_over_https() {
    let emu = start(Behavior::Healthy).await;
    // A pause between events, so each goes out in its own TLS records.
    emu.set_chunk_delay("d", Duration::from_millis(5));
    let client = common::trusting(emu.ca_pem().expect("CA"));
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&client, &emu.url(), &body).await.expect("an answer");
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers().get("content-type").map(|v| v.as_bytes());
    assert_eq!(content_type, Some(&b"text/event-stream"[..]));

    let text = resp.text().await.expect("a clean end");
    let events: Vec<&str> = text
        .split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").expect("a data: line"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json event"))
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, format!("[d] You said: {TEXT}"));
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("stop"));
    assert!(
        chunks
            .last()
            .is_some_and(|c| c["usage"]["total_tokens"].is_u64())
    );
}

#[tokio::test]
async fn a_cut_stream_is_cut_over_https_too() {
    let emu = start(Behavior::StreamCut { after: 2 }).await;
    let client = common::trusting(emu.ca_pem().expect("CA"));
    let mut resp = post(&client, &emu.url(), &chat_body(true))
        .await
        .expect("headers");
    assert_eq!(resp.status(), 200);
    let mut received = Vec::new();
    let err = loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => received.extend_from_slice(&bytes),
            Ok(None) => panic!("a clean end: {}", String::from_utf8_lossy(&received)),
            Err(e) => break e,
        }
    };
    let text = String::from_utf8_lossy(&received);
    assert!(!text.contains("[DONE]"), "{text}");
    // The opening, role and two content events, then the reset.
    assert_eq!(text.matches("data: ").count(), 4, "{text}; {err:?}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_fails_and_the_server_keeps_serving() {
    use rustls::CertificateError::{BadSignature, UnknownIssuer};
    let emu = start(Behavior::Healthy).await;
    // Trusting another test CA (same subject name, another key), then trusting no CA at all.
    let other = start(Behavior::Healthy).await;
    let strangers = [
        (common::trusting(other.ca_pem().expect("CA")), BadSignature),
        (common::client(), UnknownIssuer),
    ];
    for (stranger, expected) in strangers {
        let err = post(&stranger, &emu.url(), &chat_body(false))
            .await
            .expect_err("no answer to a client that does not trust the CA");
        assert!(err.is_connect(), "{err:?}");
        let tls = rustls_error(&err).unwrap_or_else(|| panic!("not a TLS error: {err:?}"));
        assert_eq!(tls, &rustls::Error::InvalidCertificate(expected));
    }

    // Not TLS at all: the handshake fails, that connection is dropped.
    let http = common::client();
    let plain_url = emu.url().replace("https://", "http://");
    assert!(post(&http, &plain_url, &chat_body(false)).await.is_err());

    // The server still serves a client that trusts the CA; no call reached the handlers before.
    assert_eq!(emu.calls("d"), 0);
    let client = common::trusting(emu.ca_pem().expect("CA"));
    assert_eq!(
        answer(&client, &emu.url()).await,
        format!("[d] You said: {TEXT}")
    );
}

#[tokio::test]
async fn the_certificate_names_the_loopback_host_and_alpn_picks_http11() {
    let emu = start(Behavior::Healthy).await;
    let ca = emu.ca_pem().expect("CA");
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).expect("PEM"))
        .expect("a CA certificate");
    let mut config = common::tls_config(roots);
    // A client that would rather speak h2 still gets HTTP/1.1, the emulator's one protocol.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // Always over 127.0.0.1: the names are checked against the certificate, not resolved.
    for name in ["localhost", "127.0.0.1", "::1"] {
        let tcp = tokio::net::TcpStream::connect(emu.addr())
            .await
            .expect("connect");
        let server_name = ServerName::try_from(name).expect("a server name");
        let tls = connector
            .connect(server_name.to_owned(), tcp)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"http/1.1"[..]),
            "{name}"
        );
    }
    let tcp = tokio::net::TcpStream::connect(emu.addr())
        .await
        .expect("connect");
    let wrong = ServerName::try_from("example.com").expect("a server name");
    let err = connector
        .connect(wrong, tcp)
        .await
        .expect_err("not a name of the certificate");
    let tls = rustls_error(&err).unwrap_or_else(|| panic!("not a TLS error: {err:?}"));
    assert!(
        matches!(
            tls,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
                | rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                )
        ),
        "{tls:?}"
    );
}

#[tokio::test]
async fn the_binary_writes_its_ca_with_tls_ca_out_and_serves_https() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("emulator-test-ca-{}.pem", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let (child, url, line) = common::start_binary(&[
        "--host".as_ref(),
        "127.0.0.1".as_ref(),
        "--port".as_ref(),
        "0".as_ref(),
        "--deployment".as_ref(),
        "d".as_ref(),
        "--tls-ca-out".as_ref(),
        path.as_os_str(),
        "--exit-after".as_ref(),
        "2".as_ref(),
    ])
    .await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url} {line}");

    // Written before the line was printed.
    let pem = std::fs::read_to_string(&path).expect("the CA file");
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate");
    let mut roots = RootCertStore::empty();
    roots.add(der).expect("parses as a CA certificate");
    assert_eq!(
        answer(&common::trusting(&pem), &url).await,
        format!("[d] You said: {TEXT}")
    );

    let log = common::exited_log(child).await;
    assert!(
        log.contains("deployment=d behavior=healthy status=200"),
        "{log}"
    );
    let _ = std::fs::remove_file(&path);
}
