//! HTTPS upstreams, as real Azure is: the emulator serves TLS with a test CA it generates, and
//! the function trusts that CA only when `EXTRA_CA_CERTS` names it, on top of the public roots.

use crate::common;

use std::path::PathBuf;

use common::{API_KEY, Behavior, Emulator, Harness, content, events};
use fallback_chat::config::Config;
use serde_json::json;

/// An HTTPS emulator with gpt-4o, and its CA written where `EXTRA_CA_CERTS` can name it.
async fn https_emulator(name: &str) -> (Emulator, PathBuf) {
    let emulator = Emulator::builder()
        .api_key(API_KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .tls()
        .start()
        .await
        .expect("emulator starts");
    assert!(emulator.url().starts_with("https://"), "{}", emulator.url());
    let ca = std::env::temp_dir().join(format!("fc-test-ca-{}-{name}.pem", std::process::id()));
    std::fs::write(&ca, emulator.ca_pem().expect("a TLS emulator has a CA")).unwrap();
    (emulator, ca)
}

fn vars(emulator: &Emulator, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = vec![
        ("AZURE_OPENAI_ENDPOINT".to_owned(), emulator.url()),
        ("AZURE_OPENAI_API_KEY".to_owned(), API_KEY.to_owned()),
        ("AZURE_OPENAI_DEPLOYMENTS".to_owned(), "gpt-4o".to_owned()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

#[tokio::test]
async fn an_https_deployment_answers_when_its_ca_is_trusted_through_extra_ca_certs() {
    let (emulator, ca) = https_emulator("trusted").await;
    let vars = vars(&emulator, &[("EXTRA_CA_CERTS", ca.to_str().unwrap())]);
    let h = Harness::build(emulator, Vec::new(), &vars, None);

    let reply = h.ask("hello over TLS").await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert_eq!(reply.body["deployment"], "gpt-4o");
    assert!(
        reply.body["chat_completion"]
            .as_str()
            .unwrap()
            .contains("hello over TLS"),
        "{}",
        reply.raw
    );

    // A stream over the same TLS connection pool arrives whole.
    let response = h
        .open(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "stream over TLS"}], "stream": true}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let text = common::body(response).await;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        content(&events(&text)).contains("stream over TLS"),
        "{text}"
    );
    assert_eq!(h.calls("gpt-4o"), 2);
    std::fs::remove_file(ca).unwrap();
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_failed_attempt_that_costs_no_call() {
    let (emulator, ca) = https_emulator("untrusted").await;
    // Another emulator's CA is not this one's: the handshake fails and nothing is sent.
    let (_other, other_ca) = https_emulator("other").await;
    let vars = vars(&emulator, &[("EXTRA_CA_CERTS", other_ca.to_str().unwrap())]);
    let h = Harness::build(emulator, Vec::new(), &vars, None);
    let reply = h.ask("q").await;
    assert_eq!(reply.status, 503, "{}", reply.raw);
    assert_eq!(h.calls("gpt-4o"), 0, "no request reached the emulator");
    let logged = h.logs.text();
    assert!(logged.contains("certificate"), "{logged}");
    assert!(
        logged.contains("EXTRA_CA_CERTS"),
        "the log says what to fix: {logged}"
    );
    std::fs::remove_file(ca).unwrap();
    std::fs::remove_file(other_ca).unwrap();
}

#[test]
fn extra_ca_certs_that_cannot_be_used_is_a_configuration_error_naming_it() {
    let dir = std::env::temp_dir();
    let missing = dir.join(format!("fc-missing-ca-{}.pem", std::process::id()));
    let not_pem = dir.join(format!("fc-not-pem-{}.pem", std::process::id()));
    std::fs::write(&not_pem, "hello\n").unwrap();
    for (path, says) in [(&missing, "cannot read"), (&not_pem, "no PEM certificate")] {
        let error = Config::from_lookup(|k| match k {
            "AZURE_OPENAI_ENDPOINT" => Some("https://example.openai.azure.com".into()),
            "AZURE_OPENAI_API_KEY" => Some(API_KEY.into()),
            "AUTH_PROVIDED_BY" => Some("authorizer".into()),
            "EXTRA_CA_CERTS" => Some(path.to_str().unwrap().into()),
            _ => None,
        })
        .expect_err("an unusable CA file stops the start");
        let message = error.to_string();
        assert!(message.contains("EXTRA_CA_CERTS"), "{message}");
        assert!(message.contains(says), "{message}");
        assert_eq!(error.error_type(), "ConfigError.Invalid");
    }
    std::fs::remove_file(not_pem).unwrap();
}
