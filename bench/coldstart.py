"""Cold start of a Lambda binary, measured against a minimal local Lambda Runtime API.

For each run: start the binary with AWS_LAMBDA_RUNTIME_API pointing at this server, record the
time from process start to its first poll of /runtime/invocation/next, hand it one invocation
(an API Gateway v2 event, `events/http-api/get-query.json`), record when its response arrives,
then hand it the same event once more (the warm invocation, same process), record that response,
then stop it and read its peak RSS (VmHWM). Beside each wall time, the CPU time (user + system,
every thread) the process used over it: read at its first poll (before it is answered) and when
each response arrives, from /proc/<pid>/task/*/schedstat (ns; or utime + stime of
/proc/<pid>/task/*/stat, in clock ticks, where the kernel has no schedstat: `cpu_clock` says which).

`--cpu-quota QUOTA/PERIOD` (µs) runs the binary under a CFS bandwidth limit, as Lambda gives a
function a share of a vCPU in proportion to its memory (1,769 MB = 1 vCPU): 128 MB is about 7 %,
`--cpu-quota 1000/13889`. The process is put in a cgroup of its own (v2 `cpu.max` where the cgroup2
hierarchy has the cpu controller, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) between fork
and exec, so it runs under the quota from its first instruction; the cgroup is removed afterwards.
Where no such cgroup can be made, it says why on stderr and measures on a full core, with
`"cpu_quota": {"quota": null, "why": ...}` in its output. Needs write access to /sys/fs/cgroup.

Usage: python bench/coldstart.py BINARY [RUNS] [--cpu-quota QUOTA/PERIOD] [KEY=VALUE ...]
(KEY=VALUE: extra environment for the binary). Prints a JSON object with the medians, and the p90
of the time to first poll; stdlib only. bench/harness.py imports `measure` and `CpuCgroup`.

fallback-chat against an HTTPS upstream: start the emulator with `--tls-ca-out /tmp/ca.pem` (it
prints its https URL) and pass `AZURE_OPENAI_ENDPOINT=<that URL> EXTRA_CA_CERTS=/tmp/ca.pem`
(what the harness does). A binary from before `EXTRA_CA_CERTS` trusts only the system's roots:
give it a bundle of them and the test CA instead, and the directory, e.g.

    cat /etc/ssl/certs/ca-certificates.crt /tmp/ca.pem > /tmp/bundle.pem
    python3 bench/coldstart.py OLD_BINARY 20 AZURE_OPENAI_ENDPOINT=https://127.0.0.1:8443 \\
        AZURE_OPENAI_API_KEY=emulator-key CLIENT_API_KEYS=fc-example-client-key-0000 \\
        SSL_CERT_FILE=/tmp/bundle.pem SSL_CERT_DIR=/etc/ssl/certs

(the current binary ignores SSL_CERT_FILE: its roots are compiled in, plus EXTRA_CA_CERTS).
"""

import atexit
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

EVENT = json.loads((Path(__file__).parent.parent / "events/http-api/get-query.json").read_text())
# Invocations per run: the cold one, then the same event again in the same process (warm).
INVOCATIONS = 2
# Lambda at 128 MB: 128/1769 of one vCPU, as a CFS quota per period (µs).
LAMBDA_128MB = (1000, 13889)

SCHEDSTAT = Path("/proc/self/schedstat").exists()
CPU_CLOCK = "schedstat (ns)" if SCHEDSTAT else f"utime+stime (ticks of {1000 / os.sysconf('SC_CLK_TCK'):g} ms)"
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def cpu_ms(pid):
    """CPU time (user + system) of every live thread of `pid` so far, in ms; None if it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0.0
    for tid in tids:
        try:
            if SCHEDSTAT:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e6
            else:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) * TICK_MS
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


# ----------------------------------------------------------------------------------------------
# A CPU quota: a cgroup of its own


class NoCgroup(Exception):
    """No cgroup with a CPU quota can be made here; the message says why."""


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _mounts(fstype):
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == fstype:
            found.append((Path(parts[1]), parts[3].split(",")))
    return found


def _own_path(match):
    """This process's cgroup path in the hierarchy whose /proc/self/cgroup line `match`es."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if match(number, controllers.split(",")):
            return path.lstrip("/")
    return ""


def _limited_child(parent, name, settings):
    """Creates the cgroup `parent/name` and writes `settings` (file: value, in order), checking
    each reads back as written; OSError (with the cgroup removed again) where any step fails."""
    child = parent / name
    try:
        child.mkdir()
    except OSError as error:
        raise OSError(error.errno, f"cannot create it: {error.strerror}") from error
    try:
        for file, value in settings.items():
            try:
                _write(child / file, value)
            except OSError as error:
                raise OSError(error.errno, f"cannot write {value!r} to {file}: {error.strerror}") from error
            got = (child / file).read_text().split()
            if got != value.split():
                raise OSError(0, f"{file} reads {' '.join(got)!r} after writing {value!r}")
    except OSError:
        child.rmdir()
        raise
    return child


class CpuCgroup:
    """A cgroup limiting its processes to `quota_us` of CPU per `period_us`, made by make();
    enter() (a preexec_fn) moves the calling process into it; remove() deletes it."""

    serial = 0

    def __init__(self, version, path, quota_us, period_us):
        self.version, self.path = version, Path(path)
        self.quota_us, self.period_us = quota_us, period_us
        self.procs = str(self.path / "cgroup.procs")
        atexit.register(self.remove)

    @classmethod
    def make(cls, quota_us, period_us):
        """cgroup v2 where its hierarchy has the cpu controller, else v1; NoCgroup with the
        reasons of both where neither can be made."""
        cls.serial += 1
        name = f"fc-coldstart-{os.getpid()}-{cls.serial}"
        reasons = []
        for attempt in (cls._v2, cls._v1):
            try:
                return attempt(name, quota_us, period_us)
            except NoCgroup as error:
                reasons.append(str(error))
        raise NoCgroup("; ".join(reasons))

    @classmethod
    def _v2(cls, name, quota_us, period_us):
        mounts = _mounts("cgroup2")
        if not mounts:
            raise NoCgroup("cgroup v2: not mounted")
        reasons = []
        for mount, _ in mounts:
            own = mount / _own_path(lambda number, _c: number == "0")
            for parent in dict.fromkeys([own, mount]):
                try:
                    controllers = (parent / "cgroup.controllers").read_text().split()
                except OSError as error:
                    reasons.append(f"{parent}: {error.strerror}")
                    continue
                if "cpu" not in controllers:
                    reasons.append(f"{parent} has no cpu controller (controllers: "
                                   f"{' '.join(controllers) or 'none'})")
                    continue
                try:
                    if "cpu" not in (parent / "cgroup.subtree_control").read_text().split():
                        _write(parent / "cgroup.subtree_control", "+cpu")
                except OSError as error:
                    reasons.append(f"{parent}: cannot enable +cpu in cgroup.subtree_control: {error.strerror}")
                    continue
                try:
                    child = _limited_child(parent, name, {"cpu.max": f"{quota_us} {period_us}"})
                except OSError as error:
                    reasons.append(f"{parent / name}: {error.strerror}")
                    continue
                return cls("v2", child, quota_us, period_us)
        raise NoCgroup("cgroup v2: " + "; ".join(reasons))

    @classmethod
    def _v1(cls, name, quota_us, period_us):
        mounts = [(m, o) for m, o in _mounts("cgroup") if "cpu" in o]
        if not mounts:
            raise NoCgroup("cgroup v1: no hierarchy with the cpu controller mounted")
        reasons = []
        for mount, _ in mounts:
            own = mount / _own_path(lambda _n, controllers: "cpu" in controllers)
            for parent in dict.fromkeys([own, mount]):
                if not parent.is_dir():
                    continue
                try:
                    child = _limited_child(parent, name, {"cpu.cfs_period_us": str(period_us),
                                                          "cpu.cfs_quota_us": str(quota_us)})
                except OSError as error:
                    reasons.append(f"{parent / name}: {error.strerror}")
                    continue
                return cls("v1", child, quota_us, period_us)
        raise NoCgroup("cgroup v1: " + "; ".join(reasons))

    def enter(self):
        """Moves the calling process into the cgroup: a preexec_fn (between fork and exec), so
        only async-signal-safe calls."""
        fd = os.open(self.procs, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    def throttling(self):
        """cpu.stat's counters: periods, periods throttled, time throttled (ms)."""
        try:
            stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        except (OSError, ValueError):
            return {}
        if self.version == "v2":
            throttled_ms = int(stat.get("throttled_usec", 0)) / 1000
        else:
            throttled_ms = int(stat.get("throttled_time", 0)) / 1e6
        return {"periods": int(stat.get("nr_periods", 0)), "throttled_periods": int(stat.get("nr_throttled", 0)),
                "throttled_ms": round(throttled_ms, 1)}

    def describe(self):
        return {"quota": f"{self.quota_us}/{self.period_us}", "cgroup": self.version,
                "quota_us": self.quota_us, "period_us": self.period_us,
                "share_of_a_cpu": round(self.quota_us / self.period_us, 4), "path": str(self.path)}

    def remove(self):
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # a process not yet reaped


def parse_quota(text):
    quota, period = text.split("/", 1)
    return int(quota), int(period)


# ----------------------------------------------------------------------------------------------
# The Runtime API


class Run:
    """What one run's server saw."""

    def __init__(self):
        self.pid = None
        self.spawned = threading.Event()  # pid is known
        self.idle = threading.Event()  # every invocation answered (or an init error)
        self.stop = threading.Event()  # the process is stopped: let held polls go
        self.polls = []  # (time, cpu ms) of each /next
        self.invoked = {}  # request id -> time its event was sent
        self.responses = {}  # request id -> (time, cpu ms, body, "response" or "error")
        self.init_error = None


class RuntimeApi(BaseHTTPRequestHandler):
    """The four calls a Lambda runtime makes: next, response, error, init error."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: with Nagle's algorithm on, the body of an answer on
    # a kept-alive connection (the warm invocation's) would wait for the delayed ACK (40 ms).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        run = self.server.run
        if not self.path.endswith("/runtime/invocation/next"):
            self.send_error(404)
            return
        now = time.perf_counter()
        run.spawned.wait(5)
        run.polls.append((now, cpu_ms(run.pid)))
        n = len(run.polls)
        if n > INVOCATIONS:
            # Every invocation served: hold this poll until the process is stopped.
            run.idle.set()
            run.stop.wait(60)
            return
        body = json.dumps(EVENT).encode()
        request_id = f"bench-request-{n}"
        self.send_response(200)
        self.send_header("Lambda-Runtime-Aws-Request-Id", request_id)
        self.send_header("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 30_000))
        self.send_header("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:123456789012:function:bench")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        run.invoked[request_id] = time.perf_counter()

    def do_POST(self):
        run = self.server.run
        length = int(self.headers.get("Content-Length") or 0)
        chunks = []
        if length:
            chunks.append(self.rfile.read(length))
        elif self.headers.get("Transfer-Encoding") == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        now = time.perf_counter()
        cpu = cpu_ms(run.pid)
        parts = self.path.rstrip("/").split("/")
        if parts[-2:] == ["init", "error"]:
            run.init_error = b"".join(chunks).decode(errors="replace")[:300]
            run.idle.set()
        elif len(parts) >= 2 and parts[-1] in ("response", "error"):
            run.responses[parts[-2]] = (now, cpu, b"".join(chunks), parts[-1])
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _status(body, kind):
    if kind == "error":
        return "error"
    try:
        return json.loads(body).get("statusCode")
    except (ValueError, AttributeError):
        return None


def _tail(path, lines=3):
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line[:300] for line in text[-lines:])


def one_run(binary, env, cgroup=None, output=os.devnull):
    run = Run()
    server = ThreadingHTTPServer(("127.0.0.1", 0), RuntimeApi)
    server.run = run
    # A short poll interval: shutdown() waits for serve_forever to look (0.5 s by default).
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    port = server.server_address[1]
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{port}",
        "AWS_LAMBDA_FUNCTION_NAME": "bench",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/bench",
        "AWS_LAMBDA_LOG_STREAM_NAME": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_LAMBDA_LOG_FORMAT": "JSON",
        **env,
    }
    # A preexec_fn in both conditions, so the process is started the same way (fork + exec;
    # without one, subprocess may use vfork) with and without a quota.
    preexec = cgroup.enter if cgroup else (lambda: None)
    with open(output, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen([binary], env=full_env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, preexec_fn=preexec)
        run.pid = process.pid
        run.spawned.set()
        try:
            finished = run.idle.wait(timeout=60 if cgroup else 20)
            peak_kib = peak_rss_kib(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            run.stop.set()
            server.shutdown()
            server.server_close()
    ids = [f"bench-request-{n}" for n in range(1, INVOCATIONS + 1)]
    if not finished or run.init_error or any(i not in run.responses for i in ids):
        why = f"init error {run.init_error}" if run.init_error else (
            f"answered {len(run.responses)} of {INVOCATIONS} invocations"
            f"{'' if run.polls else ' (never polled)'}, exit {process.returncode}")
        tail = _tail(output) if output != os.devnull else ""
        raise RuntimeError(f"{binary} did not complete its invocations: {why}"
                           + (f"; its last output: {tail}" if tail else ""))
    (poll_t, poll_cpu), (warm_poll_t, warm_poll_cpu) = run.polls[0], run.polls[1]
    cold_t, cold_cpu, cold_body, cold_kind = run.responses[ids[0]]
    warm_t, warm_cpu, warm_body, warm_kind = run.responses[ids[1]]

    def delta(a, b):
        return None if a is None or b is None else b - a

    return {
        "status": _status(cold_body, cold_kind),
        "warm_status": _status(warm_body, warm_kind),
        "first_poll_ms": (poll_t - started) * 1000,
        "cpu_to_first_poll_ms": poll_cpu,
        "first_response_ms": (cold_t - run.invoked[ids[0]]) * 1000,
        "cpu_first_invocation_ms": delta(poll_cpu, cold_cpu),
        "warm_response_ms": (warm_t - run.invoked[ids[1]]) * 1000,
        "cpu_warm_invocation_ms": delta(warm_poll_cpu, warm_cpu),
        "peak_rss_kib": peak_kib,
    }


def peak_rss_kib(pid):
    """The process's high-water mark of resident memory (VmHWM), while it is still alive."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def percentile(values, q):
    xs = sorted(values)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


FIGURES = ("first_poll_ms", "cpu_to_first_poll_ms", "first_response_ms", "cpu_first_invocation_ms",
           "warm_response_ms", "cpu_warm_invocation_ms", "peak_rss_kib")


def summarize(binary, results):
    """The median of each figure over `results` (runs of `binary`), the p90 of the time to first
    poll, the statuses, the binary's size, and the runs themselves."""
    summary = {}
    for key in FIGURES:
        values = [r[key] for r in results if r[key] is not None]
        summary[key] = round(statistics.median(values), 2) if values else None
    summary["first_poll_p90_ms"] = round(percentile([r["first_poll_ms"] for r in results], 0.9), 2)
    summary["statuses"] = sorted({r["status"] for r in results}, key=str)
    summary["warm_statuses"] = sorted({r["warm_status"] for r in results}, key=str)
    summary["runs"] = len(results)
    summary["binary_bytes"] = os.path.getsize(binary)
    summary["cpu_clock"] = CPU_CLOCK
    summary["all"] = results
    return summary


def measure(binary, runs, env, cgroup=None):
    """`runs` cold starts of `binary` (in `cgroup`, a CpuCgroup, if given): see `summarize`, and
    what the quota did meanwhile."""
    return measure_interleaved([("only", binary, env)], runs, cgroup)["only"]


def measure_interleaved(cells, runs, cgroup=None):
    """`runs` cold starts of each (key, binary, env) in `cells`, taken in turns (one of each, then
    again), so a machine whose speed drifts (a shared host) weighs on every cell alike; a summary
    per key. With a cgroup, what its quota did over all of them is in each summary's `cpu_quota`
    (the same figures: the cells shared the time)."""
    before = cgroup.throttling() if cgroup else None
    with tempfile.NamedTemporaryFile(prefix="coldstart-", suffix=".log", delete=False) as log:
        output = log.name
    results = {key: [] for key, _, _ in cells}
    try:
        for _ in range(runs):
            for key, binary, env in cells:
                results[key].append(one_run(binary, env, cgroup, output))
    finally:
        os.unlink(output)
    summaries = {key: summarize(binary, results[key]) for key, binary, _ in cells}
    if cgroup:
        after = cgroup.throttling()
        quota = dict(cgroup.describe(), **{k: round(after[k] - before.get(k, 0), 1) for k in after},
                     shared_by=len(cells))
        for summary in summaries.values():
            summary["cpu_quota"] = quota
    return summaries


def main():
    args = sys.argv[1:]
    quota = None
    for i, arg in enumerate(args):
        if arg == "--cpu-quota" and i + 1 < len(args):
            quota = args[i + 1]
            del args[i:i + 2]
            break
        if arg.startswith("--cpu-quota="):
            quota = arg.split("=", 1)[1]
            del args[i]
            break
    if not args or args[0].startswith("-"):
        raise SystemExit("usage: python bench/coldstart.py BINARY [RUNS] [--cpu-quota QUOTA/PERIOD] [KEY=VALUE ...]")
    binary = args.pop(0)
    runs = int(args.pop(0)) if args and args[0].isdigit() else 20
    env = dict(arg.split("=", 1) for arg in args)
    cgroup, fallback = None, None
    if quota:
        try:
            cgroup = CpuCgroup.make(*parse_quota(quota))
        except NoCgroup as error:
            fallback = {"quota": None, "why": str(error)}
            print(f"coldstart: no CPU quota, measuring on a full core: {error}", file=sys.stderr)
    try:
        summary = measure(binary, runs, env, cgroup)
    except RuntimeError as error:
        raise SystemExit(str(error))
    finally:
        if cgroup:
            cgroup.remove()
    del summary["all"]
    if fallback:
        summary["cpu_quota"] = fallback
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
