//! Every payload in events/ through the real handler, for each event source.

use crate::common;

use common::{Harness, event};

const SOURCES: [&str; 4] = ["rest-api", "http-api", "function-url", "alb"];

#[tokio::test]
async fn a_question_is_answered_from_every_event_source() {
    for source in SOURCES {
        let h = Harness::new().await;
        let reply = h.invoke(&event(&format!("{source}/get-query.json"))).await;
        assert_eq!(reply.status, 200, "{source}: {:?}", reply.body);
        assert_eq!(reply.body["deployment"], "gpt-4o", "{source}");
        let sent = &h.emulator.requests("gpt-4o")[0];
        assert_eq!(
            sent.body["messages"][1]["content"], "How do I reset my password",
            "{source}: the query reaches Azure decoded"
        );
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{source}"
        );
    }
}

/// lambda_http panics on these (found by fuzzing, src/http/event.rs): a query with a character a
/// URI cannot hold as is, as curl sends `?query="hi"`, and a Host header that makes no URL.
#[tokio::test]
async fn queries_and_hosts_lambda_http_cannot_parse_are_answered() {
    let h = Harness::new().await;
    for (raw, meant, host) in [
        (r#"query="hi""#, r#""hi""#, "exa mple.com"),
        ("query=café au lait", "café au lait", "a`b.example.com"),
        ("query=a%20b c", "a b c", "example}"),
        // A control character (a raw query of that one byte alone: fuzz/corpus/request/regression-one-control-byte-query).
        ("query=\u{8}", "\u{8}", "example.com"),
    ] {
        let mut event: serde_json::Value =
            serde_json::from_str(&event("http-api/get-query.json")).unwrap();
        event["rawQueryString"] = raw.into();
        event["headers"]["host"] = host.into();
        let reply = h.invoke(&event.to_string()).await;
        assert_eq!(reply.status, 200, "{raw}: {:?}", reply.body);
        let sent = h.emulator.requests("gpt-4o");
        assert_eq!(
            sent.last().unwrap().body["messages"][1]["content"],
            meant,
            "{raw}: the query reaches Azure as the caller wrote it"
        );
    }
}

#[tokio::test]
async fn a_missing_query_is_a_400_without_an_upstream_call() {
    for source in SOURCES {
        let h = Harness::new().await;
        let reply = h
            .invoke(&event(&format!("{source}/get-no-query.json")))
            .await;
        assert_eq!(reply.status, 400, "{source}");
        assert!(
            reply.body["error"].as_str().unwrap().contains("?query="),
            "{source}"
        );
        assert_eq!(h.emulator.total_calls(), 0, "{source}");
    }
}

#[tokio::test]
async fn a_post_on_root_is_a_405_with_allow() {
    for source in SOURCES {
        let h = Harness::new().await;
        let reply = h.invoke(&event(&format!("{source}/post-root.json"))).await;
        assert_eq!(reply.status, 405, "{source}");
        assert_eq!(reply.header("allow"), Some("GET"), "{source}");
        assert!(
            reply.body["error"].as_str().unwrap().contains("POST"),
            "{source}"
        );
        assert_eq!(h.emulator.total_calls(), 0, "{source}");
    }
}

#[tokio::test]
async fn an_unknown_path_is_a_404() {
    for source in SOURCES {
        let h = Harness::new().await;
        let reply = h
            .invoke(&event(&format!("{source}/unknown-path.json")))
            .await;
        assert_eq!(reply.status, 404, "{source}");
        assert!(
            reply.body["error"].as_str().unwrap().contains("/admin"),
            "{source}"
        );
        assert_eq!(h.emulator.total_calls(), 0, "{source}");
    }
}

#[tokio::test]
async fn responses_keep_the_shape_each_source_expects() {
    let h = Harness::new().await;
    let rest = h.invoke(&event("rest-api/get-query.json")).await.raw;
    assert!(rest.contains("\"multiValueHeaders\""), "{rest}");
    let alb = h.invoke(&event("alb/get-query.json")).await.raw;
    assert!(alb.contains("\"statusDescription\":\"200 OK\""), "{alb}");
    let v2 = h.invoke(&event("http-api/get-query.json")).await.raw;
    assert!(v2.contains("\"cookies\""), "{v2}");
}
