"""`honed serve` under a bounded load on loopback (issue 5 part 4, issue 7 part 6).

N concurrent clients (each its own keep-alive connection) each send M requests to
POST /v1/predict, one after another; the script stops by itself when they are done (or at
--timeout). While they run, the server process's RSS is sampled (psutil). Prints requests/s,
p50/p90/p99/max latency, the error count (any non-200, transport error, or a response
without one valid prediction per input) and RSS at start, end and max.

By default the script builds a run itself (generated text, a small BERT-style classifier
with random weights fine-tuned head-only for one epoch: the run directory is real, the
model small), starts `python -m honed serve` on a free 127.0.0.1 port with a bearer token,
and stops it at the end.

    python benchmarks/load_server.py                            # 16 clients x 500 requests
    python benchmarks/load_server.py --clients 32 --requests 200 --inputs 4
    python benchmarks/load_server.py --size distilbert          # a DistilBERT-size model
    python benchmarks/load_server.py --run-dir runs/my-run      # serve an existing run
    python benchmarks/load_server.py --url http://127.0.0.1:8000 --pid 1234 --token T   # a running server

Streaming mode (issue 16 part 5), for a chat run: N clients each stream M replies from
POST /v1/chat/completions (stream: true, include_usage) and the script reports time to first
token p50/p99, tokens/s per stream (completion tokens over the time from the first piece to the
last) and errors (non-200, a transport error, a stream without [DONE] or usage):

    python benchmarks/load_server.py --stream --run-dir runs/my-chat-run --clients 4 --requests 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HOST = "127.0.0.1"
MB = 1024 * 1024


# --------------------------------------------------------------------------- a run to serve

def build_run(root: Path, size: str, max_tokens: int) -> Path:
    """Generated data and a checkpoint (common.build_assets), made small unless --size distilbert,
    fine-tuned head-only for one epoch by honed itself."""
    import honed

    assets = common.build_assets(root / "assets", n_train=256, n_eval=64, seed=0, max_tokens=max_tokens)
    if size == "small":
        import torch
        from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

        tokenizer = DistilBertTokenizerFast.from_pretrained(assets["model"])
        torch.manual_seed(0)
        config = DistilBertConfig(n_layers=4, dim=256, hidden_dim=1024, n_heads=4, num_labels=len(common.LABELS),
                                  id2label=dict(enumerate(common.LABELS)), label2id={l: i for i, l in enumerate(common.LABELS)},
                                  pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512)
        DistilBertForSequenceClassification(config).save_pretrained(assets["model"], safe_serialization=True)
    recipe = {
        "task": "text-classification", "model": assets["model"],
        "data": {"train": assets["train"], "validation": assets["validation"], "test": assets["test"], "max_length": max_tokens},
        "method": "head",
        "train": {"epochs": 1, "seed": 0},
        "guards": {"baseline": False},
        "out": str(root / "run"),
    }
    return honed.run(recipe, show_progress=False).run_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(run_dir: Path, token: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, HONED_TOKEN=token, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "honed", "serve", str(run_dir), "--host", HOST, "--port", str(port)],
                                stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}"
    import httpx

    deadline = time.monotonic() + 120
    with httpx.Client(trust_env=False, timeout=2) as probe:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if probe.get(url + "/health").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                stop_server(proc)
                raise SystemExit(f"the server did not answer /health in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- measuring

class RssSampler(threading.Thread):
    """The server's resident memory every `interval` seconds, in a background thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def sample(self) -> int:
        rss = self.process.memory_info().rss
        self.samples.append((time.monotonic(), rss))
        return rss

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                self.sample()
            except Exception:  # the process ended
                return


def one_connection(url: str, headers: dict, timeout: float):
    """A client that keeps one keep-alive connection (each simulated user is one connection), ignoring proxies."""
    import httpx

    return httpx.AsyncClient(base_url=url, headers=headers, trust_env=False, timeout=timeout,
                             limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))


def past(stop_at: float, errors: list) -> bool:
    """True (and noted in errors) once the run's --timeout has passed."""
    if time.monotonic() > stop_at:
        errors.append("stopped at --timeout")
        return True
    return False


async def client_loop(url: str, headers: dict, texts: list[str], requests: int, inputs: int, offset: int, labels: set,
                      column: str, latencies: list, errors: list, stop_at: float) -> None:
    async with one_connection(url, headers, 60) as client:
        for i in range(requests):
            if past(stop_at, errors):
                return
            batch = [texts[(offset + i * inputs + k) % len(texts)] for k in range(inputs)]
            start = time.perf_counter()
            try:
                response = await client.post("/v1/predict", json={"inputs": [{column: t} for t in batch]})
            except Exception as exc:
                errors.append(f"{type(exc).__name__}")
                continue
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            predictions = response.json().get("predictions", [])
            if len(predictions) != inputs or any(p.get("label") not in labels for p in predictions):
                errors.append("malformed response")


async def load(url: str, headers: dict, texts: list[str], clients: int, requests: int, inputs: int, labels: set,
               column: str, timeout: float) -> tuple[list, list, float]:
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + timeout
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(url, headers, texts, requests, inputs, c * 997, labels, column, latencies, errors, stop_at)
                           for c in range(clients)))
    return latencies, errors, time.perf_counter() - start


STREAM_PROMPTS = ["My router will not turn on.", "My phone is very slow.", "My laptop arrived broken.",
                  "My printer lost its password.", "Where is my order?", "How do I reset my headset?"]


async def stream_loop(url: str, headers: dict, model: str, requests: int, max_tokens: int, offset: int,
                      firsts: list, rates: list, errors: list, stop_at: float) -> None:
    """One client: `requests` streamed replies, one after another, on one keep-alive connection."""
    async with one_connection(url, headers, 120) as client:
        for i in range(requests):
            if past(stop_at, errors):
                return
            body = {"model": model, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": STREAM_PROMPTS[(offset + i) % len(STREAM_PROMPTS)]}]}
            start = time.perf_counter()
            first = last = None
            tokens, done = None, False
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        payload = line[len("data: "):]
                        if payload == "[DONE]":
                            done = True
                            continue
                        event = json.loads(payload)
                        if event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
                        if event.get("choices") and event["choices"][0]["delta"].get("content"):
                            last = time.perf_counter()
                            first = first or last
            except Exception as exc:
                errors.append(type(exc).__name__)
                continue
            if not done or tokens is None:
                errors.append("a stream without [DONE] or usage")
                continue
            if first is not None:
                firsts.append(first - start)
                if tokens > 1 and last > first:
                    rates.append((tokens - 1) / (last - first))  # the first token's time is the time to first token


async def stream_load(url: str, headers: dict, model: str, clients: int, requests: int, max_tokens: int,
                      timeout: float) -> tuple[list, list, list, float]:
    firsts: list[float] = []
    rates: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + timeout
    start = time.perf_counter()
    await asyncio.gather(*(stream_loop(url, headers, model, requests, max_tokens, c * 7, firsts, rates, errors, stop_at)
                           for c in range(clients)))
    return firsts, rates, errors, time.perf_counter() - start


def report_streams(url: str, model: str, args, firsts: list, rates: list, errors: list, seconds: float) -> dict:
    ms = [x * 1000 for x in firsts]
    figures = {
        "url": url, "model": model, "mode": "stream", "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "streams": len(firsts), "seconds": round(seconds, 2),
        "time_to_first_token_ms": {"p50": round(percentile(ms, 0.5), 1), "p99": round(percentile(ms, 0.99), 1),
                                   "max": round(max(ms), 1) if ms else None},
        "tokens_per_s_per_stream": {"p50": round(percentile(rates, 0.5), 1), "p10": round(percentile(rates, 0.1), 1),
                                    "mean": round(statistics.fmean(rates), 1) if rates else None},
        "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
    }
    print(f"server: {url}  model: {model}  load: {args.clients} clients x {args.requests} streams, max_tokens {args.max_tokens}")
    ttft, rate = figures["time_to_first_token_ms"], figures["tokens_per_s_per_stream"]
    print(f"streams: {len(firsts)} in {seconds:.1f} s; time to first token p50 {ttft['p50']} ms, p99 {ttft['p99']} ms, max {ttft['max']} ms")
    print(f"tokens/s per stream: p50 {rate['p50']}, p10 {rate['p10']}, mean {rate['mean']}")
    print(f"errors: {len(errors)}" + (f"  ({'; '.join(figures['error_kinds'])})" if errors else ""))
    print(f"machine: {common.machine_cell(common.machine())}, load average {common.load_average():.1f}")
    return figures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, default=500, help="requests per client (default 500)")
    parser.add_argument("--inputs", type=int, default=1, help="texts per request (default 1)")
    parser.add_argument("--warmup", type=int, default=50, help="requests before measuring (default 50)")
    parser.add_argument("--timeout", type=float, default=900, help="stop the load after this many seconds (default 900)")
    parser.add_argument("--size", choices=["small", "distilbert"], default="small",
                        help="model built when no --run-dir/--url: small (4 layers, width 256) or distilbert (6 x 768)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_length of the built run and longest generated text; with --stream, max_tokens of each reply (default 64)")
    parser.add_argument("--run-dir", type=Path, help="serve this finished run instead of building one")
    parser.add_argument("--url", help="load a server that is already running (no start/stop)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for the RSS samples")
    parser.add_argument("--token", default=os.environ.get("HONED_TOKEN"), help="bearer token (default: $HONED_TOKEN; a random one when the script starts the server)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the built run and the server log (their folder is printed)")
    parser.add_argument("--stream", action="store_true", help="stream chat replies (needs --run-dir or --url of a chat run)")
    args = parser.parse_args()
    if min(args.clients, args.requests, args.inputs) < 1:
        parser.error("--clients, --requests and --inputs must be at least 1")
    if args.stream and not (args.run_dir or args.url):
        parser.error("--stream: give a chat run with --run-dir (or a running chat server with --url)")
    if args.stream and args.clients > 16:
        parser.error("--stream: at most 16 clients (the server's default --max-generations; more are refused with 503)")

    import httpx

    work = Path(tempfile.mkdtemp(prefix="honed-load-"))
    proc = None
    try:
        if args.url:
            url, pid, token = args.url.rstrip("/"), args.pid, args.token
        else:
            if args.run_dir is not None:
                run_dir = args.run_dir
            else:
                started = time.time()
                run_dir = build_run(work, args.size, args.max_tokens)
                print(f"built a run ({args.size}) in {time.time() - started:.1f} s: {run_dir}", flush=True)
            token = args.token or secrets.token_urlsafe(24)
            proc, url = start_server(run_dir, token, work / "server.log")
            pid = proc.pid
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=url, headers=headers, trust_env=False, timeout=30) as client:
            response = client.get("/v1/models")
            response.raise_for_status()
            card = response.json()["data"][0]
            if args.stream:
                client.post("/v1/chat/completions", json={"model": card["id"], "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hi"}]}).raise_for_status()
                firsts, rates, errors, seconds = asyncio.run(stream_load(url, headers, card["id"], args.clients, args.requests,
                                                                         args.max_tokens, args.timeout))
                figures = report_streams(url, card["id"], args, firsts, rates, errors, seconds)
                if args.json:
                    args.json.write_text(json.dumps(figures, indent=2))
                if errors:
                    sys.exit(1)
                return
            labels, column = set(card["labels"]), card.get("input", "text")
            texts = [t for t, _ in common.generate_rows(512, seed=99, max_tokens=args.max_tokens)]
            for i in range(args.warmup):
                client.post("/v1/predict", json={"inputs": [{column: texts[i % len(texts)]}]}).raise_for_status()

        sampler = RssSampler(pid) if pid else None
        rss_start = sampler.sample() if sampler else None
        if sampler:
            sampler.start()
        latencies, errors, seconds = asyncio.run(load(url, headers, texts, args.clients, args.requests, args.inputs, labels,
                                                      column, args.timeout))
        if sampler:
            sampler.halt.set()
            sampler.join()
            rss_end = sampler.sample()
            rss_values = [rss for _, rss in sampler.samples]
            tenth = sampler.samples[min(len(sampler.samples) - 1, len(sampler.samples) // 10)][1]
            half = sampler.samples[min(len(sampler.samples) - 1, len(sampler.samples) // 2)][1]
        done = len(latencies)
        ms = [x * 1000 for x in latencies]
        figures = {
            "url": url, "model": card["id"], "clients": args.clients, "requests_per_client": args.requests, "inputs_per_request": args.inputs,
            "requests": done, "seconds": round(seconds, 2), "requests_per_s": round(done / seconds, 1),
            "texts_per_s": round(done * args.inputs / seconds, 1),
            "latency_ms": {"p50": round(percentile(ms, 0.5), 1), "p90": round(percentile(ms, 0.9), 1),
                           "p99": round(percentile(ms, 0.99), 1), "max": round(max(ms), 1) if ms else None,
                           "mean": round(statistics.fmean(ms), 1) if ms else None},
            "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
        }
        if sampler:
            figures["rss_mb"] = {"start": round(rss_start / MB, 1), "after_10pct": round(tenth / MB, 1), "half_way": round(half / MB, 1), "end": round(rss_end / MB, 1),
                                 "max": round(max(rss_values) / MB, 1), "growth": round((rss_end - rss_start) / MB, 1),
                                 "growth_after_10pct": round((rss_end - tenth) / MB, 1),
                                 "samples": len(rss_values)}
        print(f"server: {url}  model: {card['id']}  load: {args.clients} clients x {args.requests} requests x {args.inputs} input(s)")
        print(f"requests: {done} in {seconds:.1f} s -> {figures['requests_per_s']} requests/s ({figures['texts_per_s']} texts/s)")
        lat = figures["latency_ms"]
        print(f"latency: p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms")
        print(f"errors: {len(errors)}" + (f"  ({'; '.join(figures['error_kinds'])})" if errors else ""))
        if sampler:
            r = figures["rss_mb"]
            print(f"server RSS: start {r['start']} MB, after 10% {r['after_10pct']} MB, half-way {r['half_way']} MB, end {r['end']} MB, max {r['max']} MB "
                  f"(growth {r['growth']:+} MB; {r['growth_after_10pct']:+} MB after the first 10%; {r['samples']} samples)")
        else:
            print("server RSS: not sampled (give --pid with --url)")
        print(f"machine: {common.machine_cell(common.machine())}, load average {common.load_average():.1f}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        if errors:
            sys.exit(1)
    finally:
        if proc is not None:
            stop_server(proc)
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
