"""One model, one request at a time: a bounded queue in front of a single worker thread.

llama.cpp contexts are not thread-safe, so every generation runs on one dedicated thread. A
request that finds the queue full is refused at once (429) instead of piling up. Every admitted
request carries a RequestControl that the model thread polls between tokens and prefill chunks, so
a deadline, a client that went away or a shutdown frees the thread within one token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from pymorph_edge.generation.generation_record import GenerationCancelled


class QueueFull(Exception):
    pass


class RequestControl:
    """Why a request must stop (None: it may go on). Callable as a Llama cancel check."""

    def __init__(self) -> None:
        self.reason: str | None = None  # "timeout", "disconnect" or "shutdown"; the first one set wins

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def __call__(self) -> bool:
        return self.reason is not None


class ModelWorker:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._admitted = 0  # running + waiting requests
        self._running = 0
        self._controls: set[RequestControl] = set()
        self._closing = False
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymorph-edge-model")

    @property
    def busy(self) -> int:
        return self._admitted

    @property
    def queued(self) -> int:
        """Requests admitted but not yet on the model thread."""
        return self._admitted - self._running

    def admit(self) -> RequestControl:
        with self._lock:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if self._admitted >= self.max_queue + 1:
                raise QueueFull(f"{self._admitted} requests are already running or queued (limit {self.max_queue + 1})")
            self._admitted += 1
            ctl = RequestControl()
            self._controls.add(ctl)
            return ctl

    def _done(self, ctl: RequestControl) -> None:
        with self._lock:
            self._admitted -= 1
            self._controls.discard(ctl)

    @contextlib.contextmanager
    def _running_as(self, ctl: RequestControl) -> Iterator[None]:
        """Count ctl as the running request; one cancelled while it waited in the queue does not start."""
        with self._lock:
            self._running += 1
        try:
            if ctl():
                raise GenerationCancelled(f"request cancelled ({ctl.reason}) before it started")
            yield
        finally:
            with self._lock:
                self._running -= 1

    def _on_thread(self, ctl: RequestControl, fn: Callable[[], Any]) -> Any:
        with self._running_as(ctl):
            return fn()

    async def run(self, ctl: RequestControl, fn: Callable[[], Any]) -> Any:
        """Run fn on the model thread. ctl is what admit() returned."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._on_thread, ctl, fn)
        finally:
            self._done(ctl)

    async def stream(self, ctl: RequestControl, make_iter: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        """Yield the items of make_iter(), produced on the model thread. If the consumer goes away
        (client disconnect cancels this generator), ctl stops the producer at its next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def produce() -> None:
            it = None
            try:
                with self._running_as(ctl):
                    it = make_iter()
                    for item in it:
                        if ctl():
                            raise GenerationCancelled(f"request cancelled ({ctl.reason})")
                        put("item", item)
            except BaseException as exc:  # reported to the consumer, who turns it into an error event
                put("error", exc)
            finally:
                if it is not None and hasattr(it, "close"):
                    it.close()
                self._done(ctl)
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
            ctl.stop("disconnect")  # a no-op when the stream ended by itself: nothing polls it any more

    def stop_all(self, reason: str = "shutdown") -> None:
        """Stop the running request and every queued one at their next check; refuse new ones."""
        with self._lock:
            self._closing = True
            for ctl in self._controls:
                ctl.stop(reason)

    def shutdown(self) -> None:
        self.stop_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
