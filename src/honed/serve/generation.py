"""Chat generation for the server, token by token: a ChatGenerator per chat run turns a request
into a GenerationJob, which runs transformers' `generate` in its own thread and hands the text
to the event loop as it is produced (AsyncTextIteratorStreamer). A streamed and a non-streamed
request go through the same job, so the same seed gives the same text either way.

A job stops early when it is cancelled (the client went away) or when a stop sequence appears:
a StoppingCriteria reads a flag the event loop sets. GenerationSlots bounds how many chat
requests may be generating or waiting for the model; a slot is freed when the job's thread has
finished, not when the client leaves, so a full server really has that many generations.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from dataclasses import dataclass, field

from ..errors import DataError
from .batching import Overloaded

log = logging.getLogger("honed.serve")

SEED_BITS = 63  # torch.manual_seed takes a 64-bit signed integer


@dataclass
class Sampling:
    """How one reply is drawn: greedy when temperature is 0, else sampled with `seed`."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)


class TextCutter:
    """The reply as the client sees it: leading and trailing whitespace dropped (as `honed
    predict` does) and everything from the first stop sequence on cut. feed() returns the text
    that is safe to send now: it holds back the last len(longest stop) - 1 characters, which may
    be the start of a stop sequence, and trailing whitespace, which may be the reply's end."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.started = False
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text of `piece` (plus what was held back) that can be sent now."""
        if self.stopped:
            return ""
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)].rstrip(), ""
            return out
        # what may be sent: all but the possible start of a stop sequence, less its trailing whitespace
        cut = len(self.pending[: max(0, len(self.pending) - self.hold)].rstrip())
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def finish(self) -> str:
        """What was held back, once generation has ended."""
        out, self.pending = ("" if self.stopped else self.pending.rstrip()), ""
        return out


class GenerationSlots:
    """Chat requests generating or waiting for the model, at most `limit`; beyond → Overloaded (503).
    Used from the event loop only."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def acquire(self) -> None:
        """Take a slot, or raise Overloaded when all are taken."""
        if self.used >= self.limit:
            raise Overloaded()
        self.used += 1

    def release(self) -> None:
        """Give a slot back."""
        self.used = max(0, self.used - 1)


class GenerationJob:
    """One reply being generated in a worker thread. Iterate `pieces()` in the event loop for the
    text; `cancel()` stops the thread at its next token; `finished` (a future) resolves when the
    thread is done and the model is free."""

    def __init__(self, generator: "ChatGenerator", ids, sampling: Sampling, model_lock: threading.Lock):
        from transformers import AsyncTextIteratorStreamer

        self.generator = generator
        self.ids = ids
        self.sampling = sampling
        self.model_lock = model_lock
        self.cancelled = threading.Event()
        self.failed = False
        self.generated = 0
        self.last_token: int | None = None
        self.cutter = TextCutter(sampling.stop)
        self.loop = asyncio.get_running_loop()
        self.finished = self.loop.create_future()
        # timeout=None: the thread always ends the stream (generate does, and _run does on failure)
        self.streamer = AsyncTextIteratorStreamer(generator.tokenizer, skip_prompt=True, timeout=None, skip_special_tokens=True)
        self.thread = threading.Thread(target=self._run, name="honed-generate", daemon=True)

    @property
    def prompt_tokens(self) -> int:
        return int(self.ids.shape[1])

    def start(self) -> "GenerationJob":
        """Run the generation in its thread; returns the job."""
        self.thread.start()
        return self

    def release_when_finished(self, release) -> None:
        """Call `release()` in the event loop once the thread is done (now, if it never started)."""
        if self.thread.ident is None or self.finished.done():
            release()
        else:
            self.finished.add_done_callback(lambda _: release())

    def cancel(self) -> None:
        """Stop generating at the next token (the thread checks the flag after each)."""
        self.cancelled.set()

    def _criteria(self):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        job = self

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                # called after each new token, before generate ends the stream: the counts are final when the text is
                job.generated = int(input_ids.shape[1]) - job.prompt_tokens
                job.last_token = int(input_ids[0, -1])
                return torch.full((input_ids.shape[0],), job.cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([Cancelled()])

    def _processors(self):
        from transformers import LogitsProcessor, LogitsProcessorList

        if not self.sampling.logit_bias:
            return None
        ids, biases = list(self.sampling.logit_bias), list(self.sampling.logit_bias.values())

        class Bias(LogitsProcessor):
            def __call__(self, input_ids, scores):
                scores[:, ids] += scores.new_tensor(biases)
                return scores

        return LogitsProcessorList([Bias()])

    def _run(self) -> None:
        import torch

        s = self.sampling
        kwargs = {"do_sample": False}
        if s.temperature > 0:
            kwargs = {"do_sample": True, "temperature": float(s.temperature)}
            if s.top_p is not None:
                kwargs["top_p"] = float(s.top_p)
        try:
            with self.model_lock:  # one generation at a time on the model, and on the global RNG
                if self.cancelled.is_set():  # the client left while this request waited
                    self.streamer.end()
                    return
                # sampling draws from torch's global generator: seed it under the lock, so the same
                # seed gives the same text; unseeded requests get a fresh random seed
                torch.manual_seed(s.seed if s.seed is not None else secrets.randbits(SEED_BITS))
                model = self.generator.model
                with torch.inference_mode():
                    model.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=s.max_tokens,
                                   pad_token_id=self.generator.tokenizer.pad_token_id, eos_token_id=self.generator.eos_id,
                                   streamer=self.streamer, stopping_criteria=self._criteria(),
                                   logits_processor=self._processors(), **kwargs)
        except Exception as exc:  # logged here; the client gets a generic error
            log.error("generation failed", exc_info=exc)
            self.failed = True
            self.streamer.end()
        finally:
            try:
                self.loop.call_soon_threadsafe(self._done)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

    def _done(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    async def pieces(self):
        """The reply's text as it is generated (stop sequences and surrounding whitespace removed)."""
        async for piece in self.streamer:
            text = self.cutter.feed(piece)
            if self.cutter.stopped:
                self.cancel()  # the reply is complete: no point generating past the stop text
            if text:
                yield text
            if self.cutter.stopped:
                return
        if self.failed:
            raise RuntimeError("generation failed")
        tail = self.cutter.finish()
        if tail:
            yield tail

    async def wait(self) -> None:
        """Until the thread is done: a client told the reply is complete may send its next request at
        once, and must find this one's slot free."""
        await asyncio.shield(self.finished)

    def finish_reason(self) -> str:
        """OpenAI's finish_reason: "length" when max_tokens ran out before the model ended its reply."""
        if self.cutter.stopped or self.last_token == self.generator.eos_id:
            return "stop"
        return "length" if self.generated >= self.sampling.max_tokens else "stop"

    async def text(self) -> str:
        """The whole reply."""
        return "".join([piece async for piece in self.pieces()])


class ChatGenerator:
    """A chat run's model and tokenizer; prepare() checks a request and encodes its prompt."""

    def __init__(self, bundle):
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.eos_id = self.tokenizer.eos_token_id
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.vocab = int(getattr(config, "vocab_size", None) or len(self.tokenizer))

    def prepare(self, messages: list[dict], sampling: Sampling, model_lock: threading.Lock) -> GenerationJob:
        """A job for `messages`, not started; raises DataError (the client's to fix) for malformed
        turns, a prompt longer than the context or a logit_bias token id outside the vocabulary.
        Must be called in the event loop."""
        from ..tasks.chat.data import validate_messages

        messages = validate_messages(messages, "messages")
        bad = [t for t in sampling.logit_bias if not 0 <= t < self.vocab]
        if bad:
            raise DataError(f"logit_bias: token id {bad[0]} is not in the vocabulary (0 to {self.vocab - 1})")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if self.context is not None and ids.shape[1] >= self.context:
            raise DataError(f"messages: the prompt is {ids.shape[1]} tokens; the model's context is {self.context}; shorten the conversation")
        if self.context is not None:
            sampling.max_tokens = min(sampling.max_tokens, self.context - int(ids.shape[1]))
        device = next(self.model.parameters()).device
        return GenerationJob(self, ids.to(device), sampling, model_lock)
