//! CloudWatch metrics in Embedded Metric Format, per deployment: calls, throttles, failovers,
//! errors by class, latency, tokens. Recorded through the `metrics` facade and written as EMF
//! JSON lines by `metrics_cloudwatch_embedded` at the end of each invocation, so CloudWatch
//! turns log lines into metrics with no API call from the function.

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_cloudwatch_embedded::Collector;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::attempt::{Attempt, AttemptOutcome};

pub const DEFAULT_NAMESPACE: &str = "FallbackChat";

/// Logs to `writer` (stdout on Lambda), as Lambda's advanced logging controls ask: JSON lines when
/// `AWS_LAMBDA_LOG_FORMAT=JSON`, text otherwise; the level from `AWS_LAMBDA_LOG_LEVEL`, else
/// `RUST_LOG`, else INFO. No timestamps (CloudWatch adds them) and no module paths.
///
/// The subscriber lambda_runtime offers does the same through tracing-subscriber's `EnvFilter`,
/// which brings a regex engine into the binary for per-module directives this function does not
/// need; a plain level filter does the job (README, "Cold start and size").
pub fn init_logging<W>(lookup: impl Fn(&str) -> Option<String>, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let level = lookup("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|| lookup("RUST_LOG"))
        .map_or(LevelFilter::INFO, |v| log_level(&v));
    let json = lookup("AWS_LAMBDA_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let logs = tracing_subscriber::fmt()
        .with_target(false)
        .without_time()
        .with_max_level(level)
        .with_writer(writer);
    // Another subscriber already set (a test harness) keeps its place.
    let _ = if json {
        // The invocation's span (with its requestId) once, as "span": the list of enclosing
        // spans would repeat it on every line, in CloudWatch's bytes and the handler's time.
        logs.json().with_span_list(false).try_init()
    } else {
        logs.try_init()
    };
}

/// A Lambda log level (TRACE..FATAL) or a RUST_LOG level; per-module directives
/// (`info,hyper=warn`) count by their bare level, and anything unreadable means INFO.
fn log_level(value: &str) -> LevelFilter {
    let bare = value
        .split(',')
        .map(str::trim)
        .find(|d| !d.contains('='))
        .unwrap_or("info");
    if bare.eq_ignore_ascii_case("fatal") {
        return LevelFilter::ERROR;
    }
    bare.parse().unwrap_or(LevelFilter::INFO)
}

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
    describe_counter!("ClientRequests", Unit::Count, "Requests of a named client");
    describe_counter!(
        "ClientRefusals",
        Unit::Count,
        "Requests of a named client refused by one of its limits, by limit"
    );
    describe_counter!(
        "ClientTokens",
        Unit::Count,
        "Tokens a named client's requests used"
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

/// A call to the fleet's shared health table, as the `HealthTable` metric names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableOp {
    Read,
    Lease,
    Throttle,
    Failure,
    Open,
    Recovered,
    /// The request's writes, waited for together before its response.
    Write,
    /// Where a stored response lives: remembered, looked up, forgotten.
    Pin,
    Holder,
    Unpin,
    /// A lease of a client's limit.
    Limit,
}

impl TableOp {
    pub fn as_str(self) -> &'static str {
        match self {
            TableOp::Read => "read",
            TableOp::Lease => "lease",
            TableOp::Throttle => "throttle",
            TableOp::Failure => "failure",
            TableOp::Open => "open",
            TableOp::Recovered => "recovered",
            TableOp::Write => "write",
            TableOp::Pin => "pin",
            TableOp::Holder => "holder",
            TableOp::Unpin => "unpin",
            TableOp::Limit => "limit",
        }
    }
}

/// What a call to the fleet's table came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableOutcome {
    Ok,
    /// A lease another execution environment holds.
    HeldElsewhere,
    Timeout,
    Error,
}

impl TableOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TableOutcome::Ok => "ok",
            TableOutcome::HeldElsewhere => "held_elsewhere",
            TableOutcome::Timeout => "timeout",
            TableOutcome::Error => "error",
        }
    }
}

/// One call to the fleet's shared health table: `op` came to `outcome` in `ms`. A read that
/// timed out or failed is a request decided on local knowledge.
pub fn health_table(op: TableOp, outcome: TableOutcome, ms: u64) {
    counter!("HealthTable", "Operation" => op.as_str(), "Outcome" => outcome.as_str()).increment(1);
    histogram!("HealthTableLatency", "Operation" => op.as_str()).record(ms as f64);
}

/// A request of named client `client` (admitted or not).
pub fn client_request(client: &str) {
    counter!("ClientRequests", "Client" => client.to_owned()).increment(1);
}

/// `client` was refused by its limit `limit` (`tokens_per_minute`, ...).
pub fn client_refused(client: &str, limit: &'static str) {
    counter!("ClientRefusals", "Client" => client.to_owned(), "Limit" => limit).increment(1);
}

/// What an admitted request of `client` used.
pub fn client_tokens(client: &str, tokens: u64) {
    counter!("ClientTokens", "Client" => client.to_owned()).increment(tokens);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_read_as_lambda_and_rust_log_write_them() {
        assert_eq!(log_level("DEBUG"), LevelFilter::DEBUG);
        assert_eq!(log_level("FATAL"), LevelFilter::ERROR);
        assert_eq!(log_level("warn"), LevelFilter::WARN);
        assert_eq!(log_level("trace,hyper=info"), LevelFilter::TRACE);
        assert_eq!(log_level("hyper=info"), LevelFilter::INFO);
        assert_eq!(log_level("loud"), LevelFilter::INFO);
        assert_eq!(log_level("off"), LevelFilter::OFF);
    }
}
