"""Handing accepted jobs to the queue, also while RabbitMQ is away.

A request the broker accepted has its run number, its run JSON and its jobs' rows in the status
store. Its jobs are then published to RabbitMQ; if that fails (RabbitMQ stopped, restarting,
unreachable), they are written to the broker's durable outbox (``transport.outbox``, SQLite in
the state directory) instead, the client still gets its run number (200), and ``/run_status``
says ``queued (waiting for the queue)``. A background task (``OutboxSender``) hands the waiting
jobs over once RabbitMQ is back: oldest first, each confirmed before the next, then says so in
the store (``queued``) and publishes their ``write_request`` events.

While the outbox holds jobs, new jobs go behind them, so a run never overtakes one accepted
before it. Only when the outbox cannot be written either (the state directory's disk is
broken) is the request refused (503): the run number is spent, the run JSON says why.

Handing over is at least once: a job confirmed by RabbitMQ whose removal from the outbox did
not happen (the broker was killed in between) is sent again after the restart; its job id is
the same, so the worker's lease and status treat it as a delivery of the same job (a job that
finished already is written again, to the same name).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from sf_daq_broker.jobs import Action, Job, StatusEvent
from sf_daq_broker.status.store import WAITING_FOR_QUEUE, JobState, StatusStore
from sf_daq_broker.transport import HandoverError, Transport
from sf_daq_broker.transport.failures import without_reprs
from sf_daq_broker.transport.outbox import Backlog, Entry, Outbox
from sf_daq_broker.transport.outbox_sender import OutboxSender, RetryTiming

log = logging.getLogger(__name__)


class Handover:
    """The broker's way from accepted jobs to the queue (see the module docstring)."""

    def __init__(
        self,
        transport: Transport,
        store: StatusStore,
        outbox: Outbox,
        timing: RetryTiming | None = None,
    ) -> None:
        self.transport = transport
        self.store = store
        self.outbox = outbox
        self.sender = OutboxSender(
            outbox,
            self._send,
            "accepted jobs",
            lambda exc: without_reprs(str(exc)) or exc.__class__.__name__,
            confirmed=self._handed_over,
            timing=timing,
        )

    @classmethod
    def open(cls, transport: Transport, store: StatusStore, state_dir: Path) -> Handover:
        """The handover of a broker whose state is in ``state_dir`` (jobs left in its outbox by
        an earlier run of the broker are handed over first)."""
        return cls(transport, store, Outbox.claim(state_dir / "handover", "jobs"))

    def start(self) -> None:
        if self.outbox.count:
            log.info("%d accepted jobs wait in the outbox for the queue", self.outbox.count)
            self.sender.wake()

    async def close(self) -> None:
        await self.sender.close()
        await asyncio.to_thread(self.outbox.close)

    def backlog(self) -> Backlog:
        return self.outbox.backlog()

    def waiting_job_ids(self) -> set[str]:
        return self.outbox.keys()

    async def submit(self, jobs: Sequence[Job]) -> list[Job]:
        """Hand ``jobs`` over now, or put them into the outbox; returns the jobs that wait.

        Raises HandoverError (with the jobs handed over) only if the outbox cannot be written.
        """
        waiting = list(jobs)
        if not self.outbox.count:
            try:
                await self.transport.publish_jobs(jobs)
                return []
            except HandoverError as exc:
                waiting = [job for job in jobs if job.source not in exc.handed_over]
                log.warning("%d jobs wait for the queue: %s", len(waiting), exc)
        try:
            await asyncio.to_thread(
                self.outbox.put, [(job.job_id, job.to_json()) for job in waiting]
            )
        except (OSError, sqlite3.Error) as exc:
            waiting_ids = {job.job_id for job in waiting}
            handed_over = [job.source for job in jobs if job.job_id not in waiting_ids]
            raise HandoverError(
                f"RabbitMQ does not take jobs and the outbox {self.outbox.path} cannot be "
                f"written ({exc})",
                handed_over,
            ) from exc
        await asyncio.to_thread(
            self.store.set_queued_message, [job.job_id for job in waiting], WAITING_FOR_QUEUE
        )
        self.sender.wake()
        return waiting

    async def _send(self, entry: Entry) -> None:
        await self.transport.publish_jobs([Job.from_json(entry.body)])

    async def _handed_over(self, entries: list[Entry]) -> None:
        jobs = [Job.from_json(entry.body) for entry in entries]
        await asyncio.to_thread(
            self.store.set_queued_message, [job.job_id for job in jobs], JobState.QUEUED.value
        )
        await announce_queued(self.transport, jobs)


async def announce_queued(transport: Transport, jobs: Sequence[Job]) -> None:
    """The ``write_request`` event of each job now in the queue (for status listeners)."""
    await asyncio.gather(
        *(
            transport.publish_status(
                StatusEvent.for_job(Action.WRITE_REQUEST, job, f"{job.source} job queued")
            )
            for job in jobs
        )
    )
