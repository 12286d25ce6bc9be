"""Loops stop when asked, even if a library swallowed the request.

A library may catch the CancelledError it receives while, say, closing a channel and carry on
(seen with aio-pika on a loaded machine). The request is still counted on the task
(``Task.cancelling``); a loop that ignored it would keep running, and the broker's stop, which
waits for its tasks, would wait for ever. So every loop that waits or retries (the broker's
background loops, a job's tries and its wait for data) asks before it goes round again. (On
Python 3.11 ``asyncio.wait_for`` may also turn a cancellation that meets its timeout into a
TimeoutError, which a retry loop would take for a slow buffer.)
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task was asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
