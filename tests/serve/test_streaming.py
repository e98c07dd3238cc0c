"""Chat serving, issue 16 parts 3-4: streamed replies (the official `openai` client and raw SSE),
seeds, stop sequences, `n`, a client that leaves mid-stream, refusals before any token, and two
runs behind one server. Two tiny-Llama chat runs (4 steps each) and one real server process."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from chat_helpers import build_tiny_llama, write_chat_recipe, write_conversations

TOKEN = "stream-secret"
HI = [{"role": "user", "content": "My router will not turn on."}]
LONGEST = 512  # the most a request may ask for; clamped to what the tiny model's context leaves


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory) -> dict:
    """Two finished chat runs, model ids 'alpha' and 'beta' (their folder names): alpha a real
    4-step run of a tiny Llama; beta a copy of it whose weights are perturbed, so the two reply
    differently (a second real run would add a minute of guards and report on a shared CPU)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    import honed

    folder = tmp_path_factory.mktemp("stream-runs")
    model = build_tiny_llama(folder / "llama")
    train = write_conversations(folder / "train.jsonl", 40, seed=1)
    recipe = write_chat_recipe(folder, model, train, **{"out": str(folder / "runs" / "alpha"), "train.max_steps": 4})
    alpha = honed.run(str(recipe), show_progress=False).run_dir
    beta = folder / "runs" / "beta"
    shutil.copytree(alpha, beta)
    llama = AutoModelForCausalLM.from_pretrained(beta / "model")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in llama.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.5)
    llama.save_pretrained(beta / "model")
    return {"alpha": alpha, "beta": beta}


@pytest.fixture(scope="module")
def eos_id(chat_runs) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_runs["alpha"] / "model").eos_token_id


@pytest.fixture(scope="module")
def server(chat_runs, tmp_path_factory, start_server):
    """Both runs behind one server, at most one chat generation at a time (so a leaked slot shows)."""
    log = tmp_path_factory.mktemp("stream-log") / "server.log"
    args = ("--max-generations", "1", "--max-body", "20000", "--threads", "1")
    with start_server(chat_runs["alpha"], log, token=TOKEN, args=(str(chat_runs["beta"]), *args)) as proc:
        yield proc


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, http_client=httpx.Client(trust_env=False), max_retries=0)


def streamed(client, **request) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(stream=True, **request))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded except the final [DONE]."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", line  # nothing but data lines and the blank lines between events
    return events


# --------------------------------------------------------------------------- streaming with the openai client

def test_stream_matches_the_non_streamed_reply_with_the_same_seed(openai_client):
    request = dict(model="alpha", messages=HI, max_tokens=24, temperature=1.0, seed=7)
    whole = openai_client.chat.completions.create(**request)
    text, chunks = streamed(openai_client, **request, stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content and text  # the same draw, token for token
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 3
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # sent in pieces, not at the end
    again = openai_client.chat.completions.create(**request)
    other = openai_client.chat.completions.create(**{**request, "seed": 8})
    assert again.choices[0].message.content == text and other.choices[0].message.content != text


def test_greedy_stream_matches_generate_chat(openai_client, chat_runs):
    from honed.tasks.chat.model import generate_chat

    text, chunks = streamed(openai_client, model="beta", messages=HI, max_tokens=20)
    assert text == generate_chat(chat_runs["beta"], HI, max_tokens=20)  # what `honed predict` replies
    assert all(c.usage is None for c in chunks)  # no usage unless stream_options asks for it


def test_raw_events_follow_openais_format(server):
    body = {"model": "alpha", "messages": HI, "max_tokens": 6, "stream": True}
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    assert {e["object"] for e in events[:-1]} == {"chat.completion.chunk"} and len({e["id"] for e in events[:-1]}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] in ("stop", "length")
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])


# --------------------------------------------------------------------------- stop, length, n

def test_stop_sequences_end_the_reply_before_them(openai_client, eos_id):
    no_end = {str(eos_id): -100}  # the model cannot end its reply: a long one to cut
    base = dict(model="alpha", messages=HI, max_tokens=30, logit_bias=no_end)
    full = openai_client.chat.completions.create(**base).choices[0]
    assert full.finish_reason == "length"
    words = full.message.content.split()
    assert len(words) >= 4, full.message.content
    stop = words[len(words) // 2]
    expected = full.message.content[: full.message.content.index(stop)].rstrip()
    cut = openai_client.chat.completions.create(**base, stop=stop).choices[0]
    assert cut.message.content == expected and cut.finish_reason == "stop"
    text, chunks = streamed(openai_client, **base, stop=["never in this reply", stop])
    assert text == expected and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_n_choices(openai_client, server):
    reply = openai_client.chat.completions.create(model="alpha", messages=HI, max_tokens=12, temperature=1.0, seed=3, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # each choice its own draw
    first = openai_client.chat.completions.create(model="alpha", messages=HI, max_tokens=12, temperature=1.0, seed=3)
    assert first.choices[0].message.content == reply.choices[0].message.content
    with server.client() as client:
        refused = client.post("/v1/chat/completions", json={"model": "alpha", "messages": HI, "n": 2, "stream": True})
        assert refused.status_code == 400 and "n:" in refused.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json={"messages": HI, "model": "alpha", "n": 9}).status_code == 422


# --------------------------------------------------------------------------- refusals before any token, disconnects

def test_a_stream_is_refused_before_any_token(server):
    body = {"model": "alpha", "messages": HI, "max_tokens": 8, "stream": True}
    refusals = {
        401: dict(auth=False, json=body),
        413: dict(json={**body, "messages": [{"role": "user", "content": "x" * 30000}]}),
        400: dict(json={**body, "stream_options": {"include_usage": True}, "stream": False}),
        422: dict(json={**body, "stop": ["a", "b", "c", "d", "e"]}),
    }
    for status, kwargs in refusals.items():
        auth = kwargs.pop("auth", True)
        with server.client(auth=auth) as client, client.stream("POST", "/v1/chat/completions", **kwargs) as response:
            raw = response.read()
        assert response.status_code == status, raw
        assert response.headers["content-type"].startswith("application/json"), status
        assert b"data:" not in raw and set(json.loads(raw)) == {"error"}, raw


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, eos_id):
    long = {"model": "alpha", "messages": HI, "max_tokens": LONGEST, "stream": True,
            "logit_bias": {str(eos_id): -100}}
    with server.client() as client:
        started = time.monotonic()
        with client.stream("POST", "/v1/chat/completions", json=long) as response:
            pieces = sum(1 for e in sse_events(response) if isinstance(e, dict) and e["choices"][0]["delta"].get("content"))
        full_seconds = time.monotonic() - started  # what a stream that is not stopped holds the slot for
    assert pieces > 50, pieces

    with server.client() as leaving, leaving.stream("POST", "/v1/chat/completions", json=long) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has started
        with server.client() as other:  # the only slot is taken while it runs
            busy = other.post("/v1/chat/completions", json={"model": "alpha", "messages": HI, "max_tokens": 2})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    left = time.monotonic()  # the connection is closed here, mid-reply
    with server.client() as client:
        while True:
            answer = client.post("/v1/chat/completions", json={"model": "alpha", "messages": HI, "max_tokens": 2})
            if answer.status_code != 503 or time.monotonic() - left > full_seconds:
                break
            time.sleep(0.02)
    waited = time.monotonic() - left
    assert answer.status_code == 200, answer.text
    # a generation that went on to its end would hold the slot about full_seconds
    assert waited < full_seconds / 2, (waited, full_seconds)


# --------------------------------------------------------------------------- two runs behind one server

def test_two_runs_answer_by_model_id(openai_client, server, chat_runs):
    from honed.tasks.chat.model import generate_chat

    assert sorted(m.id for m in openai_client.models.list().data) == ["alpha", "beta"]
    expected = {name: generate_chat(chat_runs[name], HI, max_tokens=16) for name in ("alpha", "beta")}
    assert expected["alpha"] != expected["beta"]  # otherwise the test could not tell the runs apart
    for name in ("alpha", "beta"):
        reply = openai_client.chat.completions.create(model=name, messages=HI, max_tokens=16)
        assert reply.model == name and reply.choices[0].message.content == expected[name]
    with server.client() as client:
        unknown = client.post("/v1/chat/completions", json={"model": "gamma", "messages": HI})
        unnamed = client.post("/v1/chat/completions", json={"messages": HI})
    assert unknown.status_code == 404 and "'alpha', 'beta'" in unknown.json()["error"]["message"]
    assert unnamed.status_code == 400 and "alpha, beta" in unnamed.json()["error"]["message"]


# --------------------------------------------------------------------------- the text cutter, in-process

@pytest.mark.parametrize("pieces, stops, expected", [
    (["  Hello", " wor", "ld  ", "\n"], [], "Hello world"),
    (["Hello EN", "D there"], ["END"], "Hello"),
    (["a", "b", "S", "T", "O", "P", "c"], ["STOP"], "ab"),
    (["keep STO", "re it"], ["STOP"], "keep STOre it"),
    (["x", "yz"], ["zz", "yz"], "x"),
    (["open th X", "q"], ["Xq"], "open th"),  # the space before a stop sequence is never sent
])
def test_text_cutter(pieces, stops, expected):
    from honed.serve.generation import TextCutter

    cutter = TextCutter(stops)
    sent = [cutter.feed(p) for p in pieces] + [cutter.finish()]
    assert "".join(sent) == expected
    for stop in stops:
        assert all(stop not in s for s in sent)
