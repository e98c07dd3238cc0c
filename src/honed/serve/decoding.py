"""Batched decoding for the chat server: one worker thread per chat model takes the generation jobs
that arrive within BATCH_WINDOW_S of each other (up to MAX_BATCH), left-pads their prompts and
generates them together with transformers' `generate` (KV cache on), so 16 concurrent requests
cost about one pass over the weights per token, not sixteen.

Greedy requests are batched; a sampled one (temperature > 0) runs alone, seeding torch's generator
first, so a seed gives the same text whatever else the server is doing. Each row streams its own
tokens to its job's streamer as they are produced, and stops on its own: at the end-of-turn token,
at its max_tokens, or when its client leaves (the job is cancelled); the batch ends when every row
has. The model lock (one per server: the runs behind it share the cores) is held for a whole batch.
"""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
import time

log = logging.getLogger("honed.serve")

BATCH_WINDOW_S = 0.02  # how long the first job of a batch waits for others (requests sent together arrive this close)
MAX_BATCH = 16
SEED_BITS = 63  # torch.manual_seed takes a 64-bit signed integer


class Batcher:
    """The jobs of one model, decoded in batches by one daemon thread."""

    def __init__(self, model, tokenizer, eos_id: int | None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.jobs: queue.Queue = queue.Queue()
        self.held: collections.deque = collections.deque()  # sampled jobs met while a greedy batch was filling
        self.thread: threading.Thread | None = None
        self.start_lock = threading.Lock()
        self.batch_sizes: collections.Counter = collections.Counter()  # how many batches of each size ran (observability)

    def submit(self, job) -> None:
        """Queue `job` (a GenerationJob) for the next batch."""
        with self.start_lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self.work, name="honed-generate", daemon=True)
                self.thread.start()
        self.jobs.put(job)

    def next_batch(self) -> list:
        first = self.held.popleft() if self.held else self.jobs.get()
        batch = [first]
        if first.sampling.temperature > 0:
            return batch
        deadline = time.monotonic() + BATCH_WINDOW_S
        while len(batch) < MAX_BATCH:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (self.held if job.sampling.temperature > 0 else batch).append(job)
        return batch

    def work(self) -> None:
        while True:
            batch = self.next_batch()
            try:
                self.run(batch)
            except Exception as exc:  # noqa: BLE001 - logged; the clients get a generic error
                log.error("generation failed", exc_info=exc)
                for job in batch:
                    job.failed = True
            finally:
                for job in batch:
                    job.finish_row()

    def run(self, batch: list) -> None:
        import torch

        live = [job for job in batch if not job.cancelled.is_set()]  # the clients that left while waiting get nothing
        if not live:
            return
        self.batch_sizes[len(live)] += 1
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos_id or 0)
        width = max(int(job.ids.shape[1]) for job in live)
        ids = torch.full((len(live), width), pad, dtype=torch.long, device=live[0].ids.device)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(live):  # left padding: every prompt ends where generation starts
            n = int(job.ids.shape[1])
            ids[i, width - n:] = job.ids[0]
            mask[i, width - n:] = 1
        s = live[0].sampling
        kwargs = {"do_sample": False}
        if s.temperature > 0:  # alone in its batch (next_batch)
            kwargs = {"do_sample": True, "temperature": float(s.temperature)}
            if s.top_p is not None:
                kwargs["top_p"] = float(s.top_p)
        with live[0].model_lock, torch.inference_mode():
            if s.temperature > 0:  # under the lock: the global generator is the model's to draw from
                torch.manual_seed(s.seed if s.seed is not None else secrets.randbits(SEED_BITS))
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(job.sampling.max_tokens for job in live),
                                pad_token_id=pad, eos_token_id=self.eos_id, streamer=RowStreamer(live, self.eos_id),
                                stopping_criteria=stopping(live), logits_processor=biases(live), **kwargs)


class RowStreamer:
    """transformers' streamer interface over a batch: each row's new token goes to its own job."""

    def __init__(self, jobs: list, eos_id: int | None):
        self.jobs = jobs
        self.eos_id = eos_id
        self.prompt_seen = False

    def put(self, value) -> None:
        import torch

        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done:
                continue
            job.generated += 1
            job.last_token = int(token)
            job.streamer.put(torch.tensor([token]))
            if token == self.eos_id or job.generated >= job.sampling.max_tokens:
                job.finish_row()

    def end(self) -> None:
        for job in self.jobs:
            job.finish_row()


def stopping(jobs: list):
    """Per row: stop when its job is finished or cancelled (checked after every token)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            for job in jobs:
                if job.cancelled.is_set():
                    job.finish_row()
            return torch.tensor([job.done for job in jobs], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([RowsDone()])


def biases(jobs: list):
    """Each row's logit_bias, or None when no row has one."""
    from transformers import LogitsProcessor, LogitsProcessorList

    if not any(job.sampling.logit_bias for job in jobs):
        return None

    class RowBias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for i, job in enumerate(jobs):
                if job.sampling.logit_bias:
                    ids, values = list(job.sampling.logit_bias), list(job.sampling.logit_bias.values())
                    scores[i, ids] += scores.new_tensor(values)
            return scores

    return LogitsProcessorList([RowBias()])
