"""Loops stop when asked, even if a library swallowed the request.

A library may catch the CancelledError it receives while, say, closing a channel and carry on
(seen with aio-pika on a loaded machine). The request is still counted on the task
(``Task.cancelling``); a loop that ignored it would keep running, and the broker's stop, which
waits for its tasks, would wait for ever. So every loop that waits or retries (the broker's
background loops, a job's tries and its wait for data) asks before it goes round again. (On
Python 3.11 ``asyncio.wait_for`` may also turn a cancellation that meets its timeout into a
TimeoutError, which a retry loop would take for a slow buffer.)

The other way round, some work must not be cut short by a stop (settling a job, restoring a
detector's settings): ``through_stops`` runs it to its end and tells the caller whether a stop
came meanwhile, for the caller to raise once its own clean-up is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task was asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def through_stops(
    work: Coroutine[Any, Any, T], on_stop: Callable[[], None]
) -> tuple[asyncio.Task[T], asyncio.CancelledError | None]:
    """Run ``work`` in a task of its own until it has ended, even if the caller is asked to
    stop (again and again) meanwhile; ``on_stop`` is called at the first such stop.

    Returns the ended task (its result or exception for the caller to look at) and the stop
    that came meanwhile, if one did: the caller raises it after its own clean-up.
    """
    task = asyncio.ensure_future(work)
    stopped: asyncio.CancelledError | None = None
    while not task.done():
        try:
            # ``wait``, not ``shield``: a stop of the caller does not reach the task, and the
            # task's own failure is not raised here but left on it for the caller.
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            if stopped is None:
                on_stop()
            stopped = exc
    return task, stopped
