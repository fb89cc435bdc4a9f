"""The cold start of binaries from an earlier commit, measured exactly as `make bench` measures
the current ones (bench/coldstart.py, the same emulator, each cell in turns), written to
bench/baseline-coldstart.json, which bench/report.py shows beside the current figures.

Usage (build the earlier commit's release binaries first, e.g. in a git worktree):
    bench/.venv/bin/python bench/baseline.py COMMIT FALLBACK_CHAT HELLO

Over HTTPS a binary from before EXTRA_CA_CERTS trusted only the system's store: it is given that
store plus the emulator's test CA as SSL_CERT_FILE, and SSL_CERT_DIR, so it does the start-up work
it did on Lambda and still trusts the emulator.
"""

import json
import os
import sys
from pathlib import Path

import coldstart as cs
import harness
from harness import COLD_RUNS, DEPLOYMENTS, LOGS, Emulator, function_env

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def main():
    commit, fallback_chat, hello = sys.argv[1:4]
    LOGS.mkdir(parents=True, exist_ok=True)
    quota_us, period_us = cs.LAMBDA_128MB
    cgroup = cs.CpuCgroup.make(quota_us, period_us)
    out = {"commit": commit, "runs": COLD_RUNS, "full": {}, "quota": {}, "cpu_quota": cgroup.describe(),
           "binary_bytes": {"fallback-chat": os.path.getsize(fallback_chat), "hello": os.path.getsize(hello)}}
    healthy = {d: "healthy" for d in DEPLOYMENTS}
    http = Emulator("baseline", healthy)
    https = Emulator("baseline-https", healthy, tls_ca_out=LOGS / "baseline-ca.pem")
    bundle = LOGS / "baseline-bundle.pem"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + https.ca_path.read_bytes())
    try:
        def env(emulator, tls):
            values = function_env(emulator)
            values["CLIENT_API_KEYS"] = "fc-example-client-key-0000"  # the key events/ carry
            if tls:
                values.update(SSL_CERT_FILE=str(bundle), SSL_CERT_DIR=str(SYSTEM_BUNDLE.parent))
            return values

        cells = [("fallback-chat", fallback_chat, env(http, False)),
                 ("fallback-chat-https", fallback_chat, env(https, True)),
                 ("hello", hello, {})]
        for condition, group in (("full", None), ("quota", cgroup)):
            for key, result in cs.measure_interleaved(cells, COLD_RUNS, group).items():
                result.pop("all")
                out[condition][key] = result
    finally:
        http.stop()
        https.stop()
        cgroup.remove()
    (harness.BENCH / "baseline-coldstart.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
