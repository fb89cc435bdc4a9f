"""The official openai Python SDK, unchanged, as the named clients of fallback-chat under
`cargo lambda watch --concurrency 4`, their limits counted by the fleet in moto's table.

Usage: python limits_clients.py BASE_URL CHATBOT_KEY SMALL_KEY TOKENS_PER_MINUTE EMULATOR_LOG

`small` may make 3 requests a minute; `chatbot` may use TOKENS_PER_MINUTE tokens a minute.
EMULATOR_LOG is the emulator's call log (a line per call).
Prints one line per check and a closing "N passed, N failed" line; exits non-zero on any failure.
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI, RateLimitError

from checks import check, finish

BASE, CHATBOT, SMALL, TPM, EMULATOR_LOG = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


def client(key):
    return OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=60)


def upstream_calls():
    with open(EMULATOR_LOG) as log:
        return sum("deployment=" in line for line in log)


def ask(c, text):
    return c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}], max_tokens=40
    )


def start_early_in_a_minute():
    """The checks below run within one minute window: start them in its first half."""
    second = time.time() % 60
    if second > 30:
        time.sleep(60 - second + 0.5)


start_early_in_a_minute()


@check("a client over its requests per minute gets RateLimitError with the headers, at no upstream cost")
def requests_per_minute():
    small = client(SMALL)
    for n in range(3):
        raw = ask(small, f"small {n}")
        assert raw.headers["x-ratelimit-limit-requests"] == "3", raw.headers
        assert raw.headers["x-ratelimit-remaining-requests"] == str(2 - n), raw.headers
    before = upstream_calls()
    try:
        ask(small, "one too many")
    except RateLimitError as e:
        assert e.status_code == 429
        assert e.code == "rate_limit_exceeded", e.body
        assert "client 'small'" in e.message, e.message
        wait = int(e.response.headers["retry-after"])
        assert 1 <= wait <= 60, wait
        assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    else:
        raise AssertionError("the fourth request was admitted")
    assert upstream_calls() == before, "a refused request reached Azure"


@check("another client is unaffected")
def other_client():
    raw = ask(client(CHATBOT), "hello")
    assert raw.http_response.status_code == 200
    assert int(raw.headers["x-ratelimit-limit-tokens"]) == TPM


@check(f"16 callers across 4 environments: the fleet admits at most {TPM} tokens a minute")
def fleet_wide():
    chatbot = client(CHATBOT)

    def one(n):
        try:
            raw = ask(chatbot, f"question number {n} about the weather")
            return raw.parse().usage.total_tokens
        except RateLimitError:
            return None

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(400)))
    used = sum(t for t in outcomes if t is not None)
    refused = sum(t is None for t in outcomes)
    # The first check of the chatbot used some too; everything counted is within the limit.
    print(f"     used {used} tokens of {TPM} in 400 requests, {refused} refused")
    assert refused > 0, "the limit was reached"
    assert used <= TPM, f"the fleet used {used} of {TPM}"
    assert used >= TPM // 2, f"leases left most of the limit unused: {used} of {TPM}"


finish()
