"""An in-process transport for a single machine: the broker and the workers share one loop.

It keeps RabbitMQ's delivery semantics where they matter to the code above it: a consumer has
at most ``prefetch`` unsettled jobs, ``reject`` dead-letters, and a consumer that stops without
settling a job gives it back to the queue, flagged as redelivered.

Its jobs live on disk (``job_store``: SQLite in the broker's state directory), so the default
single-machine setup is as safe as RabbitMQ: ``publish_jobs`` returns once the jobs are
committed, and a process that is killed or stopped in the middle of a job finds that job (and
every job still waiting) again when it restarts on the same state directory, delivered again
with ``redelivered`` set, while the job lease beside the output file (``workers.lease``) lets
the new delivery take the job over and clean up what the interrupted one left. Without a path
the jobs are kept in an in-memory database, for tests within one process.

Every database call runs in one dedicated thread, in the order it was made: a claim that
follows a publish or a give-back sees it, and the event loop never waits on an fsync. A
waiting consumer is woken by an event when a job of its kind becomes ready; it never polls.
Status events go from the publisher straight to the subscribers' in-memory queues: only the
broker's own process listens to them. (So a kill between a worker's final event and the status
store applying it, a few milliseconds, loses that event with the process's memory; the broker's
reconciler then ends the job from what is on disk, since no queue holds it any more: see
``job_queue_depths``.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sf_daq_broker.jobs import Job, SourceKind, StatusEvent, UndecodableMessage
from sf_daq_broker.transport.base import (
    REJECTED_BY_WORKER,
    DeadLetter,
    HandoverError,
    JobDelivery,
    StatusSubscription,
    Transport,
)
from sf_daq_broker.transport.job_store import Claimed, DeadRow, JobStore, QueueInUse

log = logging.getLogger(__name__)

T = TypeVar("T")


class QueueClosed(Exception):
    """The embedded queue was closed (its broker stops); nothing can be queued or settled."""


class EmbeddedDelivery(JobDelivery):
    def __init__(self, job: Job, claimed: Claimed, transport: EmbeddedTransport) -> None:
        self.job = job
        self.redelivered = claimed.redelivered
        self.claimed = claimed
        self._transport = transport
        self.settled = asyncio.Event()
        self.returned = False
        self._settling = False

    def _start_settling(self) -> None:
        if self.returned:
            raise RuntimeError(f"job {self.job.job_id} was given back to the queue already")
        if self._settling:
            raise RuntimeError(f"job {self.job.job_id} was acknowledged or rejected already")
        self._settling = True

    async def _settle(self, operation: Callable[[JobStore], bool]) -> None:
        self._start_settling()
        try:
            held = await self._transport._call(operation)
        finally:
            self.settled.set()  # the consumer's prefetch slot is free either way
        if not held:
            raise RuntimeError(
                f"job {self.job.job_id}: this delivery is no longer valid (the queue was "
                "reopened or the job given back since), its next delivery settles it"
            )

    async def ack(self) -> None:
        seq, tag = self.claimed.seq, self.claimed.tag
        await self._settle(lambda store: store.ack(seq, tag))

    async def reject(self) -> None:
        seq, tag = self.claimed.seq, self.claimed.tag
        await self._settle(lambda store: store.reject(seq, tag, REJECTED_BY_WORKER))


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


@dataclass(eq=False)
class _Publish:
    """One ``publish_jobs`` call waiting for the next group commit."""

    rows: list[tuple[str, bytes]]
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


class EmbeddedTransport(Transport):
    name = "embedded"

    def __init__(self, path: Path | None = None) -> None:
        """Jobs in the SQLite file ``path`` (durable), or in memory when it is None."""
        self.path = path
        self._store: JobStore | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._reopened = asyncio.Event()
        self._publishes: list[_Publish] = []
        self._publishes_lock = threading.Lock()
        self._wakeups: dict[SourceKind, asyncio.Event] = {
            kind: asyncio.Event() for kind in SourceKind
        }
        self._subscribers: set[asyncio.Queue[StatusEvent]] = set()
        self._refused = 0

    # --- the database thread ----------------------------------------------------------------

    def _open_store(self) -> JobStore:
        """In the database thread: the store, opened on first use (and after ``connect``)."""
        if self._store is None:
            if self._closed:
                raise QueueClosed(f"the embedded queue {self.path} is closed")
            store = JobStore(self.path)
            if self.path is not None:
                log.info(
                    "embedded queue %s opened: %d waiting jobs, %d of them delivered before "
                    "(they are delivered again)",
                    self.path,
                    store.opened.waiting,
                    store.opened.redelivered,
                )
            self._store = store
        return self._store

    def _submit(self, operation: Callable[[JobStore], T]) -> concurrent.futures.Future[T]:
        if self._executor is None:
            if self._closed:
                raise QueueClosed(f"the embedded queue {self.path} is closed")
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="embedded-queue"
            )
        return self._executor.submit(lambda: operation(self._open_store()))

    async def _call(self, operation: Callable[[JobStore], T]) -> T:
        return await asyncio.wrap_future(self._submit(operation))

    def _wake_later(self, kinds: Iterable[SourceKind]) -> Callable[[object], None]:
        """A done-callback (run in the database thread) waking the consumers of ``kinds``."""
        loop = asyncio.get_running_loop()
        wanted = set(kinds)

        def wake(_: object) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._wake, wanted)

        return wake

    def _wake(self, kinds: Iterable[SourceKind]) -> None:
        """Wake every consumer waiting for ``kinds`` (each waits on the event it saw last)."""
        for kind in kinds:
            event, self._wakeups[kind] = self._wakeups[kind], asyncio.Event()
            event.set()

    # --- the transport ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the queue (again, after ``close``): jobs a previous process had taken, or
        that were delivered when it was closed, are given back to their queues."""
        self._closed = False
        try:
            opened = await self._call(lambda store: store.opened)
        except QueueInUse as exc:
            raise HandoverError(str(exc)) from exc
        if opened.waiting:
            self._wake(SourceKind)
        self._reopened.set()

    async def close(self) -> None:
        """Close the file (its lock goes with it); in memory, only the subscribers go: the
        jobs stay for the next broker of this process, as on a RabbitMQ server."""
        self._subscribers.clear()
        if self.path is None or self._executor is None:
            return
        executor, self._executor = self._executor, None
        self._closed = True
        self._reopened = asyncio.Event()

        def close_store() -> None:
            if self._store is not None:
                self._store.close()
                self._store = None

        await asyncio.wrap_future(executor.submit(close_store))
        executor.shutdown(wait=False)

    async def is_healthy(self) -> bool:
        try:
            await self.connect()
        except HandoverError:
            return False
        return True

    def queued(self, kind: SourceKind) -> int:
        """Jobs waiting in the queue of ``kind`` (not counting deliveries in progress)."""
        return self._submit(lambda store: store.count(kind.value)).result()

    async def publish_jobs(self, jobs: Sequence[Job]) -> None:
        """Return once the jobs are committed; concurrent calls share one commit (fsync)."""
        if not jobs:
            return
        pending = _Publish([(job.kind.value, job.to_json()) for job in jobs])
        pending.done.add_done_callback(self._wake_later(job.kind for job in jobs))
        with self._publishes_lock:
            self._publishes.append(pending)
        try:
            await asyncio.wrap_future(self._submit(self._commit_publishes))
        except Exception as exc:
            with self._publishes_lock:
                ours_left = pending in self._publishes
                if ours_left:  # never committed: it must not be committed later either
                    self._publishes.remove(pending)
            if ours_left:
                raise HandoverError(self._refusal(exc)) from exc
        try:
            await asyncio.wrap_future(pending.done)  # committed in this or an earlier batch
        except Exception as exc:
            raise HandoverError(self._refusal(exc)) from exc

    def _refusal(self, exc: Exception) -> str:
        if isinstance(exc, QueueInUse | QueueClosed):
            return str(exc)
        where = self.path or "in memory"
        return f"the embedded queue ({where}) did not take the jobs: {type(exc).__name__}: {exc}"

    def _commit_publishes(self, store: JobStore) -> None:
        """In the database thread: every publish waiting so far, in one transaction."""
        with self._publishes_lock:
            batch, self._publishes = self._publishes, []
        if not batch:
            return  # an earlier call committed ours with its batch
        try:
            store.publish([row for pending in batch for row in pending.rows])
        except BaseException as exc:
            for pending in batch:
                pending.done.set_exception(exc)
            raise
        for pending in batch:
            pending.done.set_result(None)

    async def consume_jobs(
        self, kind: SourceKind, prefetch: int = 1
    ) -> AsyncGenerator[JobDelivery, None]:
        unsettled: list[EmbeddedDelivery] = []
        try:
            while True:
                unsettled = await _room_for_one(unsettled, prefetch)
                wakeup = self._wakeups[kind]  # before looking: a job queued after wakes it
                claimed = await self._claim(kind)
                if claimed is None:
                    await wakeup.wait()
                    continue
                job = await self._decoded(kind, claimed)
                if job is None:
                    continue
                delivery = EmbeddedDelivery(job, claimed, self)
                unsettled.append(delivery)
                yield delivery
        finally:
            self._give_back(kind, unsettled)

    async def _claim(self, kind: SourceKind) -> Claimed | None:
        tag = uuid.uuid4().hex
        try:
            claim = self._submit(lambda store: store.claim(kind.value, tag))
        except QueueClosed:
            await self._reopened.wait()  # the broker reconnects (or stops this consumer)
            return None
        try:
            return await asyncio.wrap_future(claim)
        except asyncio.CancelledError:
            # Claimed in the thread meanwhile? Then give it back, right after the claim.
            self._submit(lambda store: _give_back_claim(store, claim)).add_done_callback(
                self._wake_later([kind])
            )
            raise

    async def _decoded(self, kind: SourceKind, claimed: Claimed) -> Job | None:
        """The job, or None for a message that is no job of this queue: it goes to the
        dead-letter queue with the reason, and the consumer goes on with the next one."""
        try:
            job = Job.from_json(claimed.body)
            if job.kind is not kind:
                raise UndecodableMessage(
                    f"misrouted job message: a {job.kind} job in the {kind} queue"
                )
        except UndecodableMessage as exc:
            reason = str(exc)
            log.error(
                "a message of %s cannot be decoded, moved to the dead-letter queue: %s",
                _origin(kind.value),
                reason,
            )
            await self._call(lambda store: store.reject(claimed.seq, claimed.tag, reason))
            self._refused += 1
            return None
        return job

    def _give_back(self, kind: SourceKind, deliveries: list[EmbeddedDelivery]) -> None:
        """The consumer goes away: its unsettled jobs go back to the queue, redelivered.

        Not awaited (this runs when the consumer is closed, also by the garbage collector):
        the database thread runs it before anything asked later. If the queue is closed
        already, the jobs stay delivered and its next opening gives them back.
        """
        returned = [d for d in deliveries if not d.settled.is_set() and not d._settling]
        for delivery in returned:
            delivery.returned = True
            log.info("job %s returned to the %s queue", delivery.job.job_id, kind)
        if not returned:
            return
        held = [(d.claimed.seq, d.claimed.tag) for d in returned]
        try:
            future = self._submit(lambda store: store.give_back(held))
        except (QueueClosed, RuntimeError) as exc:  # RuntimeError: the executor is gone
            log.info("the %s jobs stay delivered until the queue is opened again: %s", kind, exc)
            return
        with contextlib.suppress(RuntimeError):  # no running loop: no consumer to wake either
            future.add_done_callback(self._wake_later([kind]))

    async def publish_status(self, event: StatusEvent) -> None:
        for subscriber in list(self._subscribers):
            subscriber.put_nowait(event)

    async def subscribe_status(self, queue_name: str | None = None) -> StatusSubscription:
        return _EmbeddedSubscription(self._subscribers)

    @property
    def refused_messages(self) -> int:
        return self._refused

    async def job_queue_depths(self) -> dict[SourceKind, tuple[int, int]] | None:
        """Ready jobs per kind, from the store (consumers: not counted, 0), so that the
        broker's reconciler also ends a job that no queue holds any more (e.g. acknowledged
        just before a kill -9, its final status event lost with the process's memory)."""

        def ready(store: JobStore) -> dict[SourceKind, tuple[int, int]]:
            return {kind: (store.count(kind.value), 0) for kind in SourceKind}

        try:
            return await self._call(ready)
        except Exception:  # closed or not openable: unknown, so nothing is judged
            return None

    async def status_queue_depth(self, queue_name: str) -> int | None:
        """Events published but not yet taken by a subscriber (all in this process)."""
        return max((queue.qsize() for queue in self._subscribers), default=0)

    async def take_dead_letters(self) -> list[DeadLetter]:
        return [_dead_letter(row) for row in await self._call(lambda store: store.take_dead())]

    async def peek_dead_letters(self) -> list[DeadLetter]:
        """What is in the dead-letter queue, left there."""
        return [_dead_letter(row) for row in await self._call(lambda store: store.dead())]


async def _room_for_one(unsettled: list[EmbeddedDelivery], prefetch: int) -> list[EmbeddedDelivery]:
    """Wait until fewer than ``prefetch`` deliveries are unsettled; the unsettled ones."""
    while len(unsettled) >= prefetch:
        waiters = [asyncio.ensure_future(d.settled.wait()) for d in unsettled]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        unsettled = [d for d in unsettled if not d.settled.is_set()]
    return unsettled


def _origin(kind: str) -> str:
    """The queue a dead letter comes from, named like RabbitMQ's (``{prefix}.jobs.{kind}``)."""
    return f"embedded.jobs.{kind}"


def _dead_letter(row: DeadRow) -> DeadLetter:
    origin = _origin(row.kind)
    if row.reason != REJECTED_BY_WORKER:
        return DeadLetter(origin, row.body, row.reason)
    try:
        return DeadLetter(origin, row.body, row.reason, Job.from_json(row.body))
    except UndecodableMessage as exc:  # rejected by a program of another format version
        return DeadLetter(origin, row.body, str(exc))


def _give_back_claim(store: JobStore, claim: concurrent.futures.Future[Claimed | None]) -> None:
    """In the database thread, after ``claim`` ran (or was cancelled before it could)."""
    if claim.cancelled() or claim.exception() is not None:
        return
    claimed = claim.result()
    if claimed is not None:
        store.give_back([(claimed.seq, claimed.tag)])
