//! A function that cannot start says why through the Lambda Runtime API's init-error endpoint,
//! as Lambda expects of a runtime: the real binary against a local Runtime API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One request the Runtime API received.
#[derive(Debug)]
struct Received {
    request_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A Runtime API on 127.0.0.1 that accepts whatever is posted (202) and reports it; a poll for
/// the next invocation gets nothing (the function must not get that far). Stops with the test.
fn runtime_api() -> (String, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a local port");
    let address = listener.local_addr().expect("bound").to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().expect("a second handle"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.trim_end().split_once(':') {
                    headers.push((name.trim().to_owned(), value.trim().to_owned()));
                }
            }
            let length = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0usize);
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = stream.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n");
            let received = Received {
                request_line: request_line.trim_end().to_owned(),
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            };
            if tx.send(received).is_err() {
                return;
            }
        }
    });
    (address, rx)
}

/// Starts the function with `env` (and nothing else of this process's environment) against a
/// local Runtime API; returns what it posted there, its exit status and what it printed.
fn start(env: &[(&str, &str)]) -> (Vec<Received>, std::process::ExitStatus, String) {
    let (api, received) = runtime_api();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fallback-chat"))
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", &api)
        .env("AWS_LAMBDA_FUNCTION_NAME", "fallback-chat")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitable") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the function neither started nor exited within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut printed = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut printed);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut printed);
    }
    (received.try_iter().collect(), status, printed)
}

#[test]
fn a_closed_configuration_is_reported_to_the_runtime_api_before_exiting() {
    let (received, status, printed) = start(&[
        ("AZURE_OPENAI_ENDPOINT", "https://x.openai.azure.com"),
        ("AZURE_OPENAI_API_KEY", "sk-never-reported-0000"),
    ]);
    assert!(!status.success(), "{printed}");
    assert_eq!(
        received.len(),
        1,
        "exactly one report: {received:?}\n{printed}"
    );
    let report = &received[0];
    assert_eq!(
        report.request_line,
        "POST /2018-06-01/runtime/init/error HTTP/1.1"
    );
    assert_eq!(
        report.header("lambda-runtime-function-error-type"),
        Some("ConfigError.Closed")
    );
    let body: Value = serde_json::from_str(&report.body).expect("a JSON error document");
    assert_eq!(body["errorType"], "ConfigError.Closed");
    let message = body["errorMessage"].as_str().expect("errorMessage");
    for needed in [
        "closed by default",
        "CLIENT_API_KEYS",
        "AUTH_PROVIDED_BY=iam",
    ] {
        assert!(message.contains(needed), "{message}");
    }
    assert!(
        !report.body.contains("sk-never-reported"),
        "{}",
        report.body
    );
    // The same message on the console, for the log.
    assert!(printed.contains("CLIENT_API_KEYS"), "{printed}");
}

#[test]
fn a_missing_variable_is_reported_by_name() {
    let (received, status, _) = start(&[("CLIENT_API_KEYS", "a-client-key-of-some-length")]);
    assert!(!status.success());
    let body: Value = serde_json::from_str(&received[0].body).expect("a JSON error document");
    assert_eq!(body["errorType"], "ConfigError.Missing");
    let message = body["errorMessage"].as_str().expect("errorMessage");
    assert!(
        message.starts_with("AZURE_OPENAI_ENDPOINT is not set"),
        "{message}"
    );
}
