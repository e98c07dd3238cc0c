"""The micro-batcher: requests that arrive together run as one call of the model, in one worker
thread, so the event loop stays free for HTTP and the model is never called concurrently."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

log = logging.getLogger("honed.serve")


class Overloaded(Exception):
    """More texts are waiting than the server holds (Limits.max_pending_texts): the app answers 503."""


class MicroBatcher:
    """Collects the texts of requests that arrive together (up to `max_texts`, or for up to
    `max_wait_s` after the first), runs `fn` once on all of them in one worker thread, and
    hands each request its slice of the results."""

    def __init__(self, fn: Callable[[list[str]], list], max_texts: int, max_wait_s: float, max_pending: int):
        self.fn = fn
        self.max_texts = max_texts
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self.pending = 0
        self.batches = 0
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="honed-infer")

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop(), name="honed-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.queue is not None:
            while not self.queue.empty():
                _, fut = self.queue.get_nowait()
                if not fut.done():
                    fut.set_exception(Overloaded())
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: list[str]) -> list:
        if self.pending + len(texts) > self.max_pending:
            raise Overloaded()
        fut = asyncio.get_running_loop().create_future()
        self.pending += len(texts)
        try:
            await self.queue.put((texts, fut))
            return await fut
        finally:
            self.pending -= len(texts)

    async def _get_within(self, timeout: float):
        """The next queued item within `timeout`, or None; never loses an item to the timeout."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        if timeout <= 0:
            return None
        getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({getter}, timeout=timeout)
        if done:
            return getter.result()
        getter.cancel()
        try:
            return await getter  # it may have completed just before the cancel
        except asyncio.CancelledError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            count = len(batch[0][0])
            deadline = loop.time() + self.max_wait_s
            while count < self.max_texts:
                item = await self._get_within(deadline - loop.time())
                if item is None:
                    break
                batch.append(item)
                count += len(item[0])
            batch = [(texts, fut) for texts, fut in batch if not fut.done()]  # clients that went away
            if not batch:
                continue
            texts = [t for item, _ in batch for t in item]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, texts)
            except Exception as exc:  # the handler turns this into a 500 without its text
                log.error("inference failed on a batch of %d texts", len(texts), exc_info=exc)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError("inference failed"))
                continue
            self.batches += 1
            start = 0
            for item, fut in batch:
                if not fut.done():
                    fut.set_result(results[start : start + len(item)])
                start += len(item)
