//! Clients shared by the integration tests.
//!
//! reqwest is built with `rustls-no-provider` here (no aws-lc in the emulator's builds), so a
//! client built the default way panics for want of a process-wide crypto provider, even for
//! `http://` URLs. These build theirs with ring explicitly and install no default, as the
//! emulator does, so the TLS tests also show that none is needed.
#![allow(dead_code)] // each test binary uses its own part of it

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A rustls client configuration with the ring provider, trusting only `roots`, offering
/// HTTP/1.1 only (the emulator's one protocol) in ALPN.
pub fn tls_config(roots: RootCertStore) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// A client that trusts nothing: for the emulator's plain-HTTP URLs.
pub fn client() -> reqwest::Client {
    with_tls(tls_config(RootCertStore::empty()))
}

/// A client that trusts only the CA certificate(s) in `ca_pem`.
#[allow(dead_code)] // only the TLS tests use it
pub fn trusting(ca_pem: &str) -> reqwest::Client {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("a valid CA certificate");
    }
    assert!(!roots.is_empty(), "no certificate in {ca_pem:?}");
    with_tls(tls_config(roots))
}

fn with_tls(config: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .expect("client builds")
}

/// The emulator binary started with `args`, once it has printed its first line: the child
/// (killed when dropped), and what that line says after "listening on ": the URL and the rest.
pub async fn start_binary(args: &[&std::ffi::OsStr]) -> (tokio::process::Child, String, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_azure-openai-emulator"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("binary runs");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .expect("a line");
    let rest = line
        .strip_prefix("azure-openai-emulator listening on ")
        .expect(&line);
    let (url, rest) = rest.split_once(' ').expect(&line);
    (child, url.to_owned(), rest.to_owned())
}

/// Waits (at most 10 s) for a binary started with `--exit-after` to stop by itself, checks that
/// it exited cleanly and returns its log (stderr).
pub async fn exited_log(child: tokio::process::Child) -> String {
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("--exit-after stops it")
        .expect("output");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
