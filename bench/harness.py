"""Benchmarks side by side: fallback-chat, LiteLLM's proxy and direct calls, against one local
Azure OpenAI emulator, on this machine. Run by bench/run.sh (`make bench`); writes BENCHMARKS.md,
bench/results.json and bench/scenario2-latency.png. A program that prints numbers, not a test.

Every process it starts binds to 127.0.0.1, runs in its own process group under `timeout`, and
is stopped when its part is done, or when the harness exits however it exits.

Adding another OpenAI-compatible gateway is one more entry in SYSTEMS (see `litellm_system` and
`watch_system`): a name, a `start` that returns its base URL and the key to send, and the
scenarios it runs in. It is then driven with `POST /v1/chat/completions` like the others.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LOGS = BENCH / "logs"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
# The arm64 builds, which run beside the x86_64 ones (see builds()).
ARM64_TARGET = TARGET / "bench-arm64"
if not TARGET.is_absolute():
    TARGET = ROOT / TARGET
VENV_BIN = BENCH / ".venv" / "bin"

EMULATOR_KEY = "emulator-key"
CLIENT_KEY = "fc-bench-client-key-0000"  # CLIENT_API_KEYS wants 16+ characters
ENTRA_TENANT = "11111111-2222-3333-4444-555555555555"
ENTRA_CLIENT = "66666666-7777-8888-9999-000000000000"
LITELLM_MASTER_KEY = "sk-bench-litellm-master-key-0000"
API_VERSION = "2024-10-21"
DEPLOYMENTS = ("gpt-4o", "gpt-35-turbo")
BODY = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "How do I reset my password?"},
    ],
}


def knob(name, default, cast=float):
    value = os.environ.get(name)
    return cast(value) if value not in (None, "") else default


# Durations and counts; the defaults keep the measuring near 8 minutes on 2 cores (builds aside).
S1_SECONDS = knob("BENCH_S1_SECONDS", 4.0)  # per system, emulator latency and concurrency
S1_REQUESTS = knob("BENCH_S1_REQUESTS", 20000, int)
S1_WARMUP = knob("BENCH_S1_WARMUP", 40, int)
S2_SECONDS = knob("BENCH_S2_SECONDS", 60.0)  # per gateway
S2_FLOOR_SECONDS = knob("BENCH_S2_FLOOR_SECONDS", 10.0)  # per floor (direct calls)
S2_RATE = knob("BENCH_S2_RATE", 20.0)  # requests per second at most, one at a time
S3_REQUESTS = knob("BENCH_S3_REQUESTS", 50, int)
S3_SECONDS = knob("BENCH_S3_SECONDS", 20.0)
COLD_RUNS = knob("BENCH_COLD_RUNS", 50, int)  # per binary, upstream and CPU condition (6 rows)
QUOTA_REQUESTS = knob("BENCH_QUOTA_REQUESTS", 400, int)  # per turn, scenario 1 under the CPU quota
QUOTA_ROUNDS = knob("BENCH_QUOTA_ROUNDS", 3, int)
FLEET_ENVIRONMENTS = knob("BENCH_FLEET_ENVIRONMENTS", 16, int)
FLEET_RATE = knob("BENCH_FLEET_RATE", 0.0)  # requests per second per environment; 0: always one in flight
# The load table: open-loop arrival rates (requests per second), seconds per rate and system,
# the emulator's fixed answer delay, and the execution environments cargo lambda watch may start
# (Lambda gives each in-flight request one; 32 carry 1000/s at 20 ms, and each takes a
# `cargo run` to start, so more would mostly lengthen the warm-up).
LOAD_RATES = [float(r) for r in os.environ.get("BENCH_LOAD_RATES", "100,500,1000,2000").split(",") if r]
LOAD_SECONDS = knob("BENCH_LOAD_SECONDS", 15.0)
LOAD_LATENCY_MS = knob("BENCH_LOAD_LATENCY_MS", 20, int)
LOAD_ENVIRONMENTS = knob("BENCH_LOAD_ENVIRONMENTS", 32, int)
SKIP_ARM64 = os.environ.get("BENCH_SKIP_ARM64", "") not in ("", "0")
ONLY = {s for s in os.environ.get("BENCH_SYSTEMS", "").split(",") if s}

# ----------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A process in its own group, with `timeout` as a backstop; stop() ends the whole group."""

    running: list["Proc"] = []

    def __init__(self, name, argv, env=None, log=None, limit=1800, stderr=None, cwd=ROOT):
        self.name = name
        self.log_path = log or LOGS / f"{name}.log"
        self.out = open(self.log_path, "ab")
        self.err = open(stderr, "ab") if stderr else None
        self.popen = subprocess.Popen(
            ["timeout", "-k", "5", str(int(limit))] + [str(a) for a in argv],
            env=env or os.environ.copy(),
            stdout=self.out,
            stderr=self.err or subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )
        Proc.running.append(self)

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def group(self):
        """Every live process of this group (and any descendant that left it)."""
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid, pgrp = int(stat.parent.name), int(fields[1]), int(fields[2])
            if pgrp == self.pid:
                found.add(pid)
        # Descendants in other groups.
        changed = True
        while changed:
            changed = False
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                pid, ppid = int(stat.parent.name), int(fields[1])
                if ppid in found and pid not in found:
                    found.add(pid)
                    changed = True
        return sorted(found)

    def stop(self):
        pids = self.group() if self.alive() else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(timeout=8)
                break
            except subprocess.TimeoutExpired:
                continue
        if self in Proc.running:
            Proc.running.remove(self)
        self.out.close()
        if self.err:
            self.err.close()


def stop_all(*_):
    for proc in list(Proc.running):
        try:
            proc.stop()
        except Exception:
            pass


def on_signal(signum, _frame):
    stop_all()
    sys.exit(128 + signum)


atexit.register(stop_all)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGHUP, on_signal)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url, headers=None, data=None, timeout=2.0):
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


def wait_until(check, seconds, proc=None, what="readiness"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited during {what} (see {rel(proc.log_path)})")
        if check():
            return
        time.sleep(0.25)
    raise RuntimeError(f"no {what} after {seconds:.0f} s")


def peak_rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def comm(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def rel(path):
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------
# The emulator


class Emulator:
    """target/bench-fixture/azure-openai-emulator with one behaviour per deployment; it logs one stderr
    line per call, which is how upstream calls are counted (between two offsets of that file).

    With `tls_ca_out` (a path), it serves HTTPS (`--tls-ca-out`): a test CA generated at start,
    its PEM written there (`ca_path`), `url` the https URL its ready line prints."""

    def __init__(self, name, behaviors, latency_ms=0, tls_ca_out=None, binary=None, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ca_path = Path(tls_ca_out) if tls_ca_out else None
        self.calls_path = LOGS / f"emulator-{name}.calls"
        argv = [binary or TARGET / "bench-fixture/azure-openai-emulator", "--host", "127.0.0.1",
                "--port", self.port, "--api-key", EMULATOR_KEY, "--latency-ms", latency_ms,
                "--exit-after", 3600, *extra]
        for deployment, behavior in behaviors.items():
            argv += ["--deployment", f"{deployment}={behavior}"]
        if self.ca_path:
            self.ca_path.unlink(missing_ok=True)
            argv += ["--tls-ca-out", self.ca_path]
        self.log_path = LOGS / f"emulator-{name}.log"
        # Where this start's lines begin in its two files (appended to if they exist).
        offsets = [p.stat().st_size if p.exists() else 0 for p in (self.log_path, self.calls_path)]
        self.proc = Proc(f"emulator-{name}", argv, log=self.log_path, stderr=self.calls_path, limit=3600)
        if not self.ca_path:
            wait_until(lambda: http_status(self.url + "/") is not None, 20, self.proc, "emulator")
            return
        try:
            wait_until(lambda: self._https_ready(offsets[0]), 20, self.proc, "emulator (HTTPS)")
            self._check_https()
        except Exception as error:
            self.proc.stop()
            with open(self.calls_path, "rb") as f:
                f.seek(offsets[1])
                lines = [l.strip() for l in f.read().decode(errors="replace").splitlines() if l.strip()]
            # Its complaint is the line naming it (a usage text follows), else the last.
            said = next((l for l in lines if l.startswith("azure-openai-emulator:")), lines[-1] if lines else "")
            if "--tls-ca-out" in said or "unknown option" in said:
                raise RuntimeError(f"this emulator has no --tls-ca-out (it said: {said[:300]})") from error
            raise RuntimeError(f"{error}{f' (it said: {said[:300]})' if said else ''}") from error

    def _https_ready(self, offset):
        """Its ready line ("... listening on https://...") is out and the CA's PEM written."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        line = next((l for l in text.splitlines() if " listening on " in l), None)
        if line is None:
            return False
        url = line.split(" listening on ", 1)[1].split()[0]
        if not url.startswith("https://"):
            raise RuntimeError(f"--tls-ca-out given, but the emulator serves {url}")
        if not (self.ca_path.exists() and b"BEGIN CERTIFICATE" in self.ca_path.read_bytes()):
            return False
        self.url = url.rstrip("/")
        return True

    def _check_https(self):
        """One request trusting only the test CA: a certificate or URL the function could not
        verify either fails here, with the reason."""
        import ssl

        context = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            urllib.request.urlopen(self.url + "/", timeout=5, context=context).close()
        except urllib.error.HTTPError:
            pass  # an answer, over a verified connection
        except (urllib.error.URLError, OSError) as error:
            raise RuntimeError(f"{self.url} not verified with the CA it wrote ({self.ca_path}): "
                               f"{getattr(error, 'reason', error)}") from error

    def mark(self):
        return self.calls_path.stat().st_size

    def count_since(self, mark, field="deployment", value=lambda v: v):
        """Upstream calls since `mark`, counted by `field` of the emulator's call log (its value
        passed through `value`), most first."""
        with open(self.calls_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        counts = {}
        for line in text.splitlines():
            parts = dict(p.split("=", 1) for p in line.split() if "=" in p)
            if field in parts:
                key = value(parts[field])
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def calls_since(self, mark):
        """Upstream calls per deployment since `mark`."""
        return self.count_since(mark)

    def stop(self):
        self.proc.stop()


# ----------------------------------------------------------------------------------------------
# Load: asyncio + httpx (keep-alive), and the in-process driver (examples/inprocess.rs)


async def _http_run(client, url, headers, body, concurrency, count, seconds, rate):
    started = time.perf_counter()
    deadline = started + seconds
    counter = iter(range(count))
    results = []

    async def worker():
        for i in counter:
            now = time.perf_counter()
            if now >= deadline:
                return
            if rate > 0:
                slot = started + i / rate
                if slot >= deadline:
                    return
                if slot > now:
                    await asyncio.sleep(slot - now)
            t0 = time.perf_counter()
            try:
                response = await client.post(url, headers=headers, json=body)
                await response.aread()
                status = response.status_code
                attempts = response.headers.get("x-fallback-attempts")
            except httpx.HTTPError as error:
                results.append({"t": t0 - started, "ms": (time.perf_counter() - t0) * 1000,
                                "status": 0, "error": type(error).__name__})
                continue
            results.append({"t": t0 - started, "ms": (time.perf_counter() - t0) * 1000,
                            "status": status, "attempts": int(attempts) if attempts else None})

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    results.sort(key=lambda r: r["t"])
    return results, time.perf_counter() - started


async def _http_load(url, headers, body, concurrency, count, seconds, rate, warmup):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
        if warmup:
            await _http_run(client, url, headers, body, concurrency, warmup, 120, 0)
        return await _http_run(client, url, headers, body, concurrency, count, seconds, rate)


def http_load(url, headers, body, concurrency, count, seconds, rate=0.0, warmup=0):
    return asyncio.run(_http_load(url, headers, body, concurrency, count, seconds, rate, warmup))


def inprocess_load(mode, emulator, deployment, concurrency, count, seconds, rate, warmup, log, preexec=None,
                   extra=(), with_cpu=False, env_extra=None):
    """Runs bench/inprocess (the in-process driver) once; returns (results, seconds, peak RSS KiB of
    the driver), and with `with_cpu` the CPU seconds the driver used as a fourth value.
    `env_extra` adds to (or overrides) the function's configuration."""
    env = {**os.environ, **function_env(emulator), **(env_extra or {})}
    argv = ["timeout", "-k", "5", str(int(seconds + 180)), TARGET / "release/inprocess",
            "--mode", mode, "--concurrency", concurrency, "--requests", count,
            "--seconds", seconds, "--rate", rate, "--warmup", warmup,
            "--endpoint", emulator.url, "--deployment", deployment,
            "--api-key", EMULATOR_KEY, "--client-key", CLIENT_KEY, *extra]
    with open(log, "ab") as err:
        # `timeout` waits for its child, so its own rusage (wait4) counts the driver's CPU time.
        proc = subprocess.Popen([str(a) for a in argv], env=env, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done = subprocess.CompletedProcess(argv, proc.returncode, stdout)
    results, summary = [], None
    for line in done.stdout.decode(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("bench") == "request":
            results.append({k: record[k] for k in ("t", "ms", "status", "attempts", "lag_ms") if k in record})
        elif record.get("bench") == "summary":
            summary = record
    if done.returncode != 0 or summary is None:
        raise RuntimeError(f"bench/inprocess exited with {done.returncode} (see {rel(log)})")
    if with_cpu:
        return results, summary["seconds"], summary["peak_rss_kib"], usage.ru_utime + usage.ru_stime
    return results, summary["seconds"], summary["peak_rss_kib"]


# ----------------------------------------------------------------------------------------------
# Systems


def function_env(emulator):
    """The function's configuration, the same in-process and under cargo lambda watch."""
    return {
        "AZURE_OPENAI_ENDPOINT": emulator.url,
        "AZURE_OPENAI_API_KEY": EMULATOR_KEY,
        "AZURE_OPENAI_DEPLOYMENTS": ",".join(DEPLOYMENTS),
        "CLIENT_API_KEYS": CLIENT_KEY,
        "AWS_LAMBDA_LOG_FORMAT": "JSON",
    }


@dataclass
class Running:
    """A started gateway: where to send requests, with which key, and its processes."""

    base_url: str
    key: str
    proc: Proc
    # Processes whose peak RSS is reported (by default every process of the group).
    rss_pids: Callable[[], list[int]] | None = None
    note: str = ""

    def stop(self):
        self.proc.stop()


@dataclass
class System:
    key: str
    name: str
    # "direct" (Python client to the emulator), "inprocess-direct" / "inprocess" (Rust driver),
    # or "gateway" (started by `start`, driven over HTTP on its OpenAI-compatible route).
    kind: str
    floor: str | None = None  # the key of the row its latencies are compared with
    # (emulator, a tag for its log files, scenario number) -> Running
    start: Callable[[Emulator, str, int], Running] | None = None
    scenarios: tuple = (1, 2, 3)
    ready_seconds: float = 300
    # Scenarios whose row runs alongside the others' (see scenario_errors): only for rows that
    # spend their time asleep in the gateway's retry back-off.
    alongside: tuple = ()
    note: str = ""
    extra: dict = field(default_factory=dict)


def watch_start(emulator, tag, scenario):
    """fallback-chat under `cargo lambda watch --release`, buffered, on 127.0.0.1."""
    port = free_port()
    env_file = LOGS / f"{tag}.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in function_env(emulator).items()))
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    env.pop("RESPONSE_MODE", None)
    # Scenario 1 sends up to 8 requests at once: like Lambda, each gets an execution environment
    # (a process) of its own instead of queueing behind one. Scenarios 2 and 3 send one at a
    # time, which Lambda serves from one warm environment; with several, cargo-lambda would
    # spread them over all, each learning the deployments' state on its own.
    # The load table needs as many as are in flight at its highest rate.
    concurrency = {1: "8", "load": str(LOAD_ENVIRONMENTS)}.get(scenario, "1")
    argv = ["cargo", "lambda", "watch", "--release", "--ignore-changes",
            "--invoke-address", "127.0.0.1", "--invoke-port", port,
            "--bin", "fallback-chat", "--env-file", env_file, "--concurrency", concurrency]
    proc = Proc(tag, argv, env=env, limit=3600)

    def functions():
        return [p for p in proc.group() if comm(p) == "fallback-chat"]

    return Running(f"http://127.0.0.1:{port}", CLIENT_KEY, proc, rss_pids=functions)


LITELLM_CONFIG = """\
# LiteLLM proxy configuration written by bench/harness.py ({variant}).
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt-4o
      api_base: {base}
      api_key: {key}
      api_version: "{version}"{params}
  - model_name: gpt-35-turbo
    litellm_params:
      model: azure/gpt-35-turbo
      api_base: {base}
      api_key: {key}
      api_version: "{version}"{params}
router_settings:{router}
  fallbacks: [{{"gpt-4o": ["gpt-35-turbo"]}}]
litellm_settings:
  telemetry: false
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  master_key: {master}
"""


def litellm_config(emulator, retries):
    return LITELLM_CONFIG.format(
        variant="defaults" if retries else "retries off",
        base=emulator.url, key=EMULATOR_KEY, version=API_VERSION, master=LITELLM_MASTER_KEY,
        params="" if retries else "\n      max_retries: 0",
        router="" if retries else "\n  num_retries: 0",
    )


def litellm_start(retries):
    def start(emulator, tag, scenario):
        executable = VENV_BIN / "litellm"
        if not executable.exists():
            raise RuntimeError(f"LiteLLM is not installed: {installed_litellm()['error']}")
        port = free_port()
        config = LOGS / f"{tag}.yaml"
        config.write_text(litellm_config(emulator, retries))
        env = dict(os.environ)
        for k in list(env):
            if k.startswith(("AZURE_", "OPENAI_", "DATABASE_URL", "REDIS_", "LITELLM_")):
                del env[k]
        env.update({
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the model price list
            "LITELLM_TELEMETRY": "False",
            "HF_HUB_OFFLINE": "1",
            "NO_DOCS": "True",
        })
        argv = [executable, "--config", config, "--host", "127.0.0.1", "--port", port,
                "--num_workers", "1", "--telemetry", "False"]
        proc = Proc(tag, argv, env=env, limit=3600)
        return Running(f"http://127.0.0.1:{port}", LITELLM_MASTER_KEY, proc)

    return start


def installed_litellm():
    path = LOGS.parent / ".venv" / "litellm-install.json"
    # bench/run.sh installs LiteLLM in the background while the builds run.
    pid = int(os.environ.get("BENCH_LITELLM_INSTALL_PID") or 0)
    if pid and not path.exists():
        log(f"waiting for LiteLLM's installation (bench/.venv/litellm-install.log, pid {pid})")
        while not path.exists():
            try:
                ended, _ = os.waitpid(pid, os.WNOHANG)  # it is this process's child (exec)
            except ChildProcessError:
                ended = pid
            if ended:
                break
            time.sleep(0.5)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"version": None, "error": "bench/run.sh did not record an installation"}


SYSTEMS = [
    System("direct", "direct (Python client)", "direct",
           note="POST to the emulator's Azure route, no gateway: the floor of every HTTP row"),
    System("direct-rs", "direct (Rust client)", "inprocess-direct", scenarios=(1, 2, 3, "load"),
           note="the same calls from the in-process driver's reqwest client: the floor of the "
                "in-process row"),
    System("inprocess", "fallback-chat, in-process", "inprocess", floor="direct-rs",
           scenarios=(1, 2, 3, "load"),
           note="bench/inprocess: the real handler fed API Gateway v2 events, no HTTP front"),
    System("watch", "fallback-chat, cargo lambda watch", "gateway", floor="direct",
           start=watch_start, scenarios=(1, 2, 3, "load"),
           note="`cargo lambda watch --release`, buffered, the function's Runtime API loop behind "
                "cargo-lambda's HTTP front"),
    System("litellm", "LiteLLM proxy, defaults", "gateway", floor="direct",
           start=litellm_start(retries=True), ready_seconds=180, scenarios=(1, 2, 3, "load"),
           # With its retries, LiteLLM waits out Retry-After (7 s) and its back-off: seconds per
           # request, asleep. Those rows run alongside the others and save about 2 minutes.
           alongside=(2, 3),
           note="the two deployments and the fallback gpt-4o -> gpt-35-turbo; retries as shipped"),
    # Healthy deployments never retry, so this variant only runs where retries can happen.
    System("litellm-noretry", "LiteLLM proxy, retries off", "gateway", floor="direct",
           start=litellm_start(retries=False), scenarios=(2, 3), ready_seconds=180,
           note="as above with `max_retries: 0` and `num_retries: 0`"),
]


def systems_for(scenario):
    return [s for s in SYSTEMS if scenario in s.scenarios and (not ONLY or s.key in ONLY)]


def start_gateway(system, emulator, tag, scenario):
    """Starts a gateway and waits until it answers over HTTP and, with no key (a 401 that
    reaches no deployment), from its request path: under cargo lambda watch that first request
    starts (and if need be builds) the function."""
    running = system.start(emulator, f"{system.key}-{tag}", scenario)
    try:
        wait_until(lambda: http_status(running.base_url + "/") is not None, system.ready_seconds,
                   running.proc, f"{system.name} listening")
        url = running.base_url + "/v1/chat/completions"
        data = json.dumps(BODY).encode()
        headers = {"content-type": "application/json"}
        wait_until(lambda: http_status(url, headers, data, timeout=60) in (401, 403),
                   system.ready_seconds, running.proc, f"{system.name} refusing an unkeyed request")
    except Exception:
        running.stop()
        raise
    return running


def gateway_args(running):
    """bench/inprocess's options that send its requests to a gateway's OpenAI route."""
    url, headers, _ = gateway_request(running)
    return ["--url", url, *[a for k, v in headers.items() for a in ("--header", f"{k}: {v}")]]


def gateway_request(running):
    return (running.base_url + "/v1/chat/completions",
            {"authorization": f"Bearer {running.key}"}, BODY)


def direct_request(emulator, deployment):
    return (f"{emulator.url}/openai/deployments/{deployment}/chat/completions?api-version={API_VERSION}",
            {"api-key": EMULATOR_KEY}, BODY)


def group_rss(running):
    pids = running.rss_pids() if running.rss_pids else [
        p for p in running.proc.group() if comm(p) != "timeout"]
    peaks = [peak_rss_kib(p) for p in pids]
    peaks = [p for p in peaks if p]
    return {"max_kib": max(peaks) if peaks else None, "sum_kib": sum(peaks) if peaks else None,
            "processes": len(peaks)}


# ----------------------------------------------------------------------------------------------
# Statistics


# One definition of a percentile for every figure (bench/coldstart.py's, linear between ranks).
from coldstart import percentile  # noqa: E402  (bench/ is this script's directory)


def summarize(results, elapsed, calls=None, ok_status=200):
    latencies = [r["ms"] for r in results]
    statuses = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    answered = sum(1 for r in results if r["status"] == ok_status)
    row = {
        "n": len(results),
        "answered": answered,
        "statuses": statuses,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "mean": sum(latencies) / len(latencies) if latencies else None,
        "max": max(latencies) if latencies else None,
        "seconds": elapsed,
        "rps": len(results) / elapsed if elapsed else None,
    }
    if calls is not None:
        total = sum(calls.values())
        row["upstream_calls"] = calls
        row["upstream_total"] = total
        row["calls_per_answer"] = total / answered if answered else None
        row["calls_per_request"] = total / len(results) if results else None
    return row


# ----------------------------------------------------------------------------------------------
# Runs


def run_cell(system, emulator, running, deployment, concurrency, count, seconds, rate, warmup, tag):
    """One measurement of one system; returns (summary row, raw results)."""
    mark = emulator.mark()
    rss = None
    if system.kind == "direct":
        url, headers, body = direct_request(emulator, deployment)
        if warmup:
            http_load(url, headers, body, concurrency, warmup, 120)
            mark = emulator.mark()
        results, elapsed = http_load(url, headers, body, concurrency, count, seconds, rate)
    elif system.kind in ("inprocess", "inprocess-direct"):
        mode = "app" if system.kind == "inprocess" else "direct"
        # The driver warms up itself, so its warm-up calls are counted: run the warm-up alone
        # first when calls matter (scenarios 2 and 3 use no warm-up).
        results, elapsed, rss = inprocess_load(mode, emulator, deployment, concurrency, count,
                                               seconds, rate, warmup, LOGS / f"inprocess-{tag}.log")
        if warmup:
            mark = None
    else:
        url, headers, body = gateway_request(running)
        if warmup:
            http_load(url, headers, body, concurrency, warmup, 120)
            mark = emulator.mark()
        results, elapsed = http_load(url, headers, body, concurrency, count, seconds, rate)
    calls = emulator.calls_since(mark) if mark is not None else None
    row = summarize(results, elapsed, calls)
    if rss:
        row["driver_peak_rss_kib"] = rss
    return row, results


def scenario1(report):
    report["s1"] = []
    report["rss"] = {}
    for latency in (0, 50):
        emulator = Emulator(f"s1-{latency}ms", {d: "healthy" for d in DEPLOYMENTS}, latency)
        try:
            for system in systems_for(1):
                running = None
                try:
                    if system.kind == "gateway":
                        running = start_gateway(system, emulator, f"s1-{latency}ms", 1)
                    for concurrency in (1, 8):
                        log(f"  scenario 1, {latency} ms, c={concurrency}: {system.name}")
                        row, _ = run_cell(system, emulator, running, "gpt-4o", concurrency,
                                          S1_REQUESTS, S1_SECONDS, 0, S1_WARMUP,
                                          f"s1-{latency}ms-c{concurrency}")
                        row.update(system=system.key, latency_ms=latency, concurrency=concurrency)
                        report["s1"].append(row)
                        if row.get("driver_peak_rss_kib"):
                            keep_max(report["rss"], system.key,
                                     {"max_kib": row["driver_peak_rss_kib"], "processes": 1})
                    if running:
                        keep_max(report["rss"], system.key, group_rss(running))
                except Exception as error:
                    fail(report, system, f"scenario 1 ({latency} ms)", error)
                finally:
                    if running:
                        running.stop()
        finally:
            emulator.stop()


# Every kind of call (`kinds`): the embedding deployments, one model on both.
EMBEDDINGS = ("te3-east", "te3-west")
KINDS_SECONDS = knob("BENCH_KINDS_SECONDS", 4.0)  # scenario 1, per kind and mode
KINDS_S2_SECONDS = knob("BENCH_KINDS_S2_SECONDS", 10.0)  # scenario 2, per kind and mode


def kinds(report):
    """Scenarios 1 and 2 for every kind of call (chat completions, the Responses API,
    embeddings): bench/inprocess through the handler against its direct calls (the floor), added
    latency and upstream calls per answer. Scenario 1: both deployments healthy, 8 in flight.
    Scenario 2: the primary throttled (Retry-After 7 s), one request at a time at S2_RATE a
    second; the floor is direct calls to the healthy fallback."""
    report["kinds"] = []
    small = {"model": "text-embedding-3-small", "dimensions": 1536}
    for operation in ("chat", "responses", "embeddings"):
        embeds = operation == "embeddings"
        names = EMBEDDINGS if embeds else DEPLOYMENTS
        model = "text-embedding-3-small" if embeds else "gpt-4o"
        extra = [a for d in EMBEDDINGS for a in ("--model", f"{d}=text-embedding-3-small")] if embeds else []
        env = None
        for number, behaviors in ((1, {n: "healthy" for n in names}),
                                  (2, {names[0]: "throttled:7", names[1]: "healthy"})):
            if embeds:
                # GET /?query= needs a chat route, so the pool has one beside the embeddings'.
                behaviors["gpt-4o"] = "healthy"
            emulator = Emulator(f"kinds-{operation}-s{number}", behaviors, 0, extra=extra)
            if embeds:
                entries = [{"id": d, "endpoint": emulator.url, "deployment": d, "embeddings": small,
                            "priority": i} for i, d in enumerate(EMBEDDINGS)]
                entries.append({"id": "gpt-4o", "endpoint": emulator.url, "deployment": "gpt-4o"})
                pool = {"deployments": entries, "default_route": "chat",
                        "routes": {"chat": ["gpt-4o"], "text-embedding-3-small": list(EMBEDDINGS)}}
                env = {"FALLBACK_POOL": json.dumps(pool), "AZURE_OPENAI_DEPLOYMENTS": ""}
            try:
                for mode in ("direct", "app"):
                    deployment = names[1] if (number == 2 and mode == "direct") else names[0]
                    concurrency, count, seconds, rate, warmup = (
                        (8, S1_REQUESTS, KINDS_SECONDS, 0, S1_WARMUP) if number == 1
                        else (1, 100_000, KINDS_S2_SECONDS, S2_RATE, 0))
                    log(f"  every kind of call: {operation}, scenario {number}, {mode}")
                    mark = emulator.mark()
                    results, elapsed, rss = inprocess_load(
                        mode, emulator, deployment, concurrency, count, seconds, rate, warmup,
                        LOGS / f"inprocess-kinds-{operation}-s{number}-{mode}.log",
                        extra=["--operation", operation, "--model", model], env_extra=env)
                    # Scenario 1 warms up inside the driver: its calls are not counted.
                    calls = emulator.calls_since(mark) if number == 2 else None
                    row = summarize(results, elapsed, calls)
                    row.update(operation=operation, scenario=number, mode=mode)
                    report["kinds"].append(row)
            finally:
                emulator.stop()


# The cost of counting a named client's limits (`limits`).
LIMITS_SECONDS = knob("BENCH_LIMITS_SECONDS", 5.0)  # per run
LIMITS_ROUNDS = knob("BENCH_LIMITS_ROUNDS", 3, int)


def limits(report):
    """What counting a named client's limits adds in-process: scenario 1 (both deployments
    healthy, 8 in flight) through the handler, the caller once with a plain CLIENT_API_KEYS key
    (nothing counted) and once as a named client with requests and tokens per minute (counted in
    the environment, no table), in turns, LIMITS_ROUNDS times each. The table's share of the cost
    (a lease every few requests) is in the fleet scenario's (d)."""
    report["limits"] = []
    clients = json.dumps([{"name": "bench", "key_env": "BENCH_CLIENT_KEY",
                           "requests_per_minute": 10**9, "tokens_per_minute": 10**12}])
    on = {"FALLBACK_CLIENTS": clients, "BENCH_CLIENT_KEY": CLIENT_KEY, "CLIENT_API_KEYS": ""}
    emulator = Emulator("limits", {n: "healthy" for n in DEPLOYMENTS}, 0)
    try:
        for turn in range(LIMITS_ROUNDS):
            for label, env in (("off", None), ("on", on)):
                log(f"  limits {label}, round {turn + 1}")
                results, elapsed, rss = inprocess_load(
                    "app", emulator, DEPLOYMENTS[0], 8, S1_REQUESTS, LIMITS_SECONDS, 0, S1_WARMUP,
                    LOGS / f"inprocess-limits-{label}.log", env_extra=env)
                row = summarize(results, elapsed)
                row.update(limits=label, round=turn + 1)
                report["limits"].append(row)
    finally:
        emulator.stop()


def scenario1_quota(report):
    """Scenario 1's in-process figures at Lambda's 128 MB CPU share: bench/inprocess (direct calls,
    then the real handler, in turns) in a cgroup with the cold-start section's quota, the emulator
    outside it. Under a quota a median says little (most requests fit in the running slice, the
    rest wait for the next period), so the mean is reported with the CPU time per request."""
    import resource

    sys.path.insert(0, str(BENCH))
    import coldstart as cs

    quota_us, period_us = cs.LAMBDA_128MB
    out = report["s1_quota"] = {"requests": QUOTA_REQUESTS, "rounds": QUOTA_ROUNDS, "rows": {}}
    try:
        cgroup = cs.CpuCgroup.make(quota_us, period_us)
    except cs.NoCgroup as error:
        out["error"] = f"no cgroup for a CPU quota could be made: {error}"
        return
    out["cpu_quota"] = cgroup.describe()
    emulator = Emulator("s1-quota", {d: "healthy" for d in DEPLOYMENTS})
    try:
        runs = {"direct": [], "app": []}
        for turn in range(QUOTA_ROUNDS):
            for mode in ("direct", "app"):
                log(f"  scenario 1 under the CPU quota: {mode}, turn {turn + 1}")
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                results, _, _ = inprocess_load(mode, emulator, "gpt-4o", 1, QUOTA_REQUESTS, 300, 0, 20,
                                               LOGS / f"inprocess-quota-{mode}.log", preexec=cgroup.enter)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                ok = [r["ms"] for r in results if r["status"] == 200]
                runs[mode].append({"ms": ok, "n": len(results), "cpu_s": cpu_s})
        for mode, turns in runs.items():
            ms_all = [m for t in turns for m in t["ms"]]
            n = sum(t["n"] for t in turns)
            out["rows"][mode] = {
                "n": n, "answered": len(ms_all),
                "mean": sum(ms_all) / len(ms_all) if ms_all else None,
                "p50": percentile(ms_all, 0.5), "p90": percentile(ms_all, 0.9), "p99": percentile(ms_all, 0.99),
                # The process's whole CPU time (start-up and warm-up included) over its requests.
                "cpu_us_per_request": round(sum(t["cpu_s"] for t in turns) * 1e6 / max(1, n + 20 * len(turns)), 1),
            }
        out["throttling"] = cgroup.throttling()
    finally:
        emulator.stop()
        cgroup.remove()


def load_test(report):
    """The load table: every system at rising open-loop rates against the emulator answering
    after LOAD_LATENCY_MS, all driven by one generator (bench/inprocess: `--mode direct` is the
    floor, `--mode app` the handler in the generator's process, `--mode http` the gateways)."""
    emulator = Emulator("load", {d: "healthy" for d in DEPLOYMENTS}, LOAD_LATENCY_MS)
    out = report["load"] = {"rates": LOAD_RATES, "seconds": LOAD_SECONDS, "latency_ms": LOAD_LATENCY_MS,
                            "environments": LOAD_ENVIRONMENTS, "rows": {}}
    try:
        for system in systems_for("load"):
            running = None
            rows = out["rows"][system.key] = []
            try:
                if system.kind == "gateway":
                    running = start_gateway(system, emulator, "load", "load")
                    # Warm. cargo lambda watch starts an environment (a `cargo run` of its own,
                    # each waiting for cargo's locks: about a second apiece) when a request finds
                    # every started one busy; bursts of LOAD_ENVIRONMENTS until all have started
                    # keep those starts out of the measured runs.
                    warm = gateway_args(running)
                    until = time.monotonic() + 600
                    while True:
                        inprocess_load("http", emulator, "gpt-4o", LOAD_ENVIRONMENTS, LOAD_ENVIRONMENTS * 2,
                                       120, 0, 0, LOGS / f"load-{system.key}.log", extra=warm)
                        started = len(running.rss_pids()) if running.rss_pids else LOAD_ENVIRONMENTS
                        if started >= LOAD_ENVIRONMENTS or time.monotonic() > until:
                            break
                    out.setdefault("warm", {})[system.key] = started
                for rate in LOAD_RATES:
                    log(f"  load, {rate:g} requests/s for {LOAD_SECONDS:g} s: {system.name}")
                    row = load_cell(system, emulator, running, rate)
                    rows.append(row)
                    log(f"    answered {row['answered']}/{row['n']}, p50 {row['p50']:.2f} ms, "
                        f"p99 {row['p99']:.2f} ms, {row['cpu_cores']:.2f} cores")
            except Exception as error:
                fail(report, system, "the load table", error)
            finally:
                if running:
                    running.stop()
    finally:
        emulator.stop()


def load_cell(system, emulator, running, rate):
    mode = {"inprocess-direct": "direct", "inprocess": "app"}.get(system.kind, "http")
    extra = ["--arrivals", "open", "--timeout", 30]
    if running:
        extra += gateway_args(running)
        cpu0 = group_cpu_seconds(running)
    mark = emulator.mark()
    results, elapsed, driver_rss, driver_cpu = inprocess_load(
        mode, emulator, "gpt-4o", 1, 0, LOAD_SECONDS, rate, 0,
        LOGS / f"load-{system.key}.log", extra=extra, with_cpu=True)
    row = summarize(results, elapsed, emulator.calls_since(mark))
    row["rate"] = rate
    lags = [r["lag_ms"] for r in results if "lag_ms" in r]
    row["lag_p99"] = percentile(lags, 0.99)
    row["lag_max"] = max(lags) if lags else None
    row["generator_cpu_s"] = round(driver_cpu, 2)
    if running:
        # The system's own processes (every one of its group), not the generator's.
        row["cpu_s"] = round(group_cpu_seconds(running) - cpu0, 2)
        row["rss"] = group_rss(running)
    else:
        # In-process, the system is the driver: the handler and the generator in one process.
        row["cpu_s"] = row["generator_cpu_s"]
        row["rss"] = {"max_kib": driver_rss, "sum_kib": driver_rss, "processes": 1}
    # Over the whole run: the arrivals and then the wait for the last answers.
    row["cpu_cores"] = row["cpu_s"] / elapsed if elapsed else None
    return row


def fleet(report):
    """The fleet scenario: bench/fleet drives many in-process execution environments, once
    learning alone and once sharing health through a DynamoDB table in moto's server, and
    prints what happened (calls per Retry-After window, requests that waited for a timeout,
    seconds to recover, the table's read latency)."""
    port = free_port()
    # DynamoDB's conditional writes are atomic; moto's, without scripts/moto_server.py, are not.
    moto = Proc("moto", [VENV_BIN / "python", ROOT / "scripts/moto_server.py", "-H", "127.0.0.1", "-p", port])
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/") is not None, 60, moto, "moto")
        log(f"  fleet: {FLEET_ENVIRONMENTS} environments, "
            f"{f'{FLEET_RATE:g} requests/s each' if FLEET_RATE else 'a request always in flight in each'}, "
            "local-only and shared side by side")
        with open(LOGS / "fleet.log", "wb") as err:
            done = subprocess.run([str(TARGET / "bench-fixture/fleet"), "--moto", f"http://127.0.0.1:{port}",
                                   "--environments", str(FLEET_ENVIRONMENTS), "--rate", str(FLEET_RATE)],
                                  stdout=subprocess.PIPE, stderr=err, timeout=900, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"bench/fleet exited {done.returncode} (see {rel(LOGS / 'fleet.log')})")
        report["fleet"] = json.loads(done.stdout)
    finally:
        moto.stop()


def keep_max(table, key, rss):
    if rss.get("max_kib") and (key not in table or rss["max_kib"] > table[key]["max_kib"]):
        table[key] = rss


def group_cpu_seconds(running):
    """CPU time (user + system) used so far by a gateway's live processes."""
    ticks = 0
    for pid in running.proc.group():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def scenario_errors(report, number, behaviors, direct_deployment, count, seconds, floor_seconds,
                    rate, keep_series):
    """Scenarios 2 and 3: one emulator per system, so each starts with a fresh one.

    Systems that list the scenario in `alongside` are started first, one at a time, and then
    measured in a thread of their own while the others run one after another: their requests
    spend seconds waiting out the gateway's own retry back-off, on next to no CPU (the CPU their
    processes used during the row is recorded with it, `gateway_cpu_s`)."""
    key = f"s{number}"
    report.setdefault("series", {})
    rows = {}

    def prepare(system):
        emulator = Emulator(f"{key}-{system.key}", behaviors)
        try:
            running = start_gateway(system, emulator, key, number) if system.kind == "gateway" else None
        except Exception:
            emulator.stop()
            raise
        return emulator, running

    def measure(system, emulator, running):
        try:
            duration = floor_seconds if system.floor is None else seconds
            log(f"  scenario {number}: {system.name} ({duration:.0f} s at most"
                f"{', alongside the others' if number in system.alongside else ''})")
            cpu = group_cpu_seconds(running) if running else None
            row, results = run_cell(system, emulator, running, direct_deployment, 1, count,
                                    duration, rate, 0, key)
            if running:
                row["gateway_cpu_s"] = round(group_cpu_seconds(running) - cpu, 2)
            row.update(system=system.key)
            rows[system.key] = row
            if keep_series:
                report["series"][system.key] = [
                    [round(r["t"], 3), round(r["ms"], 3), r["status"]] for r in results]
        except Exception as error:
            fail(report, system, f"scenario {number}", error)
        finally:
            if running:
                running.stop()
            emulator.stop()

    systems = systems_for(number)
    background = []
    for system in (s for s in systems if number in s.alongside):
        try:
            background.append((system, *prepare(system)))
        except Exception as error:
            fail(report, system, f"scenario {number}", error)
    with ThreadPoolExecutor(max(1, len(background))) as pool:
        pending = [pool.submit(measure, *args) for args in background]
        for system in (s for s in systems if number not in s.alongside):
            try:
                measure(system, *prepare(system))
            except Exception as error:
                fail(report, system, f"scenario {number}", error)
        for done in pending:
            done.result()
    report[key] = [rows[s.key] for s in systems if s.key in rows]


def coldstart(report):
    """Cold start (bench/coldstart.py) of fallback-chat and the hello-world, each on a full core
    and under the CPU share Lambda gives 128 MB (a cgroup CPU quota, made once here; where none
    can be made, the reason is recorded and only the full-core runs are made); fallback-chat
    against the emulator over plain HTTP and over HTTPS (`--tls-ca-out`, the test CA given to
    the function as EXTRA_CA_CERTS; not measured, with the reason, when the emulator cannot)."""
    sys.path.insert(0, str(BENCH))
    import coldstart as cs

    quota_us, period_us = cs.LAMBDA_128MB
    cold = report["coldstart"] = {"runs": COLD_RUNS, "full": {}, "quota": {}}
    try:
        cgroup = cs.CpuCgroup.make(quota_us, period_us)
        cold["cpu_quota"] = cgroup.describe()
    except cs.NoCgroup as error:
        cgroup = None
        cold["cpu_quota"] = {"quota": None, "why": str(error), "quota_us": quota_us, "period_us": period_us}
        log(f"  cold start: no cgroup for a CPU quota, full core only: {error}")
    emulators = {}
    try:
        healthy = {d: "healthy" for d in DEPLOYMENTS}
        emulators["http"] = Emulator("coldstart", healthy)
        try:
            emulators["https"] = Emulator("coldstart-https", healthy, tls_ca_out=LOGS / "coldstart-ca.pem")
        except Exception as error:
            cold["https_error"] = str(error)
            log(f"  cold start: no HTTPS upstream: {error}")

        def function(emulator):
            env = function_env(emulator)
            env["CLIENT_API_KEYS"] = "fc-example-client-key-0000"  # the key events/ carry
            if emulator.ca_path:
                env["EXTRA_CA_CERTS"] = str(emulator.ca_path)
            return env

        # Keyless: an Entra ID token through the function's AWS role, fetched during init (the
        # emulator stands in for STS and Entra), beside the health table's warm-up.
        emulators["entra"] = Emulator("coldstart-entra", healthy, extra=[
            "--entra", f"{ENTRA_TENANT}:{ENTRA_CLIENT}", "--entra-federation", "on", "--local-auth", "off"])

        def federated(emulator):
            env = function(emulator)
            env.pop("AZURE_OPENAI_API_KEY", None)
            env.update({"AZURE_OPENAI_AUTH": "aws_federation", "AZURE_TENANT_ID": ENTRA_TENANT,
                        "AZURE_CLIENT_ID": ENTRA_CLIENT, "AZURE_AUTHORITY_HOST": emulator.url,
                        "AWS_ENDPOINT_URL_STS": emulator.url, "AWS_ACCESS_KEY_ID": "bench",
                        "AWS_SECRET_ACCESS_KEY": "bench", "AWS_SESSION_TOKEN": "bench"})
            return env

        fc, hello = TARGET / "release/fallback-chat", TARGET / "release/hello"
        cells = [("fallback-chat", fc, function(emulators["http"])),
                 ("fallback-chat-https", fc, function(emulators["https"]) if "https" in emulators else None),
                 ("fallback-chat-entra", fc, federated(emulators["entra"])),
                 ("hello", hello, {})]
        for condition, group in (("full", None), ("quota", cgroup)):
            if condition == "quota" and group is None:
                continue
            for key, _, env in cells:
                if env is None:
                    cold[condition][key] = {"error": f"not measured: {cold['https_error']}"}
            ready = [(key, binary, env) for key, binary, env in cells if env is not None]
            missing = [rel(binary) for _, binary, _ in ready if not binary.exists()]
            log(f"  cold start: {', '.join(k for k, _, _ in ready)} in turns x{COLD_RUNS}, "
                + ("full core" if group is None else f"CPU quota {quota_us}/{period_us} µs (cgroup {group.version})"))
            try:
                if missing:
                    raise RuntimeError(f"{', '.join(missing)} not built")
                for key, result in cs.measure_interleaved(ready, COLD_RUNS, group).items():
                    result.pop("all")
                    cold[condition][key] = result
            except Exception as error:
                for key, _, _ in ready:
                    cold[condition][key] = {"error": str(error)}
    finally:
        for emulator in emulators.values():
            emulator.stop()
        if cgroup:
            cgroup.remove()


def elf_machine(path):
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if head[:4] != b"\x7fELF":
        return None
    return {0x3E: "x86_64", 0xB7: "aarch64"}.get(int.from_bytes(head[18:20], "little"), "other")


def sizes(report):
    out = {}
    for key, x86, arm in (
        ("fallback-chat", TARGET / "release/fallback-chat", ARM64_TARGET / "lambda/fallback-chat/bootstrap"),
        ("hello", TARGET / "release/hello", ARM64_TARGET / "lambda/hello/bootstrap"),
    ):
        entry = {}
        for arch, path, build in (("x86_64", x86, "fallback-chat-x86_64" if key == "fallback-chat" else "x86_64"),
                                  ("aarch64", arm, "fallback-chat-arm64" if key == "fallback-chat" else "arm64")):
            status = report["builds"].get(build, {})
            if status.get("ok") and elf_machine(path) == arch:
                entry[arch] = path.stat().st_size
            else:
                entry[arch] = None
                entry[f"{arch}_error"] = status.get("error") or ("skipped (BENCH_SKIP_ARM64)"
                                                                  if status.get("skipped") else f"{rel(path)} missing")
        out[key] = entry
    report["sizes"] = out


# ----------------------------------------------------------------------------------------------
# Builds


def build(report, name, argv, env=None, limit=1800):
    log(f"  build {name}: {' '.join(str(a) for a in argv)}")
    started = time.monotonic()
    path = LOGS / f"build-{name}.log"
    with open(path, "wb") as out:
        try:
            done = subprocess.run(["timeout", "-k", "10", str(limit)] + [str(a) for a in argv],
                                  cwd=ROOT, env=env or os.environ.copy(), stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            ok = done.returncode == 0
            error = None if ok else f"exit {done.returncode}, see {rel(path)}"
        except OSError as e:
            ok, error = False, str(e)
    seconds = time.monotonic() - started
    report["builds"][name] = {"ok": ok, "seconds": round(seconds, 1), "error": error,
                              "command": " ".join(str(a) for a in argv)}
    if not ok:
        log(f"    FAILED: {error}")
    return ok


def builds(report):
    """Every binary measured, in release mode with the project's [profile.release].

    fallback-chat, the hello-world (bench/hello) and the in-process driver (bench/inprocess) are
    built in one cargo run per architecture: their dependencies compile once and the
    whole-program (LTO) links share the cores. bench/hello and bench/inprocess ask for no feature
    fallback-chat does not enable, so this builds the deployable binary exactly as building it
    alone would; the `--bin fallback-chat` run after it makes sure of that (it finds everything
    fresh and takes a fraction of a second, or rebuilds the binary as deployed).

    The x86_64 and arm64 builds run side by side, arm64 in a target directory of its own (cargo
    locks one per build): with `codegen-units = 1` most crates compile on one core, and a lone
    build leaves the other idle about a third of the time (measured: load average 1.3 over a
    sequential run on 2 cores)."""
    report["builds"] = {}
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")

    def x86_64():
        build(report, "emulator", ["cargo", "build", "--profile", "bench-fixture", "-p",
                                   "azure-openai-emulator", "-p", "fleet"], env)
        build(report, "x86_64", ["cargo", "build", "--release", "-p", "fallback-chat", "-p", "hello",
                                 "-p", "inprocess", "--bins"], env)
        build(report, "fallback-chat-x86_64", ["cargo", "build", "--release", "--bin", "fallback-chat"],
              env)

    def arm64():
        arm_env = dict(env, CARGO_TARGET_DIR=str(ARM64_TARGET))
        build(report, "arm64", ["cargo", "lambda", "build", "--release", "--arm64", "-p", "fallback-chat",
                                "-p", "hello", "--bins"], arm_env)
        build(report, "fallback-chat-arm64", ["cargo", "lambda", "build", "--release", "--arm64",
                                              "--bin", "fallback-chat"], arm_env)

    if SKIP_ARM64:
        for name in ("arm64", "fallback-chat-arm64"):
            report["builds"][name] = {"ok": False, "skipped": True, "seconds": 0}
        x86_64()
        return
    with ThreadPoolExecutor(2) as lanes:
        for lane in [lanes.submit(x86_64), lanes.submit(arm64)]:
            lane.result()


# ----------------------------------------------------------------------------------------------
# The machine


def command_output(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine():
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    commit = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "rustc": command_output(["rustc", "--version"]),
        "python": platform.python_version(),
        "cargo_lambda": command_output([str(VENV_BIN / "cargo-lambda"), "lambda", "--version"]),
        "litellm": None,  # once bench/run.sh's background installation is done: main()
        "httpx": httpx.__version__,
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


# ----------------------------------------------------------------------------------------------


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fail(report, system, where, error):
    message = f"{type(error).__name__}: {error}"
    log(f"    {system.name} failed in {where}: {message}")
    (LOGS / "failures.log").open("a").write(f"{system.key} {where}\n{traceback.format_exc()}\n")
    report.setdefault("failures", {}).setdefault(system.key, []).append(f"{where}: {message}")


def main():
    started = time.monotonic()
    if LOGS.exists():
        shutil.rmtree(LOGS)
    LOGS.mkdir(parents=True)
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "knobs": {"S1_SECONDS": S1_SECONDS, "S1_REQUESTS": S1_REQUESTS, "S1_WARMUP": S1_WARMUP,
                        "S2_SECONDS": S2_SECONDS, "S2_FLOOR_SECONDS": S2_FLOOR_SECONDS,
                        "S2_RATE": S2_RATE, "S3_REQUESTS": S3_REQUESTS, "S3_SECONDS": S3_SECONDS,
                        "COLD_RUNS": COLD_RUNS, "QUOTA_REQUESTS": QUOTA_REQUESTS,
                        "QUOTA_ROUNDS": QUOTA_ROUNDS, "FLEET_ENVIRONMENTS": FLEET_ENVIRONMENTS,
                        "FLEET_RATE": FLEET_RATE, "LOAD_RATES": LOAD_RATES,
                        "LOAD_SECONDS": LOAD_SECONDS, "LOAD_LATENCY_MS": LOAD_LATENCY_MS,
                        "LOAD_ENVIRONMENTS": LOAD_ENVIRONMENTS, "KINDS_SECONDS": KINDS_SECONDS,
                        "KINDS_S2_SECONDS": KINDS_S2_SECONDS, "LIMITS_SECONDS": LIMITS_SECONDS,
                        "LIMITS_ROUNDS": LIMITS_ROUNDS},
              "systems": {s.key: {"name": s.name, "floor": s.floor, "note": s.note,
                                  "scenarios": list(s.scenarios), "alongside": list(s.alongside)}
                          for s in SYSTEMS},
              "litellm_config": litellm_config(type("E", (), {"url": "http://127.0.0.1:<emulator port>"}), True),
              "litellm_config_noretry": litellm_config(type("E", (), {"url": "http://127.0.0.1:<emulator port>"}), False),
              "phases": {}}
    report["machine"] = machine()
    if os.environ.get("BENCH_STARTED"):
        report["phases"]["setup (bench/.venv)"] = round(time.time() - float(os.environ["BENCH_STARTED"]) - (time.monotonic() - started), 1)

    def phase(name, fn, *args):
        t0 = time.monotonic()
        log(f"{name} (load average {' '.join(loadavg())})")
        try:
            fn(report, *args)
        except Exception as error:
            log(f"  {name} failed: {error}")
            traceback.print_exc()
            report.setdefault("phase_errors", {})[name] = f"{type(error).__name__}: {error}"
        report["phases"][name] = round(time.monotonic() - t0, 1)

    phase("builds", builds)
    t0 = time.monotonic()
    report["machine"]["litellm"] = installed_litellm()
    if time.monotonic() - t0 >= 1:
        report["phases"]["waiting for LiteLLM's installation"] = round(time.monotonic() - t0, 1)
    if not report["builds"]["emulator"]["ok"]:
        log("the emulator did not build: nothing can be measured")
    report["load_before_measuring"] = loadavg()
    phase("cold start", coldstart)
    phase("scenario 1", scenario1)
    phase("scenario 1 under the CPU quota", scenario1_quota)
    phase("scenario 2", scenario_errors, 2, {"gpt-4o": "throttled:7", "gpt-35-turbo": "healthy"},
          "gpt-35-turbo", 100_000, S2_SECONDS, S2_FLOOR_SECONDS, S2_RATE, True)
    phase("scenario 3", scenario_errors, 3, {"gpt-4o": "503", "gpt-35-turbo": "503"},
          "gpt-4o", S3_REQUESTS, S3_SECONDS, S3_SECONDS, 0.0, False)
    phase("every kind of call", kinds)
    phase("limits", limits)
    phase("fleet", fleet)
    phase("load", load_test)
    sizes(report)
    # bench/run.sh passes when it started, so the total includes setting up its virtualenv.
    report["total_seconds"] = round(time.time() - float(os.environ.get("BENCH_STARTED") or 0)
                                    if os.environ.get("BENCH_STARTED")
                                    else time.monotonic() - started, 1)
    (BENCH / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    import report as writer  # bench/report.py

    writer.write(report)
    log(f"done in {report['total_seconds']:.0f} s: BENCHMARKS.md, bench/results.json, "
        "bench/scenario2-latency.png")


if __name__ == "__main__":
    main()
