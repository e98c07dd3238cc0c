"""The chat server's batched decoding (serve/decoding.py), in-process: greedy requests that arrive
together are generated in one left-padded batch and each gets the text it gets alone; a request
cancelled while its batch-mate runs leaves the other's text unchanged; a sampled request runs
alone, so its seed gives the same text with or without company."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from chat_helpers import build_tiny_llama

PROMPTS = [[{"role": "user", "content": "My router will not turn on."}],
           [{"role": "system", "content": "You are the support assistant of an electronics shop."},
            {"role": "user", "content": "My laptop lost its password, and the printer is very slow too."}]]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from honed.serve.generation import ChatGenerator

    folder = build_tiny_llama(tmp_path_factory.mktemp("batched") / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return ChatGenerator(SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(folder)))


def replies(generator, requests, cancel_first: bool = False):
    """Start every (messages, Sampling) at once in one event loop; their texts and finish reasons."""
    async def go():
        lock = threading.Lock()
        jobs = [generator.prepare(messages, sampling, lock) for messages, sampling in requests]
        for job in jobs:
            job.start()
        if cancel_first:
            jobs[0].cancel()
        texts = await asyncio.gather(*(job.text() for job in jobs))
        await asyncio.gather(*(job.wait() for job in jobs))
        return texts, [job.finish_reason() for job in jobs], [job.generated for job in jobs]

    return asyncio.run(go())


def greedy(max_tokens: int = 16):
    from honed.serve.generation import Sampling

    return Sampling(max_tokens=max_tokens, logit_bias={})


def test_concurrent_greedy_requests_are_batched_and_match_each_alone(generator):
    alone = [replies(generator, [(p, greedy())]) for p in PROMPTS]
    before = generator.batcher.batch_sizes[2]
    texts, reasons, counts = replies(generator, [(p, greedy()) for p in PROMPTS])
    assert generator.batcher.batch_sizes[2] == before + 1  # one batch of two, not two of one
    assert texts == [a[0][0] for a in alone]
    assert reasons == [a[1][0] for a in alone] and counts == [a[2][0] for a in alone]
    assert any(texts)  # the comparison is not between two empty replies


def test_different_lengths_in_one_batch_stop_on_their_own(generator):
    texts, reasons, counts = replies(generator, [(PROMPTS[0], greedy(3)), (PROMPTS[1], greedy(16))])
    assert counts[0] <= 3 and texts[1] == replies(generator, [(PROMPTS[1], greedy(16))])[0][0]


def test_a_cancelled_request_leaves_its_batch_mate_unchanged(generator):
    alone = replies(generator, [(PROMPTS[1], greedy())])[0][0]
    texts, _, _ = replies(generator, [(PROMPTS[0], greedy()), (PROMPTS[1], greedy())], cancel_first=True)
    assert texts[1] == alone


def test_a_sampled_request_runs_alone_with_its_seed(generator):
    from honed.serve.generation import Sampling

    sampled = Sampling(max_tokens=12, temperature=1.0, seed=5)
    alone = replies(generator, [(PROMPTS[0], sampled)])[0][0]
    texts, _, _ = replies(generator, [(PROMPTS[1], greedy()), (PROMPTS[0], Sampling(max_tokens=12, temperature=1.0, seed=5))])
    assert texts[1] == alone
