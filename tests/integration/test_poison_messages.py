"""Poison messages on the real RabbitMQ: a job or status message that cannot be decoded.

Before, such a message killed the worker (``WORKER DIED: KeyError('kind')``) and stayed at the
head of its queue, so the next worker died as well. Now it goes to the dead-letter queue with the
reason beside it, one log line says so, and the consumer goes on with the next message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import Action, Job, SourceKind, StatusEvent, job_id_for
from sf_daq_broker.status.follower import follow_status
from sf_daq_broker.status.store import StatusStore
from sf_daq_broker.transport.amqp import BROKER_STATUS_QUEUE, AmqpTransport, Topology
from sf_daq_broker.workers.lease import lease_path
from sf_daq_broker.workers.loop import Progress, RetryPolicy, Source, Worker
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses
from tests.support import async_wait_until

pytestmark = pytest.mark.rabbitmq

TIMEOUT = 60.0
VERSIONS = "(this sf-daq-broker reads format versions 1 to 1)"


class SmallSource(Source):
    """Writes a small file for every job it is given and remembers the runs."""

    kind = SourceKind.DATABUFFER

    def __init__(self) -> None:
        self.runs: list[int] = []

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        self.runs.append(job.run_number)
        target.write_bytes(b"complete file")
        pulses = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        return CompletenessReport(names=[NameReport.judge("A:B", pulses, pulses)], absent=[])


def make_job(raw: Path, run: int) -> Job:
    (raw / "run_info" / "000000").mkdir(parents=True, exist_ok=True)
    return Job(
        job_id=job_id_for("p12345", run, "BSDATA"),
        request_id=f"req-{run}",
        kind=SourceKind.DATABUFFER,
        source="BSDATA",
        names=("A:B",),
        start_pulse_id=100,
        stop_pulse_id=110,
        requested_start=100,
        requested_stop=110,
        rate_multiplicator=1,
        pgroup="p12345",
        beamline="bernina",
        run_number=run,
        output_file=str(raw / f"run_{run:06d}.BSDATA.h5"),
        log_file=str(raw / "run_info" / "000000" / f"run_{run:06d}.BSDATA.log"),
        run_info_file=str(raw / "run_info" / "000000" / f"run_{run:06d}.json"),
        request_time="2026-11-21 00:00:00.000000",
    )


def changed(job: Job, **changes: Any) -> bytes:
    return json.dumps(json.loads(job.to_json()) | changes).encode()


@pytest.fixture
async def transport(amqp_url: str, amqp_prefix: str) -> AsyncIterator[AmqpTransport]:
    instance = AmqpTransport(amqp_url, prefix=amqp_prefix)
    await instance.connect()
    yield instance
    await instance.close()


async def publish_raw(amqp_url: str, exchange_name: str, routing_key: str, *bodies: bytes) -> None:
    """Publish bodies as they are, confirmed, as a broken or foreign producer would."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(exchange_name)
        for body in bodies:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key, mandatory=True)


async def queue_length(amqp_url: str, name: str) -> int:
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "sf_daq_broker.transport.amqp" and record.levelno >= logging.WARNING
    ]


async def test_poison_jobs_are_dead_lettered_with_the_reason_and_the_worker_goes_on(
    transport: AmqpTransport,
    amqp_url: str,
    amqp_prefix: str,
    raw_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    topology = Topology(amqp_prefix)
    good = make_job(raw_dir, run=5)
    template = make_job(raw_dir, run=4)
    poison = [
        b"not json",
        b"{}",
        changed(template, format_version=99),
        changed(template, run_number="x"),
        changed(template, kind="detector"),
    ]
    await publish_raw(amqp_url, topology.jobs_exchange, "databuffer", *poison)
    events = await transport.subscribe_status()
    await transport.publish_jobs([good])
    source = SmallSource()
    worker = asyncio.create_task(Worker(transport, [source], retry=RetryPolicy(attempts=1)).run())

    seen: list[StatusEvent] = []
    async with asyncio.timeout(TIMEOUT):
        while not seen or seen[-1].action is not Action.WRITE_FINISHED:
            seen.append(await events.__anext__())
    await async_wait_until(
        lambda: not lease_path(good).exists(), timeout=TIMEOUT, what="the good job settled"
    )
    assert not worker.done()  # the worker lives on
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    await events.close()

    assert source.runs == [5]
    assert [(e.action, e.run_number) for e in seen] == [
        (Action.WRITE_START, 5),
        (Action.WRITE_FINISHED, 5),
    ]
    assert Path(good.output_file).read_bytes() == b"complete file"
    assert sorted(p.relative_to(raw_dir).as_posix() for p in raw_dir.rglob("*")) == [
        "run_000005.BSDATA.h5",
        "run_info",
        "run_info/000000",
        "run_info/000000/run_000005.BSDATA.log",
    ]

    queue = topology.job_queue(SourceKind.DATABUFFER)
    reasons = [
        "undecodable job message: Invalid JSON: expected ident at line 1 column 2",
        "undecodable job message: missing job_id, request_id, kind, source, names, "
        "start_pulse_id, stop_pulse_id, requested_start, requested_stop, rate_multiplicator, "
        "pgroup, beamline, run_number, output_file, log_file, run_info_file, request_time",
        f"undecodable job message: format version 99 is unknown here {VERSIONS}",
        "undecodable job message: run_number: Input should be a valid integer, got 'x'",
        "misrouted job message: a detector job in the databuffer queue",
    ]
    dead = await transport.take_dead_letters()
    assert [(d.origin, d.body, d.reason, d.job) for d in dead] == [
        (queue, body, reason, None) for body, reason in zip(poison, reasons, strict=True)
    ]
    assert await transport.take_dead_letters() == []
    assert await queue_length(amqp_url, queue) == 0  # nothing left at the head of the queue
    assert refusals(caplog) == [
        f"a message of {queue} cannot be decoded, moved to {topology.dead_letter}: {reason}"
        for reason in reasons
    ]


async def test_a_rejected_job_is_a_dead_letter_with_its_job(
    transport: AmqpTransport, amqp_prefix: str, raw_dir: Path
) -> None:
    """What a worker rejects (the job failed) keeps its job in the dead-letter record."""
    job = make_job(raw_dir, run=3)
    await transport.publish_jobs([job])
    consumer = transport.consume_jobs(SourceKind.DATABUFFER)
    delivery = await consumer.__anext__()
    await delivery.reject()
    await consumer.aclose()
    dead: list[Any] = []

    async def collected() -> bool:
        dead.extend(await transport.take_dead_letters())
        return bool(dead)

    await async_wait_until(collected, timeout=TIMEOUT, what="the rejected job")
    assert [(d.origin, d.job, d.body, d.reason) for d in dead] == [
        (
            Topology(amqp_prefix).job_queue(SourceKind.DATABUFFER),
            job,
            job.to_json(),
            "rejected by a worker (its write_rejected status event says why)",
        )
    ]


async def test_poison_status_messages_are_dead_lettered_and_the_broker_follows_on(
    transport: AmqpTransport,
    amqp_url: str,
    amqp_prefix: str,
    raw_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    topology = Topology(amqp_prefix)
    # The broker's durable status queue exists (it was subscribed before): messages wait in it.
    await (await transport.subscribe_status(BROKER_STATUS_QUEUE)).close()
    job = make_job(raw_dir, run=6)
    valid = StatusEvent.for_job(Action.WRITE_START, job, total=11)
    poison = [
        b"not json",
        b'{"action": "write_start"}',
        changed_event(valid, format_version=99),
        changed_event(valid, run_number="x"),
    ]
    await publish_raw(amqp_url, topology.status_exchange, "", *poison)
    await transport.publish_status(valid)
    store = StatusStore()
    follower = asyncio.create_task(follow_status(transport, store, BROKER_STATUS_QUEUE))
    status = await async_wait_until(
        lambda: store.job_status(job.job_id), timeout=TIMEOUT, what="the valid event applied"
    )
    assert (status["state"], status["progress"]) == ("running", {"done": 0, "total": 11})
    dead: list[Any] = []

    async def collected() -> bool:
        dead.extend(await transport.take_dead_letters())
        return len(dead) >= len(poison)

    await async_wait_until(collected, timeout=TIMEOUT, what="the poison status messages")
    assert not follower.done()  # the status follower lives on, never resubscribed
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    store.close()

    queue = topology.status_queue(BROKER_STATUS_QUEUE)
    reasons = [
        "undecodable status message: Invalid JSON: expected ident at line 1 column 2",
        "undecodable status message: missing request_id, job_id, pgroup, run_number, source, file",
        f"undecodable status message: format version 99 is unknown here {VERSIONS}",
        "undecodable status message: run_number: Input should be a valid integer, got 'x'",
    ]
    assert [(d.origin, d.body, d.reason, d.job) for d in dead] == [
        (queue, body, reason, None) for body, reason in zip(poison, reasons, strict=True)
    ]
    assert await queue_length(amqp_url, queue) == 0
    assert refusals(caplog) == [
        f"a message of {queue} cannot be decoded, moved to {topology.dead_letter}: {reason}"
        for reason in reasons
    ]
    assert [r for r in caplog.records if r.name == "sf_daq_broker.status.follower"] == []


def changed_event(event: StatusEvent, **changes: Any) -> bytes:
    return json.dumps(json.loads(event.to_json()) | changes).encode()


async def test_a_private_status_subscription_skips_poison_and_says_why(
    transport: AmqpTransport, amqp_url: str, amqp_prefix: str, raw_dir: Path
) -> None:
    """A listener's own queue (the debugger's) does not dead-letter: the broker's durable
    queue holds the same message and dead-letters it once. The listener is told why the
    message was skipped, and the next event follows."""
    from sf_daq_broker.jobs import UndecodableMessage

    events = await transport.subscribe_status()
    job = make_job(raw_dir, run=8)
    valid = StatusEvent.for_job(Action.WRITE_FINISHED, job, "complete")
    await publish_raw(amqp_url, Topology(amqp_prefix).status_exchange, "", b"{}")
    await transport.publish_status(valid)
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(UndecodableMessage) as skipped:
            await events.__anext__()
        assert str(skipped.value) == (
            "undecodable status message: missing action, request_id, job_id, pgroup, "
            "run_number, source, file"
        )
        assert await events.__anext__() == valid
    await events.close()
    assert await transport.take_dead_letters() == []


async def run_debugger(amqp_url: str, prefix: str, *options: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sf_daq_broker.tools.broker_debugger",
        "--amqp-url",
        amqp_url,
        "--prefix",
        prefix,
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_debugger_lists_the_dead_letters_with_their_reasons_and_leaves_them(
    transport: AmqpTransport, amqp_url: str, amqp_prefix: str, raw_dir: Path
) -> None:
    topology = Topology(amqp_prefix)
    queue = topology.job_queue(SourceKind.DATABUFFER)
    job = make_job(raw_dir, run=9)
    await publish_raw(amqp_url, topology.jobs_exchange, "databuffer", b'{"kind": "databuffer"}')
    await transport.publish_jobs([job])
    consumer = transport.consume_jobs(SourceKind.DATABUFFER)
    delivery = await consumer.__anext__()  # the undecodable one was moved on the way
    assert delivery.job == job
    await delivery.reject()
    await consumer.aclose()

    async def both_dead() -> bool:
        return await queue_length(amqp_url, topology.dead_letter) == 2

    await async_wait_until(both_dead, timeout=TIMEOUT, what="two dead letters")
    expected = (
        f'{queue}: body b\'{{"kind": "databuffer"}}\': undecodable job message: missing job_id, '
        "request_id, source, names, start_pulse_id, stop_pulse_id, requested_start, "
        "requested_stop, rate_multiplicator, pgroup, beamline, run_number, output_file, "
        "log_file, run_info_file, request_time\n"
        f"{queue}: BSDATA p12345 run 9 {job.output_file}: "
        "rejected by a worker (its write_rejected status event says why)\n"
    )
    for _ in range(2):  # listing takes nothing away
        assert await run_debugger(amqp_url, amqp_prefix, "--dead-letters") == (
            0,
            expected,
            f"2 messages in {topology.dead_letter} (left there)\n",
        )
    assert [(d.reason[:31], d.job) for d in await transport.take_dead_letters()] == [
        ("undecodable job message: missin", None),
        ("rejected by a worker (its write", job),
    ]
    never = f"{amqp_prefix}-never-declared"
    assert await run_debugger(amqp_url, never, "--dead-letters") == (
        0,
        "",
        f"0 messages in {never}.jobs.dead-letter (left there)\n",
    )


async def test_the_broker_counts_the_status_messages_it_refused_in_its_metrics(
    aiohttp_client: Any, settings: Any, amqp_url: str, amqp_prefix: str
) -> None:
    transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    # The broker's durable status queue, bound before anything is published: the messages wait
    # there for the broker's follower, however long the app takes to subscribe.
    await transport.connect()
    await (await transport.subscribe_status(BROKER_STATUS_QUEUE)).close()
    client = await aiohttp_client(create_app(settings, transport))

    async def metric() -> str:
        text = await (await client.get("/metrics")).text()
        (line,) = [x for x in text.splitlines() if x.startswith("sf_daq_refused_messages ")]
        return line

    assert await metric() == "sf_daq_refused_messages 0.0"
    await publish_raw(amqp_url, Topology(amqp_prefix).status_exchange, "", b"{}", b"[]")

    async def counted() -> bool:
        return await metric() == "sf_daq_refused_messages 2.0"

    await async_wait_until(counted, timeout=TIMEOUT, what="two refused status messages")
    assert [d.reason for d in await transport.take_dead_letters()] == [
        "undecodable status message: missing action, request_id, job_id, pgroup, run_number, "
        "source, file",
        "undecodable status message: Input should be an object",
    ]
