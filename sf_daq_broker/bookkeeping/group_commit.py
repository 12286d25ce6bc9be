"""Group commit: concurrent callers share one lock hold and one set of fsyncs.

Accepting a run costs a lock and several fsyncs, and requests to one pgroup are serialised on
them. Instead of each caller taking the lock in turn, callers queue their item; whoever finds
nobody committing becomes the *leader*, takes every item queued so far and commits them as one
batch (one lock hold, one ``LAST_RUN`` write, the batch's fsyncs issued together), while the
others wait for their own item's outcome. Items that arrive during a commit form the next
batch, led by one of their own callers, so a caller never works for later arrivals after its
own item is done, and a lone caller commits at once without waiting for company.

The commit function sets each item's outcome (``Pending.succeed`` / ``fail``); an item it
leaves open, or every open item if it raises, gets the error, so no caller waits forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class Pending(Generic[ItemT, ResultT]):
    """One caller's item and, once its batch is committed, its outcome."""

    def __init__(self, item: ItemT) -> None:
        self.item = item
        self.done = False
        self._result: ResultT | None = None
        self._error: BaseException | None = None

    def succeed(self, result: ResultT) -> None:
        self._result, self.done = result, True

    def fail(self, error: BaseException) -> None:
        self._error, self.done = error, True

    def outcome(self) -> ResultT:
        if self._error is not None:
            raise self._error
        assert self.done, "outcome() before the item was committed"
        return cast(ResultT, self._result)


Commit = Callable[[list[Pending[ItemT, ResultT]]], None]


class GroupCommit(Generic[ItemT, ResultT]):
    """Leader/follower batching of blocking commits (one instance per shared resource)."""

    def __init__(self, commit: Commit[ItemT, ResultT]) -> None:
        self._commit = commit
        self._condition = threading.Condition()
        self._queue: list[Pending[ItemT, ResultT]] = []
        self._leading = False
        #: Sizes of the batches committed so far (for tests and benchmarks), newest last.
        self.batch_sizes: list[int] = []

    @property
    def queued(self) -> int:
        """Items waiting for the next batch (not the one being committed)."""
        with self._condition:
            return len(self._queue)

    def submit(self, item: ItemT) -> ResultT:
        """Commit ``item`` (alone or with the items of concurrent callers); its result."""
        pending: Pending[ItemT, ResultT] = Pending(item)
        with self._condition:
            self._queue.append(pending)
            while self._leading and not pending.done:
                self._condition.wait()
            if pending.done:
                return pending.outcome()
            self._leading = True
            batch, self._queue = self._queue, []
            self.batch_sizes.append(len(batch))
            del self.batch_sizes[:-1000]
        try:
            self._commit(batch)
        except BaseException as exc:
            for entry in batch:
                if not entry.done:
                    entry.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            for entry in batch:
                if not entry.done:
                    entry.fail(RuntimeError("the commit left this item without an outcome"))
            with self._condition:
                self._leading = False
                self._condition.notify_all()
        return pending.outcome()
