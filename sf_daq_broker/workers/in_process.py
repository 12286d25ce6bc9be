"""Workers inside the broker's process (``serve --workers``, the demo), on its transport and loop.

One task per source, each awaited on its own when stopping: a worker of one source that fails
must not take the others down with it (the broker goes on serving, and says so loudly), and
stopping waits until every interrupted job has released its lease and left its delivery
unsettled (for the queue to deliver again) before the transport closes. (Within one
``Worker`` the consumers of its sources run in a task group, which also waits for all of them.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sf_daq_broker.transport import Transport
from sf_daq_broker.workers.loop import Source, Worker

log = logging.getLogger(__name__)


class InProcessWorkers:
    """The workers of ``sources`` on ``transport``, started and stopped with the broker."""

    def __init__(self, transport: Transport, sources: Sequence[Source], name: str = "workers"):
        self.transport = transport
        self.sources = list(sources)
        self.name = name
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for source in self.sources:
            task = asyncio.create_task(
                Worker(self.transport, [source]).run(), name=f"{self.name}-{source.kind.value}"
            )
            task.add_done_callback(_report_stopped)
            self.tasks.append(task)

    async def stop(self) -> None:
        """Cancel every worker and wait until each has finished its clean-up."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []


def _report_stopped(task: asyncio.Task[None]) -> None:
    """The workers must never stop on their own: say so loudly if one did."""
    if not task.cancelled() and task.exception() is not None:
        log.critical(
            "the in-process worker %s stopped: %r; its jobs wait until the broker is restarted",
            task.get_name(),
            task.exception(),
        )
