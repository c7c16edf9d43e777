"""One model, one request at a time: a bounded queue in front of a single worker thread.

llama.cpp contexts are not thread-safe, so every generation runs on one dedicated thread. A
request that finds the queue full is refused at once (429) instead of piling up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any


class QueueFull(Exception):
    pass


class ModelWorker:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._admitted = 0  # running + waiting requests
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymorph-edge-model")

    @property
    def busy(self) -> int:
        return self._admitted

    def admit(self) -> None:
        with self._lock:
            if self._admitted >= self.max_queue + 1:
                raise QueueFull(f"{self._admitted} requests are already running or queued (limit {self.max_queue + 1})")
            self._admitted += 1

    def _done(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the model thread. The caller must have been admitted."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn)
        finally:
            self._done()

    async def stream(self, make_iter: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        """Yield the items of make_iter(), produced on the model thread. If the consumer goes away
        (client disconnect cancels this generator), the producer stops at its next item and frees the slot."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def produce() -> None:
            it = None
            try:
                it = make_iter()
                for item in it:
                    if stop.is_set():
                        break
                    put("item", item)
            except BaseException as exc:  # reported to the consumer, who turns it into an error event
                put("error", exc)
            finally:
                if it is not None and hasattr(it, "close"):
                    it.close()
                self._done()
                try:
                    put("end", None)
                except RuntimeError:  # the event loop is gone (server shutting down)
                    pass

        self._pool.submit(produce)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
