"""`make soak`: thousands of requests through `cargo lambda watch --concurrency 4` while every
deployment of the local Azure OpenAI emulator switches at random (seeded, `chaos:<seed>`) between
healthy, 429 with Retry-After, 500, 503, resets, hangs, cut, stalled and unfinished streams,
malformed events and content filters. A program that prints numbers, not a test; it exits 1 when a
promise that must hold without exception did not (no truncated success, no request past its
deadline, no transport error, no unclean error). Writes bench/soak.json and bench/soak.md
(included in BENCHMARKS.md by bench/report.py).

Each mode (buffered, as behind API Gateway; streaming, as behind a Function URL with
RESPONSE_STREAM) gets a fresh emulator with the same seeds, so both meet the same schedule of
faults, and its own `cargo lambda watch` (plain, debug: what `make run` starts). The requests are
a mix, in turn: `GET /?query=`, `POST /v1/chat/completions` buffered and streamed, and
`POST /v1/responses` (stateless: `store: false`) buffered and streamed. Every answer is checked
whole: the emulator answers `[<deployment>] You said: <the question>`, so a 200 whose
text is anything else (a cut stream passed off as complete, a continuation that lost or repeated
words) is a truncated success.

Knobs (environment): SOAK_REQUESTS per mode (10000), SOAK_CONCURRENCY requests in flight (4, one
per execution environment), SOAK_SEED (1), SOAK_HEALTHY percent of each deployment's time (50),
SOAK_MODES (buffered,streaming).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (process groups, the emulator, ports)
from coldstart import percentile  # noqa: E402

ROOT = harness.ROOT
BENCH = harness.BENCH
LOGS = harness.LOGS

REQUESTS = harness.knob("SOAK_REQUESTS", 10_000, int)
CONCURRENCY = harness.knob("SOAK_CONCURRENCY", 4, int)
SEED = harness.knob("SOAK_SEED", 1, int)
HEALTHY = harness.knob("SOAK_HEALTHY", 50, int)
MODES = [m for m in os.environ.get("SOAK_MODES", "buffered,streaming").split(",") if m]
DEPLOYMENTS = ("gpt-4o", "gpt-35-turbo", "gpt-4o-mini")
# Short budgets, so that a hang costs a second and a half rather than ten: the promises are the
# same at any setting, and 10,000 requests fit in minutes.
FUNCTION_SETTINGS = {
    "REQUEST_TIMEOUT_MS": 4000,
    "ATTEMPT_TIMEOUT_MS": 1500,
    "FIRST_TOKEN_TIMEOUT_MS": 1000,
    "STREAM_IDLE_TIMEOUT_MS": 800,
}
DEADLINE_S = FUNCTION_SETTINGS["REQUEST_TIMEOUT_MS"] / 1000
# What cargo-lambda's invoke proxy and this client add on loopback, beyond the function's
# deadline, before a request counts as late (measured: a few milliseconds; this is generous).
SLACK_S = 0.25
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
KINDS = ("get", "chat", "chat-stream", "responses", "responses-stream")


def question(i):
    # Unique per request, long enough for a stream to be cut mid-answer (a chunk per word).
    return f"soak {i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(10))


def whole(text, q):
    match = re.fullmatch(r"\[([\w.-]+)\] You said: (.*)", text or "", re.S)
    return bool(match) and match.group(1) in DEPLOYMENTS and match.group(2) == q


def classify_json(kind, status, body, q):
    """(outcome, detail) of a non-streamed answer."""
    if status == 200:
        if kind == "get":
            text, finish = body.get("chat_completion"), "stop"
        elif kind.startswith("responses"):
            output = (body.get("output") or [{}])[0]
            text = ((output.get("content") or [{}])[0]).get("text")
            finish = "stop" if body.get("status") == "completed" else body.get("status")
        else:
            choice = (body.get("choices") or [{}])[0]
            text, finish = (choice.get("message") or {}).get("content"), choice.get("finish_reason")
        if finish == "content_filter":
            return "filtered", "finish_reason content_filter"
        return ("answered", "") if whole(text, q) else ("truncated", f"{finish}: {text!r}")
    error = body.get("error")
    if status == 400 and (body.get("code") in ("content_filter", "content_policy_violation")
                          or isinstance(error, dict) and error.get("code") == "content_filter"):
        return "filtered", "400 content_filter"
    if status in (429, 503, 504) and error:
        return "unavailable", str(status)
    return "unclean", f"{status}: {json.dumps(body)[:200]}"


def classify_responses_stream(status, text, q):
    """(outcome, detail) of a streamed response, read as the OpenAI SDK reads one: its deltas,
    and `response.completed` (which carries the whole text) or an `error` event as its end."""
    if status != 200:
        try:
            return classify_json("responses", status, json.loads(text), q)
        except ValueError:
            return "unclean", f"{status}: {text[:200]!r}"
    deltas, completed, error = [], None, None
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[5:].strip())
        except ValueError:
            return "unclean", f"malformed event passed on: {line[:120]!r}"
        kind = event.get("type")
        if error is not None or completed is not None:
            return "unclean", f"{kind} after the stream's end"
        if kind == "response.output_text.delta":
            deltas.append(event.get("delta") or "")
        elif kind == "response.completed":
            completed = event.get("response") or {}
        elif kind in ("error", "response.failed"):
            error = event
    answer = "".join(deltas)
    if error is not None:
        return "interrupted", str(error.get("code", "?"))
    if completed is None:
        return "truncated", f"ended without response.completed or an error event: {answer!r}"
    final = ((completed.get("output") or [{}])[0].get("content") or [{}])[0].get("text")
    if not whole(answer, q) or final != answer:
        return "truncated", f"deltas {answer!r}, final text {final!r}"
    return "answered", ""


def classify_stream(status, text, q):
    """(outcome, detail) of a streamed answer, read as an OpenAI SDK reads it."""
    if status != 200:
        try:
            return classify_json("chat", status, json.loads(text), q)
        except ValueError:
            return "unclean", f"{status}: {text[:200]!r}"
    content, finish, done, error = [], None, False, None
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            return "unclean", f"malformed event passed on: {data[:120]!r}"
        if "error" in event:
            error = event["error"]
            continue
        for choice in event.get("choices") or []:
            content.append((choice.get("delta") or {}).get("content") or "")
            finish = choice.get("finish_reason") or finish
    answer = "".join(content)
    if error is not None:
        # An error event ends the stream (the SDK raises it); [DONE] after it would be a lie.
        return ("interrupted", error.get("code", "?")) if not done else ("unclean", "error then [DONE]")
    if not done:
        return "truncated", f"ended without [DONE] or an error event: {answer!r}"
    if finish == "content_filter":
        return "filtered", "finish_reason content_filter"
    if finish != "stop" or not whole(answer, q):
        return "truncated", f"{finish}: {answer!r}"
    return "answered", ""


async def one(client, base, i):
    kind = KINDS[i % len(KINDS)]
    q = question(i)
    headers = {"authorization": f"Bearer {harness.CLIENT_KEY}"}
    t0 = time.perf_counter()
    try:
        if kind == "get":
            response = await client.get(f"{base}/", params={"query": q}, headers=headers)
        elif kind.startswith("responses"):
            # Stateless (the whole history in the request): free to fail over and be continued.
            body = {"model": "gpt-4o", "input": q, "store": False,
                    "stream": kind == "responses-stream"}
            response = await client.post(f"{base}/v1/responses", json=body, headers=headers)
        else:
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": q}],
                    "stream": kind == "chat-stream"}
            response = await client.post(f"{base}/v1/chat/completions", json=body, headers=headers)
        raw = await response.aread()
        seconds = time.perf_counter() - t0
    except httpx.HTTPError as error:
        return {"kind": kind, "outcome": "transport", "detail": f"{type(error).__name__}: {error}",
                "s": time.perf_counter() - t0}
    text = raw.decode(errors="replace")
    if kind == "chat-stream":
        outcome, detail = classify_stream(response.status_code, text, q)
    elif kind == "responses-stream":
        outcome, detail = classify_responses_stream(response.status_code, text, q)
    else:
        try:
            outcome, detail = classify_json(kind, response.status_code, json.loads(text), q)
        except (ValueError, AttributeError):
            outcome, detail = "unclean", f"{response.status_code}: not JSON: {text[:200]!r}"
    attempts = response.headers.get("x-fallback-attempts")
    return {"kind": kind, "outcome": outcome, "detail": detail, "s": seconds,
            "status": response.status_code, "attempts": int(attempts) if attempts else None}


async def drive(base, count, on_progress):
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    # The client waits well past the deadline, so a late answer is measured, not cut off.
    timeout = httpx.Timeout(DEADLINE_S + 10)
    results = []
    counter = iter(range(count))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        async def worker():
            for i in counter:
                results.append(await one(client, base, i))
                on_progress(len(results))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def rss_kib(pid, field="VmRSS"):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def functions(proc):
    return [p for p in proc.group() if harness.comm(p) == "fallback-chat"]


def soak(mode):
    tag = f"soak-{mode}"
    behaviors = {d: f"chaos:{SEED + n}:{HEALTHY}" for n, d in enumerate(DEPLOYMENTS)}
    # Streamed answers a word every 20 ms, so that a stall or a cut lands mid-answer.
    emulator = harness.Emulator(tag, behaviors, binary=harness.TARGET / "debug/azure-openai-emulator",
                                extra=["--chunk-delay-ms", 20])
    env_file = LOGS / f"{tag}.env"
    settings = dict(harness.function_env(emulator), AZURE_OPENAI_DEPLOYMENTS=",".join(DEPLOYMENTS),
                    RESPONSE_MODE=mode, **{k: str(v) for k, v in FUNCTION_SETTINGS.items()})
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    port = harness.free_port()
    env = dict(os.environ, PATH=f"{harness.VENV_BIN}:{os.environ.get('PATH', '')}")
    argv = ["cargo", "lambda", "watch", "--ignore-changes", "--invoke-address", "127.0.0.1",
            "--invoke-port", port, "--env-file", env_file, "--concurrency", CONCURRENCY]
    watch = harness.Proc(tag, argv, env=env, limit=3600)
    base = f"http://127.0.0.1:{port}"
    try:
        harness.wait_until(lambda: harness.http_status(f"{base}/", timeout=30) is not None, 600,
                           watch, "cargo lambda watch")
        # Warm every environment (the first request to each starts it) before the measured run.
        asyncio.run(drive(base, CONCURRENCY * 3, lambda n: None))
        start_rss = {p: rss_kib(p) for p in functions(watch)}
        mark = emulator.mark()
        t0 = time.monotonic()
        last = [t0]

        def progress(n):
            now = time.monotonic()
            if now - last[0] >= 15:
                last[0] = now
                harness.log(f"{mode}: {n}/{REQUESTS} requests, {now - t0:.0f} s")

        results = asyncio.run(drive(base, REQUESTS, progress))
        elapsed = time.monotonic() - t0
        envs = functions(watch)
        end_rss = {p: rss_kib(p) for p in envs}
        peak_rss = {p: rss_kib(p, "VmHWM") for p in envs}
        calls = sum(emulator.calls_since(mark).values())
        # The chaos schedule logs each call's behaviour as "kind:detail".
        behaviours = emulator.count_since(mark, "behavior", lambda v: v.split(":", 1)[0])
    finally:
        watch.stop()
        emulator.stop()
    return summarize(mode, results, elapsed, calls, behaviours, start_rss, end_rss, peak_rss)


def summarize(mode, results, elapsed, calls, behaviours, start_rss, end_rss, peak_rss):
    outcomes = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    latencies = sorted(r["s"] for r in results)
    late = [r for r in results if r["s"] > DEADLINE_S + SLACK_S]
    bad = [r for r in results if r["outcome"] in ("truncated", "unclean", "transport")]
    answered = outcomes.get("answered", 0)
    by_kind = {}
    for r in results:
        k = by_kind.setdefault(r["kind"], {"requests": 0, "answered": 0})
        k["requests"] += 1
        k["answered"] += r["outcome"] == "answered"
    envs = []
    for pid in sorted(set(start_rss) | set(end_rss)):
        envs.append({"pid": pid, "start_kib": start_rss.get(pid), "end_kib": end_rss.get(pid),
                     "peak_kib": peak_rss.get(pid)})
    return {
        "mode": mode,
        "requests": len(results),
        "seconds": round(elapsed, 1),
        "outcomes": outcomes,
        "by_kind": by_kind,
        "answered": answered,
        "clean_errors": sum(outcomes.get(o, 0) for o in ("unavailable", "filtered", "interrupted")),
        "truncated": outcomes.get("truncated", 0),
        "unclean": outcomes.get("unclean", 0),
        "transport": outcomes.get("transport", 0),
        "past_deadline": len(late),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1) if latencies else None,
        "upstream_calls": calls,
        "calls_per_answer": round(calls / answered, 2) if answered else None,
        "behaviours": behaviours,
        "environments": envs,
        "examples": [{k: r[k] for k in ("kind", "outcome", "detail", "s") if k in r}
                     for r in (bad + late)[:10]],
    }


def markdown(report):
    runs = report["runs"]
    cols = " | ".join(r["mode"] for r in runs)
    lines = [
        "## Soak with faults (`make soak`)",
        "",
        f"{report['requests_per_mode']:,} requests per mode through `cargo lambda watch "
        f"--concurrency {report['concurrency']}` (debug build, {report['concurrency']} in flight), "
        f"in turn `GET /?query=`, `/v1/chat/completions` and `/v1/responses` (`store: false`), each "
        f"buffered and streamed, while each of "
        f"{len(DEPLOYMENTS)} deployments switches at random (seed {report['seed']}, healthy "
        f"{report['healthy_percent']}% of the time, phases of 0.5 to 3 s) between healthy, 429 with "
        "Retry-After, 500, 503, resets, hangs, cut, stalled and unfinished streams, malformed "
        "events and content filters. Budgets: "
        + ", ".join(f"`{k}={v}`" for k, v in FUNCTION_SETTINGS.items())
        + f". Measured {report['date']} on this machine ({report['machine']}).",
        "",
        f"| | {cols} |",
        "|---|" + "---:|" * len(runs),
    ]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in runs) + " |")

    row("requests", lambda r: f"{r['requests']:,} in {r['seconds']:.0f} s")
    row("answered whole", lambda r: f"{r['answered']:,} ({100 * r['answered'] / r['requests']:.1f}%)")
    row("clean errors: all unavailable (503)", lambda r: f"{r['outcomes'].get('unavailable', 0):,}")
    row("clean errors: refused by a content filter", lambda r: f"{r['outcomes'].get('filtered', 0):,}")
    row("clean errors: stream ended with an error event", lambda r: f"{r['outcomes'].get('interrupted', 0):,}")
    row("**truncated successes** (must be 0)", lambda r: f"**{r['truncated']}**")
    row("**past the deadline** (must be 0)", lambda r: f"**{r['past_deadline']}**")
    row("unclean errors, transport errors (must be 0)", lambda r: f"{r['unclean']}, {r['transport']}")
    row("latency p50 / p99 / max", lambda r: f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} / {r['max_ms']:.0f} ms")
    row("upstream calls per answer", lambda r: f"{r['calls_per_answer']}")
    row("RSS per environment, start → end (peak)", lambda r: "<br>".join(
        f"{(e['start_kib'] or 0) / 1024:.1f} → {(e['end_kib'] or 0) / 1024:.1f} MiB "
        f"({(e['peak_kib'] or 0) / 1024:.1f})" for e in r["environments"]))
    lines += [
        "",
        "What the deployments did (upstream calls by the behaviour in force): "
        + "; ".join(f"{r['mode']}: " + ", ".join(f"{k} {v:,}" for k, v in r["behaviours"].items())
                    for r in runs) + ".",
        "",
        f"A request past the deadline is one that took longer than `REQUEST_TIMEOUT_MS` plus "
        f"{SLACK_S * 1000:.0f} ms (cargo-lambda's proxy and the client on loopback). Every 200 is "
        "checked against the whole answer the emulator gives (`[<deployment>] You said: "
        "<question>`), continuations of cut streams included.",
        "",
    ]
    return "\n".join(lines)


def main():
    LOGS.mkdir(exist_ok=True)
    harness.log("building the function and the emulator (debug, as cargo lambda watch does)")
    subprocess.run(["cargo", "build", "-q", "-p", "azure-openai-emulator", "-p", "fallback-chat"],
                   cwd=ROOT, check=True)
    runs = []
    for mode in MODES:
        harness.log(f"soak: {mode}, {REQUESTS} requests")
        runs.append(soak(mode))
        r = runs[-1]
        harness.log(f"{mode}: {json.dumps({k: v for k, v in r.items() if k not in ('environments', 'examples')})}")
        for example in r["examples"]:
            harness.log(f"  {example}")
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores",
        "requests_per_mode": REQUESTS,
        "concurrency": CONCURRENCY,
        "seed": SEED,
        "healthy_percent": HEALTHY,
        "runs": runs,
    }
    (BENCH / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (BENCH / "soak.md").write_text(markdown(report))
    print(markdown(report))
    broken = [(r["mode"], k) for r in runs
              for k in ("truncated", "past_deadline", "unclean", "transport") if r[k]]
    if broken:
        print(f"soak: promises broken: {broken}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
