"""Jobs and status events on the real RabbitMQ, and the same semantics on the embedded transport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import Action, Job, SourceKind, StatusEvent, job_id_for
from sf_daq_broker.transport import REJECTED_BY_WORKER, DeadLetter, HandoverError, Transport
from sf_daq_broker.transport.amqp import AmqpTransport, Topology
from sf_daq_broker.transport.embedded import EmbeddedTransport
from tests.support import PATIENCE, async_wait_until

pytestmark = pytest.mark.rabbitmq

REQUEST = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 1999,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet"],
    "camera_list": ["SARES11-SPEC125-M1:FPICTURE"],
    "pv_list": ["SARFE10-OAPU044:SPECTRUM_X"],
    "detectors": {"JF13T01V01": {}, "JF07T03V01": {"geometry": True}},
}


def sample_job(number: int = 1, kind: SourceKind = SourceKind.DATABUFFER) -> Job:
    return Job(
        job_id=job_id_for("p12345", number, "BSDATA"),
        request_id=f"req-{number}",
        kind=kind,
        source="BSDATA",
        names=("A:B",),
        start_pulse_id=10,
        stop_pulse_id=20,
        requested_start=10,
        requested_stop=20,
        rate_multiplicator=1,
        pgroup="p12345",
        beamline="bernina",
        run_number=number,
        output_file="/x.h5",
        log_file="/x.log",
        run_info_file="/x.json",
        request_time="2026-01-01 00:00:00.000000",
    )


@pytest.fixture(params=["rabbitmq", "embedded", "embedded-file"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    if request.param == "rabbitmq":
        url = request.getfixturevalue("amqp_url")
        prefix = request.getfixturevalue("amqp_prefix")
        instance: Transport = AmqpTransport(url, prefix=prefix)
    elif request.param == "embedded-file":  # the single-machine setup's queue on disk
        instance = EmbeddedTransport(request.getfixturevalue("tmp_path") / "queue.sqlite")
    else:
        instance = EmbeddedTransport()
    await instance.connect()
    yield instance
    await instance.close()


async def next_delivery(transport: Transport, kind: SourceKind) -> Any:
    consumer = transport.consume_jobs(kind)
    delivery = await consumer.__anext__()
    return consumer, delivery


async def test_ack_removes_the_job(transport: Transport) -> None:
    await transport.publish_jobs([sample_job(1), sample_job(2)])
    consumer, first = await next_delivery(transport, SourceKind.DATABUFFER)
    assert (first.job, first.redelivered) == (sample_job(1), False)
    await first.ack()
    second = await consumer.__anext__()
    assert second.job == sample_job(2)
    await second.ack()
    await consumer.aclose()
    await transport.publish_jobs([sample_job(3)])
    consumer, third = await next_delivery(transport, SourceKind.DATABUFFER)
    assert third.job.run_number == 3  # 1 and 2 are gone for good
    await third.ack()
    await consumer.aclose()


async def test_unsettled_job_returns_to_the_queue_redelivered(transport: Transport) -> None:
    await transport.publish_jobs([sample_job(7)])
    consumer, delivery = await next_delivery(transport, SourceKind.DATABUFFER)
    assert delivery.redelivered is False
    await consumer.aclose()  # the worker dies without a verdict
    consumer, again = await next_delivery(transport, SourceKind.DATABUFFER)
    assert (again.job, again.redelivered) == (sample_job(7), True)
    await again.ack()
    await consumer.aclose()


async def test_reject_dead_letters(transport: Transport) -> None:
    await transport.publish_jobs([sample_job(4)])
    consumer, delivery = await next_delivery(transport, SourceKind.DATABUFFER)
    await delivery.reject()
    await consumer.aclose()
    dead: list[DeadLetter] = []

    async def collected() -> bool:
        dead.extend(await transport.take_dead_letters())
        return bool(dead)

    await async_wait_until(collected, timeout=PATIENCE, what="the dead-lettered job")
    assert [(d.job, d.reason) for d in dead] == [(sample_job(4), REJECTED_BY_WORKER)]


async def test_prefetch_one_holds_back_the_second_job(transport: Transport) -> None:
    import asyncio

    await transport.publish_jobs([sample_job(1), sample_job(2)])
    consumer, first = await next_delivery(transport, SourceKind.DATABUFFER)
    pending = asyncio.ensure_future(consumer.__anext__())
    done, _ = await asyncio.wait([pending], timeout=0.3)
    assert not done  # nothing more while the first job is unsettled
    await first.ack()
    second = await asyncio.wait_for(pending, PATIENCE)
    assert second.job == sample_job(2)
    await second.ack()
    await consumer.aclose()


async def test_status_events_fan_out(transport: Transport) -> None:
    first = await transport.subscribe_status()
    second = await transport.subscribe_status()
    event = StatusEvent.for_job(Action.WRITE_FINISHED, sample_job(5), "done", found=10)
    await transport.publish_status(event)
    assert await first.__anext__() == event
    assert await second.__anext__() == event
    await first.close()
    await second.close()


@pytest.fixture
async def amqp_client(
    aiohttp_client: Any, settings: Any, amqp_url: str, amqp_prefix: str
) -> TestClient:
    return await aiohttp_client(create_app(settings, AmqpTransport(amqp_url, prefix=amqp_prefix)))


async def test_broker_queues_persistent_jobs_per_source(
    amqp_client: TestClient, amqp_url: str, amqp_prefix: str, raw_dir: Path
) -> None:
    topology = Topology(amqp_prefix)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        status_queue = await channel.declare_queue(exclusive=True)
        await status_queue.bind(topology.status_exchange)

        response = await amqp_client.post("/retrieve_from_buffers", json=REQUEST)
        reply = await response.json()
        assert response.status == 200, reply

        received: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
        for kind in SourceKind:
            queue = await channel.declare_queue(topology.job_queue(kind), passive=True)
            while (message := await queue.get(fail=False)) is not None:
                await message.ack()
                received[json.loads(message.body)["source"]] = message
        assert sorted(received) == ["BSDATA", "CAMERAS", "JF07T03V01", "JF13T01V01", "PVCHANNELS"]
        for source, message in received.items():
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert message.content_type == "application/json"
            assert message.message_id == job_id_for("p12345", 1, source)
            job = Job.from_json(message.body)
            assert job.request_id == reply["request_id"]
            assert job.output_file == str(raw_dir / f"run_000001.{source}.h5")
            assert job.log_file == str(raw_dir / f"run_info/000000/run_000001.{source}.log")
        assert Job.from_json(received["CAMERAS"].body).names == ("SARES11-SPEC125-M1:FPICTURE",)
        assert Job.from_json(received["JF07T03V01"].body).options["geometry"] is True
        assert (
            Job.from_json(received["BSDATA"].body).start_pulse_id,
            Job.from_json(received["BSDATA"].body).stop_pulse_id,
        ) == (999, 2000)

        events = []
        for _ in range(5):
            message = await status_queue.get(timeout=PATIENCE)
            await message.ack()
            events.append(message)
        assert [m.headers["action"] for m in events] == ["write_request"] * 5
        assert [m.headers["source"] for m in events] == [
            "BSDATA",
            "CAMERAS",
            "PVCHANNELS",
            "JF13T01V01",
            "JF07T03V01",
        ]
        body = json.loads(events[0].body)
        assert {k: body[k] for k in ("request_id", "pgroup", "run_number", "source")} == {
            "request_id": reply["request_id"],
            "pgroup": "p12345",
            "run_number": 1,
            "source": "BSDATA",
        }
        assert isinstance(body["timestamp"], float)

        # The queues are durable: declaring them as not durable is refused by RabbitMQ.
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            probe = await connection.channel()
            await probe.declare_queue(topology.job_queue(SourceKind.DETECTOR), durable=False)


async def test_job_published_before_any_worker_waits_in_queue(
    amqp_client: TestClient, amqp_url: str, amqp_prefix: str
) -> None:
    response = await amqp_client.post("/retrieve_from_buffers", json=REQUEST)
    assert response.status == 200
    worker = AmqpTransport(amqp_url, prefix=amqp_prefix)  # a worker starting later
    consumer = worker.consume_jobs(SourceKind.DETECTOR)
    sources = set()
    for _ in range(2):
        delivery = await consumer.__anext__()
        sources.add(delivery.job.source)
        await delivery.ack()
    await consumer.aclose()
    await worker.close()
    assert sources == {"JF13T01V01", "JF07T03V01"}


async def test_unroutable_job_is_an_error_not_a_drop(amqp_url: str, amqp_prefix: str) -> None:
    transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    await transport.connect()
    topology = Topology(amqp_prefix)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.job_queue(SourceKind.ARCHIVER), passive=True)
        await queue.unbind(topology.jobs_exchange, routing_key="archiver")
    with pytest.raises(HandoverError) as caught:
        await transport.publish_jobs([sample_job(1), sample_job(2, kind=SourceKind.ARCHIVER)])
    assert str(caught.value) == "RabbitMQ did not take the BSDATA job (message refused)"
    assert caught.value.handed_over == ["BSDATA"]
    await transport.close()


async def test_rabbitmq_down_the_run_is_accepted_and_waits_for_the_queue(
    aiohttp_client: Any, settings: Any, raw_dir: Path
) -> None:
    """RabbitMQ away, the disk fine: the run gets its number (200), its jobs wait in the
    broker's outbox, /run_status and /health say so, and no message shows an object repr."""
    dead = AmqpTransport("amqp://guest:guest@127.0.0.1:1/", prefix="unused")
    client = await aiohttp_client(create_app(settings, dead))
    for run in (1, 2):
        response = await client.post("/retrieve_from_buffers", json=REQUEST)
        reply = await response.json()
        assert (response.status, reply["message"], reply["run_number"]) == (200, str(run), run)
    status = await (
        await client.get("/run_status", params={"pgroup": "p12345", "run_number": 1})
    ).json()
    waiting = "BSDATA, CAMERAS, PVCHANNELS, JF13T01V01, JF07T03V01"
    assert status["message"] == (
        f"run 1 of p12345 is queued: 0 of 5 sources done; {waiting} queued (waiting for the queue)"
    )
    assert [
        (job["source"], job["state"], job["message"]) for job in status["sources"].values()
    ] == [(source, "queued", "queued (waiting for the queue)") for source in waiting.split(", ")]
    health = await client.get("/health")
    body = await health.json()
    assert (health.status, body["handover_backlog"]) == (503, 10)
    assert body["message"] == (
        "rabbitmq transport is not reachable (10 accepted jobs wait for it, the oldest for "
        f"{body['handover_oldest_age_seconds']:.0f} s)"
    )
    record = json.loads((raw_dir / "run_info/000000/run_000001.json").read_text())
    assert "handover" not in record


async def test_the_run_is_refused_only_when_the_outbox_cannot_be_written_either(
    aiohttp_client: Any, settings: Any, raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from sf_daq_broker.transport.outbox import Outbox

    def broken(self: Outbox, items: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Outbox, "put", broken)
    dead = AmqpTransport("amqp://guest:guest@127.0.0.1:1/", prefix="unused")
    client = await aiohttp_client(create_app(settings, dead))
    response = await client.post("/retrieve_from_buffers", json=REQUEST)
    reply = await response.json()
    outbox = settings.state_dir / "handover" / "jobs.0.sqlite"
    reason = (
        f"RabbitMQ does not take jobs and the outbox {outbox} cannot be written (disk I/O error)"
    )
    assert (response.status, reply["message"]) == (
        503,
        f"run 1 of p12345 was recorded but its jobs could not be queued ({reason}); the run "
        "number is not reused: send the request again when the queue is back",
    )
    record = json.loads((raw_dir / "run_info/000000/run_000001.json").read_text())
    assert (record["handover"]["status"], record["handover"]["reason"]) == ("failed", reason)


async def test_jobs_waiting_for_the_queue_outlive_a_restart_of_the_broker(
    aiohttp_client: Any, settings: Any, amqp_url: str, amqp_prefix: str
) -> None:
    """Accepted while RabbitMQ was away, the broker then stopped: the next broker on the same
    state directory hands the jobs over (once), and the store says they are queued."""
    dead = AmqpTransport("amqp://guest:guest@127.0.0.1:1/", prefix=amqp_prefix)
    first = await aiohttp_client(create_app(settings, dead))
    reply = await (await first.post("/retrieve_from_buffers", json=REQUEST)).json()
    job_ids = [job["job_id"] for job in (await run_status(first, 1))["sources"].values()]
    await first.close()
    second = await aiohttp_client(create_app(settings, AmqpTransport(amqp_url, amqp_prefix)))

    async def handed_over() -> bool:
        body = await (await second.get("/health")).json()
        return body["handover_backlog"] == 0

    await async_wait_until(handed_over, timeout=60, what="the jobs handed over")
    status = await run_status(second, reply["run_number"])
    assert [job["message"] for job in status["sources"].values()] == ["queued"] * 5
    consumer = AmqpTransport(amqp_url, prefix=amqp_prefix)
    delivered = []
    for kind in (SourceKind.DATABUFFER, SourceKind.IMAGEBUFFER, SourceKind.ARCHIVER):
        queue = await next_delivery(consumer, kind)
        delivered.append(queue[1].job.job_id)
        await queue[1].ack()
        await queue[0].aclose()
    detectors, delivery = await next_delivery(consumer, SourceKind.DETECTOR)
    delivered.append(delivery.job.job_id)
    await delivery.ack()
    delivery = await detectors.__anext__()
    delivered.append(delivery.job.job_id)
    await delivery.ack()
    await detectors.aclose()
    assert delivered == job_ids
    assert await consumer.job_queue_depths() == {kind: (0, 0) for kind in SourceKind}
    await consumer.close()


async def run_status(client: TestClient, run: int) -> Any:
    response = await client.get("/run_status", params={"pgroup": "p12345", "run_number": run})
    return await response.json()
