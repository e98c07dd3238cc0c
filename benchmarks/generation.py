"""Served generation: honed's /v1/chat/completions at 1, 4 and 16 concurrent streamed requests against
transformers' `generate` called one request at a time on the same model (KV cache on in both).

    python benchmarks/generation.py [--requests 16] [--max-tokens 32] [--concurrency 1,4,16]

The model is benchmarks/llm_memory.py's ~125 M Llama with random weights and its 32 000-token
word-level tokenizer, saved as a honed model folder (a run directory with model/ and honed.json)
and served by `python -m honed serve` in its own process. Every reply is exactly --max-tokens long
(the end-of-turn token is banned: honed's logit_bias, transformers' min_new_tokens), greedy, to the
same --requests prompts. Printed: total completion tokens per second of wall time, the median time
to first token, and the ratio of each concurrency to the one-at-a-time baseline (a fresh process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import announce_machine, append_result, cpu_flags, load_average, machine_cell, today, versions_cell  # noqa: E402
from llm_memory import VOCAB, build_model, build_tokenizer  # noqa: E402
from load_server import start_server, stop_server  # noqa: E402


def prompts(n: int, words: list[str]) -> list[list[dict]]:
    rng = random.Random(5)
    return [[{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(10, 60)))}] for _ in range(n)]


def build_run(root: Path) -> Path:
    """A honed model folder around the random-weight model, as `honed serve` loads a chat run."""
    from honed.models.causal_lm import load_causal_lm
    from honed.models.load import save_model

    if not (root / "model" / "config.json").exists():
        build_model("125m", root / "model")
    run = root / "run"
    if not (run / "model").exists():
        bundle = load_causal_lm(str(root / "model"))
        save_model(bundle, bundle.model, run / "model", {"task": "chat", "messages_column": "messages", "precision": "fp32"})
        # `honed serve` serves finished runs only; this one's figures are not the benchmark's concern
        (run / "metrics.json").write_text(json.dumps({"task": "chat", "note": "built by benchmarks/generation.py, not trained"}))
    return run


def baseline(model_dir: Path, requests: list[list[dict]], max_tokens: int) -> dict:
    """transformers' generate, one request after another, greedy, KV cache on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))  # as `honed serve` (all cores but one)
    firsts, tokens = [], 0

    class First:
        def __init__(self):
            self.started, self.calls, self.first = time.perf_counter(), 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first put is the prompt
                self.first = time.perf_counter() - self.started

        def end(self):
            pass

    started = time.perf_counter()
    for messages in requests:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        streamer = First()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id, streamer=streamer)
        tokens += out.shape[1] - ids.shape[1]
        firsts.append(streamer.first)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "ttft_s": statistics.median(firsts)}


async def served(url: str, token: str, requests: list[list[dict]], max_tokens: int, concurrency: int, eos: int) -> dict:
    """Every request streamed, `concurrency` at a time; completion tokens from each stream's usage chunk."""
    import httpx

    headers = {"authorization": f"Bearer {token}"}
    queue = list(requests)
    firsts, tokens = [], [0]

    async def worker(client):
        while queue:
            messages = queue.pop()
            body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                    "logit_bias": {str(eos): -100}}
            sent = time.perf_counter()
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                assert response.status_code == 200, await response.aread()
                first = None
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - sent
                    if event.get("usage"):
                        tokens[0] += event["usage"]["completion_tokens"]
                firsts.append(first)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"tokens": tokens[0], "seconds": time.perf_counter() - started, "ttft_s": statistics.median(f for f in firsts if f is not None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="prompts, the same for every setting")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (exactly: end-of-turn is banned)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrent requests")
    parser.add_argument("--keep", help="build the model here and reuse it")
    parser.add_argument("--no-record", action="store_true", help="do not append a row to RESULTS.md")
    parser.add_argument("--note", default="", help="a note for the RESULTS.md row")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokenizer, words = build_tokenizer(VOCAB)
    requests = prompts(args.requests, words)
    if args.child:  # the baseline, in a process of its own
        print("RESULT " + json.dumps(baseline(Path(args.folder) / "run" / "model", requests, args.max_tokens)), flush=True)
        return
    info, load_before = announce_machine()
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()) or "none"
    folder = Path(args.keep or tempfile.mkdtemp(prefix="generation_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    run = build_run(folder)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--child", "--folder", str(folder), "--requests", str(args.requests),
                           "--max-tokens", str(args.max_tokens)], capture_output=True, text=True, env=env)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"baseline failed: {proc.stderr[-2000:]}")
    results = {"generate": json.loads(line[7:])}
    base = results["generate"]
    print(f"{'transformers generate, one at a time':<38} {base['tokens'] / base['seconds']:7.1f} tokens/s  TTFT {base['ttft_s'] * 1000:7.0f} ms",
          flush=True)
    token = secrets.token_hex(8)
    server, url = start_server(run, token, folder / "server.log")
    try:
        for c in [int(x) for x in args.concurrency.split(",") if x.strip()]:
            r = results[f"honed x{c}"] = asyncio.run(served(url, token, requests, args.max_tokens, c, tokenizer.eos_token_id))
            ratio = (r["tokens"] / r["seconds"]) / (base["tokens"] / base["seconds"])
            print(f"{f'honed serve, {c} concurrent':<38} {r['tokens'] / r['seconds']:7.1f} tokens/s  TTFT {r['ttft_s'] * 1000:7.0f} ms  "
                  f"{ratio:5.2f}x the baseline", flush=True)
    finally:
        stop_server(server)
    if not args.no_record:
        rate = lambda k: results[k]["tokens"] / results[k]["seconds"] if k in results else float("nan")  # noqa: E731
        cells = [f"{rate(k):.1f} ({results[k]['ttft_s'] * 1000:.0f} ms)" for k in ("generate", "honed x1", "honed x4", "honed x16") if k in results]
        append_result("Served generation: honed /v1/chat/completions vs transformers generate one at a time (125 M Llama, fp32, greedy)",
                      ["date", "requests × tokens", "generate tokens/s (TTFT)", "honed ×1", "honed ×4", "honed ×16", "×16 ÷ generate",
                       "CPU", "versions", "note"],
                      [today(), f"{args.requests} × {args.max_tokens}", *cells, *["–"] * (4 - len(cells)),
                       f"{rate('honed x16') / rate('generate'):.2f}×" if "honed x16" in results else "–",
                       machine_cell(info) + f" [{isa}]", versions_cell(info), f"load {load_before:.1f}→{load_average():.1f}. {args.note}".strip()])


if __name__ == "__main__":
    main()
