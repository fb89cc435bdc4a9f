"""Writes BENCHMARKS.md and bench/scenario2-latency.png from the harness's results.

`python bench/report.py` rewrites both from bench/results.json without measuring again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CHART = BENCH / "scenario2-latency.png"


def ms(value):
    if value is None:
        return "–"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def added(value, floor):
    if value is None or floor is None:
        return "–"
    diff = value - floor
    return ("+" if diff >= 0 else "−") + ms(abs(diff))


def ratio(value, floor):
    if value is None or not floor:
        return "–"
    r = value / floor
    return f"×{r:.0f}" if r >= 100 else f"×{r:.1f}" if r >= 10 else f"×{r:.2f}"


def mib(kib):
    return "–" if not kib else f"{kib / 1024:.1f} MiB"


def size(b):
    return "–" if not b else f"{b / 1024 / 1024:.2f} MiB"


def statuses(row):
    return ", ".join(f"{n}× {'error' if s == '0' else s}" for s, n in sorted(row["statuses"].items()))


def name(report, key):
    return report["systems"][key]["name"]


def reasons(report, key, where):
    """Why a system has no figures for `where` ("scenario 2"), from the run's failures, or ""."""
    return "; ".join(f.split(": ", 1)[1] for f in report.get("failures", {}).get(key, [])
                     if f.startswith(where))


def failed_row(report, key, where, columns):
    return (f"| {name(report, key)} | " + " | ".join(["–"] * (columns - 2))
            + f" | failed: {reasons(report, key, where) or 'not run'} |")


def vs_floor(row, floor_row):
    """The p50 and p99 ratio cells of a row to its floor's ("(floor)" for a floor itself)."""
    if floor_row is None:
        return ["(floor)", ""]
    return [ratio(row["p50"], floor_row["p50"]), ratio(row["p99"], floor_row["p99"])]


def scenario_rows(report, number, columns, cells):
    """The table rows of scenario `number`, one per system that runs it: its name, then
    cells(row, floor_row); a system with no result gets a failed row with the reasons."""
    by = {r["system"]: r for r in report.get(f"s{number}", [])}
    rows = []
    for key, s in report["systems"].items():
        if number not in s["scenarios"]:
            continue
        r = by.get(key)
        if r is None:
            rows.append(failed_row(report, key, f"scenario {number}", columns))
            continue
        f = by.get(s["floor"]) if s["floor"] else None
        rows.append(f"| {s['name']} | " + " | ".join(cells(r, f)) + " |")
    return rows


def chart(report):
    series = report.get("series", {})
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["system"]: r for r in report.get("s2", [])}
    keys = [k for k in report["systems"] if k in series and series[k]]
    fig, (over_time, bars) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    for key in keys:
        points = series[key]
        over_time.scatter([p[0] for p in points], [p[1] for p in points], s=6 if len(points) > 50 else 30,
                          label=f"{name(report, key)} ({len(points)})")
    over_time.set_yscale("log")
    over_time.set_axisbelow(True)
    over_time.set_xlabel("seconds since the first request")
    over_time.set_ylabel("latency (ms, log scale)")
    over_time.set_title("Each request over time")
    over_time.grid(True, which="both", alpha=0.3)
    # Below the plot: wherever it sits inside, some run's points would be under it.
    over_time.legend(fontsize=7, markerscale=2, title="system (requests)", title_fontsize=7,
                     loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)

    keys = keys[::-1]  # first system on top
    labels = [name(report, k) for k in keys]
    p50 = [rows.get(k, {}).get("p50") or 0 for k in keys]
    p99 = [rows.get(k, {}).get("p99") or 0 for k in keys]
    y = range(len(keys))
    bars.barh([i + 0.2 for i in y], p50, height=0.4, label="p50")
    bars.barh([i - 0.2 for i in y], p99, height=0.4, label="p99")
    for i, (a, b) in enumerate(zip(p50, p99)):
        bars.text(a * 1.08, i + 0.2, ms(a) + ("" if a >= 1000 else " ms"), va="center", fontsize=7)
        bars.text(b * 1.08, i - 0.2, ms(b) + ("" if b >= 1000 else " ms"), va="center", fontsize=7)
    bars.set_xscale("log")
    bars.set_xlim(right=max(p99 + p50 + [1]) * 12)
    bars.set_yticks(list(y))
    bars.set_yticklabels(labels, fontsize=8)
    bars.set_xlabel("latency (ms, log scale)")
    bars.set_title("p50 and p99")
    bars.legend(fontsize=8, loc="lower right")
    bars.grid(True, axis="x", which="both", alpha=0.3)
    fig.suptitle("Scenario 2: gpt-4o answers 429 with Retry-After: 7 s, gpt-35-turbo is healthy "
                 f"(one request at a time, at most {report['knobs']['S2_RATE']:.0f}/s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(CHART, dpi=110)
    plt.close(fig)
    return True


def cpu(row):
    value = row.get("gateway_cpu_s")
    return "–" if value is None else f"{value:.2f}"


def alongside_note(report, number):
    """The sentence saying which rows ran alongside the others (bench/harness.py,
    scenario_errors) and the CPU they used meanwhile, or None."""
    rows = {r["system"]: r for r in report.get(f"s{number}", [])}
    parts = [f"*{s['name']}* ({cpu(rows[k])} s of CPU over its row)"
             for k, s in report["systems"].items()
             if number in s.get("alongside", ()) and k in rows]
    if not parts:
        return None
    return ("Rows run one after another, except " + ", ".join(parts) + ": its requests spend "
            "seconds asleep in the gateway's own retry back-off, so its row runs alongside the "
            "others' to save time. *Gateway CPU* is the user and system time of the gateway's "
            "processes over its row (for `cargo lambda watch`, cargo-lambda's and the function's).")


def quota_section(report, w):
    q = report.get("s1_quota")
    if not q:
        return
    w("### Scenario 1 at Lambda's 128 MB CPU share")
    w("")
    if q.get("error"):
        w(f"Not measured: {q['error']}.")
        w("")
        return
    c = q["cpu_quota"]
    t = q.get("throttling", {})
    w(f"The in-process driver alone in a cgroup ({c['cgroup']}) with a CPU quota of {c['quota_us']} µs "
      f"per {c['period_us']} µs ({c['share_of_a_cpu'] * 100:.1f} % of one CPU, as Lambda gives 128 MB), "
      "the emulator outside it answering at once: direct calls and the real handler in turns, "
      f"{q['rounds']} turns of {q['requests']} requests each, one at a time. Under a quota most "
      "requests fit in the slice the process is running in and the rest wait for the next period, "
      "so the mean, not the median, is what a user sees on average; the CPU time per request is the "
      "process's whole CPU time (start-up included) over its requests"
      + (f"; {t['throttled_periods']} of {t['periods']} periods were throttled." if t.get("periods") else "."))
    w("")
    w("| System | n | mean ms | p50 ms | p90 ms | p99 ms | CPU per request |")
    w("|---|---|---|---|---|---|---|")
    rows = q["rows"]
    for mode, label in (("direct", "direct (Rust client)"), ("app", "fallback-chat, in-process")):
        r = rows.get(mode)
        if not r or r.get("mean") is None:
            w(f"| {label} | – | – | – | – | – | – |")
            continue
        w(f"| {label} | {r['answered']} | {ms(r['mean'])} | {ms(r['p50'])} | {ms(r['p90'])} | {ms(r['p99'])} | "
          f"{r['cpu_us_per_request']:.0f} µs |")
    d, a = rows.get("direct"), rows.get("app")
    if d and a and d.get("mean") is not None and a.get("mean") is not None:
        w("")
        w(f"The handler adds {(a['mean'] - d['mean']) * 1000:.0f} µs to the mean and "
          f"{a['cpu_us_per_request'] - d['cpu_us_per_request']:.0f} µs of CPU per request at this share.")
    w("")


def section(report, w, phase, title, logs):
    """A section's heading, and its phase's results, or None after saying why it did not run."""
    w(f"## {title}")
    w("")
    results = report.get(phase)
    if not results:
        w(f"Not run: {report.get('phase_errors', {}).get(phase, f'see {logs}')}")
        w("")
    return results


def kinds_section(report, w):
    """Scenarios 1 and 2 for every kind of call, in-process against direct calls."""
    rows = section(report, w, "kinds", "Every kind of call: chat completions, the Responses API, embeddings",
                   "bench/logs/inprocess-kinds-*.log")
    if not rows:
        return
    k = report["knobs"]
    w("bench/inprocess drives the real handler with `POST /v1/chat/completions`, `POST /v1/responses` "
      "(`store: false`) and `POST /v1/embeddings` (two inputs), and makes the same calls straight to the "
      "emulator's deployment (the floor: `/openai/v1/responses`, `/openai/deployments/{d}/embeddings`). "
      f"Scenario 1: both deployments healthy, answering at once, 8 in flight for {k.get('KINDS_SECONDS', 4):.0f} s "
      f"after {k['S1_WARMUP']} warm-up requests. Scenario 2: the primary answers `429` with `Retry-After: 7`, one "
      f"request at a time at most {k['S2_RATE']:.0f} a second for {k.get('KINDS_S2_SECONDS', 10):.0f} s; the floor "
      "is direct calls to the healthy fallback. Upstream calls per answer counts every call the emulator saw.")
    w("")
    w("| Call | Scenario | n | direct p50 ms | direct p99 ms | in-process p50 ms | in-process p99 ms | added p50 | added p99 | calls per answer |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for operation in ("chat", "responses", "embeddings"):
        for number in (1, 2):
            by = {r["mode"]: r for r in rows if r["operation"] == operation and r["scenario"] == number}
            d, a = by.get("direct"), by.get("app")
            if not (d and a):
                w(f"| {operation} | {number} | – | – | – | – | – | – | – | not run |")
                continue
            bad = a["n"] - a["answered"]
            note = f" ({bad} not 200)" if bad else ""
            cpa = a.get("calls_per_answer")
            w(f"| {operation} | {number} | {a['n']}{note} | {ms(d['p50'])} | {ms(d['p99'])} | {ms(a['p50'])} | "
              f"{ms(a['p99'])} | {added(a['p50'], d['p50'])} | {added(a['p99'], d['p99'])} | "
              f"{f'{cpa:.3f}' if cpa is not None else '–'} |")
    w("")


def limits_section(report, w):
    """What counting a named client's limits adds in-process."""
    rows = section(report, w, "limits", "Per-client limits: what counting them costs",
                   "bench/logs/inprocess-limits-*.log")
    if not rows:
        return
    w("bench/inprocess drives the real handler with `POST /v1/chat/completions`, both deployments "
      "healthy, 8 in flight, the caller once with a plain `CLIENT_API_KEYS` key (no limits) and once "
      "as a named client with requests and tokens per minute, counted in the environment (no table), "
      "in turns. Each request then reserves its estimate before the call, settles it after, and its "
      "response carries the `x-ratelimit-*` headers.")
    w("")
    w("| Round | n (off) | p50 ms off | p99 ms off | n (on) | p50 ms on | p99 ms on | added p50 | added p99 |")
    w("|---|---|---|---|---|---|---|---|---|")
    for turn in sorted({r["round"] for r in rows}):
        by = {r["limits"]: r for r in rows if r["round"] == turn}
        off, on = by.get("off"), by.get("on")
        if not (off and on):
            continue
        w(f"| {turn} | {off['n']} | {ms(off['p50'])} | {ms(off['p99'])} | {on['n']} | {ms(on['p50'])} | "
          f"{ms(on['p99'])} | {added(on['p50'], off['p50'])} | {added(on['p99'], off['p99'])} |")
    w("")
    w("The table's part (a lease every few dozen requests) is measured with the fleet: see its (d).")
    w("")


def load_section(report, w):
    load = section(report, w, "load", "Load: open loop, rising rates", "bench/logs/")
    if not load:
        return
    rows = load["rows"]
    floor = {r["rate"]: r for r in rows.get("direct-rs", [])}
    w(f"Every system at {', '.join(f'{r:g}' for r in load['rates'])} requests a second for "
      f"{load['seconds']:g} s each, `POST /v1/chat/completions` (the gateways' OpenAI route), "
      f"against the emulator answering every call after a fixed {load['latency_ms']} ms. "
      "**Open loop**: request i is due at i / rate whatever became of the earlier ones, sent from "
      "a task of its own, its latency counted from when it was due, so a system that falls behind "
      "shows it in its latencies and errors instead of quietly slowing the generator down (the "
      "coordinated omission of closed-loop tools such as wrk, and of this file's other tables). "
      "The generator is `bench/inprocess --arrivals open`, a Rust driver with the function's own "
      "HTTP client: one generator for every row, so the rows differ by the system alone, and the "
      "only one that can also drive the handler in-process with no HTTP front (oha and vegeta "
      "cannot; neither they nor k6 can be installed here, and wrk is closed-loop). "
      "*Added* is the row's latency minus the direct floor's at the same rate and percentile. "
      f"`cargo lambda watch` may start up to {load['environments']} execution environments "
      "(Lambda gives each request in flight one), warmed first; LiteLLM runs one uvicorn "
      "worker, as in the other tables. Status 0: no HTTP answer: none within 30 s, or no "
      "connection accepted within 3 s (the client's connect timeout: a LiteLLM median of 3.00 s "
      "is a backlog that accepts no more). CPU is the "
      "system's processes' CPU time over the run (the arrivals and the wait for the last answers) "
      "in cores (1.00 is one core busy); "
      "in-process that includes the generator, whose own cost the direct row shows. All of it on "
      "the 2 cores that also run the generator and the emulator: the rates past what a system "
      "serves show where it saturates on this machine, not on Lambda.")
    w("")
    w("| System | rate /s | answered | other outcomes | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU (cores) | peak RSS | generator lag p99 ms |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, s in report["systems"].items():
        if key not in rows:
            continue
        if not rows[key]:
            why = reasons(report, key, "the load table")
            w(f"| {s['name']} | – | – | {'failed: ' + why if why else '–'} | | | | | | | |")
            continue
        for r in rows[key]:
            f = floor.get(r["rate"]) if key != "direct-rs" else None
            others = ", ".join(f"{n} × {st}" for st, n in sorted(r["statuses"].items()) if st != "200") or "none"
            rss = r.get("rss") or {}
            procs = rss.get("processes") or 0
            memory = mib(rss.get("max_kib")) + (f" (largest of {procs}; {mib(rss.get('sum_kib'))} in all)" if procs > 1 else "")
            w(f"| {s['name']} | {r['rate']:g} | {r['answered']}/{r['n']} | {others} | {ms(r['p50'])} | "
              f"{ms(r['p99'])} | {added(r['p50'], f and f['p50'])} | {added(r['p99'], f and f['p99'])} | "
              f"{r['cpu_cores']:.2f} | {memory} | {ms(r.get('lag_p99'))} |")
    w("")
    said = []
    inproc = rows.get("inprocess") or []
    if inproc:
        top = inproc[-1]
        f = floor.get(top["rate"])
        said.append(f"In-process, the handler answers all {top['n']:,} requests at {top['rate']:g} a second "
                    f"and adds {added(top['p50'], f and f['p50'])} ms at p50 and "
                    f"{added(top['p99'], f and f['p99'])} ms at p99 over direct calls, on "
                    f"{top['cpu_cores']:.2f} cores with the generator.")
    watch = rows.get("watch") or []
    held = [r for r in watch if r["answered"] == r["n"]]
    broke = next((r for r in watch if r["answered"] < r["n"] / 2), None)
    if held and broke:
        said.append(
            f"Under `cargo lambda watch` every request is answered up to {held[-1]['rate']:g} a second; "
            f"at {broke['rate']:g} it stops answering: the emulator sees no call after the first "
            f"second, the functions sit idle ({broke['cpu_cores']:.2f} cores) and the requests wait "
            f"out 30 s, although {load['environments']} environments at {load['latency_ms']} ms could "
            "carry more and the same handler carries every rate in-process. That is cargo-lambda's "
            f"local Runtime API ({report.get('machine', {}).get('cargo_lambda', 'cargo-lambda')} here) "
            "ceasing to hand out invocations, not the function; on AWS the function sits "
            "behind Lambda's own, so use the in-process rows for the function's cost, and "
            "`cargo lambda watch` for behaviour, not for load beyond a few hundred requests a second.")
    lite = rows.get("litellm") or []
    if lite:
        first = lite[0]
        said.append(f"LiteLLM's proxy (one worker) is already past what it serves at {first['rate']:g} a second "
                    f"on this machine: p50 {ms(first['p50'])}, p99 {ms(first['p99'])}, one core busy.")
    if said:
        w(" ".join(said))
        w("")


def fleet_section(report, w):
    f = section(report, w, "fleet", "Fleet: many execution environments, one memory", "bench/logs/fleet.log")
    if not f:
        return
    t, h, r = f["throttle"], f["hang"], f["table_reads"]
    w(f"{f['environments']} execution environments of fallback-chat (`bench/fleet`: in-process "
      "App instances, each with its own health table, as each Lambda execution environment has), "
      + (f"{f['rate_per_environment']:g} requests a second each, spread evenly, "
         if f.get('rate_per_environment') else "each with a request always in flight (the next "
         "sent as soon as the last is answered, as a busy Lambda environment has), ")
      + "the real handler fed "
      "API Gateway events; the fleet warm (every environment has answered from gpt-4o) before the "
      "fault starts. Once with each environment learning alone (no `HEALTH_TABLE`), once sharing "
      "health through a DynamoDB table in moto's server on 127.0.0.1 (`HEALTH_TABLE`, default "
      "settings but `HEALTH_TIMEOUT_MS=200` to give moto room), the two side by side, each against "
      "an emulator of its own. Calls are counted by the emulator.")
    w("")
    w(f"**(a) gpt-4o answers 429 with `Retry-After: {t['retry_after_s']}` for {t['windows']} windows**: "
      "calls to gpt-4o in each window, fleet-wide. The first window is the onset: an environment "
      "that read the table just before the first 429 may still call gpt-4o once before its next "
      "read (at most `HEALTH_REFRESH_MS`, 1 s, later). After that, one environment tries it when "
      "the cooldown ends (it holds the table's lease) and the others wait for its word.")
    w("")
    n = t["windows"]
    w("| | " + " | ".join(f"window {i + 1}{' (onset)' if i == 0 else ''}" for i in range(n)) + " | requests served |")
    w("|---|" + "---|" * (n + 1))
    for key, label in (("local", "each environment alone"), ("shared", "shared table")):
        row = t[key]
        w(f"| {label} | " + " | ".join(str(c) for c in row["calls_per_window"]) + f" | {row['requests']} |")
    w("")
    attempt_s = f["attempt_timeout_ms"] / 1000
    w(f"**(b) gpt-4o hangs for {h['seconds']} s, then recovers**. A request that meets the hang "
      f"waits a whole attempt timeout (`ATTEMPT_TIMEOUT_MS`, {attempt_s:g} s) before gpt-35-turbo "
      "answers it; a probe of an open circuit waits a shorter one (a few times the deployment's "
      "usual latency, at least 1 s). With the table, the fleet's failures open the circuit for "
      "everyone, one environment probes, and probes that keep timing out back off (5, 10, 20 s "
      "...), which is also why recovery can take longer than alone, where each environment "
      "needed three timeouts of its own before it stopped calling.")
    w("")
    w(f"| | requests that waited {attempt_s:g} s | requests that waited a probe's timeout | calls to gpt-4o during the outage | seconds from recovery until gpt-4o answers again | requests served |")
    w("|---|---|---|---|---|---|")
    for key, label in (("local", "each environment alone"), ("shared", "shared table")):
        row = h[key]
        back = row.get("seconds_to_answer_again")
        w(f"| {label} | {row['waited_attempt_timeout']} | {row['waited_probe_timeout']} | "
          f"{row['gpt4o_calls_during_outage']} | {'–' if back is None else f'{back:g}'} | {row['requests']} |")
    w("")
    w(f"**(c) The table's reads**: the GetItem a request makes when its environment's knowledge is "
      f"due for a refresh, {r['n']} in a row against moto: p50 {r['p50_ms']:.2f} ms, p99 "
      f"{r['p99_ms']:.2f} ms. moto runs on loopback without TLS, so this is the client's and "
      "moto's work only; moto is a Python server and slower than DynamoDB, which answers a "
      "GetItem in single-digit milliseconds in-region (TLS connection kept open). At most one "
      "read per `HEALTH_REFRESH_MS` (1 s) per environment, never longer than "
      "`HEALTH_TIMEOUT_MS` (50 ms): at 2 requests a second per environment, about every other "
      "request reads; at 20, one in twenty"
      + (f"; with a request always in flight, as in (a) (about {per_env:,.0f} a second per "
         f"environment), one in {per_env:,.0f}." if (per_env := t["shared"]["requests"] / max(
             1, t["windows"] * t["retry_after_s"] * f["environments"])) > 20 else "."))
    w("")
    lim = f.get("limits")
    if lim:
        w(f"**(d) One client's tokens per minute across the fleet**: a client with "
          f"`tokens_per_minute: {lim['tokens_per_minute']:,}`, every environment with a chat "
          f"request (`max_tokens: 40`) always in flight for {lim['seconds']} s within one minute "
          "window, the limit counted through the table (each environment leases a slice of the "
          "window, a quarter of its share, and spends it locally; `LIMITS_ENVIRONMENTS` = the "
          "fleet's size).")
        w("")
        w("| limit | tokens used | overshoot | requests admitted | refused | table calls | per admitted request | per request |")
        w("|---|---|---|---|---|---|---|---|")
        w(f"| {lim['tokens_per_minute']:,} | {lim['used_tokens']:,} | {lim['overshoot_tokens']:,} | "
          f"{lim['admitted']:,} | {lim['refused']:,} | {lim['table_calls']:,} | "
          f"{lim['table_calls_per_admitted']:.3f} | {lim['table_calls_per_request']:.4f} |")
        w("")
        w("A refused request costs no table call once the environment has seen the window spent. "
          "What the fleet used below the limit was leased but not yet spent when the run ended.")
        w("")


def cold_conditions(report):
    """bench/results.json's cold-start figures as {"full": {...}, "quota": {...}}, each keyed by
    "fallback-chat", "fallback-chat-https" and "hello" (results from before the CPU quota and
    the HTTPS upstream: their one condition, a full core, HTTP only)."""
    cold = report.get("coldstart", {})
    if "full" in cold:
        return cold
    return {"runs": report["knobs"]["COLD_RUNS"], "full": {k: cold[k] for k in ("fallback-chat", "hello") if k in cold},
            "quota": {}, "cpu_quota": {"quota": None, "why": None}, "legacy": True}


def fixed(v):
    return f"{v:.2f} ms" if v < 100 else f"{v:.1f} ms"


def before_after(cold, w):
    """The same measurements of the binary from before the cold-start work, when
    bench/baseline-coldstart.json holds them (measured by the same code, same machine)."""
    path = Path(__file__).parent / "baseline-coldstart.json"
    if not path.exists():
        return
    base = json.loads(path.read_text())
    w(f"### Before and after the cold-start work (commit {base['commit']} against this one)")
    w("")
    w(f"The binaries of commit {base['commit']} (which read the system's certificate store at start, and "
      "had the AWS SDK's own HTTPS stack, AWS-LC and HTTP/2 in them) measured by `bench/baseline.py` with the same "
      "`bench/coldstart.py` on the same machine just before this run; over HTTPS that binary "
      "trusted the test CA through `SSL_CERT_FILE` (the system bundle plus the CA) and "
      f"`SSL_CERT_DIR`. Medians of {base['runs']} runs; wall / CPU.")
    w("")
    w("| | condition | before | after | hello-world, before / after |")
    w("|---|---|---|---|---|")

    def pair(row, wall, cpu):
        if not row or row.get("error") or row.get(wall) is None:
            return "–"
        c = row.get(cpu)
        return f"{fixed(row[wall])}" + (f" / {fixed(c)}" if c is not None else "")

    for condition, title in (("full", "full core"), ("quota", "128 MB share")):
        b, a = base.get(condition, {}), cold.get(condition, {})
        if not a:
            continue
        for label, key, wall, cpu in (
                ("Start to first poll", "fallback-chat", "first_poll_ms", "cpu_to_first_poll_ms"),
                ("First invocation, HTTP upstream", "fallback-chat", "first_response_ms", "cpu_first_invocation_ms"),
                ("First invocation, HTTPS upstream", "fallback-chat-https", "first_response_ms", "cpu_first_invocation_ms"),
                ("Warm invocation, HTTPS upstream", "fallback-chat-https", "warm_response_ms", "cpu_warm_invocation_ms")):
            hello = (f"{pair(b.get('hello'), wall, cpu)} → {pair(a.get('hello'), wall, cpu)}"
                     if key == "fallback-chat" and wall != "warm_response_ms" else "")
            w(f"| {label} | {title} | {pair(b.get(key), wall, cpu)} | {pair(a.get(key), wall, cpu)} | {hello} |")
        rb, ra = (b.get("fallback-chat") or {}).get("peak_rss_kib"), (a.get("fallback-chat") or {}).get("peak_rss_kib")
        if rb and ra:
            w(f"| Peak RSS | {title} | {mib(rb)} | {mib(ra)} | |")
    sizes = base.get("binary_bytes", {})
    after = (cold.get("full", {}).get("fallback-chat") or {}).get("binary_bytes")
    if sizes.get("fallback-chat") and after:
        w(f"| Binary, x86_64 | | {size(sizes['fallback-chat'])} | {size(after)} | |")
    w("")


def coldstart_section(report, w):
    """The cold-start tables (one per CPU condition), the targets, the sizes; returns the
    hello-world's full-core figures (its peak RSS is the memory tables' yardstick)."""
    w("## Cold start, memory and size")
    w("")
    cold = cold_conditions(report)
    q = cold.get("cpu_quota") or {}
    runs = cold.get("runs") or report["knobs"]["COLD_RUNS"]
    clocks = {r.get("cpu_clock") for c in ("full", "quota") for r in cold.get(c, {}).values() if r.get("cpu_clock")}
    w(f"Each release binary started {runs} times per row by `bench/coldstart.py` against a minimal "
      "local Lambda Runtime API. *Start to first poll*: from starting the process to its first "
      "`GET /runtime/invocation/next` (configuration read, HTTP client and TLS set up for "
      "fallback-chat). *First invocation*: from handing it `events/http-api/get-query.json` to "
      "its response, which for fallback-chat means a call to the emulator (a new connection: over "
      "HTTPS, with its TLS handshake; the emulator serves HTTPS with a test CA it generates, "
      "`--tls-ca-out`, trusted by the function through `EXTRA_CA_CERTS`). *Warm invocation*: the "
      "same event once more, in the same process, right after. The hello-world `lambda_http` "
      "function has no upstream: its HTTPS rows are n/a. Beside each wall time, the CPU time "
      "(user + system, every thread of the process) it used over the same span, read at its "
      "first poll and when each response arrives "
      + ("(`/proc/<pid>/task/*/schedstat`, ns)" if clocks <= {"schedstat (ns)"} else
         f"(clock: {', '.join(sorted(clocks))}; in clock ticks it is coarse, a tick or nothing)")
      + ". Medians, and the p90 of the time to first poll. Peak RSS is the process's `VmHWM` "
      "after both invocations (the HTTP upstream's run).")
    w("")
    if cold.get("legacy"):
        w("**Full core and HTTP upstream only**: this run of the harness predates the 128 MB CPU "
          "share, the HTTPS upstream, the warm invocation and the CPU times.")
    elif q.get("quota"):
        w(f"Two CPU conditions. **Full core**: nothing limits the process (the machine's "
          f"{report['machine']['nproc']} cores are shared with the harness's Runtime API and the "
          f"emulator). **128 MB share**: Lambda gives a function CPU in proportion to its memory, "
          f"one vCPU at 1,769 MB, so about 7 % of one at 128 MB; here a cgroup {q['cgroup']} CPU "
          f"quota of {q['quota_us']} µs per {q['period_us']} µs period "
          f"({q['quota_us'] / q['period_us'] * 100:.1f} % of one CPU, "
          + ("`cpu.max`" if q["cgroup"] == "v2" else "`cpu.cfs_quota_us` / `cpu.cfs_period_us`")
          + "), the process put in its cgroup before `exec`, so from its first instruction. The "
          "Runtime API and the emulator run outside it, as they would on AWS.")
    else:
        w(f"**No 128 MB CPU share**: the CPU quota Lambda's 128 MB would get "
          f"({q.get('quota_us', 1000)} µs per {q.get('period_us', 13889)} µs, a cgroup CPU quota) "
          f"could not be set up on this machine, so only the full-core figures are here. Why: "
          f"{q.get('why') or 'not recorded'}.")
    w("")
    if cold.get("https_error"):
        w(f"**No HTTPS upstream**: {cold['https_error']}.")
        w("")

    def cell(row, key, fmt):
        if not row or row.get("error"):
            return "–" if not row else "not measured" if skipped(row) else "failed (below)"
        v = row.get(key)
        return "–" if v is None else fmt(v)

    def skipped(row):
        """A row not measured for a reason given above the tables (no HTTPS upstream)."""
        return row.get("error", "").startswith("not measured")

    def figure(row, key):
        return None if not row or row.get("error") else row.get(key)

    def statuses_of(row):
        if not row or row.get("error"):
            return "–"
        return f"{', '.join(map(str, row.get('statuses', []))) or '–'} / {', '.join(map(str, row.get('warm_statuses', []))) or '–'}"

    titles = {"full": "On a full core",
              "quota": f"Under the 128 MB CPU share (cgroup {q.get('cgroup')}, {q.get('quota_us')} µs per {q.get('period_us')} µs)"}
    for condition in ("full", "quota"):
        rows = cold.get(condition) or {}
        if not rows:
            continue
        fc, fcs, he = rows.get("fallback-chat"), rows.get("fallback-chat-https"), rows.get("hello")
        w(f"### {titles[condition]}")
        w("")
        w("| | fallback-chat | hello-world `lambda_http` | fallback-chat × hello-world |")
        w("|---|---|---|---|")
        for label, key, fmt in (
                ("Start to first poll, median, wall", "first_poll_ms", fixed),
                ("Start to first poll, median, CPU", "cpu_to_first_poll_ms", fixed),
                ("Start to first poll, p90, wall", "first_poll_p90_ms", fixed),
                ("First invocation to its response, HTTP upstream, wall", "first_response_ms", fixed),
                ("First invocation to its response, HTTP upstream, CPU", "cpu_first_invocation_ms", fixed),
                ("Warm invocation to its response, HTTP upstream, wall", "warm_response_ms", fixed)):
            w(f"| {label} | {cell(fc, key, fmt)} | {cell(he, key, fmt)} | {ratio(figure(fc, key), figure(he, key))} |")
        for label, key in (("First invocation to its response, HTTPS upstream, wall", "first_response_ms"),
                           ("First invocation to its response, HTTPS upstream, CPU", "cpu_first_invocation_ms"),
                           ("Warm invocation to its response, HTTPS upstream, wall", "warm_response_ms"),
                           ("Warm invocation to its response, HTTPS upstream, CPU", "cpu_warm_invocation_ms")):
            w(f"| {label} | {cell(fcs, key, fixed)} | n/a (no upstream) | n/a |")
        fce = rows.get("fallback-chat-entra")
        if fce:
            for label, key in (("Start to first poll, Entra ID through AWS federation (token fetched in init), wall", "first_poll_ms"),
                               ("Start to first poll, Entra ID through AWS federation, CPU", "cpu_to_first_poll_ms"),
                               ("First invocation to its response, Entra ID, wall", "first_response_ms"),
                               ("First invocation to its response, Entra ID, CPU", "cpu_first_invocation_ms")):
                w(f"| {label} | {cell(fce, key, fixed)} | n/a | vs key: {ratio(figure(fce, key), figure(fc, key))} |")
        w(f"| Peak RSS after both invocations | {cell(fc, 'peak_rss_kib', mib)} | {cell(he, 'peak_rss_kib', mib)} | "
          f"{ratio(figure(fc, 'peak_rss_kib'), figure(he, 'peak_rss_kib'))} |")
        w(f"| Status of the responses, first / warm | HTTP: {statuses_of(fc)}; HTTPS: {statuses_of(fcs)} | "
          f"{statuses_of(he)} | |")
        w("")
        failed = [(label, row["error"]) for label, row in (("fallback-chat, HTTP upstream", fc),
                                                           ("fallback-chat, HTTPS upstream", fcs),
                                                           ("hello-world", he))
                  if row and row.get("error") and not skipped(row)]
        for label, error in failed:
            w(f"- {label}: {error}")
        if failed:
            w("")
        throttled = [row["cpu_quota"] for row in (fc, fcs, he) if row and isinstance(row.get("cpu_quota"), dict)
                     and "throttled_periods" in row["cpu_quota"]]
        if condition == "quota" and throttled:
            # Rows measured in turns share one record of the quota; older runs had one per row.
            shared = throttled[0].get("shared_by")
            if shared:
                throttled = throttled[:1]
            w(f"The quota at work: over these rows the cgroup held its processes back in "
              f"{sum(t['throttled_periods'] for t in throttled):.0f} of the "
              f"{sum(t['periods'] for t in throttled):.0f} periods in which they ran, "
              f"{sum(t['throttled_ms'] for t in throttled) / 1000:.2f} s in all (its `cpu.stat`)"
              + (". The rows were measured in turns (one start of each, then again), so a drift in the "
                 "machine's speed weighs on each alike." if shared else "."))
            w("")
        bad = [f"{label} ({statuses_of(row)})" for label, row in (("HTTP upstream", fc), ("HTTPS upstream", fcs))
               if row and not row.get("error")
               and set(row.get("statuses", [])) | set(row.get("warm_statuses", [])) != {200}]
        if bad:
            w(f"Not every response was a 200 ({'; '.join(bad)}): those invocations time an error "
              "answer, not a completion. Over HTTPS that is the function not trusting the test "
              "CA: a binary from before `EXTRA_CA_CERTS` needs `SSL_CERT_FILE` (see "
              "`bench/coldstart.py`).")
            w("")

    before_after(cold, w)

    # The targets of the cold-start work.
    def ratio_of(a, b):
        return a / b if a is not None and b else None

    def verdict(value, target):
        if value is None:
            return "not measured"
        return f"×{value:.2f} (target ≤ ×{target}: {'met' if value <= target else 'not met'})"

    parts = []
    for condition, where in (("quota", "under the 128 MB share"), ("full", "on a full core")):
        rows = cold.get(condition) or {}
        if not rows:
            continue
        fc, fcs, he = rows.get("fallback-chat"), rows.get("fallback-chat-https"), rows.get("hello")
        poll = ratio_of(figure(fc, "first_poll_ms"), figure(he, "first_poll_ms"))
        tls = ratio_of(figure(fcs, "first_response_ms"), figure(fcs, "warm_response_ms"))
        answered = fcs and not fcs.get("error") and set(fcs.get("statuses", [])) | set(fcs.get("warm_statuses", [])) == {200}
        parts.append(f"{where}, start to first poll fallback-chat ÷ hello-world {verdict(poll, 1.3)}, "
                     "first HTTPS invocation ÷ warm HTTPS invocation "
                     + (verdict(tls, 1.5) if answered or tls is None
                        else f"×{tls:.2f}, which says nothing: the HTTPS responses were {statuses_of(fcs)}"))
    if parts:
        w("Targets (the quota's figures are the ones that count: that is what a 128 MB function gets): "
          + "; ".join(parts) + ".")
        w("")

    w("Sizes are of the stripped release binaries: `cargo build --release` for x86_64, "
      "`cargo lambda build --release --arm64` (zig from PyPI) for arm64, as deployed.")
    w("")
    w("| | fallback-chat | hello-world `lambda_http` | fallback-chat × hello-world |")
    w("|---|---|---|---|")
    sz = report.get("sizes", {})
    for arch in ("x86_64", "aarch64"):
        a = sz.get("fallback-chat", {}).get(arch)
        b = sz.get("hello", {}).get(arch)
        ea = sz.get("fallback-chat", {}).get(f"{arch}_error")
        eb = sz.get("hello", {}).get(f"{arch}_error")
        w(f"| Binary size, {arch} | {size(a) if a else ea} | {size(b) if b else eb} | {ratio(a, b)} |")
    w("")
    # The history of the cold-start work: what each change cost and saved, in words.
    notes = BENCH / "cold-start.md"
    if notes.exists():
        w(notes.read_text().rstrip())
        w("")
    return (cold.get("full") or {}).get("hello") or {}


def write(report):
    has_chart = chart(report)
    m = report["machine"]
    k = report["knobs"]
    lite = m["litellm"]
    out = []
    w = out.append
    w("# Benchmarks")
    w("")
    w("fallback-chat side by side with LiteLLM's proxy and with no gateway at all, every system "
      "talking to the same local Azure OpenAI emulator (`crates/azure-openai-emulator`) on one "
      f"machine. Generated by `make bench` (`bench/run.sh`) on {report['date']}; every figure "
      "comes from that run, the raw ones are in `bench/results.json`. Benchmarks print numbers, "
      "they test nothing.")
    w("")
    w("## The machine and the run")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| CPUs | {m['nproc']} × {m['cpu']} |")
    w(f"| Memory | {m['memory_gib']} GiB |")
    w(f"| Kernel | Linux {m['kernel']} |")
    w(f"| Rust | {m['rustc']} |")
    w(f"| cargo-lambda | {m['cargo_lambda'] or 'not found'} |")
    w(f"| LiteLLM | {lite['version'] + ' (`litellm[proxy]` from PyPI)' if lite.get('version') else 'not installed: ' + str(lite.get('error'))} |")
    w(f"| Python, load generator | Python {m['python']}, asyncio + httpx {m['httpx']} (keep-alive) |")
    w(f"| Commit measured | {m['commit']} |")
    phases = ", ".join(f"{n} {v:.0f} s" for n, v in report["phases"].items())
    w(f"| Duration | {report['total_seconds'] / 60:.1f} min in all ({phases}) |")
    w(f"| Load average before measuring | {' '.join(report.get('load_before_measuring', []))} (just after the builds) |")
    w("")
    w("## How to read this")
    w("")
    w("Latency is measured by the client, from sending a request to having read its whole answer. "
      "Each latency row is compared with its **floor**, the same calls made straight to the "
      "emulator with no gateway by the same kind of client: `+` is the latency a system adds to "
      "it, `×` the ratio. The HTTP systems (fallback-chat under `cargo lambda watch`, LiteLLM) are "
      "driven by one Python load generator and compared with direct calls from it; the in-process "
      "row (the real handler fed API Gateway events, as the Lambda runtime feeds it, without any "
      "HTTP front) is driven by a Rust driver and compared with direct calls from that driver's "
      "`reqwest` client; the load table's rows all by that driver's open loop. Load generator, "
      "gateway and emulator share the machine's "
      f"{m['nproc']} cores, so at concurrency 8 the figures include their contention. *Upstream calls* "
      "are counted from the emulator's own log (one line per call it received). Cold start, memory "
      "and size are compared with a hello-world `lambda_http` function (`bench/hello/`) built "
      "in the same cargo run as fallback-chat, with the same release profile and the same `lambda_http` and `tokio`. Under `cargo lambda watch` "
      "the function runs behind cargo-lambda's local Runtime API and HTTP front, which add their "
      "own cost: on AWS, API Gateway and the Lambda service stand there instead. `p99` of a few "
      "dozen requests is close to their maximum; `n` says how many there were.")
    w("")
    w("## The systems")
    w("")
    w("| Row | What it is | Floor |")
    w("|---|---|---|")
    for key, s in report["systems"].items():
        floor = name(report, s["floor"]) if s["floor"] else "(is one)"
        w(f"| {s['name']} | {s['note']}; scenarios {', '.join(map(str, s['scenarios']))} | {floor} |")
    w("")
    w("Every gateway gets `POST /v1/chat/completions` with `{\"model\": \"gpt-4o\", \"messages\": "
      "[system, user]}` and its key as `Authorization: Bearer`; direct calls go to "
      "`/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21` with `api-key`. "
      "fallback-chat runs with `AZURE_OPENAI_DEPLOYMENTS=gpt-4o,gpt-35-turbo` and every other "
      "setting at its default; LiteLLM with the configuration at the end of this page.")
    w("")

    # Scenario 1
    w("## Scenario 1: healthy deployments")
    w("")
    w("Both deployments healthy; the emulator answers at once, then after 50 ms (`--latency-ms 50`). "
      f"Each system gets {k['S1_WARMUP']} warm-up requests, then as many requests as it completes in "
      f"{k['S1_SECONDS']:.0f} s (at most {k['S1_REQUESTS']}), with 1 and then 8 requests in flight. "
      "The floor is direct calls to gpt-4o.")
    w("")
    w("| Emulator | In flight | System | n | p50 ms | p99 ms | added p50 | added p99 | p50 × floor | p99 × floor | req/s |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    s1 = report.get("s1", [])
    for latency in (0, 50):
        for c in (1, 8):
            rows = [r for r in s1 if r["latency_ms"] == latency and r["concurrency"] == c]
            by = {r["system"]: r for r in rows}
            for key, s in report["systems"].items():
                if 1 not in s["scenarios"]:
                    continue
                label = f"| {'at once' if latency == 0 else f'{latency} ms'} | {c} "
                r = by.get(key)
                if r is None:
                    w(label + f"| {s['name']} | – | – | – | – | – | – | – | failed: {reasons(report, key, 'scenario 1') or 'not run'} |")
                    continue
                f = by.get(s["floor"]) if s["floor"] else None
                fp50, fp99 = (f["p50"], f["p99"]) if f else (None, None)
                bad = r["n"] - r["answered"]
                note = f" ({bad} not 200)" if bad else ""
                w(label + f"| {s['name']} | {r['n']}{note} | {ms(r['p50'])} | {ms(r['p99'])} | "
                  f"{added(r['p50'], fp50) if f else '(floor)'} | {added(r['p99'], fp99) if f else ''} | "
                  f"{ratio(r['p50'], fp50) if f else ''} | {ratio(r['p99'], fp99) if f else ''} | "
                  f"{r['rps']:.0f} |")
    w("")

    quota_section(report, w)
    kinds_section(report, w)
    limits_section(report, w)

    # Scenario 2
    w("## Scenario 2: gpt-4o throttled, gpt-35-turbo healthy (the original app's situation)")
    w("")
    w("gpt-4o answers every call with `429` and `Retry-After: 7`; gpt-35-turbo answers at once. "
      f"One request at a time, at most {k['S2_RATE']:.0f} a second, for {k['S2_SECONDS']:.0f} s per "
      f"gateway ({k['S2_FLOOR_SECONDS']:.0f} s for the floors; a request still running at the end "
      "is waited for). Each system starts fresh, against an emulator of its own. Direct calls cannot "
      "fall back, so the floor is direct calls to **gpt-35-turbo**, the deployment that answers: "
      "the least any gateway could take. *Upstream calls per answer* counts every call the "
      "emulator received (429s included) per `200` the client got.")
    w("")
    if has_chart:
        w("![Scenario 2 latency per system](bench/scenario2-latency.png)")
        w("")
        w("[bench/scenario2-latency.png](bench/scenario2-latency.png): left, every request's latency "
          "over the run (log scale); right, p50 and p99.")
        w("")
    w("| System | requests | answered | p50 ms | p99 ms | p50 × floor | p99 × floor | upstream calls per answer | calls gpt-4o / gpt-35-turbo | gateway CPU s |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    out += scenario_rows(report, 2, 11, lambda r, f: [
        str(r["n"]), str(r["answered"]), ms(r["p50"]), ms(r["p99"]), *vs_floor(r, f),
        "–" if r.get("calls_per_answer") is None else f"{r['calls_per_answer']:.3f}",
        f"{r.get('upstream_calls', {}).get('gpt-4o', 0)} / {r.get('upstream_calls', {}).get('gpt-35-turbo', 0)}",
        cpu(r)])
    w("")
    if note := alongside_note(report, 2):
        w(note)
        w("")

    # Scenario 3
    w("## Scenario 3: every deployment down")
    w("")
    w("Both deployments answer every call with `503`. One request at a time, back to back, "
      f"{k['S3_REQUESTS']} requests or {k['S3_SECONDS']:.0f} s, whichever comes first; each system "
      "starts fresh against an emulator of its own. The figure is the time until the client has "
      "its error answer. The floor is one direct call to gpt-4o answered 503. fallback-chat opens "
      "a deployment's circuit after 3 consecutive failures (`CIRCUIT_FAILURES`) and then answers "
      "503 without calling it until `CIRCUIT_OPEN_MS` (5 s) has passed, when one request probes "
      "it, so once both circuits are open it answers sooner than a single direct call: a ratio "
      "under 1.")
    w("")
    w("| System | requests | answers | p50 ms | p99 ms | p50 × floor | p99 × floor | upstream calls per request | gateway CPU s |")
    w("|---|---|---|---|---|---|---|---|---|")
    out += scenario_rows(report, 3, 10, lambda r, f: [
        str(r["n"]), statuses(r), ms(r["p50"]), ms(r["p99"]), *vs_floor(r, f),
        "–" if r.get("calls_per_request") is None else f"{r['calls_per_request']:.2f}",
        cpu(r)])
    w("")
    if note := alongside_note(report, 3):
        w(note)
        w("")

    fleet_section(report, w)
    load_section(report, w)

    # Cold start, memory, size
    hello = coldstart_section(report, w)
    w("Peak RSS while serving scenario 1 (the highest `VmHWM` seen over both emulator settings, "
      "after the concurrency-8 run), compared with the hello-world after its two invocations on a "
      "full core:")
    w("")
    w("| System | Process measured | Peak RSS | × hello-world |")
    w("|---|---|---|---|")
    rss = report.get("rss", {})
    what = {
        "inprocess": "the driver process: the function plus the Rust load generator",
        "watch": "the `fallback-chat` function process (the largest of its execution environments), not cargo-lambda",
        "litellm": "the proxy's process (one uvicorn worker)",
    }
    for key, s in report["systems"].items():
        if key not in what:
            continue
        r = rss.get(key)
        if not r:
            why = reasons(report, key, "scenario 1")
            w(f"| {s['name']} | {what.get(key, '')} | – | {'failed: ' + why if why else '–'} |")
            continue
        w(f"| {s['name']} | {what.get(key, 'every process of the system')} "
          f"({r['processes']} process{'es' if r['processes'] != 1 else ''}) | {mib(r['max_kib'])} | "
          f"{ratio(r['max_kib'], hello.get('peak_rss_kib'))} |")
    w("")

    problems = report.get("failures", {})
    if problems or report.get("phase_errors") or any(not b.get("ok") and not b.get("skipped")
                                                     for b in report.get("builds", {}).values()):
        w("## What did not run")
        w("")
        for key, why in problems.items():
            for reason in why:
                w(f"- {name(report, key)}: {reason}")
        for phase, error in report.get("phase_errors", {}).items():
            w(f"- phase {phase}: {error}")
        for b, status in report.get("builds", {}).items():
            if not status.get("ok") and not status.get("skipped"):
                w(f"- build {b} (`{status.get('command')}`): {status.get('error')}")
        if not lite.get("version"):
            w(f"- LiteLLM could not be installed: {lite.get('error')}")
        w("")

    w("## Reproduce")
    w("")
    w("```sh")
    w("make bench            # = bench/run.sh: builds, bench/.venv, every measurement, this file")
    w("python bench/report.py   # rewrite this file and the chart from bench/results.json")
    w("```")
    w("")
    w("`bench/run.sh` creates `bench/.venv` from `bench/requirements.txt` (httpx, matplotlib, "
      "cargo-lambda, moto) and, in the background while the builds run, `bench/requirements-litellm.txt` "
      "(LiteLLM), everything pinned by `bench/constraints.txt`. It then builds, in release mode: "
      "`cargo build --profile bench-fixture -p azure-openai-emulator -p fleet` (release without "
      "LTO: the emulator and the fleet driver are fixtures); "
      "`cargo build --release -p fallback-chat -p hello -p inprocess --bins` (fallback-chat, the "
      "hello-world `bench/hello` and the in-process driver `bench/inprocess` in one run, with the "
      "same dependencies and profile); `cargo build --release --bin fallback-chat`, which finds "
      "the deployable binary already built; and the same two for arm64 with `cargo lambda build "
      "--release --arm64`. Logs of every process are in `bench/logs/`. Knobs, as "
      "environment variables: `BENCH_S1_SECONDS`, `BENCH_S2_SECONDS`, `BENCH_S2_FLOOR_SECONDS`, "
      "`BENCH_S2_RATE`, `BENCH_S3_REQUESTS`, `BENCH_S3_SECONDS`, `BENCH_COLD_RUNS`, "
      "`BENCH_FLEET_ENVIRONMENTS`, `BENCH_FLEET_RATE`, `BENCH_LOAD_RATES=100,500,1000,2000`, "
      "`BENCH_LOAD_SECONDS`, `BENCH_LOAD_LATENCY_MS`, `BENCH_LOAD_ENVIRONMENTS`, "
      "`BENCH_SKIP_ARM64=1`, `BENCH_SYSTEMS=direct,watch,...` (rows to run). Pieces alone:")
    w("")
    w("```sh")
    w("target/bench-fixture/azure-openai-emulator --port 8080 --deployment gpt-4o=throttled:7 --deployment gpt-35-turbo=healthy &")
    w("AZURE_OPENAI_ENDPOINT=http://127.0.0.1:8080 AZURE_OPENAI_API_KEY=emulator-key \\")
    w("  CLIENT_API_KEYS=fc-bench-client-key-0000 target/release/inprocess --concurrency 1 --seconds 10")
    w("# open loop, 1000 requests a second for 15 s, to any OpenAI-compatible gateway (here `CLIENT_API_KEYS=fc-example-client-key-0000 make run`)")
    w("target/release/inprocess --mode http --arrivals open --rate 1000 --seconds 15 \\")
    w("  --url http://127.0.0.1:9000/v1/chat/completions --header 'authorization: Bearer fc-example-client-key-0000'")
    w("python3 bench/coldstart.py target/release/fallback-chat 20 AZURE_OPENAI_ENDPOINT=http://127.0.0.1:8080 \\")
    w("  AZURE_OPENAI_API_KEY=emulator-key CLIENT_API_KEYS=fc-example-client-key-0000")
    w("# cold start under the 128 MB CPU share (a cgroup of its own: root, or write access to /sys/fs/cgroup)")
    w("python3 bench/coldstart.py target/release/hello 20 --cpu-quota 1000/13889")
    w("# against an HTTPS upstream: the emulator's test CA, trusted through EXTRA_CA_CERTS")
    w("target/bench-fixture/azure-openai-emulator --port 8443 --tls-ca-out /tmp/emulator-ca.pem &")
    w("python3 bench/coldstart.py target/release/fallback-chat 20 --cpu-quota 1000/13889 \\")
    w("  AZURE_OPENAI_ENDPOINT=https://127.0.0.1:8443 AZURE_OPENAI_API_KEY=emulator-key \\")
    w("  CLIENT_API_KEYS=fc-example-client-key-0000 EXTRA_CA_CERTS=/tmp/emulator-ca.pem")
    w("```")
    w("")
    # Written by their own runs (`make soak`, `make fuzz`), each with its date.
    for extra in ("soak.md", "fuzz.md"):
        if (BENCH / extra).exists():
            w((BENCH / extra).read_text().rstrip())
            w("")
    w("## The LiteLLM configuration")
    w("")
    w("Started as `litellm --config <file> --host 127.0.0.1 --port <port> --num_workers 1 "
      "--telemetry False` with `LITELLM_LOCAL_MODEL_COST_MAP=True` (no download of the price "
      "list), no database, no callbacks. *LiteLLM proxy, defaults*:")
    w("")
    w("```yaml")
    w(report["litellm_config"].rstrip())
    w("```")
    w("")
    w("*LiteLLM proxy, retries off* adds `max_retries: 0` to both deployments' `litellm_params` "
      "and `num_retries: 0` to `router_settings`.")
    w("")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(out))


if __name__ == "__main__":
    write(json.loads((BENCH / "results.json").read_text()))
    sys.exit(0)
