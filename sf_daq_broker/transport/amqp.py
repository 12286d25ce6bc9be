"""RabbitMQ transport (aio-pika): durable, confirmed, nothing silently dropped.

Topology (all durable, names under a configurable prefix, default ``sf-daq``):

- ``{prefix}.jobs``: topic exchange; a job is published with its source kind as routing key;
- ``{prefix}.jobs.{kind}``: one queue per source kind, bound with the kind, dead-lettering into
- ``{prefix}.jobs.dead-letter``: fanout exchange and queue of the same name, holding rejected
  jobs for a person to look at;
- ``{prefix}.status``: fanout exchange of status events.

A message that cannot be decoded (a poison message: not JSON, not a job, a newer format) is
copied into the dead-letter queue with the reason in its ``x-sf-daq-reason`` header and the queue
it came from in ``x-sf-daq-origin``, and acknowledged once RabbitMQ confirmed the copy: the
consumer goes on with the next message, and a person sees in the dead-letter queue what came
and why it was refused. (Rejecting it into the queue's dead-letter exchange would keep the
message but lose the reason, which RabbitMQ cannot carry; a crash between the confirmed copy
and the ack leaves a second copy, never none.)

Broker and workers both declare the whole topology with the same arguments, so whichever
starts first creates it, and a job published while no worker runs waits in its queue. Jobs are
persistent messages published with confirms and ``mandatory``: ``publish_jobs`` returns only
after RabbitMQ has taken responsibility for every job, and a job that no queue would take is an
error instead of a silent drop.

Status events are never dropped: one that cannot be sent now (RabbitMQ away, the channel
closed) goes into an outbox (``outbox``) and is sent from there, in order, once RabbitMQ is
back; while the outbox holds events every new one queues behind them, so a job's events keep
their order. A worker gives its outbox a file (``status_outbox``), so the events also outlive
a crash of the worker; without one (the broker's own ``write_request`` events, tests) the
outbox is in memory and outlives the outage only.

Messages about failures name them plainly (``failures``): never an aio-pika object repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from yarl import URL

from sf_daq_broker.jobs import Job, SourceKind, StatusEvent, UndecodableMessage
from sf_daq_broker.transport.base import (
    REJECTED_BY_WORKER,
    DeadLetter,
    HandoverError,
    JobDelivery,
    StatusSubscription,
    Transport,
)
from sf_daq_broker.transport.failures import describe_failure, failure_kind
from sf_daq_broker.transport.outbox import Entry, Outbox
from sf_daq_broker.transport.outbox_sender import OutboxSender

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
PUBLISH_TIMEOUT = 10.0
#: A broker that stays away for long must not let its status queue fill RabbitMQ's disk.
STATUS_QUEUE_LIMIT = 1_000_000
#: Name of the broker's own durable status queue (below the prefix).
BROKER_STATUS_QUEUE = "broker"
#: Headers of a message moved to the dead-letter queue because it could not be decoded.
REASON_HEADER = "x-sf-daq-reason"
ORIGIN_HEADER = "x-sf-daq-origin"
#: A reason longer than this is cut (it lives in a message header).
REASON_LIMIT = 2000


class Topology:
    """Names and declarations shared by every process that talks to the same RabbitMQ."""

    def __init__(self, prefix: str) -> None:
        self.jobs_exchange = f"{prefix}.jobs"
        self.dead_letter = f"{prefix}.jobs.dead-letter"
        self.status_exchange = f"{prefix}.status"
        self.prefix = prefix

    def status_queue(self, name: str) -> str:
        return f"{self.status_exchange}.{name}"

    def job_queue(self, kind: SourceKind) -> str:
        return f"{self.prefix}.jobs.{kind.value}"

    async def declare(self, channel: AbstractChannel) -> AbstractExchange:
        """Declare everything; returns the jobs exchange."""
        await self.declare_dead_letter(channel)
        jobs = await channel.declare_exchange(
            self.jobs_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for kind in SourceKind:
            queue = await self.declare_job_queue(channel, kind)
            await queue.bind(jobs, routing_key=kind.value)
        await self.declare_status(channel)
        return jobs

    async def declare_dead_letter(self, channel: AbstractChannel) -> AbstractExchange:
        """The dead-letter exchange, and its queue bound to it."""
        dead_letter = await channel.declare_exchange(
            self.dead_letter, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(self.dead_letter, durable=True)
        await dead_queue.bind(dead_letter)
        return dead_letter

    async def declare_status(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.status_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )

    async def delete(self, channel: AbstractChannel) -> None:
        """Remove every queue and exchange (tests and benchmarks clean up after themselves)."""
        queues = [self.job_queue(kind) for kind in SourceKind]
        for queue in [*queues, self.dead_letter, self.status_queue(BROKER_STATUS_QUEUE)]:
            await channel.queue_delete(queue)
        for exchange in (self.jobs_exchange, self.dead_letter, self.status_exchange):
            await channel.exchange_delete(exchange)

    async def declare_job_queue(self, channel: AbstractChannel, kind: SourceKind) -> AbstractQueue:
        return await channel.declare_queue(
            self.job_queue(kind),
            durable=True,
            arguments={"x-dead-letter-exchange": self.dead_letter},
        )


class AmqpDelivery(JobDelivery):
    def __init__(self, message: AbstractIncomingMessage, kind: SourceKind | None = None) -> None:
        """Raises UndecodableMessage if the message carries no job this program can read, or
        (given the queue's ``kind``) a job of another kind, which this queue's worker would
        write with the wrong source."""
        self._message = message
        self.job = Job.from_json(message.body)
        if kind is not None and self.job.kind is not kind:
            raise UndecodableMessage(
                f"misrouted job message: a {self.job.kind} job in the {kind} queue"
            )
        self.redelivered = bool(message.redelivered)

    async def ack(self) -> None:
        await self._message.ack()

    async def reject(self) -> None:
        await self._message.reject(requeue=False)  # dead-letters through the queue's DLX


class _Refuser:
    """Moves messages that cannot be decoded to the dead-letter queue, with the reason (see the
    module's docstring), and counts them."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        #: Messages refused since this process started.
        self.count = 0

    async def refuse(
        self, channel: AbstractChannel, message: AbstractIncomingMessage, origin: str, reason: str
    ) -> None:
        self.count += 1
        reason = reason if len(reason) <= REASON_LIMIT else reason[: REASON_LIMIT - 1] + "…"
        destination = self._topology.dead_letter
        log.error("a message of %s cannot be decoded, moved to %s: %s", origin, destination, reason)
        copy = aio_pika.Message(
            message.body,
            headers={**(message.headers or {}), REASON_HEADER: reason, ORIGIN_HEADER: origin},
            content_type=message.content_type,
            message_id=message.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            exchange = await self._topology.declare_dead_letter(channel)
            await exchange.publish(copy, routing_key="", mandatory=True, timeout=PUBLISH_TIMEOUT)
            await message.ack()
        except Exception as exc:
            # Never left unsettled at the head of its queue: a job queue dead-letters it
            # without the reason (this log line has it); a status queue drops it. If the
            # channel is gone, RabbitMQ gives it back and the next consumer tries again.
            log.warning(
                "the undecodable message of %s was not moved to %s (%s): rejected instead",
                origin,
                destination,
                failure_kind(exc),
            )
            with contextlib.suppress(Exception):
                await message.reject(requeue=False)


class _AmqpSubscription(StatusSubscription):
    """Status events of one queue. An undecodable message of a durable queue (the broker's) is
    moved to the dead-letter queue and skipped; one of a private queue (a listener such as the
    debugger, which gets a copy of what the broker's queue dead-letters) is dropped, and
    ``__anext__`` raises its UndecodableMessage so that the listener can say so and go on."""

    def __init__(
        self, channel: AbstractChannel, queue: AbstractQueue, refuser: _Refuser | None
    ) -> None:
        self._channel = channel
        self._iterator = queue.iterator()
        self._refuser = refuser
        self.queue_name = queue.name  # a private queue gets a generated name: tools show it

    async def __anext__(self) -> StatusEvent:
        while True:
            message = await self._iterator.__anext__()
            try:
                event = StatusEvent.from_json(message.body)
            except UndecodableMessage as exc:
                if self._refuser is None:
                    await message.ack()
                    raise
                await self._refuser.refuse(self._channel, message, self.queue_name, str(exc))
                continue
            await message.ack()
            return event

    async def close(self) -> None:
        """Stop consuming. Closing gives the events taken but not read back to the queue; if
        RabbitMQ closed the channel already (e.g. its delivery timeout: events left unread too
        long), that fails, and need not succeed: RabbitMQ requeued them when it closed it."""
        try:
            await self._iterator.close()
        except (AMQPError, ChannelInvalidStateError, ExceptionGroup) as exc:
            log.debug("status subscription %s: channel gone at close: %r", self.queue_name, exc)
        if not self._channel.is_closed:
            await self._channel.close()


class AmqpTransport(Transport):
    name = "rabbitmq"

    def __init__(
        self,
        url: str,
        prefix: str = "sf-daq",
        declare_topology: bool = True,
        status_outbox: Path | None = None,
    ) -> None:
        """``declare_topology=False`` for pure listeners (the debugger): they declare only the
        status exchange, so they leave no durable job queues behind on a fresh server.
        ``status_outbox``: the directory of the durable outbox of status events (workers)."""
        self.url = url
        self.status_outbox_dir = status_outbox
        self._status_sender: OutboxSender | None = None
        self.declare_topology = declare_topology
        self.topology = Topology(prefix)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._jobs_exchange: AbstractExchange | None = None
        self._status_exchange: AbstractExchange | None = None
        self._connect_lock = asyncio.Lock()
        self._refuser = _Refuser(self.topology)

    @property
    def refused_messages(self) -> int:
        return self._refuser.count

    async def connect(self) -> None:
        sender = await self._status_outbox()
        if sender.outbox.count:
            sender.wake()  # events left by an outage or by an earlier process of this worker
        async with self._connect_lock:
            if self._connection is not None and not self._connection.is_closed:
                return
            connection = await aio_pika.connect_robust(self.url, timeout=CONNECT_TIMEOUT)
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                if self.declare_topology:
                    self._jobs_exchange = await self.topology.declare(channel)
                self._status_exchange = await self.topology.declare_status(channel)
            except BaseException:
                await connection.close()
                raise
            self._connection, self._channel = connection, channel
            log.info("connected to RabbitMQ at %s", _without_password(self.url))

    async def close(self) -> None:
        """Close; status events still in the outbox stay there (in its file, for the next
        process of this worker; an in-memory outbox's are lost, and said so)."""
        if self._status_sender is not None:
            await self._status_sender.close()
            outbox = self._status_sender.outbox
            if outbox.count and outbox.path is None:
                log.error("%d status events not sent: RabbitMQ did not come back", outbox.count)
            await asyncio.to_thread(outbox.close)
            self._status_sender = None
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = None

    async def is_healthy(self) -> bool:
        try:
            await self.connect()
        except Exception:
            return False
        assert self._channel is not None
        return not self._channel.is_closed

    async def _connection_or_fail(self) -> AbstractRobustConnection:
        try:
            await asyncio.wait_for(self.connect(), CONNECT_TIMEOUT * 2)
        except Exception as exc:
            raise HandoverError(describe_failure(self.url, exc)) from exc
        assert self._connection is not None
        return self._connection

    async def publish_jobs(self, jobs: Sequence[Job]) -> None:
        await self._connection_or_fail()
        exchange = self._jobs_exchange
        if exchange is None:
            raise HandoverError("this RabbitMQ transport was opened without the job topology")

        async def publish(job: Job) -> None:
            message = aio_pika.Message(
                job.to_json(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=job.job_id,
                headers={"source": job.source, "pgroup": job.pgroup, "run_number": job.run_number},
            )
            await exchange.publish(
                message, routing_key=job.kind.value, mandatory=True, timeout=PUBLISH_TIMEOUT
            )

        # All jobs in flight at once: one round trip for the confirms instead of one per job.
        outcomes = await asyncio.gather(*(publish(job) for job in jobs), return_exceptions=True)
        handed_over = [
            job.source for job, outcome in zip(jobs, outcomes, strict=True) if outcome is None
        ]
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise HandoverError(
                    f"RabbitMQ did not take the {job.source} job ({failure_kind(outcome)})",
                    handed_over,
                ) from outcome

    async def consume_jobs(
        self, kind: SourceKind, prefetch: int = 1
    ) -> AsyncGenerator[JobDelivery, None]:
        connection = await self._connection_or_fail()
        # A channel per consumer: its prefetch is its own, and closing it returns the jobs it
        # had not settled to the queue (RabbitMQ redelivers them to another consumer).
        channel = await connection.channel()
        try:
            await channel.set_qos(prefetch_count=prefetch)
            queue = await self.topology.declare_job_queue(channel, kind)
            async with queue.iterator() as messages:
                async for message in messages:
                    try:
                        delivery = AmqpDelivery(message, kind)
                    except UndecodableMessage as exc:
                        await self._refuser.refuse(channel, message, queue.name, str(exc))
                        continue
                    yield delivery
        finally:
            if not channel.is_closed:
                await channel.close()

    async def publish_status(self, event: StatusEvent) -> None:
        """Sent and confirmed, or in the outbox (never raises: a status event that cannot be
        sent now must never fail a job)."""
        sender = await self._status_outbox()
        if not sender.outbox.count:
            try:
                await self._send_status(event.to_json(), dict(event.headers()))
                return
            except Exception as exc:
                log.warning(
                    "status event %s of %s waits in the outbox: %s",
                    event.action,
                    event.job_id,
                    describe_failure(self.url, exc),
                )
        await asyncio.to_thread(sender.outbox.put, [(event.job_id, event.to_json())])
        sender.wake()

    async def _send_status(self, body: bytes, headers: dict[str, str]) -> None:
        await self._connection_or_fail()
        assert self._status_exchange is not None
        await self._status_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=dict(headers),
            ),
            routing_key="",
            mandatory=False,  # nobody listening is fine for status events
            timeout=PUBLISH_TIMEOUT,
        )

    async def _send_status_entry(self, entry: Entry) -> None:
        try:
            headers = dict(StatusEvent.from_json(entry.body).headers())
        except Exception:  # written by another version: the body is what matters
            headers = {}
        await self._send_status(entry.body, headers)

    async def _status_outbox(self) -> OutboxSender:
        """The outbox of status events, opened at first use (its file claimed for this
        process: ``Outbox.claim``)."""
        if self._status_sender is None:
            if self.status_outbox_dir is None:
                outbox = Outbox()
            else:
                outbox = await asyncio.to_thread(Outbox.claim, self.status_outbox_dir, "status")
            if self._status_sender is None:  # not opened by another task meanwhile
                self._status_sender = OutboxSender(
                    outbox,
                    self._send_status_entry,
                    "status events",
                    lambda exc: describe_failure(self.url, exc),
                )
            else:
                await asyncio.to_thread(outbox.close)
        return self._status_sender

    def status_backlog(self) -> int:
        """Status events waiting in the outbox for RabbitMQ."""
        return 0 if self._status_sender is None else self._status_sender.outbox.count

    async def job_queue_depths(self) -> dict[SourceKind, tuple[int, int]] | None:
        """Ready messages and consumers of each job queue (passive declares), None if RabbitMQ
        cannot be asked now. Messages delivered and not yet settled are not counted."""
        try:
            connection = await self._connection_or_fail()
            async with connection.channel() as channel:
                depths = {}
                for kind in SourceKind:
                    queue = await channel.declare_queue(self.topology.job_queue(kind), passive=True)
                    result = queue.declaration_result
                    depths[kind] = (result.message_count or 0, result.consumer_count or 0)
                return depths
        except Exception as exc:
            log.info("job queues not inspected: %s", describe_failure(self.url, exc))
            return None

    async def status_queue_depth(self, queue_name: str) -> int | None:
        """Events waiting in a named status queue (the broker's), None if unknown."""
        try:
            connection = await self._connection_or_fail()
            async with connection.channel() as channel:
                queue = await channel.declare_queue(
                    self.topology.status_queue(queue_name), passive=True
                )
                return queue.declaration_result.message_count or 0
        except Exception:
            return None

    async def subscribe_status(self, queue_name: str | None = None) -> StatusSubscription:
        """Subscribe with a private queue, or a named durable one that outlives this process."""
        connection = await self._connection_or_fail()
        channel = await connection.channel()
        if queue_name is None:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        else:
            queue = await channel.declare_queue(
                self.topology.status_queue(queue_name),
                durable=True,
                arguments={"x-max-length": STATUS_QUEUE_LIMIT},
            )
        await queue.bind(self.topology.status_exchange)
        return _AmqpSubscription(channel, queue, None if queue_name is None else self._refuser)

    async def take_dead_letters(self) -> list[DeadLetter]:
        connection = await self._connection_or_fail()
        async with connection.channel() as channel:
            queue = await channel.declare_queue(self.topology.dead_letter, durable=True)
            dead = []
            while (message := await queue.get(fail=False)) is not None:
                dead.append(_dead_letter(message))
                await message.ack()
            return dead

    async def peek_dead_letters(self) -> list[DeadLetter]:
        """What is in the dead-letter queue, left there: read unsettled on a channel of its
        own, whose closing gives every message back in its place (flagged redelivered)."""
        connection = await self._connection_or_fail()
        channel = await connection.channel()
        try:
            try:
                queue = await channel.declare_queue(self.topology.dead_letter, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return []  # never declared: nothing was ever dead-lettered
            dead = []
            while (message := await queue.get(fail=False)) is not None:
                dead.append(_dead_letter(message))
            return dead
        finally:
            if not channel.is_closed:
                await channel.close()


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    """A refused message has its reason in its headers; a rejected job RabbitMQ's x-death."""
    headers = message.headers or {}
    if REASON_HEADER in headers:
        return DeadLetter(
            _text(headers.get(ORIGIN_HEADER)), message.body, _text(headers[REASON_HEADER])
        )
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths else {}
    origin = _text(death.get("queue")) if isinstance(death, dict) else ""
    try:
        return DeadLetter(origin, message.body, REJECTED_BY_WORKER, Job.from_json(message.body))
    except UndecodableMessage as exc:  # rejected by a program of another format version
        return DeadLetter(origin, message.body, str(exc))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _without_password(url: str) -> str:
    return str(URL(url).with_password(None)) if "@" in url else url
