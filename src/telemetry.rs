//! CloudWatch metrics in Embedded Metric Format, per deployment: calls, throttles, failovers,
//! errors by class, latency, tokens. Recorded through the `metrics` facade and written as EMF
//! JSON lines by `metrics_cloudwatch_embedded` at the end of each invocation, so CloudWatch
//! turns log lines into metrics with no API call from the function.

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_cloudwatch_embedded::Collector;

use crate::attempt::{Attempt, AttemptOutcome};

pub const DEFAULT_NAMESPACE: &str = "FallbackChat";

/// Installs the EMF recorder (once per execution environment) under `namespace`.
pub fn install(namespace: &str) -> Result<&'static Collector, String> {
    let collector = metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace(namespace.to_owned())
        .init()
        .map_err(|e| e.to_string())?;
    describe_counter!("Calls", Unit::Count, "Calls made to a deployment");
    describe_counter!("Answers", Unit::Count, "Requests a deployment answered");
    describe_counter!("Throttles", Unit::Count, "429s from a deployment");
    describe_counter!(
        "Failovers",
        Unit::Count,
        "Requests that moved on from a deployment to another"
    );
    describe_counter!("Errors", Unit::Count, "Failed calls, by class");
    describe_counter!("Tokens", Unit::Count, "Total tokens a deployment used");
    describe_counter!(
        "Unavailable",
        Unit::Count,
        "Requests no deployment could answer"
    );
    describe_histogram!("Latency", Unit::Milliseconds, "Call latency per deployment");
    describe_counter!(
        "Interruptions",
        Unit::Count,
        "Streams of a deployment that broke after their first content"
    );
    describe_counter!(
        "Continuations",
        Unit::Count,
        "Broken streams another deployment went on with, by the deployment that did"
    );
    describe_counter!(
        "HealthTable",
        Unit::Count,
        "Calls to the fleet's shared health table, by operation and outcome"
    );
    describe_histogram!(
        "HealthTableLatency",
        Unit::Milliseconds,
        "Latency of calls to the fleet's shared health table"
    );
    Ok(collector)
}

/// Writes everything recorded since the last flush to stdout, where Lambda's log agent picks it up.
pub fn flush(collector: Option<&'static Collector>) {
    if let Some(collector) = collector
        && let Err(error) = collector.flush(std::io::stdout())
    {
        tracing::warn!(%error, "could not write metrics");
    }
}

/// One call to a deployment (not a deployment skipped without a call).
pub fn call(attempt: &Attempt) {
    let deployment = attempt.deployment.clone();
    counter!("Calls", "Deployment" => deployment.clone()).increment(1);
    histogram!("Latency", "Deployment" => deployment.clone()).record(attempt.ms as f64);
    match attempt.outcome {
        AttemptOutcome::Ok => {}
        AttemptOutcome::Throttled => counter!("Throttles", "Deployment" => deployment).increment(1),
        class => {
            counter!("Errors", "Deployment" => deployment, "Class" => class.as_str()).increment(1)
        }
    }
}

/// The request moved on from `deployment` to try another.
pub fn failover(deployment: &str) {
    counter!("Failovers", "Deployment" => deployment.to_owned()).increment(1);
}

/// `deployment` answered, using `tokens` when the answer says.
pub fn answered(deployment: &str, tokens: Option<u64>) {
    counter!("Answers", "Deployment" => deployment.to_owned()).increment(1);
    if let Some(tokens) = tokens {
        counter!("Tokens", "Deployment" => deployment.to_owned()).increment(tokens);
    }
}

/// No deployment of `route` could answer.
pub fn unavailable(route: &str) {
    counter!("Unavailable", "Route" => route.to_owned()).increment(1);
}

/// One call to the fleet's shared health table: `operation` (read, lease, throttle, failure,
/// open, recovered, write) came to `outcome` (ok, held_elsewhere, timeout, error) in `ms`. A
/// read that timed out or failed is a request decided on local knowledge.
pub fn health_table(operation: &str, outcome: &str, ms: u64) {
    counter!("HealthTable", "Operation" => operation.to_owned(), "Outcome" => outcome.to_owned())
        .increment(1);
    histogram!("HealthTableLatency", "Operation" => operation.to_owned()).record(ms as f64);
}

/// `deployment`'s stream broke after its first content.
pub fn interrupted(deployment: &str) {
    counter!("Interruptions", "Deployment" => deployment.to_owned()).increment(1);
}

/// `to` went on with the answer `from`'s stream had begun.
pub fn continued(from: &str, to: &str) {
    counter!("Continuations", "Deployment" => to.to_owned(), "From" => from.to_owned())
        .increment(1);
}
