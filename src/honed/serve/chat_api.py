"""POST /v1/chat/completions, compatible with the OpenAI API: one reply or `n`, or a stream of
server-sent events in OpenAI's chunk format (the assistant role first, content deltas, a chunk
with finish_reason, a usage chunk when stream_options.include_usage, then `data: [DONE]`).

Everything that can be refused is checked before the response starts (the bearer token and the
body size by RequestGuard; fields, the model, the prompt's length and a free generation slot
here), so a refused stream is an ordinary 4xx/503 with no token generated."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace

from ..errors import HonedError
from .batching import MicroBatcher
from .bodies import parse_body, pick_run
from .generation import GenerationJob, GenerationSlots, Sampling
from .http_errors import HTTPError, missing_extra
from .limits import Limits
from .loaders import Served
from .schemas import chat_request, stop_list

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ModuleNotFoundError as missing:  # the `serve` extra is optional
    raise missing_extra(missing.name) from None

DEFAULT_MAX_TOKENS = 128
SEED_MOD = 2**63  # choice i of a seeded request uses seed + i, kept in torch's seed range


class GenerationStream(StreamingResponse):
    """A StreamingResponse that cancels its generation however the response ends: Starlette
    cancels the sending task when the client disconnects, which may leave the body's async
    generator suspended (and its `finally` unrun) until it is garbage-collected."""

    def __init__(self, content, job: GenerationJob, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def sampling_of(body) -> Sampling:
    """The request's sampling fields; logit_bias keys must be token ids (integers as strings)."""
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = float(value)
        except ValueError:
            raise HTTPError(400, "logit_bias: keys must be token ids (integers)") from None
    return Sampling(max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
                    temperature=body.temperature or 0.0, top_p=body.top_p, seed=body.seed,
                    stop=stop_list(body.stop), logit_bias=bias)


def choice_sampling(sampling: Sampling, index: int) -> Sampling:
    """Choice `index` of a request: its own seed (seed + index), so seeded choices differ but repeat."""
    seed = None if sampling.seed is None else (sampling.seed + index) % SEED_MOD
    return replace(sampling, seed=seed, stop=list(sampling.stop))


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_events(job: GenerationJob, model_id: str, include_usage: bool):
    """The server-sent events of one streamed reply."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model_id}

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
        return sse(body)

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for text in job.pieces():
                yield chunk({"content": text})
        except RuntimeError:  # the generation failed; the server log has why, the client a generic line
            yield sse({"error": {"message": "generation failed; the server log has the details", "type": "server_error"}})
            return
        await job.wait()  # the slot is free before the client hears the reply is complete
        yield chunk({}, job.finish_reason())
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(job.prompt_tokens, [job])})
        yield sse("[DONE]")
    finally:
        job.cancel()  # the client left, or the reply is complete: stop the thread at its next token


def usage(prompt_tokens: int, jobs: list[GenerationJob]) -> dict:
    completion = sum(job.generated for job in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def chat_route(app: FastAPI, runs: dict[str, Served], limits: Limits, batchers: dict[str, MicroBatcher]) -> None:
    """POST /v1/chat/completions for the chat runs; the request's `model` picks the run."""
    body_model = chat_request(limits.max_text_chars, limits.max_inputs)
    model_lock = threading.Lock()  # one generation at a time on this machine, whichever run: they share the cores
    slots = GenerationSlots(limits.max_generations)
    app.state.generation_slots = slots

    def prepare(served: Served, messages: list[dict], sampling: Sampling) -> GenerationJob:
        try:
            return served.info["generator"].prepare(messages, sampling, model_lock)
        except HonedError as exc:  # a prompt longer than the context, malformed turns: the client's to fix
            raise HTTPError(400, str(exc).split(" (")[0]) from None

    async def completions(request: Request):
        body = await parse_body(request, body_model)
        served = pick_run(body.model, runs)
        n = body.n or 1
        if body.stream and n > 1:
            raise HTTPError(400, "n: a stream carries one choice; send n: 1, or stream: false for several choices")
        if body.stream_options is not None and not body.stream:
            raise HTTPError(400, "stream_options: only allowed with stream: true")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        sampling = sampling_of(body)
        job = prepare(served, messages, choice_sampling(sampling, 0))
        slots.acquire()  # 503 when full: before the response starts, so a stream is refused cleanly
        if body.stream:
            job.start().release_when_finished(slots.release)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return GenerationStream(stream_events(job, served.model_id, include_usage), job, media_type="text/event-stream",
                                    headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        jobs, choices = [], []
        try:
            for index in range(n):
                if index:
                    job = prepare(served, messages, choice_sampling(sampling, index))
                jobs.append(job.start())
                text = await job.text()
                await job.wait()
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "finish_reason": job.finish_reason()})
        finally:
            job.cancel()  # the client left mid-request: stop generating; the slot is freed when the thread ends
            job.release_when_finished(slots.release)  # at once when the reply is complete (the thread was awaited)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": served.model_id, "choices": choices, "usage": usage(job.prompt_tokens, jobs),
        })

    app.add_api_route("/v1/chat/completions", completions, methods=["POST"])
