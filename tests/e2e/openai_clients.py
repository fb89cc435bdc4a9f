"""The official openai Python SDK, unchanged, against fallback-chat under `cargo lambda watch`.

Usage: python openai_clients.py BASE_URL [streaming|buffered] [CLIENT_KEY]

The emulator behind the function has gpt-4o throttled and gpt-35-turbo healthy, so every
answer must come complete from gpt-35-turbo. Prints one line per check and a closing
"N passed, N failed" line; exits non-zero on any failure.
"""

import sys

from openai import AzureOpenAI, OpenAI

from checks import check, finish

import time

BASE = sys.argv[1].rstrip("/")
MODE = sys.argv[2] if len(sys.argv) > 2 else "buffered"
KEY = sys.argv[3] if len(sys.argv) > 3 else "not-checked-by-this-function"
QUESTION = "How do I reset my password?"
EXPECTED = f"[gpt-35-turbo] You said: {QUESTION}"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": QUESTION},
]

openai_client = OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=30)
azure_client = AzureOpenAI(
    azure_endpoint=BASE, api_version="2024-10-21", api_key=KEY, max_retries=0, timeout=30
)



def collect(stream):
    text, chunks, usage, finish = [], 0, None, None
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    return "".join(text), chunks, usage, finish


@check("OpenAI client, buffered: the whole answer, from the healthy deployment")
def _():
    raw = openai_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == EXPECTED, completion
    assert completion.model == "gpt-35-turbo-0125", completion.model
    assert completion.usage.total_tokens > 0
    assert raw.headers["x-fallback-deployment"] == "gpt-35-turbo", dict(raw.headers)


@check("OpenAI client, streaming: every piece, a finish_reason and the usage")
def _():
    stream = openai_client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, chunks, usage, finish = collect(stream)
    assert text == EXPECTED, text
    assert chunks > 3, chunks
    assert finish == "stop", finish
    assert usage is not None and usage.total_tokens > 0, usage


@check("AzureOpenAI client, buffered")
def _():
    completion = azure_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content == EXPECTED, completion
    assert completion.model == "gpt-35-turbo-0125", completion.model


@check("AzureOpenAI client, streaming")
def _():
    stream = azure_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    text, _, _, finish = collect(stream)
    assert text == EXPECTED, text
    assert finish == "stop", finish


if MODE == "streaming":

    @check("streaming mode: the first piece arrives while the rest is still being produced")
    def _():
        # The emulator pauses 60 ms between events: a relayed stream spreads them out.
        started = time.monotonic()
        arrivals = []
        stream = openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - started)
        assert len(arrivals) >= 5, arrivals
        assert arrivals[-1] - arrivals[0] > 0.2, arrivals


@check("OpenAI client: a bad request is an ordinary SDK error")
def _():
    from openai import BadRequestError

    try:
        openai_client.chat.completions.create(model="gpt-4o", messages=[])
    except BadRequestError as e:
        assert e.status_code == 400
        assert e.body["code"] == "invalid_type", e.body
    else:
        raise AssertionError("no error for an empty messages list")


@check("OpenAI client with a wrong key: refused as the SDK expects")
def _():
    from openai import AuthenticationError

    wrong = OpenAI(base_url=f"{BASE}/v1", api_key="fc-wrong-key-000000000000", max_retries=0)
    try:
        wrong.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except AuthenticationError as e:
        assert e.status_code == 401
    else:
        raise AssertionError("a wrong key was accepted")


finish()
