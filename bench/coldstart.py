"""Cold start of a Lambda binary, measured against a minimal local Lambda Runtime API.

For each run: start the binary with AWS_LAMBDA_RUNTIME_API pointing at this server, record the
time from process start to its first poll of /runtime/invocation/next, hand it one invocation
(an API Gateway v2 event), record when its response arrives, then stop it and read its peak RSS.

Usage: python bench/coldstart.py BINARY [RUNS] [KEY=VALUE ...]   (extra environment for the binary)
Prints a JSON object with the medians; stdlib only. bench/harness.py imports `measure`.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

EVENT = json.loads((Path(__file__).parent.parent / "events/http-api/get-query.json").read_text())


class RuntimeApi(BaseHTTPRequestHandler):
    """The four calls a Lambda runtime makes: next, response, error, init error."""

    protocol_version = "HTTP/1.1"
    state = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        st = self.state
        if not self.path.endswith("/runtime/invocation/next"):
            self.send_error(404)
            return
        now = time.perf_counter()
        if st.get("first_poll") is None:
            st["first_poll"] = now
        if st.get("served"):
            # One invocation per run: hold the second poll until the process is stopped.
            st["idle"].set()
            time.sleep(30)
            return
        st["served"] = True
        body = json.dumps(EVENT).encode()
        self.send_response(200)
        self.send_header("Lambda-Runtime-Aws-Request-Id", "bench-request-1")
        self.send_header("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 30_000))
        self.send_header("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:123456789012:function:bench")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        st["invoked"] = time.perf_counter()

    def do_POST(self):
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
        self.state["responded"] = time.perf_counter()
        self.state["response"] = b"".join(chunks)
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()


def one_run(binary, env):
    RuntimeApi.state = {"idle": threading.Event()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), RuntimeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
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
    started = time.perf_counter()
    process = subprocess.Popen([binary], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = RuntimeApi.state["idle"].wait(timeout=20)
    peak_kib = peak_rss_kib(process.pid)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    server.shutdown()
    server.server_close()
    st = RuntimeApi.state
    if not finished or "responded" not in st:
        raise RuntimeError(f"{binary} did not complete an invocation")
    try:
        status = json.loads(st["response"]).get("statusCode")
    except (ValueError, AttributeError):
        status = None
    return {
        "status": status,
        "first_poll_ms": (st["first_poll"] - started) * 1000,
        "first_response_ms": (st["responded"] - st["invoked"]) * 1000,
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


def measure(binary, runs, env):
    """`runs` cold starts of `binary`: the median of each figure, the runs themselves, the size."""
    results = [one_run(binary, env) for _ in range(runs)]
    summary = {key: round(statistics.median(r[key] for r in results), 2)
               for key in results[0] if key != "status"}
    summary["statuses"] = sorted({r["status"] for r in results}, key=str)
    summary["runs"] = runs
    summary["binary_bytes"] = os.path.getsize(binary)
    summary["all"] = results
    return summary


def main():
    binary = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    env = dict(arg.split("=", 1) for arg in sys.argv[3:])
    try:
        summary = measure(binary, runs, env)
    except RuntimeError as error:
        raise SystemExit(str(error))
    del summary["all"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
