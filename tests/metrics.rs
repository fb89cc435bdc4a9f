//! The CloudWatch metrics a request leaves behind, checked against the Embedded Metric Format
//! specification's required fields. (One test: the metrics recorder is process-wide.)

mod common;

use std::collections::HashMap;

use common::{Behavior, Harness, RetryAfter};
use serde_json::Value;

/// Checks one EMF document against the specification's requirements and returns
/// (dimension values, metric values) for the assertions that follow.
fn validate(line: &str) -> (HashMap<String, String>, HashMap<String, Value>) {
    let doc: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let aws = doc["_aws"].as_object().expect("_aws object");
    assert!(
        aws["Timestamp"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "Timestamp in ms: {line}"
    );
    let directives = aws["CloudWatchMetrics"]
        .as_array()
        .expect("CloudWatchMetrics array");
    assert!(!directives.is_empty());
    let (mut dimensions, mut metrics) = (HashMap::new(), HashMap::new());
    for directive in directives {
        let namespace = directive["Namespace"].as_str().expect("Namespace");
        assert!((1..=255).contains(&namespace.len()));
        for set in directive["Dimensions"]
            .as_array()
            .expect("Dimensions array of arrays")
        {
            let set = set.as_array().expect("a dimension set is an array");
            assert!(set.len() <= 30, "at most 30 dimensions");
            for name in set {
                let name = name.as_str().expect("dimension names are strings");
                let value = doc[name]
                    .as_str()
                    .unwrap_or_else(|| panic!("dimension {name} is a root string member: {line}"));
                dimensions.insert(name.to_owned(), value.to_owned());
            }
        }
        for metric in directive["Metrics"].as_array().expect("Metrics array") {
            let name = metric["Name"].as_str().expect("metric Name");
            if let Some(unit) = metric.get("Unit") {
                let unit = unit.as_str().expect("Unit is a string");
                assert!(
                    ["Count", "Milliseconds", "Seconds", "Bytes", "None"].contains(&unit),
                    "{unit}"
                );
            }
            let value = &doc[name];
            let numeric = value.is_number()
                || value
                    .as_array()
                    .is_some_and(|values| values.iter().all(Value::is_number))
                || value["Values"]
                    .as_array()
                    .is_some_and(|values| values.iter().all(Value::is_number));
            assert!(numeric, "metric {name} has a numeric root member: {line}");
            metrics.insert(name.to_owned(), value.clone());
        }
    }
    (dimensions, metrics)
}

fn total(value: &Value) -> f64 {
    match value {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::Array(values) => values.iter().map(total).sum(),
        other => total(&other["Values"]),
    }
}

#[tokio::test]
async fn metrics_per_deployment_follow_the_embedded_metric_format() {
    let collector =
        fallback_chat::telemetry::install("FallbackChatTest").expect("recorder installs");
    let h = Harness::with(
        &[
            ("gpt-4o", Behavior::Throttled(RetryAfter::Seconds(7))),
            ("gpt-35-turbo", Behavior::Healthy),
            ("gpt-4o-mini", Behavior::Healthy),
        ],
        &[],
    )
    .await;
    h.emulator.set("gpt-35-turbo", Behavior::ServerError);
    assert_eq!(h.ask("one").await.status, 200);

    let mut out = Vec::new();
    collector.flush(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let mut seen: HashMap<(String, String), f64> = HashMap::new();
    for line in text.lines() {
        let (dimensions, metrics) = validate(line);
        let deployment = dimensions.get("Deployment").cloned().unwrap_or_default();
        let class = dimensions
            .get("Class")
            .map(|c| format!("/{c}"))
            .unwrap_or_default();
        for (name, value) in metrics {
            *seen
                .entry((format!("{name}{class}"), deployment.clone()))
                .or_default() += total(&value);
        }
    }
    let get =
        |name: &str, deployment: &str| seen.get(&(name.to_owned(), deployment.to_owned())).copied();
    assert_eq!(get("Throttles", "gpt-4o"), Some(1.0), "{seen:?}");
    assert_eq!(get("Failovers", "gpt-4o"), Some(1.0), "{seen:?}");
    // A single 500 is retried once: two calls, two errors, one failover.
    assert_eq!(get("Calls", "gpt-35-turbo"), Some(2.0), "{seen:?}");
    assert_eq!(
        get("Errors/server_error", "gpt-35-turbo"),
        Some(2.0),
        "{seen:?}"
    );
    assert_eq!(get("Failovers", "gpt-35-turbo"), Some(1.0), "{seen:?}");
    assert_eq!(get("Answers", "gpt-4o-mini"), Some(1.0), "{seen:?}");
    assert!(
        get("Tokens", "gpt-4o-mini").is_some_and(|t| t > 0.0),
        "{seen:?}"
    );
    assert!(get("Latency", "gpt-4o-mini").is_some(), "{seen:?}");
    assert!(text.contains("\"Unit\":\"Milliseconds\""), "{text}");
}
