"""The file half of a job's pipeline: HDF5 calls on a thread of their own, a bounded queue.

An api/1 job is two stages: receiving and decoding the stream (the event loop) and writing
HDF5 (here). Each runs on its own thread, so on two cores both go at once: while the writer
copies a batch into the file, the next ones are received and decoded. The calls run one after
another, in the order submitted, on one thread (h5py is not parallel anyway). At most
``budget`` bytes of submitted work wait: a producer faster than the disk waits in ``submit``
instead of holding the run in memory.

A failed call fails the next ``submit``/``call``. ``close`` drops whatever has not started,
waits for the running call, and runs its final call (closing the file) on the same thread, so
the file is closed before the worker loop removes or publishes it, also when the job was
cancelled or failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sf_daq_broker.h5.channels import ChannelFile

T = TypeVar("T")

#: Bytes of submitted batches that may wait for the writer thread.
PENDING_BUDGET = 32 << 20


class FileStage:
    def __init__(self, budget: int = PENDING_BUDGET) -> None:
        self.budget = budget
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="h5-writer")
        self._pending: collections.deque[tuple[Future[Any], int]] = collections.deque()
        self._pending_bytes = 0
        self._closed = False

    async def submit(self, nbytes: int, function: Callable[..., Any], *args: Any) -> None:
        """Queue ``function(*args)``; wait first while more than ``budget`` bytes wait."""
        await self._settle(lambda: self._pending_bytes + nbytes > self.budget)
        self._pending.append((self._executor.submit(function, *args), nbytes))
        self._pending_bytes += nbytes

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` after everything submitted; its result."""
        await self.drain()
        return await asyncio.wrap_future(self._executor.submit(function, *args))

    async def drain(self) -> None:
        """Wait until everything submitted has run (its first error is raised)."""
        await self._settle(lambda: True)

    async def _settle(self, more: Callable[[], bool]) -> None:
        """Collect finished calls (raising a failure), waiting for the oldest while ``more``."""
        while self._pending and (self._pending[0][0].done() or more()):
            future, nbytes = self._pending[0]
            await asyncio.wrap_future(future)
            self._pending.popleft()
            self._pending_bytes -= nbytes

    async def close(self, final: Callable[[], Any] | None = None) -> None:
        """Cancel what has not started, run ``final`` after the running call, stop the thread.

        Shielded: a job cancelled while closing still leaves the thread idle and ``final``
        done before this returns to the canceller.
        """
        if self._closed:
            return
        self._closed = True
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        done = asyncio.wrap_future(self._executor.submit(final or (lambda: None)))
        self._executor.shutdown(wait=False)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await done  # the file is closed before the canceller goes on
            raise


@contextlib.asynccontextmanager
async def open_channel_file(
    target: Path, attributes: Mapping[str, Any]
) -> AsyncIterator[tuple[FileStage, ChannelFile]]:
    """A ``ChannelFile`` at ``target`` and the stage its calls run on; closed on the stage's
    thread on leaving (the loop then publishes it), or discarded if the block raised (the loop
    removes it): a failed job's file, maybe on a full disk, is never flushed (``h5.closing``)."""
    stage = FileStage()
    opened: list[ChannelFile] = []
    try:
        await stage.call(lambda: opened.append(ChannelFile(target, attributes)))
        yield stage, opened[0]
    except BaseException:
        await stage.close(lambda: _close(opened, discard=True))
        raise
    await stage.close(lambda: _close(opened, discard=False))


def _close(files: list[ChannelFile], *, discard: bool) -> None:
    for file in files:
        if discard:
            file.discard()
        else:
            file.close()
