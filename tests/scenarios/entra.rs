//! Keyless auth to Azure: deployments that authenticate with Microsoft Entra ID tokens, against
//! the emulator standing in for the resource (keys refused, `disableLocalAuth`), for Entra's
//! token endpoint and for STS's `GetWebIdentityToken`. One token for many requests, renewed
//! before it ends without failing a request, a 401 renewed once, and a token endpoint that is
//! down, slow or refusing costs an attempt, never the request.

use std::sync::Arc;
use std::time::Duration;

use crate::common;

use azure_openai_emulator::{EntraConfig, TokenMode};
use common::{Behavior, Emulator, Harness, Logs};
use fallback_chat::App;
use fallback_chat::clock::ManualClock;
use fallback_chat::config::Config;
use serde_json::{Value, json};

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT: &str = "66666666-7777-8888-9999-000000000000";
const SECRET: &str = "entra-client-secret-never-log-me";
const KEY: &str = "emulator-key";

/// One resource whose deployments refuse keys, and Entra for the app registration.
async fn keyless(lifetime: Duration, secret: bool, federation: bool) -> Emulator {
    let mut entra = EntraConfig::new(TENANT, CLIENT);
    entra.client_secret = secret.then(|| SECRET.to_owned());
    entra.federation = federation;
    entra.lifetime = lifetime;
    Emulator::builder()
        .api_key(KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .deployment("gpt-35-turbo", Behavior::Healthy)
        .entra(entra)
        .disable_local_auth()
        .start()
        .await
        .unwrap()
}

/// The simple variables with a client secret, over `emulator` as resource and authority.
fn secret_vars(emulator: &Emulator) -> Vec<(String, String)> {
    [
        ("AZURE_OPENAI_ENDPOINT", emulator.url()),
        ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o,gpt-35-turbo".into()),
        ("AZURE_OPENAI_AUTH", "client_secret".into()),
        ("AZURE_TENANT_ID", TENANT.into()),
        ("AZURE_CLIENT_ID", CLIENT.into()),
        ("AZURE_CLIENT_SECRET", SECRET.into()),
        ("AZURE_AUTHORITY_HOST", emulator.url()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[tokio::test]
async fn a_client_secret_gets_one_token_for_many_requests_each_carrying_it_and_no_key() {
    let emulator = keyless(Duration::from_secs(3599), true, false).await;
    let vars = secret_vars(&emulator);
    let h = Harness::build(emulator, Vec::new(), &vars, None);
    for n in 0..10 {
        let reply = h.ask(&format!("question {n}")).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.body["deployment"], "gpt-4o");
    }
    assert_eq!(
        h.emulator.token_requests(),
        1,
        "one token for every request"
    );
    let form = &h.emulator.token_forms()[0];
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], CLIENT);
    assert_eq!(
        form["scope"],
        "https://cognitiveservices.azure.com/.default"
    );
    for request in h.emulator.requests("gpt-4o") {
        assert!(request.headers["authorization"].starts_with("Bearer eyJ"));
        assert!(!request.headers.contains_key("api-key"), "never a key");
    }
    let logs = h.logs.text();
    assert!(!logs.contains(SECRET), "the secret is in no log line");
    assert!(!logs.contains("emulator-entra-token"), "nor is the token");
}

#[tokio::test]
async fn a_token_that_lives_5_s_is_renewed_during_steady_requests_none_failing() {
    let emulator = keyless(Duration::from_secs(5), true, false).await;
    let vars = secret_vars(&emulator);
    let h = Harness::build(emulator, Vec::new(), &vars, None);
    for n in 0..30 {
        let reply = h.ask(&format!("q{n}")).await;
        assert_eq!(reply.status, 200, "request {n}: {:?}", reply.body);
        assert_eq!(reply.body["deployment"], "gpt-4o", "request {n}");
        h.advance(Duration::from_millis(500));
        // The renewal runs beside the requests: let it.
        tokio::task::yield_now().await;
    }
    // 15 s of 5 s tokens, each renewed in the second half of its life.
    let fetched = h.emulator.token_requests();
    assert!((3..=8).contains(&fetched), "{fetched} token requests");
    let attempts = h.logs.text();
    assert!(!attempts.contains("token_unavailable"), "{attempts}");
}

#[tokio::test]
async fn a_401_with_a_valid_looking_token_is_renewed_and_tried_once_more() {
    let emulator = keyless(Duration::from_secs(3599), true, false).await;
    let vars = secret_vars(&emulator);
    let h = Harness::build(emulator, Vec::new(), &vars, None);
    assert_eq!(h.ask("first").await.status, 200);
    h.emulator.revoke_tokens();
    let reply = h.ask("after the revocation").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(
        reply.body["deployment"], "gpt-4o",
        "the same deployment, once more"
    );
    assert_eq!(h.emulator.token_requests(), 2);
    assert_eq!(h.calls("gpt-4o"), 3, "the 401, then the retry");
}

#[tokio::test]
async fn an_entra_error_is_a_failed_attempt_naming_the_aadsts_code_and_a_keyed_deployment_answers()
{
    // gpt-4o on the keyless resource (Entra), gpt-35-turbo on another with a key.
    let keyless_resource = keyless(Duration::from_secs(3599), true, false).await;
    let keyed = Emulator::builder()
        .api_key(KEY)
        .deployment("gpt-35-turbo", Behavior::Healthy)
        .start()
        .await
        .unwrap();
    keyless_resource.set_token_mode(TokenMode::InvalidClient);
    let pool = json!({"deployments": [
        {"id": "east", "endpoint": keyless_resource.url(), "deployment": "gpt-4o", "priority": 0,
         "auth": {"type": "entra", "credential": "client_secret", "authority_host": keyless_resource.url()}},
        {"id": "west", "endpoint": keyed.url(), "deployment": "gpt-35-turbo", "priority": 1, "key_env": "WEST_KEY"}
    ]});
    let vars: Vec<(String, String)> = [
        ("FALLBACK_POOL", pool.to_string()),
        ("AZURE_TENANT_ID", TENANT.into()),
        ("AZURE_CLIENT_ID", CLIENT.into()),
        ("AZURE_CLIENT_SECRET", SECRET.into()),
        ("WEST_KEY", KEY.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let h = Harness::build(keyless_resource, vec![keyed], &vars, None);
    let reply = h.ask("hello").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["deployment"], "west");
    let lines = h.logs.lines();
    let summary = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request")
        .unwrap();
    assert_eq!(
        summary["fields"]["attempts"],
        "east:token_unavailable west:ok"
    );
    let text = h.logs.text();
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(!text.contains(SECRET));
}

#[tokio::test]
async fn a_pool_of_only_entra_deployments_answers_503_naming_the_cause_in_time_and_recovers() {
    let emulator = keyless(Duration::from_secs(3599), true, false).await;
    let mut vars = secret_vars(&emulator);
    vars.push(("ATTEMPT_TIMEOUT_MS".into(), "400".into()));
    vars.push(("REQUEST_TIMEOUT_MS".into(), "2000".into()));
    emulator.set_token_mode(TokenMode::Slow(Duration::from_secs(1)));
    let h = Harness::build(emulator, Vec::new(), &vars, None);
    let started = std::time::Instant::now();
    let reply = h.ask("hello").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within the deadline"
    );
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    let attempts = reply.body["attempts"].as_array().unwrap();
    assert!(
        attempts.iter().all(|a| a["outcome"] == "token_unavailable"),
        "{attempts:?}"
    );
    assert!(
        attempts[0]["message"]
            .as_str()
            .unwrap()
            .contains("Entra ID token"),
        "{attempts:?}"
    );

    // Down: every attempt says so, at once, while the back-off lasts. (The slow fetch went on
    // after the attempts stopped waiting; it ends, refused, before the next request.)
    h.emulator.set_token_mode(TokenMode::Unavailable);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    h.advance(Duration::from_secs(60));
    let reply = h.ask("still down").await;
    assert_eq!(reply.status, 503);
    assert!(reply.raw.contains("AADSTS90033"), "{}", reply.raw);

    // The endpoint recovers: after the circuit's opening and the back-off, answered again.
    h.emulator.set_token_mode(TokenMode::Healthy);
    h.advance(Duration::from_secs(120));
    let reply = h.ask("recovered").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

#[tokio::test]
async fn with_aws_federation_sts_signs_the_assertion_and_no_secret_exists() {
    let emulator = keyless(Duration::from_secs(3599), false, true).await;
    let vars: std::collections::HashMap<String, String> = [
        ("AZURE_OPENAI_ENDPOINT", emulator.url()),
        ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o".into()),
        ("AZURE_OPENAI_AUTH", "aws_federation".into()),
        ("AZURE_TENANT_ID", TENANT.into()),
        ("AZURE_CLIENT_ID", CLIENT.into()),
        ("AZURE_AUTHORITY_HOST", emulator.url()),
        ("AUTH_PROVIDED_BY", "authorizer".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config = Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let sdk = common::aws_sdk(&emulator.url()).await;
    let clock = Arc::new(ManualClock::default());
    let app = Arc::new(App::with_aws(config, Arc::clone(&clock), 1, None, &sdk).unwrap());
    let logs = Logs::default();
    for n in 0..5 {
        let event = common::http_api_get(Some(&format!("q{n}")));
        let reply =
            common::invoke_app(&app, &logs, &event, common::wall_ms(&*clock) + 30_000).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    assert_eq!(emulator.sts_requests(), 1, "one assertion for one token");
    assert_eq!(emulator.token_requests(), 1);
    let form = &emulator.token_forms()[0];
    assert_eq!(
        form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert!(form["client_assertion"].starts_with("eyJ"));
    assert!(!form.contains_key("client_secret"));
    // The assertion is STS's, for Entra's token exchange audience.
    let payload = form["client_assertion"].split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], "api://AzureADTokenExchange");
    for request in emulator.requests("gpt-4o") {
        assert!(request.headers["authorization"].starts_with("Bearer "));
        assert!(!request.headers.contains_key("api-key"));
    }
    assert!(app.check_tokens().await.is_empty());
}

#[tokio::test]
async fn entra_settings_are_checked_at_cold_start_naming_what_to_set() {
    let get = |pairs: &[(&str, &str)]| {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("AUTH_PROVIDED_BY".to_string(), "iam".to_string())])
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let base = [("AZURE_OPENAI_ENDPOINT", "https://x.openai.azure.com")];
    let with = |more: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(more);
        v
    };
    assert!(get(&with(&[("AZURE_OPENAI_AUTH", "password")])).contains("AZURE_OPENAI_AUTH"));
    assert!(
        get(&with(&[
            ("AZURE_OPENAI_AUTH", "aws_federation"),
            ("AZURE_CLIENT_ID", CLIENT)
        ]))
        .contains("AZURE_TENANT_ID")
    );
    let missing_secret = get(&with(&[
        ("AZURE_OPENAI_AUTH", "client_secret"),
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_CLIENT_ID", CLIENT),
    ]));
    assert!(
        missing_secret.contains("AZURE_CLIENT_SECRET"),
        "{missing_secret}"
    );
    // With Entra ID, no key is needed.
    let ok = get(&with(&[
        ("AZURE_OPENAI_AUTH", "aws_federation"),
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_CLIENT_ID", CLIENT),
    ]));
    assert_eq!(ok, "", "a keyless configuration is complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_no_token_yet_share_one_fetch() {
    let emulator = keyless(Duration::from_secs(3599), true, false).await;
    // The token endpoint takes a while: every request arrives while the first fetch runs.
    emulator.set_token_mode(TokenMode::Slow(Duration::from_millis(300)));
    let vars = secret_vars(&emulator);
    let h = Harness::build(emulator, Vec::new(), &vars, None);
    let asks = (0..8).map(|n| {
        let h = &h;
        async move { h.ask(&format!("at once {n}")).await }
    });
    let replies = futures_util::future::join_all(asks).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    assert_eq!(
        h.emulator.token_requests(),
        1,
        "one fetch for eight requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_whether_a_token_can_be_had_without_showing_the_secret() {
    let emulator = keyless(Duration::from_secs(3599), true, false).await;
    let vars = secret_vars(&emulator);
    let check = |vars: Vec<(String, String)>| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_fallback-chat"))
                .arg("--check")
                .env_clear()
                .envs(vars)
                .env("AUTH_PROVIDED_BY", "iam")
                .output()
                .expect("the binary runs")
        })
        .await
        .unwrap()
    };
    let ok = check(vars.clone()).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(emulator.token_requests(), 1, "--check asked for a token");

    emulator.set_token_mode(TokenMode::InvalidClient);
    let refused = check(vars).await;
    let said = String::from_utf8_lossy(&refused.stderr).to_string()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success());
    assert!(
        said.contains("no Entra ID token") && said.contains("AADSTS7000215"),
        "{said}"
    );
    assert!(!said.contains(SECRET), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_slower_than_an_attempt_still_yields_a_token_for_the_next_request() {
    let emulator = keyless(Duration::from_secs(3599), true, false).await;
    let mut vars = secret_vars(&emulator);
    vars.push(("ATTEMPT_TIMEOUT_MS".into(), "300".into()));
    vars.push(("AZURE_OPENAI_DEPLOYMENTS".into(), "gpt-4o".into()));
    emulator.set_token_mode(TokenMode::Slow(Duration::from_millis(800)));
    let h = Harness::build(emulator, Vec::new(), &vars, None);
    // The attempt gives up waiting; the fetch goes on.
    let first = h.ask("first").await;
    assert_eq!(first.status, 503, "{:?}", first.body);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let next = h.ask("next").await;
    assert_eq!(next.status, 200, "{:?}", next.body);
    assert_eq!(h.emulator.token_requests(), 1, "the one fetch served both");
}
