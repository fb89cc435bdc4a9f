//! Start-up only: logging, configuration, shared state, then the Lambda runtime loop.

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;

use fallback_chat::config::Config;
use fallback_chat::error::ConfigError;
use fallback_chat::{App, secrets, telemetry};
use lambda_http::{Request, service_fn, tracing};

/// Configuration, keys held in AWS (only when referenced), then the shared state.
async fn start() -> Result<App, ConfigError> {
    let mut config = Config::from_env()?;
    secrets::resolve(&mut config).await?;
    App::new(config)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // JSON lines when AWS_LAMBDA_LOG_FORMAT=JSON, level from AWS_LAMBDA_LOG_LEVEL or RUST_LOG.
    tracing::init_default_subscriber();

    let app = match start().await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, "fallback-chat cannot start");
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
    let pool = &app.config().pool;
    let deployments: Vec<String> = pool
        .deployments
        .iter()
        .map(|d| format!("{} ({}, priority {})", d.id, d.endpoint, d.priority))
        .collect();
    tracing::info!(
        ?deployments,
        default_route = pool.default_route().name,
        response_streaming = app.config().response_streaming,
        "fallback-chat ready"
    );

    // Built once, shared by every invocation of this execution environment.
    let app = Arc::new(app);
    let streaming = app.config().response_streaming;
    let result = if streaming {
        // Function URL with InvokeMode RESPONSE_STREAM: frames reach the caller as they come.
        let handler = service_fn(move |request: Request| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(app.handle(request).await) }
        });
        lambda_http::run_with_streaming_response(handler).await
    } else {
        // API Gateway, ALB, buffered Function URLs: one whole response per invocation.
        let handler = service_fn(move |request: Request| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(app.handle_buffered(request).await) }
        });
        lambda_http::run(handler).await
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "Lambda runtime stopped");
            ExitCode::FAILURE
        }
    }
}
