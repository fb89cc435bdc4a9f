"""The official openai Python SDK, unchanged: the Responses API and embeddings through
fallback-chat under `cargo lambda watch --concurrency 2`.

Usage: python responses_clients.py BASE_URL CLIENT_KEY EAST_URL WEST_URL EAST_LOG

Behind the function: two resources, east (gpt-4o and te3-small throttled, Retry-After 3 s)
and west (healthy), and the fleet's table in moto. EAST_URL and WEST_URL are the emulators'
(their `PUT /_emulator/deployments/NAME` changes a behaviour); EAST_LOG is east's call log.
Prints one line per check and a closing "N passed, N failed" line; exits non-zero on any failure.
"""

import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from openai import APIStatusError, BadRequestError, OpenAI

from checks import check, finish

BASE, KEY, EAST, WEST, EAST_LOG = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
client = OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=60)
QUESTION = "Where is my order?"
ANSWER = f"[gpt-4o] You said: {QUESTION}"

# The stored conversation's first response, for the last check.
CONVERSATION = []


def behave(emulator, deployment, behavior):
    request = urllib.request.Request(
        f"{emulator}/_emulator/deployments/{deployment}",
        data=behavior.encode(),
        method="PUT",
        headers={"api-key": "emulator-key"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204, response.status


def east_lines(needle):
    with open(EAST_LOG) as log:
        return sum(needle in line for line in log)


@check("responses.create: answered by the fallback, which the header names")
def _():
    raw = client.responses.with_raw_response.create(model="gpt-4o", input=QUESTION)
    response = raw.parse()
    assert response.output_text == ANSWER, response
    assert response.status == "completed", response.status
    assert raw.headers["x-fallback-deployment"] == "west", dict(raw.headers)
    assert response.usage.total_tokens > 0


@check("responses.create, streamed: every delta, one response, completed")
def _():
    deltas, kinds, ids = [], [], set()
    with client.responses.stream(model="gpt-4o", input=QUESTION) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type in ("response.created", "response.completed"):
                ids.add(event.response.id)
        final = stream.get_final_response()
    assert "".join(deltas) == ANSWER, deltas
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert len(ids) == 1, ids
    assert final.output_text == ANSWER, final


@check("embeddings.create: the fallback's vectors, of the model's dimension")
def _():
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["How do I reset my password?", "Where is my order?"]
    )
    result = raw.parse()
    assert raw.headers["x-fallback-deployment"] == "west-embed", dict(raw.headers)
    assert [len(d.embedding) for d in result.data] == [1536, 1536], [len(d.embedding) for d in result.data]
    assert result.usage.total_tokens > 0


@check("a stored conversation goes on where it is stored, from either execution environment")
def _():
    first = client.responses.create(model="gpt-4o", input="My order is late.")
    # East is healthy again, its cooldown (Retry-After 3 s) over, and first by priority; the
    # conversation lives on west.
    behave(EAST, "gpt-4o", "healthy")
    time.sleep(3.2)
    east_calls = east_lines("deployment=gpt-4o ")

    def follow_up(i):
        raw = client.responses.with_raw_response.create(
            model="gpt-4o", input=f"When will it come? ({i})", previous_response_id=first.id
        )
        return raw.headers["x-fallback-deployment"], raw.parse().output_text

    # Two at once: cargo-lambda gives them one execution environment each.
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(follow_up, range(2)))
    for i, (deployment, text) in enumerate(answers):
        assert deployment == "west", answers
        assert text.endswith("(remembering 1 earlier turns)"), text
    assert east_lines("deployment=gpt-4o ") == east_calls, "east was asked"
    # The fleet's table said where the response is: no environment had to look it up.
    assert east_lines("behavior=Get ") == 0, "an environment looked the id up on east"

    CONVERSATION.append(first.id)


@check("an error event after the preamble: the next deployment answers, one clean stream")
def _():
    # East's first call after its shared cooldown is the fleet's trial, and a failed trial
    # opens its circuit: let it succeed first (a stateless request, so not pinned anywhere).
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Hi", store=False)
    assert raw.headers["x-fallback-deployment"] == "east", dict(raw.headers)
    behave(EAST, "gpt-4o", "stream-error:0")
    streams = east_lines("status=200 stream")
    kinds, deltas = [], []
    stream = client.responses.create(model="gpt-4o", input=QUESTION, stream=True, store=False)
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    assert "error" not in kinds, kinds
    assert kinds.count("response.created") == 1, kinds
    assert "".join(deltas) == ANSWER, deltas
    assert east_lines("status=200 stream") == streams + 1, "east's stream was tried first"


@check("a cut after output, stateless: continued on the fallback, the whole text")
def _():
    behave(EAST, "gpt-4o", "stream-cut:3")
    streams = east_lines("status=200 stream")
    deltas, numbers = [], []
    stream = client.responses.create(model="gpt-4o", input=QUESTION, stream=True, store=False)
    for event in stream:
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    assert "".join(deltas) == ANSWER, deltas
    assert numbers == sorted(set(numbers)), numbers
    assert east_lines("status=200 stream") == streams + 1, "east's stream was cut first"


@check("a previous_response_id of the wrong shape: a 400, no upstream call")
def _():
    calls = east_lines("deployment=gpt-4o ")
    try:
        client.responses.create(model="gpt-4o", input="x", previous_response_id="not-a-response")
    except BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "previous_response_id", e.body
    else:
        raise AssertionError("accepted")
    assert east_lines("deployment=gpt-4o ") == calls


@check("the deployment that holds a conversation down: a 503 that names it, no other asked")
def _():
    east_calls = east_lines("deployment=gpt-4o ")
    # West down: a 503 that names it, and nothing asked of east.
    behave(WEST, "gpt-4o", "throttled:30")
    try:
        client.responses.create(model="gpt-4o", input="Hello?", previous_response_id=CONVERSATION[0])
    except APIStatusError as e:
        assert e.status_code == 503, e.status_code
        assert e.body["code"] == "conversation_unavailable", e.body
        assert "west" in e.body["message"], e.body
    else:
        raise AssertionError("answered without the conversation's history")
    assert east_lines("deployment=gpt-4o ") == east_calls, "east was asked"


finish()
