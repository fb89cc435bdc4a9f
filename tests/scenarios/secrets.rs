//! Keys held in AWS, resolved for real against moto's server (Secrets Manager and SSM over HTTP,
//! through the same SDK clients the function uses). Each test starts its own moto and points an
//! SDK configuration at it, so the tests share nothing and touch no process environment.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common;

use aws_config::SdkConfig;
use aws_sdk_ssm::types::ParameterType;
use common::Logs;
use common::moto::Moto;
use fallback_chat::config::Config;
use fallback_chat::config::keys::{referenced, resolve};
use fallback_chat::{App, ClientKeys};

const ENDPOINT: &str = "https://x.openai.azure.com";

const SM_KEY: &str = "sk-azure-from-secrets-manager";
const EAST_KEY: &str = "sk-east-from-json";
const WEST_KEY: &str = "sk-west-from-json";
const SSM_KEY: &str = "sk-azure-from-ssm";
const CLIENT_KEYS: &str = "client-key-0123456789abcdef,client-key-fedcba9876543210";
const PARAMETER: &str = "/fallback/azure-key";
/// Every value moto holds: none may appear in an error or a log line.
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

/// A config from `vars` plus an endpoint and, unless client keys are given, an authorizer.
fn config(vars: &[(&str, &str)]) -> Config {
    let mut map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.entry("AZURE_OPENAI_ENDPOINT".into())
        .or_insert_with(|| ENDPOINT.into());
    if !map.contains_key("CLIENT_API_KEYS") {
        map.insert("AUTH_PROVIDED_BY".into(), "authorizer".into());
    }
    Config::from_lookup(|name| map.get(name).cloned()).expect("the test config is valid")
}

/// moto with the secrets and the parameter the tests read, and the SDK configuration that
/// reaches it.
struct Aws {
    moto: Moto,
    sdk: SdkConfig,
    key_arn: String,
    json_arn: String,
    client_arn: String,
    empty_arn: String,
    parameter_arn: String,
    logs: Logs,
}

impl Aws {
    async fn start() -> Self {
        let moto = Moto::start();
        let sdk = common::aws_sdk(&moto.endpoint()).await;
        let sm = aws_sdk_secretsmanager::Client::new(&sdk);
        let ssm = aws_sdk_ssm::Client::new(&sdk);
        let create = |name: &'static str, value: String| {
            let sm = sm.clone();
            async move {
                // A busy moto can take a call and lose the answer; the SDK's retry then finds
                // the secret made: the setup is idempotent, the tests are about reading.
                match sm
                    .create_secret()
                    .name(name)
                    .secret_string(value)
                    .send()
                    .await
                {
                    Ok(created) => created.arn.expect("CreateSecret returns the ARN"),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_resource_exists_exception()) =>
                    {
                        sm.describe_secret()
                            .secret_id(name)
                            .send()
                            .await
                            .unwrap_or_else(|e| panic!("DescribeSecret {name}: {e:?}"))
                            .arn
                            .expect("DescribeSecret returns the ARN")
                    }
                    Err(e) => panic!("CreateSecret {name}: {e:?}"),
                }
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
            // Idempotent, as CreateSecret above: a retried call must not fail the setup.
            .overwrite(true)
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
        moto.reset();
        Self {
            moto,
            sdk,
            key_arn,
            json_arn,
            client_arn,
            empty_arn,
            parameter_arn,
            logs: Logs::default(),
        }
    }

    /// `vars` resolved as a cold start would, every log line (the SDK's included, at TRACE) in
    /// `self.logs`.
    async fn resolve(&self, vars: &[(&str, &str)]) -> Result<Config, String> {
        let config = config(vars);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.logs.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        let _current = tracing::subscriber::set_default(subscriber);
        match resolve(&config, &self.sdk).await {
            Ok(resolved) => Ok(resolved.apply(config)),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn resolved(&self, vars: &[(&str, &str)]) -> Config {
        self.resolve(vars)
            .await
            .unwrap_or_else(|e| panic!("{vars:?} did not resolve: {e}"))
    }

    /// The error `vars` are refused with; it never shows a fetched value.
    async fn refused(&self, vars: &[(&str, &str)]) -> String {
        let error = match self.resolve(vars).await {
            Ok(_) => panic!("{vars:?} resolved, but should not have"),
            Err(e) => e,
        };
        for value in FETCHED {
            assert!(!error.contains(value), "{error} shows a fetched value");
        }
        error
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

#[tokio::test]
async fn plain_keys_need_no_aws_at_all() {
    let config = config(&[
        ("AZURE_OPENAI_API_KEY", "sk-abc:def"),
        ("CLIENT_API_KEYS", "plain-client-key-0123456789"),
    ]);
    assert!(
        !referenced(&config),
        "a key with a ':' is still a plain key"
    );
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _current = tracing::subscriber::set_default(subscriber);
    // A cold start: were aws-config loaded, its region and credential chains would log at TRACE.
    let app = App::start(config).await.expect("plain keys start");
    assert_eq!(logs.text(), "", "plain keys must not touch aws-config");
    drop(app);
}

#[tokio::test]
async fn a_secrets_manager_key_is_trimmed_and_fetched_once_for_every_deployment_using_it() {
    let aws = Aws::start().await;
    let c = aws
        .resolved(&[("AZURE_OPENAI_API_KEY", &aws.key_arn)])
        .await;
    assert_eq!(keys(&c), [("gpt-4o", SM_KEY), ("gpt-35-turbo", SM_KEY)]);
    assert_eq!(aws.moto.calls(GET_SECRET), 1);
}

#[tokio::test]
async fn one_field_of_a_json_secret_is_picked_by_arn_or_by_name() {
    let aws = Aws::start().await;
    let east = format!("{}#east", aws.json_arn);
    let c = aws.resolved(&[("AZURE_OPENAI_API_KEY", &east)]).await;
    assert_eq!(keys(&c)[0], ("gpt-4o", EAST_KEY));
    let c = aws
        .resolved(&[("AZURE_OPENAI_API_KEY", "secretsmanager:azure-keys#west")])
        .await;
    assert_eq!(keys(&c)[0], ("gpt-4o", WEST_KEY), "trimmed too");
}

#[tokio::test]
async fn an_ssm_secure_string_is_read_decrypted_by_path_or_by_arn() {
    let aws = Aws::start().await;
    let c = aws
        .resolved(&[("AZURE_OPENAI_API_KEY", "ssm:/fallback/azure-key")])
        .await;
    assert_eq!(keys(&c)[0], ("gpt-4o", SSM_KEY));
    let c = aws
        .resolved(&[("AZURE_OPENAI_API_KEY", &aws.parameter_arn)])
        .await;
    assert_eq!(keys(&c)[1], ("gpt-35-turbo", SSM_KEY));
    assert_eq!(aws.moto.calls(GET_PARAMETER), 2);
}

#[tokio::test]
async fn a_pool_fetches_each_secret_and_parameter_once_and_keeps_plain_keys() {
    let aws = Aws::start().await;
    // Two entries share KEY_EAST, KEY_WEST is another field of the same secret, one entry reads
    // SSM, one keeps a plain key.
    let pool = r#"{"deployments": [
        {"id": "east-ptu", "endpoint": "https://east.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_EAST"},
        {"id": "east-paygo", "endpoint": "https://east.openai.azure.com", "deployment": "gpt-4o-paygo", "key_env": "KEY_EAST", "priority": 1},
        {"id": "west", "endpoint": "https://west.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_WEST", "priority": 1},
        {"id": "north", "endpoint": "https://north.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_NORTH", "priority": 2},
        {"id": "local", "endpoint": "http://127.0.0.1:11434/v1", "deployment": "llama3.1:8b", "api": "v1", "key_env": "KEY_LOCAL", "priority": 3}
    ]}"#;
    let (east, west) = (
        format!("{}#east", aws.json_arn),
        format!("{}#west", aws.json_arn),
    );
    let c = aws
        .resolved(&[
            ("FALLBACK_POOL", pool),
            ("KEY_EAST", &east),
            ("KEY_WEST", &west),
            ("KEY_NORTH", "ssm:/fallback/azure-key"),
            ("KEY_LOCAL", "plain-local-key"),
        ])
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
    assert_eq!(aws.moto.calls(GET_SECRET), 1, "one secret, fetched once");
    assert_eq!(
        aws.moto.calls(GET_PARAMETER),
        1,
        "one parameter, fetched once"
    );
}

#[tokio::test]
async fn client_keys_may_be_held_in_secrets_manager_beside_a_plain_azure_key() {
    let aws = Aws::start().await;
    let c = aws
        .resolved(&[
            ("AZURE_OPENAI_API_KEY", "sk-plain-azure-key"),
            ("CLIENT_API_KEYS", &aws.client_arn),
        ])
        .await;
    assert_eq!(c.client_keys.as_ref().unwrap().expose(), CLIENT_KEYS);
    assert_eq!(keys(&c)[0], ("gpt-4o", "sk-plain-azure-key"));
    assert!(ClientKeys::from_config(&c).is_ok());
}

#[tokio::test]
async fn a_request_is_served_end_to_end_with_the_azure_and_client_keys_from_secrets_manager() {
    let aws = Aws::start().await;
    // The emulator only accepts the Azure key moto holds, and the handler only the client keys
    // moto holds.
    let emulator = azure_openai_emulator::Emulator::builder()
        .api_key(SM_KEY)
        .deployment("gpt-4o", azure_openai_emulator::Behavior::Healthy)
        .start()
        .await
        .expect("emulator starts");
    let served = aws
        .resolved(&[
            ("AZURE_OPENAI_ENDPOINT", &emulator.url()),
            ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o"),
            ("AZURE_OPENAI_API_KEY", &aws.key_arn),
            ("CLIENT_API_KEYS", &aws.client_arn),
        ])
        .await;
    let app = Arc::new(App::new(served).expect("the app builds"));
    let ask = |authorization: Option<&str>| {
        let mut event: serde_json::Value =
            serde_json::from_str(include_str!("../../events/http-api/get-query.json")).unwrap();
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
}

#[tokio::test]
async fn a_missing_secret_names_the_variable_the_reference_and_the_fix() {
    let aws = Aws::start().await;
    let missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:no-such-key-AbCdEf";
    let error = aws
        .refused(&[
            ("AZURE_OPENAI_API_KEY", missing),
            ("CLIENT_API_KEYS", &aws.client_arn),
        ])
        .await;
    assert!(
        error.starts_with("AZURE_OPENAI_API_KEY is invalid: "),
        "{error}"
    );
    assert!(error.contains(missing), "{error}");
    assert!(error.contains("does not exist"), "{error}");
    assert!(error.contains("create it"), "{error}");
}

#[tokio::test]
async fn in_a_pool_the_entry_whose_reference_fails_is_named_and_no_other_value_leaks() {
    let aws = Aws::start().await;
    let pool = r#"{"deployments": [
        {"id": "east", "endpoint": "https://east.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_EAST"},
        {"id": "west", "endpoint": "https://west.openai.azure.com", "deployment": "gpt-4o", "key_env": "KEY_WEST"}
    ]}"#;
    let east = format!("{}#east", aws.json_arn);
    let error = aws
        .refused(&[
            ("FALLBACK_POOL", pool),
            ("KEY_EAST", &east),
            ("KEY_WEST", "ssm:/fallback/no-such-parameter"),
        ])
        .await;
    assert!(error.starts_with("KEY_WEST is invalid: "), "{error}");
    assert!(error.contains("\"west\""), "{error}");
    assert!(
        error.contains("SSM parameter /fallback/no-such-parameter"),
        "{error}"
    );
}

#[tokio::test]
async fn a_missing_json_field_or_an_empty_secret_is_refused_saying_which() {
    let aws = Aws::start().await;
    let north = format!("{}#north", aws.json_arn);
    let error = aws.refused(&[("AZURE_OPENAI_API_KEY", &north)]).await;
    assert!(error.contains("no field \"north\""), "{error}");
    let error = aws
        .refused(&[
            ("AZURE_OPENAI_API_KEY", "sk-plain-azure-key"),
            ("CLIENT_API_KEYS", &aws.empty_arn),
        ])
        .await;
    assert!(error.starts_with("CLIENT_API_KEYS is invalid: "), "{error}");
    assert!(error.contains(&aws.empty_arn), "{error}");
    assert!(error.contains("empty"), "{error}");
}

#[tokio::test]
async fn every_resolution_is_logged_with_its_reference_and_never_its_value() {
    let aws = Aws::start().await;
    aws.resolved(&[
        ("AZURE_OPENAI_API_KEY", &aws.key_arn),
        ("CLIENT_API_KEYS", &aws.client_arn),
    ])
    .await;
    aws.resolved(&[("AZURE_OPENAI_API_KEY", "ssm:/fallback/azure-key")])
        .await;
    let west = format!("{}#west", aws.json_arn);
    aws.resolved(&[("AZURE_OPENAI_API_KEY", &west)]).await;
    aws.refused(&[("AZURE_OPENAI_API_KEY", &format!("{}#north", aws.json_arn))])
        .await;
    // The SDK logged at TRACE level throughout.
    let logged = aws.logs.text();
    assert!(logged.contains("key reference resolved"), "{logged}");
    assert!(
        logged.contains(&format!("reference={}", aws.key_arn)),
        "{logged}"
    );
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
}

#[tokio::test]
async fn an_endpoint_that_does_not_answer_fails_in_time_saying_where_it_tried() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let sdk = common::aws_sdk(&format!("http://127.0.0.1:{closed}")).await;
    let arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:azure-key-AbCdEf";
    let config = config(&[("AZURE_OPENAI_API_KEY", arn)]);
    let started = Instant::now();
    let error = resolve(&config, &sdk)
        .await
        .expect_err("nothing answers")
        .to_string();
    assert!(started.elapsed() < Duration::from_secs(8), "{error}");
    assert!(
        error.contains("could not call Secrets Manager in us-east-1"),
        "{error}"
    );
    assert!(error.contains(arn), "{error}");
}

#[tokio::test]
async fn named_clients_keys_may_be_referenced_inline_or_held_in_their_variables() {
    let aws = Aws::start().await;
    let clients = format!(
        r#"[{{"name": "team", "key_ref": "{}#east", "requests_per_minute": 5}},
            {{"name": "other", "key_env": "KEY_OTHER"}}]"#,
        aws.json_arn
    );
    let west = format!("{}#west", aws.json_arn);
    let c = aws
        .resolved(&[
            ("AZURE_OPENAI_API_KEY", "sk-plain-azure-key"),
            ("FALLBACK_CLIENTS", &clients),
            ("KEY_OTHER", &west),
        ])
        .await;
    assert_eq!(c.clients[0].keys[0].expose(), EAST_KEY);
    assert_eq!(c.clients[1].keys[0].expose(), WEST_KEY);
    assert!(ClientKeys::from_config(&c).is_ok());
    // One secret, fetched once for both fields.
    assert_eq!(aws.moto.calls(GET_SECRET), 1);

    // A field the secret does not have names the client, never a value.
    let missing = format!(
        r#"[{{"name": "team", "key_ref": "{}#north"}}]"#,
        aws.json_arn
    );
    let error = aws
        .refused(&[
            ("AZURE_OPENAI_API_KEY", "sk-plain-azure-key"),
            ("FALLBACK_CLIENTS", &missing),
        ])
        .await;
    assert!(error.contains("client \"team\""), "{error}");
    assert!(error.contains("north"), "{error}");
}

#[tokio::test]
async fn an_entra_client_secret_held_in_secrets_manager_authenticates_and_shows_nowhere() {
    const ENTRA_SECRET: &str = "entra-secret-from-secrets-manager";
    let aws = Aws::start().await;
    let arn = aws_sdk_secretsmanager::Client::new(&aws.sdk)
        .create_secret()
        .name("entra-secret")
        .secret_string(ENTRA_SECRET)
        .send()
        .await
        .unwrap()
        .arn
        .unwrap();
    let mut entra = azure_openai_emulator::EntraConfig::new("tenant-1", "client-1");
    entra.client_secret = Some(ENTRA_SECRET.to_owned());
    let emulator = azure_openai_emulator::Emulator::builder()
        .api_key("emulator-key")
        .deployment("gpt-4o", azure_openai_emulator::Behavior::Healthy)
        .entra(entra)
        .disable_local_auth()
        .start()
        .await
        .unwrap();
    let served = aws
        .resolved(&[
            ("AZURE_OPENAI_ENDPOINT", &emulator.url()),
            ("AZURE_OPENAI_DEPLOYMENTS", "gpt-4o"),
            ("AZURE_OPENAI_AUTH", "client_secret"),
            ("AZURE_TENANT_ID", "tenant-1"),
            ("AZURE_CLIENT_ID", "client-1"),
            ("AZURE_CLIENT_SECRET", &arn),
            ("AZURE_AUTHORITY_HOST", &emulator.url()),
        ])
        .await;
    assert_eq!(aws.moto.calls(GET_SECRET), 1);
    let clock = Arc::new(fallback_chat::clock::ManualClock::default());
    let app = Arc::new(App::with_clock(served, clock).expect("the app builds"));
    let logs = common::Logs::default();
    let event = common::http_api_get(Some("hello"));
    let reply = common::invoke_app(&app, &logs, &event, common::epoch_ms() + 30_000).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(emulator.token_forms()[0]["client_secret"], ENTRA_SECRET);
    for text in [logs.text(), aws.logs.text(), reply.raw] {
        assert!(!text.contains(ENTRA_SECRET), "the secret shows: {text}");
    }
}
