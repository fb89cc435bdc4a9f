//! What a chatbot front end notices when deployments throttle, fail or hang.

use crate::common;

use std::time::{Duration, Instant};

use common::{API_KEY, Behavior, Harness, RetryAfter, epoch_ms, http_api_get};
use serde_json::Value;

#[tokio::test]
async fn a_healthy_primary_answers_with_the_original_field_name() {
    let h = Harness::new().await;
    let reply = h.ask("How do I reset my password?").await;

    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let answer = reply.body["chat_completion"].as_str().unwrap();
    assert!(answer.contains("How do I reset my password?"), "{answer}");
    assert_eq!(reply.body["deployment"], "gpt-4o");
    assert_eq!(reply.body["model"], "gpt-4o-2024-08-06");
    assert!(reply.body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-fallback-deployment"), Some("gpt-4o"));
    assert_eq!(reply.header("x-fallback-attempts"), Some("1"));
    assert_eq!((h.calls("gpt-4o"), h.calls("gpt-35-turbo")), (1, 0));
}

#[tokio::test]
async fn the_request_is_azure_shaped_with_the_system_prompt_first() {
    let h = Harness::with(&[], &[("SYSTEM_PROMPT", "Answer in French.")]).await;
    h.ask("hello").await;

    let sent = &h.emulator.requests("gpt-4o")[0];
    assert_eq!(sent.path, "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!(sent.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(
        sent.headers.get("api-key").map(String::as_str),
        Some(API_KEY)
    );
    let messages = sent.body["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[0]["content"], "Answer in French.");
    assert_eq!(messages[1]["role"], "user");
    assert_eq!(messages[1]["content"], "hello");
}

#[tokio::test]
async fn a_throttled_primary_is_skipped_until_its_retry_after_has_passed() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7))),
            ("gpt-35-turbo", Behavior::Healthy),
        ],
        &[],
    )
    .await;

    let first = h.ask("one").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body["deployment"], "gpt-35-turbo");
    assert_eq!(first.header("x-fallback-attempts"), Some("2"));
    assert_eq!((h.calls("gpt-4o"), h.calls("gpt-35-turbo")), (1, 1));

    // Still cooling down: the primary is not called at all.
    h.advance(Duration::from_millis(6_900));
    let second = h.ask("two").await;
    assert_eq!(second.body["deployment"], "gpt-35-turbo");
    assert_eq!(second.header("x-fallback-attempts"), Some("1"));
    assert_eq!((h.calls("gpt-4o"), h.calls("gpt-35-turbo")), (1, 2));

    // Cooled down and recovered: back on the primary.
    h.set("gpt-4o", Behavior::Healthy);
    h.advance(Duration::from_millis(200));
    let third = h.ask("three").await;
    assert_eq!(third.body["deployment"], "gpt-4o");
    assert_eq!((h.calls("gpt-4o"), h.calls("gpt-35-turbo")), (2, 2));
}

#[tokio::test]
async fn every_retry_after_form_sets_the_cooldown() {
    // (form, shortest and longest cooldown it may produce)
    let cases = [
        (RetryAfter::Milliseconds(1_500), 1_500, 1_500),
        (RetryAfter::Seconds(7), 7_000, 7_000),
        // An HTTP-date has one-second resolution and is computed against the wall clock.
        (RetryAfter::HttpDate(9), 8_000, 10_000),
        (RetryAfter::ResetRequests(5), 5_000, 5_000),
        (RetryAfter::ResetTokens(6), 6_000, 6_000),
        // No header at all: the configured default (THROTTLE_COOLDOWN_MS below).
        (RetryAfter::None, 4_000, 4_000),
    ];
    for (form, min_ms, max_ms) in cases {
        let h = Harness::with(
            &[
                ("gpt-4o", Behavior::Throttled(form.clone())),
                ("gpt-35-turbo", Behavior::Healthy),
            ],
            &[("THROTTLE_COOLDOWN_MS", "4000")],
        )
        .await;
        // The 429 body also says "retry after N seconds"; only the header form is under test here.
        h.ask("first").await;
        h.set("gpt-4o", Behavior::Healthy);

        h.advance(Duration::from_millis(min_ms - 100));
        assert_eq!(
            h.ask("early").await.body["deployment"],
            "gpt-35-turbo",
            "{form:?}"
        );
        assert_eq!(h.calls("gpt-4o"), 1, "{form:?}: called while cooling down");

        h.advance(Duration::from_millis(max_ms - min_ms + 200));
        assert_eq!(h.ask("late").await.body["deployment"], "gpt-4o", "{form:?}");
    }
}

#[tokio::test]
async fn when_everything_is_throttled_the_503_says_when_to_come_back() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7))),
            (
                "gpt-35-turbo",
                Behavior::Throttled(RetryAfter::Milliseconds(2_500)),
            ),
        ],
        &[],
    )
    .await;

    let first = h.ask("anyone?").await;
    assert_eq!(first.status, 503);
    assert_eq!(first.body["error"], "All models are currently unavailable.");
    assert_eq!(
        first.header("retry-after"),
        Some("3"),
        "soonest recovery, rounded up"
    );
    let attempts = first.body["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["deployment"], "gpt-4o");
    assert_eq!(attempts[0]["outcome"], "throttled");
    assert_eq!(attempts[0]["status"], 429);
    assert_eq!(attempts[0]["retry_after_ms"], 7_000);
    assert!(attempts[0]["ms"].is_u64());
    assert_eq!(attempts[1]["outcome"], "throttled");

    // While both cool down the answer comes at once, without calling anyone.
    h.advance(Duration::from_secs(1));
    let started = Instant::now();
    let second = h.ask("still?").await;
    assert_eq!(second.status, 503);
    assert_eq!(second.header("retry-after"), Some("2"));
    let attempts = second.body["attempts"].as_array().unwrap();
    assert!(
        attempts.iter().all(|a| a["outcome"] == "cooling_down"),
        "{attempts:?}"
    );
    assert_eq!(h.emulator.total_calls(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "never sleeps for a Retry-After"
    );
}

#[tokio::test]
async fn each_failure_class_falls_through_to_the_next_deployment() {
    let cases = [
        (Behavior::ServerError, "server_error", Some(500u64)),
        (Behavior::Unavailable, "server_error", Some(503)),
        (Behavior::RequestTimeout, "timeout", Some(408)),
        (Behavior::ResetConnection, "connection_reset", None),
        (
            Behavior::ContextLengthExceeded,
            "context_length_exceeded",
            Some(400),
        ),
        (Behavior::DeploymentNotFound, "misconfigured", Some(404)),
        (Behavior::Unauthorized, "misconfigured", Some(401)),
    ];
    for (behavior, outcome, status) in cases {
        let h = Harness::with(
            &[
                ("gpt-4o", behavior.clone()),
                ("gpt-35-turbo", Behavior::Healthy),
            ],
            &[],
        )
        .await;
        let reply = h.ask("hello").await;
        assert_eq!(reply.status, 200, "{behavior:?}: {:?}", reply.body);
        assert_eq!(reply.body["deployment"], "gpt-35-turbo", "{behavior:?}");
        assert_eq!(
            reply.header("x-fallback-attempts"),
            Some("2"),
            "{behavior:?}"
        );

        // With nothing to fall back on, the 503 names the class of each failure.
        let h = Harness::with(&[("gpt-4o", behavior.clone())], &[]).await;
        let reply = h.ask("hello").await;
        assert_eq!(reply.status, 503, "{behavior:?}");
        assert_eq!(
            reply.body["attempts"][0]["outcome"], outcome,
            "{behavior:?}"
        );
        assert_eq!(
            reply.body["attempts"][0]["status"].as_u64(),
            status,
            "{behavior:?}"
        );
        assert!(reply.header("retry-after").is_some(), "{behavior:?}");
    }
}

#[tokio::test]
async fn a_missing_deployment_or_bad_key_is_logged_as_a_configuration_error() {
    for behavior in [Behavior::DeploymentNotFound, Behavior::Unauthorized] {
        let h = Harness::with(
            &[
                ("gpt-4o", behavior.clone()),
                ("gpt-35-turbo", Behavior::Healthy),
            ],
            &[],
        )
        .await;
        assert_eq!(h.ask("hello").await.status, 200);
        let errors: Vec<Value> = h
            .logs
            .lines()
            .into_iter()
            .filter(|l| l["level"] == "ERROR")
            .collect();
        assert_eq!(errors.len(), 1, "{behavior:?}: {}", h.logs.text());
        let line = &errors[0];
        assert_eq!(line["fields"]["deployment"], "gpt-4o");
        assert_eq!(line["fields"]["outcome"], "misconfigured");
        assert!(
            line["fields"]["message"]
                .as_str()
                .unwrap()
                .contains("configuration error"),
            "{line}"
        );
        let detail = line["fields"]["detail"].as_str().unwrap();
        assert!(detail.contains("check AZURE_OPENAI_"), "{detail}");
    }
}

#[tokio::test]
async fn an_unreachable_endpoint_gives_a_503_naming_connection_errors() {
    // Bind then drop: nothing listens on this port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = Harness::with(
        &[],
        &[("AZURE_OPENAI_ENDPOINT", &format!("http://127.0.0.1:{port}"))],
    )
    .await;
    let reply = h.ask("hello").await;
    assert_eq!(reply.status, 503);
    let attempts = reply.body["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(
        attempts.iter().all(|a| a["outcome"] == "connection_error"),
        "{attempts:?}"
    );
}

#[tokio::test]
async fn a_hung_deployment_costs_one_attempt_timeout_then_the_next_answers() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Hang),
            ("gpt-35-turbo", Behavior::Healthy),
        ],
        &[("ATTEMPT_TIMEOUT_MS", "400")],
    )
    .await;
    let started = Instant::now();
    let reply = h.ask("hello").await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["deployment"], "gpt-35-turbo");
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    // The hung call is abandoned at the attempt timeout, not left to run.
    assert!(elapsed < Duration::from_millis(3_000), "{elapsed:?}");
}

#[tokio::test]
async fn the_whole_request_ends_inside_the_lambda_deadline() {
    let h = Harness::with(
        &[("gpt-4o", Behavior::Hang), ("gpt-35-turbo", Behavior::Hang)],
        &[("DEADLINE_MARGIN_MS", "300")],
    )
    .await;
    let deadline = epoch_ms() + 1_500;
    let reply = h
        .invoke_with_deadline(&http_api_get(Some("hi")), deadline)
        .await;
    let finished = epoch_ms();
    assert_eq!(reply.status, 503);
    assert!(
        finished < deadline,
        "finished {} ms late",
        finished - deadline
    );
    let outcomes: Vec<&str> = reply.body["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["timeout", "deadline_exceeded"]);
}

#[tokio::test]
async fn a_deadline_that_is_not_an_epoch_time_falls_back_to_the_configured_budget() {
    let h = Harness::with(&[], &[("REQUEST_TIMEOUT_MS", "20000")]).await;
    let now = std::time::SystemTime::now();
    let mut context = lambda_http::Context::default();
    for bogus in [0, 1_000, epoch_ms() + 3_600_000] {
        context.deadline = bogus;
        assert_eq!(
            h.app.budget(Some(&context), now),
            Duration::from_secs(20),
            "{bogus}"
        );
    }
    context.deadline = epoch_ms() + 5_000;
    let budget = h.app.budget(Some(&context), now);
    assert!(budget <= Duration::from_millis(4_500), "{budget:?}");
    assert!(budget > Duration::from_millis(4_000), "{budget:?}");
}

#[tokio::test]
async fn a_filtered_prompt_is_refused_with_azures_reason_and_not_retried() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::ContentFilter),
            ("gpt-35-turbo", Behavior::Healthy),
        ],
        &[],
    )
    .await;
    let reply = h.ask("something hateful").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["code"], "content_filter");
    assert_eq!(reply.body["target"], "prompt");
    assert_eq!(reply.body["deployment"], "gpt-4o");
    assert_eq!(
        reply.body["filtered_categories"],
        serde_json::json!(["hate"])
    );
    assert_eq!(
        reply.body["content_filter_result"]["hate"]["severity"],
        "high"
    );
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("content management policy")
    );
    assert_eq!(
        h.calls("gpt-35-turbo"),
        0,
        "a filtered prompt is not sent elsewhere"
    );
}

#[tokio::test]
async fn a_filtered_completion_is_not_passed_off_as_an_answer() {
    let h = Harness::with(&[("gpt-4o", Behavior::OutputFiltered)], &[]).await;
    let reply = h.ask("tell me a story").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["code"], "content_filter");
    assert_eq!(reply.body["target"], "completion");
    assert_eq!(
        reply.body["filtered_categories"],
        serde_json::json!(["violence"])
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_costs_nothing_upstream() {
    let h = Harness::with(&[], &[("MAX_QUERY_CHARS", "50")]).await;
    for (query, status, fragment) in [
        (None, 400, "Missing query"),
        (Some(""), 400, "Missing query"),
        (Some("   "), 400, "Missing query"),
        (
            Some(&"x".repeat(51) as &str),
            400,
            "51 characters long; the limit is 50",
        ),
    ] {
        let reply = h.invoke(&http_api_get(query)).await;
        assert_eq!(reply.status, status, "{query:?}");
        let error = reply.body["error"].as_str().unwrap();
        assert!(error.contains(fragment), "{query:?}: {error}");
    }
    // The limit counts characters, not bytes.
    assert_eq!(h.ask(&"é".repeat(50)).await.status, 200);
    assert_eq!(h.emulator.total_calls(), 1);
}

#[tokio::test]
async fn the_key_never_appears_in_logs_or_responses() {
    let scenarios: [&[(&str, Behavior)]; 4] = [
        &[("gpt-4o", Behavior::Healthy)],
        &[
            ("gpt-4o", Behavior::Unauthorized),
            ("gpt-35-turbo", Behavior::Throttled(RetryAfter::None)),
        ],
        &[("gpt-4o", Behavior::ContentFilter)],
        &[
            ("gpt-4o", Behavior::ServerError),
            ("gpt-35-turbo", Behavior::ResetConnection),
        ],
    ];
    for deployments in scenarios {
        let h = Harness::with(deployments, &[]).await;
        for event in [http_api_get(Some("hello")), http_api_get(None)] {
            let reply = h.invoke(&event).await;
            assert!(
                !reply.raw.contains(API_KEY),
                "response leaks the key: {}",
                reply.raw
            );
        }
        let logs = h.logs.text();
        assert!(!logs.is_empty());
        assert!(!logs.contains(API_KEY), "logs leak the key: {logs}");
    }
}

#[tokio::test]
async fn each_attempt_is_one_structured_log_line_with_the_request_id() {
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7))),
            ("gpt-35-turbo", Behavior::Healthy),
        ],
        &[],
    )
    .await;
    h.ask("hello").await;
    let lines = h.logs.lines();
    let attempts: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "upstream attempt")
        .collect();
    assert_eq!(attempts.len(), 2, "{}", h.logs.text());
    let throttled = &attempts[0]["fields"];
    assert_eq!(throttled["deployment"], "gpt-4o");
    assert_eq!(throttled["outcome"], "throttled");
    assert_eq!(throttled["status"], 429);
    assert_eq!(throttled["retry_after_ms"], 7_000);
    assert!(throttled["latency_ms"].is_u64());
    assert_eq!(attempts[1]["fields"]["outcome"], "ok");

    // Every line the handler writes carries the invocation's request id.
    let ours: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("fallback_chat"))
        })
        .collect();
    assert!(ours.len() >= 3);
    for line in ours {
        let id = line["span"]["requestId"].as_str().unwrap_or_default();
        assert!(id.starts_with("req-"), "{line}");
    }
}
