"""The interface between the broker, the workers and whatever carries jobs and status events.

Semantics both implementations keep (tests run the same scenarios on both):
- ``publish_jobs`` returns only when every job is safely queued, else raises HandoverError;
- a delivered job stays owned by its consumer until ``ack`` (done: gone for good) or
  ``reject`` (failed: moved to the dead-letter queue); a consumer that goes away without
  deciding gives the job back to the queue for another worker;
- status events fan out to every status subscriber;
- a message that cannot be decoded (``UndecodableMessage``) never reaches the consumer, never
  blocks its queue and never stops the consumer: it goes to the dead-letter queue with the
  reason, and ``take_dead_letters`` shows it as a ``DeadLetter`` without a job.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from sf_daq_broker.jobs import Job, SourceKind, StatusEvent


class HandoverError(Exception):
    """Jobs could not be queued; ``handed_over`` lists the sources that were."""

    def __init__(self, message: str, handed_over: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.handed_over = list(handed_over)


@dataclass(frozen=True)
class DeadLetter:
    """A message of the dead-letter queue and why it is there: a job a worker rejected (its
    ``write_rejected`` status event has the worker's reason), or a message that could not be
    decoded (``job`` is None, ``body`` the bytes as they came, ``reason`` the decoder's)."""

    #: The queue the message was taken from.
    origin: str
    body: bytes
    reason: str
    job: Job | None = None


#: The reason of a job that a worker rejected (the worker says why in the job's status event).
REJECTED_BY_WORKER = "rejected by a worker (its write_rejected status event says why)"


class JobDelivery(abc.ABC):
    """A job handed to one consumer, waiting for its verdict."""

    job: Job
    redelivered: bool

    @abc.abstractmethod
    async def ack(self) -> None:
        """The job is done (its file is complete on disk)."""

    @abc.abstractmethod
    async def reject(self) -> None:
        """The job failed for good: move it to the dead-letter queue."""


class Transport(abc.ABC):
    #: Shown in logs and /health.
    name: str

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open connections and declare what the transport needs."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def is_healthy(self) -> bool:
        """Whether jobs could be handed over right now."""

    @abc.abstractmethod
    async def publish_jobs(self, jobs: Sequence[Job]) -> None:
        """Queue every job durably, or raise HandoverError."""

    @abc.abstractmethod
    def consume_jobs(
        self, kind: SourceKind, prefetch: int = 1
    ) -> AsyncGenerator[JobDelivery, None]:
        """Deliveries of the queue of ``kind``, one by one, until the generator is closed
        (``aclose()``: the consumer is cancelled and unacknowledged deliveries go back)."""

    @abc.abstractmethod
    async def publish_status(self, event: StatusEvent) -> None:
        """Send a status event to every subscriber (best effort: never fails a job)."""

    @abc.abstractmethod
    async def subscribe_status(self, queue_name: str | None = None) -> StatusSubscription:
        """Start receiving status events: every event published after this returns.

        With ``queue_name`` the subscription outlives this process where the transport can
        (a durable queue on RabbitMQ): events published meanwhile are delivered on return.
        """

    @property
    def refused_messages(self) -> int:
        """Undecodable messages this process moved to the dead-letter queue so far."""
        return 0

    @abc.abstractmethod
    async def take_dead_letters(self) -> list[DeadLetter]:
        """Remove and return what is in the dead-letter queue: rejected jobs and messages
        that could not be decoded, each with its reason."""

    async def job_queue_depths(self) -> dict[SourceKind, tuple[int, int]] | None:
        """(ready messages, consumers) of each job queue, None where that cannot be seen
        (then nothing is reconciled: ``status.reconcile``)."""
        return None

    async def status_queue_depth(self, queue_name: str) -> int | None:
        """Events waiting in the named status queue, None if unknown."""
        return None


class StatusSubscription(abc.ABC):
    """Status events in the order they were published, until closed."""

    def __aiter__(self) -> StatusSubscription:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> StatusEvent: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> StatusSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
