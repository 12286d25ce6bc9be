"""The preview service: previews computed in a separate process, on demand, and cached.

Why a process: reading HDF5 and drawing with matplotlib hold the GIL for long stretches; in a
thread of the broker they would delay every API request. One niced child process does all the
work, one preview at a time, so the API keeps its cores and a burst of page views queues up
behind the child instead of loading the machine. The child is started at the first preview,
replaced after ``TASKS_PER_CHILD`` previews (matplotlib's caches) or when it died.

Why pebble's pool and not the standard ``ProcessPoolExecutor``: a preview that does not end
(a read from a hanging file system, say) must not hold up every later one. pebble counts a
task's timeout from the moment the child starts it, not from when it was queued behind up to
``MAX_PENDING`` others, and when it runs out the child is terminated and a new one takes the
next preview; the standard pool can only stop waiting for a task, while its child goes on with
it for ever. For the same reason ``close`` terminates the child instead of waiting for it.

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
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar, cast

from pebble import ProcessExpired, ProcessPool

from sf_daq_broker.web import render

log = logging.getLogger(__name__)

CACHE_BYTES = 64 * 1024 * 1024
#: Previews waiting or running at most; beyond that the page is told to come back later.
MAX_PENDING = 64
#: A preview running longer than this is given up and its process ended (the work is bounded:
#: this is a safety net against a stuck read). Time spent waiting in the queue does not count.
TIMEOUT_SECONDS = 120.0
TASKS_PER_CHILD = 200

T = TypeVar("T")


class PreviewBusy(Exception):
    """Too many previews are waiting; the page should ask again later."""


def _result_size(result: Any) -> int:
    if isinstance(result, bytes):
        return len(result)
    return sys.getsizeof(repr(result))


def _end_pool(pool: ProcessPool) -> None:
    """Stop a pool and terminate its child (SIGTERM, SIGKILL after pebble's grace time)."""
    pool.stop()
    pool.join()


class PreviewService:
    """Computes previews in one child process; results cached by key.

    ``get`` raises ``TimeoutError`` for a preview that ran longer than ``timeout`` seconds (its
    process was terminated), ``pebble.ProcessExpired`` when the process died under a preview,
    and ``BrokenProcessPool`` when no process could be started or the service was closed
    under a waiting preview.
    """

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
        self._processes: ProcessPool | None = None
        #: The pool's futures not yet done: ``close`` fails those pebble leaves unanswered.
        self._scheduled: set[Future[Any]] = set()
        self._scheduled_lock = threading.Lock()

    def _pool(self) -> ProcessPool:
        if self._processes is not None and not self._processes.active:
            # Broken (e.g. its child could not start; pebble failed its previews with
            # BrokenProcessPool) and refusing new ones: a new pool takes this preview.
            # Ended in a thread, as terminating a child may take pebble's grace time.
            broken, self._processes = self._processes, None
            threading.Thread(target=_end_pool, args=(broken,), daemon=True).start()
        if self._processes is None:
            self._processes = ProcessPool(
                max_workers=1,
                max_tasks=TASKS_PER_CHILD,
                initializer=render.init_preview_process,
                context=multiprocessing.get_context("spawn"),
            )
        return self._processes

    def close(self) -> None:
        """Stop the child, terminating a running preview: a stuck one must not hang shutdown.

        Blocks up to pebble's grace time between SIGTERM and SIGKILL: call it in a thread.
        Previews still waiting or running fail with ``BrokenProcessPool``: pebble may fail
        them as it stops; those it leaves unanswered, the service fails.
        """
        pool, self._processes = self._processes, None
        if pool is None:
            return
        _end_pool(pool)
        with self._scheduled_lock:
            left = list(self._scheduled)
        for future in left:
            if not future.done():
                future.set_exception(BrokenProcessPool("the preview service was closed"))

    def cached(self, key: Hashable) -> Any | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        self._cache.move_to_end(key)
        return entry[0]

    async def get(self, key: Hashable, function: Callable[..., T], *args: Any, what: str = "") -> T:
        """``function(*args)`` computed in the preview process, or its cached result.

        ``what`` names the preview in the log when it fails (default: its key).
        """
        hit = self.cached(key)
        if hit is not None:
            return cast(T, hit)
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                raise PreviewBusy(f"{len(self._pending)} previews are being computed")
            pending = asyncio.ensure_future(self._compute(key, what or repr(key), function, *args))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _compute(self, key: Hashable, what: str, function: Callable[..., T], *args: Any) -> T:
        future = self._pool().schedule(function, args=args, timeout=self.timeout)
        with self._scheduled_lock:
            self._scheduled.add(future)
        future.add_done_callback(self._forget)
        try:
            result = await asyncio.wrap_future(future)
        except TimeoutError:
            log.warning(
                "the preview %s ran longer than %g s: its process was terminated, a new one "
                "takes the next preview",
                what,
                self.timeout,
            )
            raise
        except ProcessExpired as exc:
            log.warning(
                "the preview process died (exit code %s) computing the preview %s; a new one "
                "takes the next preview",
                exc.exitcode,
                what,
            )
            raise
        self.computed += 1
        self._store(key, result)
        return result

    def _forget(self, future: Future[Any]) -> None:
        with self._scheduled_lock:
            self._scheduled.discard(future)

    def _store(self, key: Hashable, result: Any) -> None:
        size = _result_size(result)
        if size > self.cache_bytes:
            return
        self._cache[key] = (result, size)
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, (_, dropped) = self._cache.popitem(last=False)
            self._cached_bytes -= dropped
