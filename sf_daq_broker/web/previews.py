"""The preview service: previews computed in a separate process, on demand, and cached.

Why a process: reading HDF5 and drawing with matplotlib hold the GIL for long stretches; in a
thread of the broker they would delay every API request. One niced child process does all the
work, one preview at a time, so the API keeps its cores and a burst of page views queues up
behind the child instead of loading the machine. The child is started at the first preview,
replaced after ``TASKS_PER_CHILD`` previews (matplotlib's caches) or when it died.

Why a cache: a finished file never changes under its name (a redelivered job writes a new file
and renames it over the old one, which changes its modification time and size), so a preview
keyed by (path, mtime, size, what) stays right; the cache holds at most ``cache_bytes`` of
results and forgets the least recently used. The same preview asked for twice while it is being
computed is computed once.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar, cast

from sf_daq_broker.web import render

log = logging.getLogger(__name__)

CACHE_BYTES = 64 * 1024 * 1024
#: Previews waiting or running at most; beyond that the page is told to come back later.
MAX_PENDING = 64
#: A preview taking longer than this is given up (the work is bounded: this is a safety net).
TIMEOUT_SECONDS = 120.0
TASKS_PER_CHILD = 200

T = TypeVar("T")


class PreviewBusy(Exception):
    """Too many previews are waiting; the page should ask again later."""


def _result_size(result: Any) -> int:
    if isinstance(result, bytes):
        return len(result)
    return sys.getsizeof(repr(result))


class PreviewService:
    """Computes previews in one child process; results cached by key."""

    def __init__(
        self,
        cache_bytes: int = CACHE_BYTES,
        max_pending: int = MAX_PENDING,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self.cache_bytes = cache_bytes
        self.max_pending = max_pending
        self.timeout = timeout
        self.computed = 0  # previews computed (not served from the cache), for tests and logs
        self._cache: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._cached_bytes = 0
        self._pending: dict[Hashable, asyncio.Future[Any]] = {}
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> Executor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=render.init_preview_process,
                max_tasks_per_child=TASKS_PER_CHILD,
            )
        return self._executor

    def close(self) -> None:
        """Stop the child (a running preview is waited for: its work is bounded)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def cached(self, key: Hashable) -> Any | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        self._cache.move_to_end(key)
        return entry[0]

    async def get(self, key: Hashable, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` computed in the preview process, or its cached result."""
        hit = self.cached(key)
        if hit is not None:
            return cast(T, hit)
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                raise PreviewBusy(f"{len(self._pending)} previews are being computed")
            pending = asyncio.ensure_future(self._compute(key, function, *args))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _compute(self, key: Hashable, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._pool(), function, *args), self.timeout
            )
        except BrokenProcessPool:
            log.warning("the preview process died; a new one starts with the next preview")
            broken, self._executor = self._executor, None
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            raise
        self.computed += 1
        self._store(key, result)
        return result

    def _store(self, key: Hashable, result: Any) -> None:
        size = _result_size(result)
        if size > self.cache_bytes:
            return
        self._cache[key] = (result, size)
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, (_, dropped) = self._cache.popitem(last=False)
            self._cached_bytes -= dropped
