//! Start-up only: logging, configuration, shared state, then the Lambda runtime loop. A start
//! that fails is reported to the Runtime API's init-error endpoint, as Lambda expects of a
//! runtime, so the failed invocation carries the message that names what to fix.

#![warn(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    clippy::unwrap_used
)]

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;

use fallback_chat::clock::{Clock, SystemClock};
use fallback_chat::config::Config;
use fallback_chat::error::ConfigError;
use fallback_chat::telemetry;
use fallback_chat::{App, repair_event};
use lambda_http::http::{Method, Uri};
use lambda_http::lambda_runtime::Diagnostic;
use lambda_http::request::LambdaRequest;
use lambda_http::{Adapter, LambdaEvent, Request, Service, StreamAdapter, service_fn};
use lambda_runtime_api_client::{Client, build_request};

/// Configuration, then the shared state (keys held in AWS resolved, only when referenced).
async fn start() -> Result<App, ConfigError> {
    let config = Config::from_env()?;
    let pool = &config.pool;
    let deployments: Vec<String> = pool
        .deployments
        .iter()
        .map(|d| format!("{} ({}, priority {})", d.id, d.endpoint, d.priority))
        .collect();
    tracing::info!(
        ?deployments,
        default_route = pool.default_route().name,
        response_streaming = config.response_streaming,
        health_table = config.health_table.as_deref(),
        callers_authenticated_by = config.auth_in_front.unwrap_or("client keys"),
        "configuration read"
    );
    App::start(config).await
}

/// Tells the Lambda Runtime API why this environment cannot start (`POST /runtime/init/error`),
/// so Lambda fails the invocation with this message instead of a bare exit. Outside Lambda
/// (no `AWS_LAMBDA_RUNTIME_API`) there is no one to tell.
async fn report_init_error(error: &ConfigError) {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        return;
    };
    let base = api
        .parse::<Uri>()
        .ok()
        .filter(|uri| uri.scheme().is_some())
        .or_else(|| format!("http://{api}").parse().ok());
    let Some(base) = base else {
        tracing::error!(
            api,
            "AWS_LAMBDA_RUNTIME_API is not a URL; cannot report the error"
        );
        return;
    };
    let diagnostic = Diagnostic {
        error_type: error.error_type().to_owned(),
        error_message: error.to_string(),
    };
    let request = serde_json::to_vec(&diagnostic)
        .map_err(|e| e.to_string())
        .and_then(|body| {
            build_request()
                .method(Method::POST)
                .uri("/2018-06-01/runtime/init/error")
                .header("lambda-runtime-function-error-type", error.error_type())
                .header("content-type", "application/json")
                .body(body.into())
                .map_err(|e| e.to_string())
        });
    let sent = match (Client::builder().with_endpoint(base).build(), request) {
        (Ok(client), Ok(request)) => client.call(request).await.map_err(|e| e.to_string()),
        (Err(e), _) => Err(e.to_string()),
        (_, Err(e)) => Err(e),
    };
    if let Err(reason) = sent {
        tracing::error!(%reason, "could not report the error to the Lambda Runtime API");
    }
}

/// `fallback-chat --check`: reads the configuration as a cold start would (keys held in AWS
/// included) and says whether the function would start, without serving anything.
async fn check() -> ExitCode {
    match start().await {
        Ok(app) => {
            let problems = app.check_tokens().await;
            if !problems.is_empty() {
                for problem in &problems {
                    eprintln!("fallback-chat: no Entra ID token: {problem}");
                }
                return ExitCode::FAILURE;
            }
            println!("fallback-chat: the configuration is complete; the function would start");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("fallback-chat cannot start: {error}");
            ExitCode::FAILURE
        }
    }
}

/// lambda_http's adapter (`lambda_http::run` and `run_with_streaming_response` are exactly
/// these adapters under the runtime), each event first repaired where lambda_http would panic
/// on it ([`repair_event`]).
fn repaired<S, R>(
    mut adapter: S,
) -> impl Service<LambdaEvent<LambdaRequest>, Response = R, Error = Infallible, Future = S::Future>
where
    S: Service<LambdaEvent<LambdaRequest>, Response = R, Error = Infallible>,
{
    service_fn(move |mut event: LambdaEvent<LambdaRequest>| {
        repair_event(&mut event.payload);
        adapter.call(event)
    })
}

/// The Runtime API's base URL, from `AWS_LAMBDA_RUNTIME_API` (`host:port`).
fn runtime_api() -> Option<Uri> {
    let api = std::env::var("AWS_LAMBDA_RUNTIME_API").ok()?;
    api.parse::<Uri>()
        .ok()
        .filter(|uri| uri.scheme().is_some())
        .or_else(|| format!("http://{api}").parse().ok())
}

/// Lambda sends the function SIGTERM before it shuts an execution environment down only when an
/// extension is registered. This registers a no-op internal one (subscribed to no event, as
/// lambda_runtime's `spawn_graceful_shutdown_handler` does) and, on SIGTERM, gives the clients'
/// unspent leases back to the fleet before the process exits. Written with the Runtime API
/// client rather than that helper's lambda-extension crate: two requests, where the crate would
/// bring chrono and tracing-subscriber's env-filter (a regex engine) into the binary. Any
/// failure leaves the function as it was: the leases then lapse with their window.
async fn release_leases_at_shutdown(app: Arc<App>) {
    // Within Lambda's 500 ms between SIGTERM and SIGKILL, with room to exit.
    const RELEASE_LIMIT: std::time::Duration = std::time::Duration::from_millis(300);
    let Some(base) = runtime_api() else {
        return;
    };
    let Ok(client) = Client::builder().with_endpoint(base).build() else {
        return;
    };
    let client = Arc::new(client);
    let register = build_request()
        .method(Method::POST)
        .uri("/2020-01-01/extension/register")
        .header("Lambda-Extension-Name", "fallback-chat-lease-release")
        .header("content-type", "application/json")
        .body(r#"{"events":[]}"#.into());
    let id = match register.map(|request| client.call(request)) {
        Ok(call) => match call.await {
            Ok(response) if response.status().is_success() => response
                .headers()
                .get("lambda-extension-identifier")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            _ => None,
        },
        Err(_) => None,
    };
    let Some(id) = id else {
        tracing::info!("no extension registered: unspent leases lapse with their window");
        return;
    };
    // The extension waits for its next event, which never comes (it asked for none).
    let waiting = Arc::clone(&client);
    tokio::spawn(async move {
        loop {
            let next = build_request()
                .method(Method::GET)
                .uri("/2020-01-01/extension/event/next")
                .header("Lambda-Extension-Identifier", id.as_str())
                .body(lambda_runtime_api_client::body::Body::empty());
            let Ok(next) = next else { return };
            if waiting.call(next).await.is_err() {
                return;
            }
        }
    });
    let Ok(mut sigterm) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    tokio::spawn(async move {
        sigterm.recv().await;
        match SystemClock
            .timeout(RELEASE_LIMIT, app.release_leases())
            .await
        {
            Some(released) => {
                tracing::info!(released, "shutting down: unspent leases given back");
            }
            None => tracing::warn!("shutting down: giving the unspent leases back took too long"),
        }
        std::process::exit(0);
    });
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // JSON lines when AWS_LAMBDA_LOG_FORMAT=JSON, level from AWS_LAMBDA_LOG_LEVEL or RUST_LOG.
    telemetry::init_logging(|name| std::env::var(name).ok(), std::io::stdout);
    // Lambda starts the bootstrap without arguments.
    if std::env::args().nth(1).as_deref() == Some("--check") {
        return check().await;
    }

    let app = match start().await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, error_type = error.error_type(), "fallback-chat cannot start");
            report_init_error(&error).await;
            return ExitCode::FAILURE;
        }
    };
    let namespace = std::env::var("METRICS_NAMESPACE")
        .unwrap_or_else(|_| telemetry::DEFAULT_NAMESPACE.to_owned());
    let app = match telemetry::install(&namespace) {
        Ok(collector) => app.with_metrics(collector),
        Err(error) => {
            tracing::warn!(%error, "metrics disabled");
            app
        }
    };
    let streaming = app.response_streaming();
    tracing::info!(response_streaming = streaming, "fallback-chat ready");

    // Built once, shared by every invocation of this execution environment.
    let app = Arc::new(app);
    if app.shares_limits() {
        release_leases_at_shutdown(Arc::clone(&app)).await;
    }
    let result = if streaming {
        // Function URL with InvokeMode RESPONSE_STREAM: frames reach the caller as they come.
        let handler = service_fn(move |request: Request| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(app.handle(request).await) }
        });
        lambda_http::lambda_runtime::run(repaired(StreamAdapter::from(handler))).await
    } else {
        // API Gateway, ALB, buffered Function URLs: one whole response per invocation.
        let handler = service_fn(move |request: Request| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(app.handle_buffered(request).await) }
        });
        lambda_http::lambda_runtime::run(repaired(Adapter::from(handler))).await
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "Lambda runtime stopped");
            ExitCode::FAILURE
        }
    }
}
