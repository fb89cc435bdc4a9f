//! `azure-openai-emulator`: run the emulator for local demos.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use azure_openai_emulator::{Behavior, Emulator, EntraConfig};

const USAGE: &str = "usage: azure-openai-emulator [--host 127.0.0.1] [--port 8080] [--api-key KEY]
                             [--deployment NAME=BEHAVIOR]... [--model NAME=MODEL]...
                             [--latency-ms N] [--chunk-delay-ms N]
                             [--exit-after SECS] [--tls-ca-out PATH]
                             [--entra TENANT:CLIENT_ID] [--entra-secret SECRET]
                             [--entra-federation on] [--token-lifetime SECS]
                             [--local-auth off]
  defaults: --deployment gpt-4o=healthy --deployment gpt-35-turbo=healthy, key emulator-key
  --model: the model version deployment NAME reports (default: from its name, e.g. gpt-4o ->
            gpt-4o-2024-08-06); an embedding model's name (text-embedding-3-small, ...-large)
            sets the dimension of its vectors (1536, 3072) unless a request asks for another
  while running: PUT /_emulator/deployments/NAME with a BEHAVIOR as the body (and the key)
            changes how NAME answers, e.g. curl -X PUT -H 'api-key: emulator-key' -d healthy ...
  --entra: also serve Entra ID's token endpoint (POST /TENANT/oauth2/v2.0/token) for that app
            registration, and STS's GetWebIdentityToken (POST / with the Action); its tokens are
            accepted as Authorization: Bearer. --entra-secret: the client secret it accepts;
            --entra-federation on: it accepts STS's tokens as client assertions; --token-lifetime:
            of its tokens (default 3599). --local-auth off: keys are refused (disableLocalAuth)
  --chunk-delay-ms: pause between the events of streamed (\"stream\": true) answers, default 0
  --tls-ca-out: serve HTTPS (certificate for localhost, 127.0.0.1, ::1; ALPN http/1.1) signed by
            a test CA generated at start, whose certificate is written to PATH in PEM before
            the listening line; trust it in the client
  BEHAVIOR: healthy, throttled, throttled:<secs>, throttled-ms:<ms>, throttled-date:<secs>,
            throttled-reset:<secs>, throttled-reset-tokens:<secs>, throttled-none, 500|server-error,
            503|unavailable, 503:<secs>, 408|timeout, hang, reset, content-filter, context-length,
            not-found, 401|unauthorized, output-filtered
  stream failures (\"stream\": true requests only; other requests get healthy answers):
            stream-cut:<chunks>      <chunks> content chunks, then a TCP reset, no [DONE]
            stream-stall:<chunks>    <chunks> content chunks, then silence, connection open
            stream-error:<chunks>    <chunks> content chunks, then the deployment's error event
            stream-corrupt:<index>   a malformed event before content chunk <index>, then the rest
            stream-no-done           a complete stream that ends without data: [DONE]
            stream-slow-start:<ms>   the first event at once, the role chunk <ms> later
            stream-async-filter      Azure's content_filter_offsets event after the 2nd chunk
            stream-tool-cut:<pieces> a tool call whose arguments stop after <pieces>, then a reset
  continuing a partial answer (the last assistant message, alone or followed by one user message):
            content-policy           400 content_policy_violation, as OpenAI refuses a prompt
            no-prefill               400 when the last message is an assistant message
            refuse-continuation      400 for any request that asks to continue a partial answer
            continue-overlap:<words> a continuation first repeats the partial answer's last words
  chaos (seeded, reproducible; phases of 0.5 to 3 s from the start, independent per deployment):
            chaos:<seed>             healthy half the time, otherwise one of: throttled (1-4 s),
                                     500, 503, reset, hang, stream-cut, stream-stall,
                                     stream-no-done, stream-corrupt, content-filter, output-filtered
            chaos:<seed>:<percent>   healthy <percent> of the time (0-100)";

struct Args {
    host: IpAddr,
    port: u16,
    api_key: String,
    deployments: Vec<(String, Behavior)>,
    models: Vec<(String, String)>,
    latency: Duration,
    chunk_delay: Duration,
    exit_after: Option<Duration>,
    tls_ca_out: Option<PathBuf>,
    entra: Option<EntraConfig>,
    local_auth: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut out = Args {
        host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 8080,
        api_key: "emulator-key".to_owned(),
        deployments: Vec::new(),
        models: Vec::new(),
        latency: Duration::ZERO,
        chunk_delay: Duration::ZERO,
        exit_after: None,
        tls_ca_out: None,
        entra: None,
        local_auth: true,
    };
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v:?}"))
        };
        match flag.as_str() {
            "--host" if value == "localhost" => out.host = IpAddr::V4(Ipv4Addr::LOCALHOST),
            "--host" => {
                out.host = value
                    .parse()
                    .map_err(|_| format!("--host: not an IP address: {value:?}"))?
            }
            "--port" => {
                out.port = value
                    .parse()
                    .map_err(|_| format!("--port: not a port: {value:?}"))?
            }
            "--api-key" => out.api_key = value,
            "--deployment" => {
                let (name, behavior) = value.split_once('=').unwrap_or((&value, "healthy"));
                if name.is_empty() {
                    return Err(format!("--deployment: empty name in {value:?}"));
                }
                out.deployments.push((name.to_owned(), behavior.parse()?));
            }
            "--model" => match value.split_once('=') {
                Some((name, model)) if !name.is_empty() && !model.is_empty() => {
                    out.models.push((name.to_owned(), model.to_owned()));
                }
                _ => return Err(format!("--model: expected NAME=MODEL, got {value:?}")),
            },
            "--latency-ms" => out.latency = Duration::from_millis(number(&value)?),
            "--chunk-delay-ms" => out.chunk_delay = Duration::from_millis(number(&value)?),
            "--exit-after" => out.exit_after = Some(Duration::from_secs(number(&value)?)),
            "--tls-ca-out" if value.is_empty() => return Err("--tls-ca-out: empty path".into()),
            "--tls-ca-out" => out.tls_ca_out = Some(PathBuf::from(value)),
            "--entra" => match value.split_once(':') {
                Some((tenant, client)) if !tenant.is_empty() && !client.is_empty() => {
                    let lifetime = out.entra.as_ref().map(|e| e.lifetime);
                    let mut entra = EntraConfig::new(tenant, client);
                    if let Some(lifetime) = lifetime {
                        entra.lifetime = lifetime;
                    }
                    out.entra = Some(entra);
                }
                _ => return Err(format!("--entra: expected TENANT:CLIENT_ID, got {value:?}")),
            },
            "--entra-secret" | "--entra-federation" | "--token-lifetime" => {
                let Some(entra) = out.entra.as_mut() else {
                    return Err(format!("{flag} needs --entra before it"));
                };
                match flag.as_str() {
                    "--entra-secret" => entra.client_secret = Some(value),
                    "--entra-federation" => entra.federation = value == "on",
                    _ => entra.lifetime = Duration::from_secs(number(&value)?),
                }
            }
            "--local-auth" => out.local_auth = value != "off",
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    if out.deployments.is_empty() {
        out.deployments = vec![
            ("gpt-4o".to_owned(), Behavior::Healthy),
            ("gpt-35-turbo".to_owned(), Behavior::Healthy),
        ];
    }
    Ok(Some(out))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("azure-openai-emulator: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let mut builder = Emulator::builder()
        .api_key(args.api_key)
        .bind(SocketAddr::new(args.host, args.port))
        .log_calls(true);
    if args.tls_ca_out.is_some() {
        builder = builder.tls();
    }
    if let Some(entra) = args.entra.clone() {
        builder = builder.entra(entra);
    }
    if !args.local_auth {
        builder = builder.disable_local_auth();
    }
    for (name, behavior) in &args.deployments {
        builder = builder.deployment(name.clone(), behavior.clone());
    }
    for (name, model) in &args.models {
        builder = builder.model_version(name, model.clone());
    }
    let emulator = match builder.start().await {
        Ok(emulator) => emulator,
        Err(e) => {
            eprintln!(
                "azure-openai-emulator: cannot listen on {}:{}: {e}",
                args.host, args.port
            );
            return ExitCode::FAILURE;
        }
    };
    for (name, _) in &args.deployments {
        emulator.set_latency(name, args.latency);
        emulator.set_chunk_delay(name, args.chunk_delay);
    }
    // Written before the listening line, so a script that waits for the line can read the file.
    if let (Some(path), Some(pem)) = (&args.tls_ca_out, emulator.ca_pem())
        && let Err(e) = std::fs::write(path, pem)
    {
        eprintln!(
            "azure-openai-emulator: cannot write the test CA to {}: {e}",
            path.display()
        );
        return ExitCode::FAILURE;
    }

    let listed: Vec<String> = args
        .deployments
        .iter()
        .map(|(n, b)| format!("{n}={b}"))
        .collect();
    println!(
        "azure-openai-emulator listening on {} (deployments: {})",
        emulator.url(),
        listed.join(", ")
    );
    // Scripts wait for this line, and stdout is block-buffered when piped.
    let _ = std::io::stdout().flush();

    let exit_after = async {
        match args.exit_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
        _ = exit_after => {}
    }
    drop(emulator);
    ExitCode::SUCCESS
}

#[cfg(unix)]
async fn terminate() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut sigterm) => {
            sigterm.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use azure_openai_emulator::Chaos;

    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_and_flags() {
        let args = parse(&[]).ok().flatten().expect("defaults");
        assert_eq!((args.port, args.api_key.as_str()), (8080, "emulator-key"));
        let names: Vec<_> = args.deployments.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["gpt-4o", "gpt-35-turbo"]);

        let args = parse(&[
            "--port",
            "9000",
            "--deployment",
            "a=hang",
            "--latency-ms",
            "5",
            "--chunk-delay-ms",
            "7",
            "--exit-after",
            "3",
            "--tls-ca-out",
            "ca.pem",
        ])
        .ok()
        .flatten()
        .expect("flags");
        assert_eq!(args.port, 9000);
        assert_eq!(args.deployments, [("a".to_owned(), Behavior::Hang)]);
        assert_eq!(args.chunk_delay, Duration::from_millis(7));
        assert_eq!(args.tls_ca_out, Some(PathBuf::from("ca.pem")));
        assert_eq!(
            parse(&[]).ok().flatten().expect("defaults").tls_ca_out,
            None
        );
        assert_eq!(
            (args.latency, args.exit_after),
            (Duration::from_millis(5), Some(Duration::from_secs(3)))
        );
        assert!(matches!(parse(&["--help"]), Ok(None)));

        let args = parse(&[
            "--deployment",
            "a=chaos:42",
            "--deployment",
            "b=chaos:42:70",
        ])
        .ok()
        .flatten()
        .expect("chaos");
        assert_eq!(
            args.deployments,
            [
                ("a".to_owned(), Behavior::Chaos(Chaos::new(42, 50))),
                ("b".to_owned(), Behavior::Chaos(Chaos::new(42, 70))),
            ]
        );
    }

    #[test]
    fn errors_are_explained() {
        for bad in [
            &["--port"][..],
            &["--port", "x"],
            &["--bogus", "1"],
            &["--deployment", "a=nope"],
            &["--deployment", "=hang"],
            &["--deployment", "a=chaos"],
            &["--deployment", "a=chaos:x"],
            &["--deployment", "a=chaos:1:101"],
            &["--tls-ca-out"],
            &["--tls-ca-out", ""],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
