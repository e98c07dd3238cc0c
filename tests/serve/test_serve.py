"""`honed serve`: a real server process on a loopback port, called with httpx (issue 5 part 3-4,
issue 7 part 5); plus the app and the micro-batcher in-process for what a process cannot show."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest

from helpers import make_texts

EDGE_TEXTS = ["great", "GREAT love, excellent!!!", "ça marche très bien 👍 — merci", "broken " * 400, "\n\t  refund  \n"]


def error_of(response: httpx.Response, status: int) -> dict:
    """The error body: exactly {"error": {"message", "type"}}, and nothing that leaks internals."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message and isinstance(body["error"]["type"], str)
    for leak in ("Traceback", "/tmp", "/work", "site-packages", ".py", "pydantic", "Error:"):
        assert leak not in response.text, response.text
    return body["error"]


@pytest.fixture(scope="module")
def reference(served_run, tmp_path_factory) -> dict:
    """honed.predict on the same texts: text → (label, {label: probability})."""
    import honed

    texts = make_texts(60, seed=7)["text"].tolist() + EDGE_TEXTS
    path = tmp_path_factory.mktemp("serve-ref") / "inputs.csv"
    pd.DataFrame({"text": texts}).to_csv(path, index=False)
    frame = honed.predict(served_run, path)
    assert frame["text"].tolist() == texts
    labels = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
    return {row["text"]: (row["prediction"], {label: float(row[f"prob_{label}"]) for label in labels})
            for _, row in frame.iterrows()}


def assert_matches(predictions: list[dict], texts: list[str], reference: dict) -> None:
    assert len(predictions) == len(texts)
    for text, got in zip(texts, predictions):
        label, probs = reference[text]
        assert got["label"] == label, text
        assert got["probabilities"].keys() == probs.keys()
        # 1e-3: the fixture's head-only model folds its standardisation into weights of ~7e3 on
        # features of std ~1e-4 (measured), so fp32 rounding in a differently padded batch moves a
        # probability by ~1e-4; the label must still be the same
        for name, p in probs.items():
            assert got["probabilities"][name] == pytest.approx(p, abs=1e-3), text


# --------------------------------------------------------------------------- the real process

def test_health_needs_no_token(server):
    with server.client(auth=False) as client:
        response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_models_lists_the_run(server, served_run):
    with server.client() as client:
        body = client.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == served_run.name and card["object"] == "model"
    assert card["task"] == "text-classification" and card["labels"] == ["neg", "pos"]
    assert card["input"] == "text" and "/v1/predict" in card["endpoints"]


def test_predictions_match_honed_predict(server, reference):
    texts = list(reference)
    with server.client() as client:
        response = client.post("/v1/predict", json={"inputs": [{"text": t} for t in texts]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "predictions"}
    assert_matches(body["predictions"], texts, reference)
    for p in body["predictions"]:
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_model_field_is_checked(server, reference):
    text = next(iter(reference))
    with server.client() as client:
        ok = client.post("/v1/predict", json={"model": server_model_id(client), "inputs": [{"text": text}]})
        wrong = client.post("/v1/predict", json={"model": "someone-else", "inputs": [{"text": text}]})
    assert ok.status_code == 200
    assert "serves" in error_of(wrong, 404)["message"]


def server_model_id(client: httpx.Client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic dGVzdC10b2tlbi01ZjJiOWM="},
    {"Authorization": "test-token-5f2b9c"},
    {"Authorization": "Bearer test-token-5f2b9c-and-more"},
])
def test_token_is_required_on_v1(server, headers):
    with server.client(auth=False, headers=headers) as client:
        for response in (client.get("/v1/models"), client.post("/v1/predict", json={"inputs": [{"text": "great"}]}),
                         client.get("/v1/anything")):
            error = error_of(response, 401)
            assert error["type"] == "authentication_error" and "token" in error["message"]
            assert response.headers["www-authenticate"] == "Bearer"


def test_token_is_accepted(server):
    for scheme in ("Bearer", "bearer"):
        with server.client(auth=False, headers={"Authorization": f"{scheme} {server.token}"}) as client:
            response = client.post("/v1/predict", json={"inputs": [{"text": "great love"}]})
        assert response.status_code == 200, response.text


def test_token_is_checked_before_the_body(server):
    """An unauthenticated client cannot make the server read (or size-check) a body."""
    with server.client(auth=False) as client:
        response = client.post("/v1/predict", content=b"x" * (2 * 1024 * 1024), headers={"content-type": "application/json"})
    error_of(response, 401)


@pytest.mark.parametrize("raw", [b"{", b'{"inputs": [{"text": "a"}]', b"not json", b"", b"\xff\xfe\x00", b'{"inputs": [{"text": "a"}]}}'])
def test_malformed_json_is_400(server, raw):
    with server.client() as client:
        response = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert "not valid JSON" in error_of(response, 400)["message"]


def test_body_must_be_declared_json(server):
    """A web page can POST text/plain to a loopback port without a CORS preflight; such bodies are refused."""
    with server.client() as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            response = client.post("/v1/predict", content=b'{"inputs": [{"text": "a"}]}', headers=headers)
            assert "application/json" in error_of(response, 415)["message"]


def test_oversized_body_is_413(server):
    big = json.dumps({"inputs": [{"text": "a" * (1024 * 1024)}]}).encode()
    with server.client() as client:
        declared = client.post("/v1/predict", content=big, headers={"content-type": "application/json"})

        def chunks():  # no Content-Length: the limit is enforced while reading
            for start in range(0, len(big), 64 * 1024):
                yield big[start : start + 64 * 1024]

        streamed = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    for response in (declared, streamed):
        error = error_of(response, 413)
        assert "1048576 bytes" in error["message"]
    with server.client() as client:  # and the server is still fine
        assert client.post("/v1/predict", json={"inputs": [{"text": "great"}]}).status_code == 200


@pytest.mark.parametrize("body, words", [
    ({"inputs": [{"text": "a"}], "temperature": 1}, ["temperature", "unknown field"]),
    ({"inputs": [{"text": "a", "label": "pos"}]}, ["inputs[0].label", "unknown field"]),
    ({"inputs": [{"txt": "a"}]}, ["inputs[0].text", "required", "inputs[0].txt", "unknown field"]),
    ({"inputs": [{}]}, ["inputs[0].text", "required"]),
    ({}, ["inputs", "required"]),
    ({"inputs": [{"text": 5}]}, ["inputs[0].text", "valid string"]),
    ({"inputs": [{"text": None}]}, ["inputs[0].text", "valid string"]),
    ({"inputs": [{"text": ["a"]}]}, ["inputs[0].text", "valid string"]),
    ({"inputs": "great"}, ["inputs", "valid array"]),
    ({"inputs": ["great"]}, ["inputs[0]"]),
    ({"inputs": []}, ["inputs", "at least 1"]),
    ({"inputs": [{"text": "a"}] * 257}, ["inputs", "at most 256"]),
    ({"inputs": [{"text": "a" * 100_001}]}, ["inputs[0].text", "at most 100000 characters"]),
    ({"inputs": [{"text": "a"}], "model": 3}, ["model", "valid string"]),
    ([{"text": "a"}], ["body", "object"]),
])
def test_invalid_fields_are_422(server, body, words):
    with server.client() as client:
        response = client.post("/v1/predict", json=body)
    error = error_of(response, 422)
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]
    assert "aaaa" not in error["message"]


def test_limits_are_inclusive(server):
    with server.client() as client:
        most = client.post("/v1/predict", json={"inputs": [{"text": "great"}] * 256})
        longest = client.post("/v1/predict", json={"inputs": [{"text": "great " * 16_666 + "love"}]})
        empty = client.post("/v1/predict", json={"inputs": [{"text": ""}]})
    assert most.status_code == 200 and len(most.json()["predictions"]) == 256
    assert longest.status_code == 200, longest.text
    assert empty.status_code == 200 and empty.json()["predictions"][0]["label"] in ("neg", "pos")


def test_unknown_endpoint_and_method(server):
    with server.client() as client:
        assert "no such endpoint" in error_of(client.get("/v1/nothing"), 404)["message"]
        error_of(client.get("/v1/predict"), 405)
        error_of(client.get("/docs"), 404)  # no interactive docs or schema exposed
        error_of(client.get("/openapi.json"), 404)


def test_concurrent_requests_are_all_correct(server, reference):
    texts = list(reference)
    jobs = [[texts[(i * 7 + k) % len(texts)] for k in range(1 + i % 4)] for i in range(32)]
    barrier = threading.Barrier(len(jobs))
    with server.client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)) as client:
        def call(batch):
            barrier.wait(timeout=30)
            return client.post("/v1/predict", json={"inputs": [{"text": t} for t in batch]})

        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(call, jobs))
    for batch, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert_matches(response.json()["predictions"], batch, reference)


def test_server_log_has_no_request_noise(server):
    """Access logging is off; the log holds the start-up line (and nothing secret)."""
    output = server.output()
    assert "serving" in output and "127.0.0.1" in output
    assert server.token not in output


# --------------------------------------------------------------------------- the CLI's refusals

def run_cli(args: list[str], capsys) -> tuple[int, str]:
    from honed.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_refuses_a_missing_run_dir(tmp_path, capsys):
    code, err = run_cli(["serve", str(tmp_path / "nope"), "--port", "1"], capsys)
    assert code == 2 and err.startswith("error: RUN_DIR:") and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_an_unfinished_run(served_run, tmp_path, capsys):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(served_run / "model", partial / "model")  # model written, metrics.json not yet
    code, err = run_cli(["serve", str(partial)], capsys)
    assert code == 2 and "metrics.json" in err and "--resume" in err
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["serve", str(tmp_path / "empty")], capsys)
    assert code == 2 and "model/honed.json" in err


def test_cli_refuses_a_bad_token(served_run, capsys):
    code, err = run_cli(["serve", str(served_run), "--token", "has space"], capsys)
    assert code == 2 and "--token" in err


def test_cli_reports_a_taken_port(served_run, server, capsys):
    port = server.url.rsplit(":", 1)[1]
    code, err = run_cli(["serve", str(served_run), "--port", port], capsys)
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- in-process: the app and the batcher

def fake_served(predict):
    from honed.serve.loaders import Served

    return Served(model_id="fake", task="text-classification", labels=["a", "b"], input_column="review text",
                  created=0, predict=predict)


def echo(texts):
    return [{"label": "a", "probabilities": {"a": 1.0, "b": 0.0}, "echo": t} for t in texts]


def test_app_without_token_is_open_and_uses_the_runs_column():
    from fastapi.testclient import TestClient

    from honed.serve.app import create_app
    from honed.serve.limits import Limits

    app = create_app(fake_served(echo), token=None, limits=Limits(max_inputs=2, max_text_chars=5, max_body_bytes=200))
    with TestClient(app) as client:
        ok = client.post("/v1/predict", json={"inputs": [{"review text": "hi"}, {"review text": "yo"}]})
        assert ok.status_code == 200 and [p["echo"] for p in ok.json()["predictions"]] == ["hi", "yo"]
        assert "at most 2" in error_of(client.post("/v1/predict", json={"inputs": [{"review text": "x"}] * 3}), 422)["message"]
        assert "at most 5 characters" in error_of(client.post("/v1/predict", json={"inputs": [{"review text": "x" * 6}]}), 422)["message"]
        assert "200 bytes" in error_of(client.post("/v1/predict", json={"inputs": [{"review text": "x" * 300}]}), 413)["message"]
        assert "unknown field" in error_of(client.post("/v1/predict", json={"inputs": [{"text": "x"}]}), 422)["message"]


def test_inference_failure_is_a_500_without_details():
    from fastapi.testclient import TestClient

    from honed.serve.app import create_app

    def broken(texts):
        raise RuntimeError("CUDA out of memory at /secret/path/model.safetensors")

    with TestClient(create_app(fake_served(broken)), raise_server_exceptions=False) as client:
        response = client.post("/v1/predict", json={"inputs": [{"review text": "x"}]})
        error = error_of(response, 500)
        assert "secret" not in response.text and "CUDA" not in response.text and error["type"] == "server_error"
        assert client.get("/health").status_code == 200


def test_overload_is_a_503():
    from fastapi.testclient import TestClient

    from honed.serve.app import create_app
    from honed.serve.limits import Limits

    with TestClient(create_app(fake_served(echo), limits=Limits(max_pending_texts=3))) as client:
        response = client.post("/v1/predict", json={"inputs": [{"review text": "x"}] * 4})
        assert error_of(response, 503)["type"] == "overloaded_error" and response.headers["retry-after"] == "1"


def test_batcher_groups_requests_that_arrive_together():
    from honed.serve.batching import MicroBatcher

    calls = []

    def fn(texts):
        calls.append(list(texts))
        return [t.upper() for t in texts]

    async def main():
        batcher = MicroBatcher(fn, max_texts=8, max_wait_s=0.05, max_pending=1000)
        await batcher.start()
        try:
            requests = [[f"r{i}-{k}" for k in range(1 + i % 3)] for i in range(10)]
            results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        finally:
            await batcher.stop()
        return requests, results

    requests, results = asyncio.run(main())
    assert results == [[t.upper() for t in r] for r in requests]  # each request gets its own slice, in order
    assert len(calls) < len(requests)  # grouped
    assert all(len(c) <= 8 + 2 for c in calls)  # stops collecting at max_texts (a request is never split)
    assert sorted(t for c in calls for t in c) == sorted(t for r in requests for t in r)


def test_batcher_skips_requests_whose_client_left():
    from honed.serve.batching import MicroBatcher

    seen = []

    def fn(texts):
        seen.extend(texts)
        return texts

    async def main():
        batcher = MicroBatcher(fn, max_texts=64, max_wait_s=0.05, max_pending=1000)
        await batcher.start()
        try:
            gone = asyncio.ensure_future(batcher.submit(["gone"]))
            await asyncio.sleep(0)
            gone.cancel()
            kept = await batcher.submit(["kept"])
        finally:
            await batcher.stop()
        return kept, batcher.pending

    kept, pending = asyncio.run(main())
    assert kept == ["kept"] and "gone" not in seen and pending == 0


def test_forward_shapes_are_bounded():
    """Every (rows, width) the server runs comes from a small set, and never exceeds max_length."""
    from honed.serve.loaders import CHUNK, bucket_rows, bucket_width

    for max_length in (32, 100, 128, 512):
        widths = {bucket_width(w, max_length) for w in range(1, max_length + 1)}
        assert all(w <= max_length for w in widths) and len(widths) <= 24
        assert all(bucket_width(w, max_length) >= w for w in range(1, max_length + 1))
    rows = {bucket_rows(n) for n in range(1, CHUNK + 1)}
    assert len(rows) <= 12 and all(bucket_rows(n) >= n for n in range(1, CHUNK + 1))
