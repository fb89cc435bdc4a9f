//! Start-up only: logging, configuration, shared state, then the Lambda runtime loop.

use std::convert::Infallible;
use std::process::ExitCode;

use fallback_chat::App;
use fallback_chat::config::Config;
use lambda_http::{Request, service_fn, tracing};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // JSON lines when AWS_LAMBDA_LOG_FORMAT=JSON, level from AWS_LAMBDA_LOG_LEVEL or RUST_LOG.
    tracing::init_default_subscriber();

    let app = match Config::from_env().and_then(App::new) {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, "fallback-chat cannot start");
            return ExitCode::FAILURE;
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
        "fallback-chat ready"
    );

    // Lives as long as the execution environment; leaking it lets every invocation borrow it.
    let app: &'static App = Box::leak(Box::new(app));
    let handler = service_fn(move |request: Request| async move {
        Ok::<_, Infallible>(app.handle(request).await)
    });
    match lambda_http::run(handler).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "Lambda runtime stopped");
            ExitCode::FAILURE
        }
    }
}
