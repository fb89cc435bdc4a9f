//! Real HTTP against a started emulator.

mod common;

use std::time::{Duration, Instant, SystemTime};

use azure_openai_emulator::{Behavior, Chaos, Emulator, RetryAfter};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API_VERSION: &str = "2024-10-21";

fn chat_body(text: &str) -> Value {
    json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": text},
    ]})
}

fn classic_url(emu: &Emulator, deployment: &str) -> String {
    format!(
        "{}/openai/deployments/{deployment}/chat/completions?api-version={API_VERSION}",
        emu.url()
    )
}

async fn post(emu: &Emulator, deployment: &str) -> reqwest::Response {
    common::client()
        .post(classic_url(emu, deployment))
        .header("api-key", emu.api_key())
        .json(&chat_body("hello there"))
        .send()
        .await
        .expect("emulator answers")
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn assert_uuid_like(id: Option<&str>) {
    let id = id.expect("id header present");
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(id.matches('-').count(), 4, "{id}");
}

async fn start(deployments: &[(&str, Behavior)]) -> Emulator {
    let mut builder = Emulator::builder();
    for (name, behavior) in deployments {
        builder = builder.deployment(*name, behavior.clone());
    }
    builder.start().await.expect("emulator starts")
}

#[tokio::test]
async fn healthy_answer_has_azure_shape_and_headers() {
    let emu = start(&[("gpt-35-turbo", Behavior::Healthy)]).await;
    let resp = post(&emu, "gpt-35-turbo").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), Some("application/json"));
    assert_uuid_like(header(&resp, "x-request-id"));
    assert_uuid_like(header(&resp, "apim-request-id"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some("99"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), Some("99000"));

    let body: Value = resp.json().await.expect("json body");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-"))
    );
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().is_some_and(|t| t > 1_700_000_000));
    assert_eq!(body["model"], "gpt-35-turbo-0125");
    assert_eq!(body["system_fingerprint"], "fp_emu");
    let prompt_filter = &body["prompt_filter_results"][0];
    assert_eq!(prompt_filter["prompt_index"], 0);
    for category in ["hate", "self_harm", "sexual", "violence"] {
        let safe = json!({"filtered": false, "severity": "safe"});
        assert_eq!(prompt_filter["content_filter_results"][category], safe);
        assert_eq!(body["choices"][0]["content_filter_results"][category], safe);
    }
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(
        choice["message"],
        json!({"role": "assistant", "content": "[gpt-35-turbo] You said: hello there", "refusal": null})
    );
    let usage = &body["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64(),
        usage["completion_tokens"].as_u64(),
    );
    assert!(prompt.is_some_and(|n| n > 0) && completion.is_some_and(|n| n > 0));
    assert_eq!(
        usage["total_tokens"].as_u64(),
        prompt.zip(completion).map(|(p, c)| p + c)
    );

    // Two answers never share an id.
    let other: Value = post(&emu, "gpt-35-turbo").await.json().await.expect("json");
    assert_ne!(other["id"], body["id"]);
}

#[tokio::test]
async fn model_version_remaining_headers_and_latency_are_settable() {
    let emu = Emulator::builder()
        .deployment("gpt-4o", Behavior::Healthy)
        .deployment("custom", Behavior::Healthy)
        .model_version("custom", "my-model-2025")
        .start()
        .await
        .expect("starts");
    let body: Value = post(&emu, "gpt-4o").await.json().await.expect("json");
    assert_eq!(body["model"], "gpt-4o-2024-08-06");
    let body: Value = post(&emu, "custom").await.json().await.expect("json");
    assert_eq!(body["model"], "my-model-2025");

    emu.set_remaining("gpt-4o", 3, 1200);
    emu.set_latency("gpt-4o", Duration::from_millis(300));
    let started = Instant::now();
    let resp = post(&emu, "gpt-4o").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some("3"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), Some("1200"));
}

#[tokio::test]
async fn every_retry_after_variant_sends_its_headers() {
    const TIMING: [&str; 5] = [
        "retry-after-ms",
        "retry-after",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-remaining-tokens",
    ];
    // (variant, expected timing headers, text in the message)
    type Case = (
        RetryAfter,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: [Case; 5] = [
        (
            RetryAfter::Milliseconds(1500),
            &[("retry-after-ms", "1500"), ("retry-after", "2")],
            "Please retry after 2 seconds.",
        ),
        (
            RetryAfter::Seconds(7),
            &[("retry-after", "7")],
            "Please retry after 7 seconds.",
        ),
        (
            RetryAfter::ResetRequests(5),
            &[("x-ratelimit-reset-requests", "5")],
            "Please retry after 5 seconds.",
        ),
        (
            RetryAfter::ResetTokens(9),
            &[("x-ratelimit-reset-tokens", "9")],
            "Please retry after 9 seconds.",
        ),
        (RetryAfter::None, &[], "Please retry after a while."),
    ];
    let emu = start(&[("gpt-4o", Behavior::Healthy)]).await;
    for (retry, expected, text) in cases {
        emu.set("gpt-4o", Behavior::Throttled(retry.clone()));
        let resp = post(&emu, "gpt-4o").await;
        assert_eq!(resp.status(), 429, "{retry:?}");
        assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(header(&resp, "content-type"), Some("application/json"));
        assert_uuid_like(header(&resp, "x-request-id"));
        for name in TIMING {
            let want = expected.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
            assert_eq!(header(&resp, name), want, "{retry:?}: header {name}");
        }
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "429");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit"
            ),
            "{message}"
        );
        assert!(message.contains(text), "{retry:?}: {message}");
    }

    // HTTP-date: an IMF-fixdate about 30 s ahead, and nothing else.
    emu.set("gpt-4o", Behavior::Throttled(RetryAfter::HttpDate(30)));
    let resp = post(&emu, "gpt-4o").await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after-ms"), None);
    let date = header(&resp, "retry-after").expect("retry-after");
    assert!(date.ends_with(" GMT"), "{date}");
    let at = httpdate::parse_http_date(date).expect("IMF-fixdate");
    let ahead = at.duration_since(SystemTime::now()).expect("in the future");
    assert!(
        ahead > Duration::from_secs(27) && ahead <= Duration::from_secs(30),
        "{ahead:?}"
    );
}

#[tokio::test]
async fn wrong_or_missing_key_is_401_and_still_counted() {
    let emu = Emulator::builder()
        .api_key("secret")
        .deployment("gpt-4o", Behavior::Healthy)
        .start()
        .await
        .expect("starts");
    assert_eq!(emu.api_key(), "secret");
    let client = common::client();
    for key in [Some("wrong"), None] {
        let mut req = client
            .post(classic_url(&emu, "gpt-4o"))
            .json(&chat_body("hi"));
        if let Some(key) = key {
            req = req.header("api-key", key);
        }
        let resp = req.send().await.expect("answer");
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "401");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Access denied"))
        );
    }
    assert_eq!(emu.calls("gpt-4o"), 2);

    // A bearer token with the key is accepted too.
    let resp = client
        .post(classic_url(&emu, "gpt-4o"))
        .bearer_auth("secret")
        .json(&chat_body("hi"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(emu.calls("gpt-4o"), 3);
    assert_eq!(emu.total_calls(), 3);
}

#[tokio::test]
async fn missing_api_version_is_resource_not_found() {
    let emu = start(&[("gpt-4o", Behavior::Healthy)]).await;
    let resp = common::client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions",
            emu.url()
        ))
        .header("api-key", emu.api_key())
        .json(&chat_body("hi"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 404);
    assert_uuid_like(header(&resp, "apim-request-id"));
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"error": {"code": "404", "message": "Resource not found"}})
    );
    assert_eq!(emu.calls("gpt-4o"), 1);
}

#[tokio::test]
async fn unknown_deployment_is_deployment_not_found() {
    let emu = start(&[("gpt-4o", Behavior::Healthy)]).await;
    let resp = post(&emu, "gpt-5").await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "DeploymentNotFound");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("The API deployment"))
    );
    assert_eq!(emu.calls("gpt-5"), 1);
    assert_eq!(emu.calls("gpt-4o"), 0);

    // Registering it later makes it answer.
    emu.set("gpt-5", Behavior::Healthy);
    assert_eq!(post(&emu, "gpt-5").await.status(), 200);
}

#[tokio::test]
async fn v1_route_takes_the_deployment_from_model() {
    let emu = start(&[("gpt-4o", Behavior::Healthy)]).await;
    let client = common::client();
    let url = format!("{}/openai/v1/chat/completions", emu.url());
    let mut body = chat_body("via v1");
    body["model"] = json!("gpt-4o");
    let resp = client
        .post(&url)
        .bearer_auth(emu.api_key())
        .json(&body)
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.expect("json");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "[gpt-4o] You said: via v1"
    );
    assert_eq!(emu.calls("gpt-4o"), 1);
    assert_eq!(
        emu.requests("gpt-4o")[0].path,
        "/openai/v1/chat/completions"
    );
    assert_eq!(emu.requests("gpt-4o")[0].query, None);

    // The v1 route has no api-version; scripted 429s then leave it out of the message.
    emu.set("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(3)));
    let resp = client
        .post(&url)
        .header("api-key", emu.api_key())
        .json(&body)
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 429);
    let err: Value = resp.json().await.expect("json");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("Requests to the ChatCompletions_Create Operation have exceeded"));

    // Without a model there is no deployment to route to.
    let resp = client
        .post(&url)
        .header("api-key", emu.api_key())
        .json(&chat_body("no model"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 400);
    assert_eq!(emu.total_calls(), 3);
}

#[tokio::test]
async fn body_without_messages_is_400_openai_style() {
    let emu = start(&[("gpt-4o", Behavior::Healthy)]).await;
    let client = common::client();
    for body in [
        "not json",
        r#"{"prompt":"hi"}"#,
        r#"{"messages":"hi"}"#,
        r#"{"messages":[]}"#,
    ] {
        let resp = client
            .post(classic_url(&emu, "gpt-4o"))
            .header("api-key", emu.api_key())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.expect("json");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert_eq!(err["error"]["param"], "messages");
        assert_eq!(err["error"]["code"], Value::Null);
    }
    assert_eq!(emu.requests("gpt-4o")[0].body, json!("not json"));

    // A rejected body does not consume a one-shot; an unknown deployment is a 404 whatever the body.
    emu.push("gpt-4o", Behavior::ServerError);
    let bad = |deployment: &str| {
        client
            .post(classic_url(&emu, deployment))
            .header("api-key", emu.api_key())
            .body("{}")
            .send()
    };
    assert_eq!(bad("gpt-4o").await.expect("answer").status(), 400);
    assert_eq!(bad("missing").await.expect("answer").status(), 404);
    assert_eq!(post(&emu, "gpt-4o").await.status(), 500);
}

#[tokio::test]
async fn push_is_one_shot_fifo_before_the_steady_behaviour() {
    let emu = start(&[("gpt-4o", Behavior::Healthy)]).await;
    emu.push("gpt-4o", Behavior::ServerError);
    emu.push("gpt-4o", Behavior::Unavailable);
    assert_eq!(post(&emu, "gpt-4o").await.status(), 500);
    assert_eq!(post(&emu, "gpt-4o").await.status(), 503);
    assert_eq!(post(&emu, "gpt-4o").await.status(), 200);
    assert_eq!(post(&emu, "gpt-4o").await.status(), 200);

    emu.set("gpt-4o", Behavior::RequestTimeout);
    emu.push("gpt-4o", Behavior::Healthy);
    assert_eq!(post(&emu, "gpt-4o").await.status(), 200);
    assert_eq!(post(&emu, "gpt-4o").await.status(), 408);
    assert_eq!(emu.calls("gpt-4o"), 6);

    emu.reset_counters();
    assert_eq!((emu.calls("gpt-4o"), emu.total_calls()), (0, 0));
    assert!(emu.requests("gpt-4o").is_empty());
    assert_eq!(post(&emu, "gpt-4o").await.status(), 408);
}

#[tokio::test]
async fn scripted_errors_use_azure_envelopes() {
    let emu = start(&[("d", Behavior::Healthy)]).await;
    let cases: [(Behavior, u16, Value); 7] = [
        (
            Behavior::ServerError,
            500,
            json!({"type": "server_error", "param": null, "code": null}),
        ),
        (Behavior::Unavailable, 503, json!({"code": "503"})),
        (
            Behavior::RequestTimeout,
            408,
            json!({"code": "Timeout", "message": "The operation was timeout."}),
        ),
        (
            Behavior::ContentFilter,
            400,
            json!({"code": "content_filter", "param": "prompt", "type": null, "status": 400}),
        ),
        (
            Behavior::ContextLengthExceeded,
            400,
            json!({"code": "context_length_exceeded", "param": "messages", "type": "invalid_request_error"}),
        ),
        (
            Behavior::DeploymentNotFound,
            404,
            json!({"code": "DeploymentNotFound"}),
        ),
        (Behavior::Unauthorized, 401, json!({"code": "401"})),
    ];
    for (behavior, status, fields) in cases {
        emu.set("d", behavior.clone());
        let resp = post(&emu, "d").await;
        assert_eq!(resp.status(), status, "{behavior:?}");
        assert_eq!(
            header(&resp, "x-ratelimit-remaining-requests"),
            None,
            "{behavior:?}"
        );
        assert_uuid_like(header(&resp, "x-request-id"));
        let body: Value = resp.json().await.expect("json");
        for (key, want) in fields.as_object().into_iter().flatten() {
            assert_eq!(&body["error"][key], want, "{behavior:?}: {key}");
        }
        assert!(body["error"]["message"].is_string(), "{behavior:?}");
        if behavior == Behavior::ContentFilter {
            let inner = &body["error"]["innererror"];
            assert_eq!(inner["code"], "ResponsibleAIPolicyViolation");
            assert_eq!(
                inner["content_filter_result"]["hate"],
                json!({"filtered": true, "severity": "high"})
            );
        }
    }

    emu.set("d", Behavior::UnavailableRetryAfter(4));
    let resp = post(&emu, "d").await;
    assert_eq!(
        (resp.status().as_u16(), header(&resp, "retry-after")),
        (503, Some("4"))
    );

    emu.set("d", Behavior::OutputFiltered);
    let resp = post(&emu, "d").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "content_filter");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["content_filter_results"]["violence"],
        json!({"filtered": true, "severity": "medium"})
    );
}

#[tokio::test]
async fn reset_connection_gives_the_client_an_error_not_a_response() {
    let emu = start(&[("gpt-4o", Behavior::ResetConnection)]).await;
    let err = common::client()
        .post(classic_url(&emu, "gpt-4o"))
        .header("api-key", emu.api_key())
        .json(&chat_body("hi"))
        .send()
        .await
        .expect_err("no HTTP response");
    assert!(err.is_request() || err.is_connect(), "{err:?}");
    assert_eq!(emu.calls("gpt-4o"), 1);

    // On the wire: not a single byte, then an RST (ECONNRESET), not a clean FIN.
    let mut stream = tokio::net::TcpStream::connect(emu.addr())
        .await
        .expect("connect");
    let body = chat_body("hi").to_string();
    let request = format!(
        "POST /openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION} HTTP/1.1\r\nhost: x\r\napi-key: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        emu.api_key(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .expect("the server acts at once");
    assert!(
        buf.is_empty(),
        "got bytes: {:?}",
        String::from_utf8_lossy(&buf)
    );
    let err = read.expect_err("connection reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
    assert_eq!(emu.calls("gpt-4o"), 2);

    // The server keeps serving other connections.
    emu.set("gpt-4o", Behavior::Healthy);
    assert_eq!(post(&emu, "gpt-4o").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_is_counted_does_not_block_others_and_ends_with_the_emulator() {
    let emu = start(&[("stuck", Behavior::Hang), ("ok", Behavior::Healthy)]).await;
    let hung = tokio::spawn(
        common::client()
            .post(classic_url(&emu, "stuck"))
            .header("api-key", emu.api_key())
            .json(&chat_body("anyone?"))
            .send(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while emu.calls("stuck") == 0 {
        assert!(Instant::now() < deadline, "hung call never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = tokio::time::timeout(Duration::from_secs(5), post(&emu, "ok"))
        .await
        .expect("a hung call does not block others");
    assert_eq!(resp.status(), 200);
    assert!(!hung.is_finished());
    assert_eq!((emu.calls("stuck"), emu.total_calls()), (1, 2));

    drop(emu);
    let outcome = tokio::time::timeout(Duration::from_secs(5), hung)
        .await
        .expect("dropping the emulator releases the hung call")
        .expect("task");
    assert!(
        outcome.is_err(),
        "a hung call gets no response: {outcome:?}"
    );
}

#[tokio::test]
async fn drop_closes_the_listener() {
    let emu = start(&[("gpt-4o", Behavior::Healthy)]).await;
    let addr = emu.addr();
    assert_eq!(emu.url(), format!("http://127.0.0.1:{}", addr.port()));
    drop(emu);
    // The abort is processed at the next scheduling point of this current-thread runtime.
    tokio::task::yield_now().await;
    let err = tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("nobody listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn requests_are_recorded_with_headers_and_body() {
    let emu = start(&[("gpt-4o", Behavior::Healthy)]).await;
    post(&emu, "gpt-4o").await;
    let recorded = emu.requests("gpt-4o");
    assert_eq!(recorded.len(), 1);
    let req = &recorded[0];
    assert_eq!(req.path, "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!(req.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(
        req.headers.get("api-key").map(String::as_str),
        Some("emulator-key")
    );
    assert_eq!(
        req.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(req.body, chat_body("hello there"));
    assert!(emu.requests("other").is_empty());
}

#[test]
fn behavior_from_str_round_trips() {
    let all = [
        Behavior::Healthy,
        Behavior::Throttled(RetryAfter::Seconds(7)),
        Behavior::Throttled(RetryAfter::Milliseconds(1500)),
        Behavior::Throttled(RetryAfter::HttpDate(7)),
        Behavior::Throttled(RetryAfter::ResetRequests(7)),
        Behavior::Throttled(RetryAfter::ResetTokens(7)),
        Behavior::Throttled(RetryAfter::None),
        Behavior::ServerError,
        Behavior::Unavailable,
        Behavior::UnavailableRetryAfter(3),
        Behavior::RequestTimeout,
        Behavior::Hang,
        Behavior::ResetConnection,
        Behavior::ContentFilter,
        Behavior::ContextLengthExceeded,
        Behavior::DeploymentNotFound,
        Behavior::Unauthorized,
        Behavior::OutputFiltered,
        Behavior::Chaos(Chaos::new(42, 70)),
        Behavior::Chaos(Chaos::new(u64::MAX, 0)),
    ];
    for b in all {
        assert_eq!(b.to_string().parse::<Behavior>(), Ok(b.clone()), "{b}");
    }
    let aliases = [
        ("throttled", Behavior::Throttled(RetryAfter::Seconds(7))),
        ("throttled:12", Behavior::Throttled(RetryAfter::Seconds(12))),
        (
            "throttled-ms:1500",
            Behavior::Throttled(RetryAfter::Milliseconds(1500)),
        ),
        (
            "throttled-date:7",
            Behavior::Throttled(RetryAfter::HttpDate(7)),
        ),
        (
            "throttled-reset:7",
            Behavior::Throttled(RetryAfter::ResetRequests(7)),
        ),
        (
            "throttled-reset-tokens:7",
            Behavior::Throttled(RetryAfter::ResetTokens(7)),
        ),
        ("throttled-none", Behavior::Throttled(RetryAfter::None)),
        ("500", Behavior::ServerError),
        ("503", Behavior::Unavailable),
        ("503:5", Behavior::UnavailableRetryAfter(5)),
        ("408", Behavior::RequestTimeout),
        ("timeout", Behavior::RequestTimeout),
        ("401", Behavior::Unauthorized),
        ("not-found", Behavior::DeploymentNotFound),
        ("reset", Behavior::ResetConnection),
        ("chaos:42", Behavior::Chaos(Chaos::new(42, 50))),
        ("chaos:7:100", Behavior::Chaos(Chaos::new(7, 100))),
    ];
    for (text, b) in aliases {
        assert_eq!(text.parse::<Behavior>(), Ok(b), "{text}");
    }
    for bad in [
        "",
        "sleepy",
        "throttled:x",
        "throttled-ms",
        "hang:3",
        "healthy:1",
        "chaos",
        "chaos:x",
        "chaos:1:101",
        "chaos:1:2:3",
    ] {
        let err = bad.parse::<Behavior>().expect_err(bad);
        assert!(
            err.contains("valid forms") && err.contains("throttled-ms:<ms>"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn binary_prints_its_url_serves_logs_and_exits() {
    let args = [
        "--port",
        "0",
        "--deployment",
        "gpt-4o=throttled:7",
        "--deployment",
        "gpt-35-turbo",
        "--api-key",
        "k",
        "--exit-after",
        "2",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let (child, url, deployments) = common::start_binary(&args).await;
    assert_eq!(
        deployments.trim_end(),
        "(deployments: gpt-4o=throttled:7, gpt-35-turbo=healthy)"
    );

    let client = common::client();
    for (deployment, status) in [("gpt-4o", 429), ("gpt-35-turbo", 200)] {
        let resp = client
            .post(format!(
                "{url}/openai/deployments/{deployment}/chat/completions?api-version=v"
            ))
            .header("api-key", "k")
            .json(&chat_body("hi"))
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), status);
    }
    let log = common::exited_log(child).await;
    assert!(
        log.contains("deployment=gpt-4o behavior=throttled:7 status=429"),
        "{log}"
    );
    assert!(
        log.contains("deployment=gpt-35-turbo behavior=healthy status=200"),
        "{log}"
    );
}
