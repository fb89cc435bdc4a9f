//! moto's server (AWS APIs on 127.0.0.1), started for a test and killed when it ends.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// moto's server, killed when the test ends however it ends.
pub struct Moto {
    child: Child,
    port: u16,
    /// moto appends one JSON line per request it receives here (MOTO_ENABLE_RECORDING).
    recording: PathBuf,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub fn start() -> Self {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mut command = moto_command();
        let executable = format!("{command:?}");
        // moto binds a port of its own choosing (-p 0) and says which: a port picked here and
        // released for it could be picked again by another test before moto binds it, and
        // the second test would then talk to the first one's moto.
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("{}-{n}", std::process::id());
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let recording = dir.join(format!("moto-recording-{name}.jsonl"));
        let log = dir.join(format!("moto-{name}.log"));
        let _ = std::fs::remove_file(&recording);
        let child = command
            .args(["-H", "127.0.0.1", "-p", "0"])
            .env("MOTO_ENABLE_RECORDING", "true")
            .env("MOTO_RECORDER_FILEPATH", &recording)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("cannot create moto's log file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {executable}: {e}; `make test` installs moto (pip install 'moto[server]' into .venv)"
                )
            });
        let mut moto = Moto {
            child,
            port: 0,
            recording,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let port = text
                .split(" * Running on http://127.0.0.1:")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse::<u16>().ok());
            if let Some(port) = port
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                moto.port = port;
                break;
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("{executable} exited ({status}) before answering; its output:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not say where it listens within 60 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto.reset();
        moto
    }

    /// Stops the server now, as an outage would.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Forgets the requests recorded so far.
    pub fn reset(&self) {
        std::fs::write(&self.recording, "").expect("cannot reset moto's recording");
    }

    /// How many requests for `target` (an X-Amz-Target such as `secretsmanager.GetSecretValue`)
    /// moto received since the last reset.
    pub fn calls(&self, target: &str) -> usize {
        let needle = format!("\"{target}\"");
        std::fs::read_to_string(&self.recording)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&needle))
            .count()
    }
}

/// The command that starts moto's server: `MOTO_SERVER`, else scripts/moto_server.py (moto with
/// DynamoDB's conditional writes made atomic, as DynamoDB's are) under the Makefile's venv.
fn moto_command() -> Command {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return Command::new(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    if !python.is_file() {
        panic!(
            "{} not found: `make test` creates it with moto, or run: python3 -m venv .venv && \
             .venv/bin/pip install 'moto[server]'",
            python.display()
        );
    }
    let mut command = Command::new(python);
    command.arg(root.join("scripts/moto_server.py"));
    command
}
