//! Keys held in AWS, resolved for real against moto's server (Secrets Manager and SSM over HTTP,
//! through the same SDK clients the function uses). One test function: the SDK reads its endpoint
//! and credentials from process-wide environment variables.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use aws_config::BehaviorVersion;
use aws_sdk_ssm::types::ParameterType;
use common::Logs;
use common::moto::Moto;
use fallback_chat::config::Config;
use fallback_chat::config::keys::resolve;
use fallback_chat::error::ConfigError;
use fallback_chat::http::auth::ClientKeys;
use fallback_chat::net::{ExtraRoots, Http};

const ENDPOINT: &str = "https://x.openai.azure.com";

/// A config from `vars` plus an endpoint and, unless client keys are given, an authorizer.
fn config(vars: &[(&str, &str)]) -> Config {
    let mut map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.insert("AZURE_OPENAI_ENDPOINT".into(), ENDPOINT.into());
    if !map.contains_key("CLIENT_API_KEYS") {
        map.insert("AUTH_PROVIDED_BY".into(), "authorizer".into());
    }
    Config::from_lookup(|name| map.get(name).cloned()).expect("the test config is valid")
}

/// Resolves `config`'s references with every log line, the SDK's included, captured in `logs`.
async fn resolve_logged(config: &mut Config, logs: &Logs) -> Result<(), ConfigError> {
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _current = tracing::subscriber::set_default(subscriber);
    resolve(config).await
}

async fn resolved(vars: &[(&str, &str)], logs: &Logs) -> Config {
    let mut config = config(vars);
    if let Err(e) = resolve_logged(&mut config, logs).await {
        panic!("{vars:?} did not resolve: {e}");
    }
    config
}

async fn refused(vars: &[(&str, &str)], logs: &Logs) -> String {
    let mut config = config(vars);
    match resolve_logged(&mut config, logs).await {
        Ok(()) => panic!("{vars:?} resolved, but should not have"),
        Err(e) => e.to_string(),
    }
}

fn keys(config: &Config) -> Vec<(&str, &str)> {
    config
        .pool
        .deployments
        .iter()
        .map(|d| (d.id.as_str(), d.key.as_ref().map_or("", |k| k.expose())))
        .collect()
}

const SM_KEY: &str = "sk-azure-from-secrets-manager";
const EAST_KEY: &str = "sk-east-from-json";
const WEST_KEY: &str = "sk-west-from-json";
const SSM_KEY: &str = "sk-azure-from-ssm";
const CLIENT_KEYS: &str = "client-key-0123456789abcdef,client-key-fedcba9876543210";
const PARAMETER: &str = "/fallback/azure-key";
const FETCHED: [&str; 6] = [
    SM_KEY,
    EAST_KEY,
    WEST_KEY,
    SSM_KEY,
    "client-key-0123456789abcdef",
    "client-key-fedcba9876543210",
];

const GET_SECRET: &str = "secretsmanager.GetSecretValue";
const GET_PARAMETER: &str = "AmazonSSM.GetParameter";

#[tokio::test]
async fn keys_held_in_secrets_manager_and_ssm_are_resolved_once_at_cold_start() {
    // Plain keys first, before any AWS setting exists in this process and before moto runs: if
    // resolve loaded aws-config, its profile, region and credential chains would log at TRACE.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            // SAFETY: the only test in this binary, and no other thread reads the environment yet.
            unsafe { std::env::remove_var(&name) };
        }
    }
    let plain_logs = Logs::default();
    let mut plain = config(&[
        ("AZURE_OPENAI_API_KEY", "sk-abc:def"),
        ("CLIENT_API_KEYS", "plain-client-key-0123456789"),
    ]);
    resolve_logged(&mut plain, &plain_logs)
        .await
        .expect("plain keys need no AWS at all");
    assert_eq!(
        keys(&plain),
        [("gpt-4o", "sk-abc:def"), ("gpt-35-turbo", "sk-abc:def")]
    );
    assert_eq!(
        plain.client_keys.as_ref().unwrap().expose(),
        "plain-client-key-0123456789"
    );
    assert_eq!(
        plain_logs.text(),
        "",
        "plain keys must not touch aws-config"
    );

    let moto = Moto::start();
    // SAFETY: as above; the SDK reads these when aws-config loads, after they are set.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", moto.endpoint());
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
        // The developer's ~/.aws must not redirect or re-credential the SDK.
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/aws-config");
        std::env::set_var(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        );
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }

    // Fixtures, created through the same SDK.
    let http = Http::new(&ExtraRoots::default()).expect("an HTTP client");
    let aws = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http.for_aws())
        .load()
        .await;
    let sm = aws_sdk_secretsmanager::Client::new(&aws);
    let ssm = aws_sdk_ssm::Client::new(&aws);
    let create = |name: &'static str, value: String| {
        let sm = sm.clone();
        async move {
            sm.create_secret()
                .name(name)
                .secret_string(value)
                .send()
                .await
                .unwrap_or_else(|e| panic!("CreateSecret {name}: {e:?}"))
                .arn
                .expect("CreateSecret returns the ARN")
        }
    };
    let key_arn = create("azure-key", format!("  {SM_KEY} \n")).await;
    let json_arn = create(
        "azure-keys",
        format!(r#"{{"east": "{EAST_KEY}", "west": " {WEST_KEY} ", "port": 443}}"#),
    )
    .await;
    let client_arn = create("client-keys", format!("{CLIENT_KEYS}\n")).await;
    let empty_arn = create("empty-key", "  \n ".to_owned()).await;
    ssm.put_parameter()
        .name(PARAMETER)
        .value(SSM_KEY)
        .r#type(ParameterType::SecureString)
        .send()
        .await
        .expect("PutParameter");
    let parameter_arn = ssm
        .get_parameter()
        .name(PARAMETER)
        .send()
        .await
        .expect("GetParameter")
        .parameter
        .and_then(|p| p.arn)
        .expect("GetParameter returns the ARN");
    assert!(key_arn.starts_with("arn:aws:secretsmanager:us-east-1:"));
    assert!(parameter_arn.starts_with("arn:aws:ssm:us-east-1:"));

    let logs = Logs::default();

    // A Secrets Manager ARN: trimmed, and fetched once although both default deployments use it.
    moto.reset();
    let c = resolved(&[("AZURE_OPENAI_API_KEY", &key_arn)], &logs).await;
    assert_eq!(keys(&c), [("gpt-4o", SM_KEY), ("gpt-35-turbo", SM_KEY)]);
    assert_eq!(moto.calls(GET_SECRET), 1);

    // One field of a JSON secret.
    let east = format!("{json_arn}#east");
    let c = resolved(&[("AZURE_OPENAI_API_KEY", &east)], &logs).await;
    assert_eq!(keys(&c)[0], ("gpt-4o", EAST_KEY));

    // The short Secrets Manager form, by name.
    let c = resolved(
        &[("AZURE_OPENAI_API_KEY", "secretsmanager:azure-keys#west")],
        &logs,
    )
    .await;
    assert_eq!(keys(&c)[0], ("gpt-4o", WEST_KEY));

    // An SSM SecureString, by path and by ARN, decrypted.
    moto.reset();
    let c = resolved(
        &[("AZURE_OPENAI_API_KEY", "ssm:/fallback/azure-key")],
        &logs,
    )
    .await;
    assert_eq!(keys(&c)[0], ("gpt-4o", SSM_KEY));
    let c = resolved(&[("AZURE_OPENAI_API_KEY", &parameter_arn)], &logs).await;
    assert_eq!(keys(&c)[1], ("gpt-35-turbo", SSM_KEY));
    assert_eq!(moto.calls(GET_PARAMETER), 2);

    // A pool: two entries share KEY_EAST, KEY_WEST is another field of the same secret, one entry
    // reads SSM, one keeps a plain key. One GetSecretValue and one GetParameter in all.
    let pool = r#"{"deployments": [
        {"id": "east-ptu", "endpoint": "https://east.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_EAST"},
        {"id": "east-paygo", "endpoint": "https://east.openai.azure.com", "deployment": "gpt-4o-paygo", "key_env": "KEY_EAST", "priority": 1},
        {"id": "west", "endpoint": "https://west.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_WEST", "priority": 1},
        {"id": "north", "endpoint": "https://north.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_NORTH", "priority": 2},
        {"id": "local", "endpoint": "http://127.0.0.1:11434/v1", "deployment": "llama3.1:8b", "api": "v1", "key_env": "KEY_LOCAL", "priority": 3}
    ]}"#;
    let west = format!("{json_arn}#west");
    moto.reset();
    let c = resolved(
        &[
            ("FALLBACK_POOL", pool),
            ("KEY_EAST", &east),
            ("KEY_WEST", &west),
            ("KEY_NORTH", "ssm:/fallback/azure-key"),
            ("KEY_LOCAL", "plain-local-key"),
        ],
        &logs,
    )
    .await;
    assert_eq!(
        keys(&c),
        [
            ("east-ptu", EAST_KEY),
            ("east-paygo", EAST_KEY),
            ("west", WEST_KEY),
            ("north", SSM_KEY),
            ("local", "plain-local-key"),
        ]
    );
    assert_eq!(moto.calls(GET_SECRET), 1, "one secret, fetched once");
    assert_eq!(moto.calls(GET_PARAMETER), 1, "one parameter, fetched once");

    // CLIENT_API_KEYS as a reference, alongside a plain Azure key.
    let c = resolved(
        &[
            ("AZURE_OPENAI_API_KEY", "sk-plain-azure-key"),
            ("CLIENT_API_KEYS", &client_arn),
        ],
        &logs,
    )
    .await;
    assert_eq!(c.client_keys.as_ref().unwrap().expose(), CLIENT_KEYS);
    assert_eq!(keys(&c)[0], ("gpt-4o", "sk-plain-azure-key"));
    assert!(ClientKeys::from_config(&c).is_ok());

    // Served end to end with both keys from Secrets Manager: the emulator only accepts the
    // Azure key moto holds, and the handler only the client keys moto holds.
    let emulator = azure_openai_emulator::Emulator::builder()
        .api_key(SM_KEY)
        .deployment("gpt-4o", azure_openai_emulator::Behavior::Healthy)
        .start()
        .await
        .expect("emulator starts");
    let vars: HashMap<&str, String> = HashMap::from([
        ("AZURE_OPENAI_ENDPOINT", emulator.url()),
        ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o".to_owned()),
        ("AZURE_OPENAI_API_KEY", key_arn.clone()),
        ("CLIENT_API_KEYS", client_arn.clone()),
    ]);
    let mut served = Config::from_lookup(|name| vars.get(name).cloned()).expect("valid config");
    resolve_logged(&mut served, &logs)
        .await
        .expect("both references resolve");
    let app = Arc::new(fallback_chat::App::new(served).expect("the app builds"));
    let ask = |authorization: Option<&str>| {
        let mut event: serde_json::Value =
            serde_json::from_str(include_str!("../events/http-api/get-query.json")).unwrap();
        match authorization {
            Some(value) => event["headers"]["authorization"] = serde_json::Value::from(value),
            None => {
                _ = event["headers"]
                    .as_object_mut()
                    .unwrap()
                    .remove("authorization")
            }
        }
        lambda_http::request::from_str(&event.to_string()).unwrap()
    };
    let second_client_key = CLIENT_KEYS.split(',').nth(1).unwrap();
    let answered = app
        .handle_buffered(ask(Some(&format!("Bearer {second_client_key}"))))
        .await;
    assert_eq!(answered.status(), 200);
    assert_eq!(emulator.calls("gpt-4o"), 1);
    assert_eq!(emulator.requests("gpt-4o")[0].headers["api-key"], SM_KEY);
    assert_eq!(app.handle_buffered(ask(None)).await.status(), 401);
    assert_eq!(
        app.handle_buffered(ask(Some("Bearer fc-example-client-key-0000")))
            .await
            .status(),
        401
    );
    assert_eq!(
        emulator.calls("gpt-4o"),
        1,
        "refused requests cost nothing upstream"
    );

    // A missing secret names the variable, the reference and the fix.
    let missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:no-such-key-AbCdEf";
    let error = refused(
        &[
            ("AZURE_OPENAI_API_KEY", missing),
            ("CLIENT_API_KEYS", &client_arn),
        ],
        &logs,
    )
    .await;
    assert!(
        error.starts_with("AZURE_OPENAI_API_KEY is invalid: "),
        "{error}"
    );
    assert!(error.contains(missing), "{error}");
    assert!(error.contains("does not exist"), "{error}");
    assert!(error.contains("create it"), "{error}");
    let missing_error = error;

    // In a pool, the entry is named; a resolvable reference next to it does not leak into the message.
    let pool = r#"{"deployments": [
        {"id": "east", "endpoint": "https://east.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_EAST"},
        {"id": "west", "endpoint": "https://west.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_WEST"}
    ]}"#;
    let pool_error = refused(
        &[
            ("FALLBACK_POOL", pool),
            ("KEY_EAST", &east),
            ("KEY_WEST", "ssm:/fallback/no-such-parameter"),
        ],
        &logs,
    )
    .await;
    assert!(
        pool_error.starts_with("KEY_WEST is invalid: "),
        "{pool_error}"
    );
    assert!(pool_error.contains("\"west\""), "{pool_error}");
    assert!(
        pool_error.contains("SSM parameter /fallback/no-such-parameter"),
        "{pool_error}"
    );

    // A JSON field that is not there, and a secret that holds only whitespace.
    let field_error = refused(
        &[("AZURE_OPENAI_API_KEY", &format!("{json_arn}#north"))],
        &logs,
    )
    .await;
    assert!(field_error.contains("no field \"north\""), "{field_error}");
    let empty_error = refused(
        &[
            ("AZURE_OPENAI_API_KEY", "sk-plain-azure-key"),
            ("CLIENT_API_KEYS", &empty_arn),
        ],
        &logs,
    )
    .await;
    assert!(
        empty_error.starts_with("CLIENT_API_KEYS is invalid: "),
        "{empty_error}"
    );
    assert!(empty_error.contains(&empty_arn), "{empty_error}");
    assert!(empty_error.contains("empty"), "{empty_error}");

    for error in [&missing_error, &pool_error, &field_error, &empty_error] {
        for value in FETCHED {
            assert!(!error.contains(value), "{error} shows a fetched value");
        }
    }

    // Every resolution logged its reference and duration; no fetched value reached a log line,
    // although the SDK logged at TRACE level throughout.
    let logged = logs.text();
    assert!(logged.contains("key reference resolved"), "{logged}");
    assert!(logged.contains(&format!("reference={key_arn}")), "{logged}");
    assert!(
        logged.contains("reference=ssm:/fallback/azure-key"),
        "{logged}"
    );
    assert!(logged.contains("elapsed_ms="), "{logged}");
    for value in FETCHED {
        assert!(
            !logged.contains(value),
            "a fetched value was logged: {value}\n{logged}"
        );
    }

    // An endpoint that does not answer: the message says where it tried and what to check.
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    // SAFETY: as above.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}")) };
    let started = Instant::now();
    let unreachable_error = refused(&[("AZURE_OPENAI_API_KEY", &key_arn)], &logs).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{unreachable_error}"
    );
    assert!(
        unreachable_error.contains("could not call Secrets Manager in us-east-1"),
        "{unreachable_error}"
    );
    assert!(unreachable_error.contains(&key_arn), "{unreachable_error}");

    println!("{missing_error}\n{pool_error}\n{field_error}\n{empty_error}\n{unreachable_error}");
}
