"""An in-process transport for a single machine: the broker and the workers share one loop.

It keeps RabbitMQ's delivery semantics where they matter to the code above it: a consumer has
at most ``prefetch`` unsettled jobs, ``reject`` dead-letters, and a consumer that stops without
settling a job gives it back to the queue, flagged as redelivered. Nothing survives the process;
that is the price of needing no server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence

from sf_daq_broker.jobs import Job, SourceKind, StatusEvent
from sf_daq_broker.transport.base import (
    REJECTED_BY_WORKER,
    DeadLetter,
    JobDelivery,
    StatusSubscription,
    Transport,
)

log = logging.getLogger(__name__)


class EmbeddedDelivery(JobDelivery):
    def __init__(self, job: Job, redelivered: bool, transport: EmbeddedTransport) -> None:
        self.job = job
        self.redelivered = redelivered
        self._transport = transport
        self.settled = asyncio.Event()
        self.returned = False

    def _settle(self) -> None:
        if self.returned:
            raise RuntimeError(f"job {self.job.job_id} was given back to the queue already")
        if self.settled.is_set():
            raise RuntimeError(f"job {self.job.job_id} was acknowledged or rejected already")
        self.settled.set()

    async def ack(self) -> None:
        self._settle()

    async def reject(self) -> None:
        self._settle()
        self._transport.dead_letter_jobs.append(self.job)


class _EmbeddedSubscription(StatusSubscription):
    def __init__(self, subscribers: set[asyncio.Queue[StatusEvent]]) -> None:
        self._queue: asyncio.Queue[StatusEvent] = asyncio.Queue()
        self._subscribers = subscribers
        subscribers.add(self._queue)

    async def __anext__(self) -> StatusEvent:
        if self._queue not in self._subscribers and self._queue.empty():
            raise StopAsyncIteration
        return await self._queue.get()

    async def close(self) -> None:
        self._subscribers.discard(self._queue)


class EmbeddedTransport(Transport):
    name = "embedded"

    def __init__(self) -> None:
        self._queues: dict[SourceKind, asyncio.Queue[tuple[Job, bool]]] = {
            kind: asyncio.Queue() for kind in SourceKind
        }
        self._subscribers: set[asyncio.Queue[StatusEvent]] = set()
        self.dead_letter_jobs: list[Job] = []

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribers.clear()

    async def is_healthy(self) -> bool:
        return True

    def queued(self, kind: SourceKind) -> int:
        """Jobs waiting in the queue of ``kind`` (not counting deliveries in progress)."""
        return self._queues[kind].qsize()

    async def publish_jobs(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._queues[job.kind].put_nowait((job, False))

    async def consume_jobs(
        self, kind: SourceKind, prefetch: int = 1
    ) -> AsyncGenerator[JobDelivery, None]:
        queue = self._queues[kind]
        unsettled: list[EmbeddedDelivery] = []
        try:
            while True:
                while len(unsettled) >= prefetch:
                    waiters = [asyncio.ensure_future(d.settled.wait()) for d in unsettled]
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in waiters:
                            waiter.cancel()
                    unsettled = [d for d in unsettled if not d.settled.is_set()]
                job, redelivered = await queue.get()
                delivery = EmbeddedDelivery(job, redelivered, self)
                unsettled.append(delivery)
                yield delivery
        finally:
            for delivery in unsettled:
                if not delivery.settled.is_set():
                    delivery.returned = True
                    log.info("job %s returned to the %s queue", delivery.job.job_id, kind)
                    queue.put_nowait((delivery.job, True))

    async def publish_status(self, event: StatusEvent) -> None:
        for subscriber in list(self._subscribers):
            subscriber.put_nowait(event)

    async def subscribe_status(self, queue_name: str | None = None) -> StatusSubscription:
        return _EmbeddedSubscription(self._subscribers)

    async def take_dead_letters(self) -> list[DeadLetter]:
        jobs, self.dead_letter_jobs = self.dead_letter_jobs, []
        return [
            DeadLetter(f"embedded.jobs.{job.kind.value}", job.to_json(), REJECTED_BY_WORKER, job)
            for job in jobs
        ]
