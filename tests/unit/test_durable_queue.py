"""The embedded queue on disk: what a stopped or killed single-machine broker leaves behind
is delivered again when it reopens the same file, exactly as RabbitMQ redelivers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.transport import (
    REJECTED_BY_WORKER,
    DeadLetter,
    HandoverError,
    JobDelivery,
    create_transport,
)
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.transport.job_store import JobStore
from tests.integration.test_transports import sample_job
from tests.support import PATIENCE


@pytest.fixture
def queue_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.sqlite"


@pytest.fixture
async def opened(queue_file: Path) -> AsyncIterator[list[EmbeddedTransport]]:
    """Transports of a test, closed at its end (a test reopens the file as a restart would)."""
    transports: list[EmbeddedTransport] = []
    yield transports
    for transport in transports:
        await transport.close()


async def reopen(queue_file: Path, opened: list[EmbeddedTransport]) -> EmbeddedTransport:
    transport = EmbeddedTransport(queue_file)
    await transport.connect()
    opened.append(transport)
    return transport


async def deliver(
    transport: EmbeddedTransport, kind: SourceKind = SourceKind.DATABUFFER
) -> tuple[Any, JobDelivery]:
    """A consumer of ``kind`` and its first delivery (the consumer is an async generator)."""
    consumer = transport.consume_jobs(kind)
    delivery = await asyncio.wait_for(consumer.__anext__(), 10)
    return consumer, delivery


async def test_published_jobs_are_delivered_in_order_and_ack_is_final(
    queue_file: Path, opened: list[EmbeddedTransport]
) -> None:
    transport = await reopen(queue_file, opened)
    await transport.publish_jobs([sample_job(1), sample_job(2)])
    assert transport.queued(SourceKind.DATABUFFER) == 2
    consumer, first = await deliver(transport)
    assert (first.job, first.redelivered) == (sample_job(1), False)
    await first.ack()
    second = await asyncio.wait_for(consumer.__anext__(), 10)
    assert (second.job, second.redelivered) == (sample_job(2), False)
    await second.ack()
    await consumer.aclose()
    await transport.close()

    again = await reopen(queue_file, opened)
    assert again.queued(SourceKind.DATABUFFER) == 0
    await again.publish_jobs([sample_job(3)])
    consumer, third = await deliver(again)
    assert (third.job.run_number, third.redelivered) == (3, False)  # 1 and 2 are gone for good
    await third.ack()
    await consumer.aclose()


async def test_a_delivery_unsettled_when_the_queue_closed_is_redelivered_on_reopening(
    queue_file: Path, opened: list[EmbeddedTransport]
) -> None:
    transport = await reopen(queue_file, opened)
    await transport.publish_jobs([sample_job(1), sample_job(2)])
    await transport.publish_jobs([sample_job(3, kind=SourceKind.ARCHIVER)])
    old_consumer, first = await deliver(transport)
    assert first.job == sample_job(1)
    await transport.close()  # the broker stops while job 1 runs: no verdict

    await transport.connect()  # and starts again
    assert (transport.queued(SourceKind.DATABUFFER), transport.queued(SourceKind.ARCHIVER)) == (
        2,
        1,
    )
    consumer, redelivered = await deliver(transport)
    assert (redelivered.job, redelivered.redelivered) == (sample_job(1), True)
    with pytest.raises(RuntimeError, match="this delivery is no longer valid"):
        await first.ack()  # the stopped broker's delivery cannot settle the job any more
    await redelivered.ack()
    following = await asyncio.wait_for(consumer.__anext__(), 10)
    assert (following.job, following.redelivered) == (sample_job(2), False)
    await following.ack()
    await consumer.aclose()
    await old_consumer.aclose()
    await transport.close()

    fresh = await reopen(queue_file, opened)  # a new process: the archiver job still waits
    assert (fresh.queued(SourceKind.DATABUFFER), fresh.queued(SourceKind.ARCHIVER)) == (0, 1)
    archiver, waiting = await deliver(fresh, SourceKind.ARCHIVER)
    assert (waiting.job, waiting.redelivered) == (sample_job(3, kind=SourceKind.ARCHIVER), False)
    await waiting.ack()
    await archiver.aclose()


async def test_dead_letters_are_kept_on_disk_until_taken(
    queue_file: Path, opened: list[EmbeddedTransport]
) -> None:
    transport = await reopen(queue_file, opened)
    await transport.publish_jobs([sample_job(4), sample_job(5)])
    consumer, delivery = await deliver(transport)
    await delivery.reject()
    await consumer.aclose()
    await transport.close()

    again = await reopen(queue_file, opened)
    assert again.queued(SourceKind.DATABUFFER) == 1  # job 5; job 4 is not queued any more
    assert await again.take_dead_letters() == [
        DeadLetter(
            "embedded.jobs.databuffer", sample_job(4).to_json(), REJECTED_BY_WORKER, sample_job(4)
        )
    ]
    assert await again.take_dead_letters() == []
    await again.close()
    assert await (await reopen(queue_file, opened)).take_dead_letters() == []


async def test_a_consumer_that_goes_away_gives_its_job_back_at_once(
    queue_file: Path, opened: list[EmbeddedTransport]
) -> None:
    transport = await reopen(queue_file, opened)
    await transport.publish_jobs([sample_job(7)])
    consumer, delivery = await deliver(transport)
    waiting = asyncio.ensure_future(deliver(transport))  # a second worker, woken by the return
    await consumer.aclose()
    other, again = await asyncio.wait_for(waiting, PATIENCE)
    assert (again.job, again.redelivered) == (sample_job(7), True)
    with pytest.raises(RuntimeError, match="given back to the queue already"):
        await delivery.ack()
    await again.ack()
    await other.aclose()
    assert transport.queued(SourceKind.DATABUFFER) == 0


async def test_a_waiting_consumer_is_woken_by_a_publish(
    queue_file: Path, opened: list[EmbeddedTransport]
) -> None:
    transport = await reopen(queue_file, opened)
    waiting = asyncio.ensure_future(deliver(transport))
    done, _ = await asyncio.wait([waiting], timeout=0.2)
    assert not done  # nothing to deliver yet
    await transport.publish_jobs([sample_job(8)])
    consumer, delivery = await asyncio.wait_for(waiting, PATIENCE)
    assert delivery.job == sample_job(8)
    await delivery.ack()
    await consumer.aclose()


async def test_concurrent_publishes_are_all_committed(
    queue_file: Path, opened: list[EmbeddedTransport]
) -> None:
    transport = await reopen(queue_file, opened)
    await asyncio.gather(*(transport.publish_jobs([sample_job(n)]) for n in range(1, 51)))
    await transport.close()
    again = await reopen(queue_file, opened)
    consumer: Any = again.consume_jobs(SourceKind.DATABUFFER, prefetch=50)
    numbers = []
    for _ in range(50):
        delivery = await asyncio.wait_for(consumer.__anext__(), 10)
        numbers.append(delivery.job.run_number)
        await delivery.ack()
    await consumer.aclose()
    assert sorted(numbers) == list(range(1, 51))


async def test_a_second_process_cannot_open_a_queue_in_use(
    queue_file: Path, opened: list[EmbeddedTransport]
) -> None:
    """Two brokers on one state directory would deliver each other's running jobs again."""
    await reopen(queue_file, opened)
    intruder = EmbeddedTransport(queue_file)
    opened.append(intruder)
    with pytest.raises(HandoverError) as caught:
        await intruder.connect()
    message = (
        f"the embedded queue {queue_file} is in use by another broker process "
        f"(pid {os.getpid()}); run one broker per state directory"
    )
    assert str(caught.value) == message
    assert await intruder.is_healthy() is False
    with pytest.raises(HandoverError) as caught:
        await intruder.publish_jobs([sample_job(1)])
    assert str(caught.value) == message


async def test_a_row_that_is_no_job_of_its_queue_is_dead_lettered_with_the_reason(
    queue_file: Path, opened: list[EmbeddedTransport], caplog: pytest.LogCaptureFixture
) -> None:
    """E.g. a job of a format this program cannot read, left in the file by an upgrade: it
    must not stop the worker at every start, nor block the jobs behind it."""
    misrouted = sample_job(8, kind=SourceKind.ARCHIVER)
    store = JobStore(queue_file)
    store.publish([("databuffer", b"{not json"), ("databuffer", misrouted.to_json())])
    store.close()
    transport = await reopen(queue_file, opened)
    await transport.publish_jobs([sample_job(9)])
    consumer, delivery = await deliver(transport)
    assert (delivery.job, delivery.redelivered) == (sample_job(9), False)
    await delivery.ack()
    await consumer.aclose()
    reasons = [
        "undecodable job message: Invalid JSON: key must be a string at line 1 column 2",
        "misrouted job message: a archiver job in the databuffer queue",
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "sf_daq_broker.transport.embedded"][
        -2:
    ] == [
        f"a message of embedded.jobs.databuffer cannot be decoded, moved to the dead-letter "
        f"queue: {reason}"
        for reason in reasons
    ]
    assert transport.refused_messages == 2
    assert await transport.peek_dead_letters() == [
        DeadLetter("embedded.jobs.databuffer", b"{not json", reasons[0]),
        DeadLetter("embedded.jobs.databuffer", misrouted.to_json(), reasons[1]),
    ]
    assert len(await transport.take_dead_letters()) == 2
    assert await transport.take_dead_letters() == []
    assert transport.queued(SourceKind.DATABUFFER) == 0


def test_the_default_embedded_transport_lives_in_the_state_dir(tmp_path: Path) -> None:
    transport = create_transport("", "sf-daq", state_dir=tmp_path)
    assert isinstance(transport, EmbeddedTransport)
    assert transport.path == tmp_path / "queue.sqlite"
    assert EmbeddedTransport().path is None  # in memory: tests of one process only


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from sf_daq_broker.jobs import SourceKind
    from sf_daq_broker.transport.embedded import EmbeddedTransport
    from tests.integration.test_transports import sample_job

    async def main() -> None:
        transport = EmbeddedTransport(Path(sys.argv[1]))
        await transport.connect()
        await transport.publish_jobs([sample_job(1), sample_job(2), sample_job(3)])
        consumer = transport.consume_jobs(SourceKind.DATABUFFER, prefetch=2)
        first = await consumer.__anext__()
        second = await consumer.__anext__()
        await first.reject()
        print("holding", second.job.run_number, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_a_killed_process_leaves_its_unsettled_job_to_the_next_one(
    queue_file: Path, opened: list[EmbeddedTransport]
) -> None:
    """kill -9 in the middle of job 2: job 1 was rejected, job 3 never delivered."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(queue_file)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        assert line == "holding 2\n"
    finally:
        child.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(child.wait, 60) == -signal.SIGKILL
        child.stdout.close()

    again = await reopen(queue_file, opened)
    consumer: Any = again.consume_jobs(SourceKind.DATABUFFER, prefetch=2)
    deliveries = [await asyncio.wait_for(consumer.__anext__(), 10) for _ in range(2)]
    assert [(d.job, d.redelivered) for d in deliveries] == [
        (sample_job(2), True),
        (sample_job(3), False),
    ]
    for delivery in deliveries:
        await delivery.ack()
    await consumer.aclose()
    assert [(d.job, d.reason) for d in await again.take_dead_letters()] == [
        (sample_job(1), REJECTED_BY_WORKER)
    ]
