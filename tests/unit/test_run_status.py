"""/run_status follows status events and survives a broker restart (both transports)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import Action, Job, SourceKind, StatusEvent
from sf_daq_broker.transport import Transport
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.transport.embedded import EmbeddedTransport
from tests.support import PATIENCE, async_wait_until

REQUEST = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 1999,
    "channels_list": ["A:B"],
    "detectors": {"JF13T01V01": {}},
}
REPORT = {"expected": 1000, "found": 998, "missing": [1500, 1501]}


@pytest.fixture(params=["embedded", "rabbitmq"])
def transport_factory(request: pytest.FixtureRequest) -> Callable[[], Transport]:
    if request.param == "embedded":
        shared = EmbeddedTransport()  # one "server" across broker restarts in this process
        return lambda: shared
    url = request.getfixturevalue("amqp_url")
    prefix = request.getfixturevalue("amqp_prefix")
    return lambda: AmqpTransport(url, prefix=prefix)


@pytest.fixture
async def start_broker(
    settings: Any, transport_factory: Callable[[], Transport]
) -> AsyncIterator[Callable[[], Any]]:
    clients: list[TestClient] = []

    async def start() -> TestClient:
        client = TestClient(TestServer(create_app(settings, transport_factory())))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def status_of(client: TestClient, run: int = 1) -> tuple[int, dict[str, Any]]:
    response = await client.get("/run_status", params={"pgroup": "p12345", "run_number": run})
    return response.status, await response.json()


async def take_jobs(transport: Transport) -> dict[str, Job]:
    jobs = {}
    for kind in (SourceKind.DATABUFFER, SourceKind.DETECTOR):
        consumer = transport.consume_jobs(kind)
        delivery = await consumer.__anext__()
        jobs[delivery.job.source] = delivery.job
        await delivery.ack()
        await consumer.aclose()
    return jobs


async def test_status_follows_the_run_and_survives_restart(
    start_broker: Callable[[], Any], transport_factory: Callable[[], Transport]
) -> None:
    broker = await start_broker()
    response = await broker.post("/retrieve_from_buffers", json=REQUEST)
    assert response.status == 200
    status, reply = await status_of(broker)
    assert status == 200
    assert reply["run_state"] == "queued"
    assert reply["message"] == "run 1 of p12345 is queued: 0 of 2 sources done"
    assert {s: v["state"] for s, v in reply["sources"].items()} == {
        "BSDATA": "queued",
        "JF13T01V01": "queued",
    }

    worker = transport_factory()
    await worker.connect()
    jobs = await take_jobs(worker)
    bsdata, detector = jobs["BSDATA"], jobs["JF13T01V01"]
    await worker.publish_status(
        StatusEvent.for_job(Action.WRITE_START, bsdata, "started", total=1002)
    )
    await worker.publish_status(
        StatusEvent.for_job(Action.WRITE_PROGRESS, bsdata, "", done=500, total=1002)
    )

    async def progress_seen() -> bool:
        _, now = await status_of(broker)
        return now["sources"]["BSDATA"]["progress"] == {"done": 500, "total": 1002}

    await async_wait_until(progress_seen, timeout=PATIENCE, what="progress in /run_status")
    _, reply = await status_of(broker)
    assert reply["run_state"] == "running"
    assert reply["sources"]["BSDATA"]["state"] == "running"

    await worker.publish_status(
        StatusEvent.for_job(Action.WRITE_FINISHED, bsdata, "written", total=1002, report=REPORT)
    )
    await worker.publish_status(
        StatusEvent.for_job(Action.WRITE_REJECTED, detector, "image buffer: HTTP 500 after 5 tries")
    )

    async def finished() -> bool:
        _, now = await status_of(broker)
        return now["run_state"] == "failed" and now["sources"]["BSDATA"]["state"] == "done"

    await async_wait_until(finished, timeout=PATIENCE, what="the run to end")
    _, reply = await status_of(broker)
    assert reply["message"] == "run 1 of p12345 is failed: 1 of 2 sources done"
    assert reply["sources"]["BSDATA"]["completeness"] == REPORT
    assert reply["sources"]["BSDATA"]["progress"] == {"done": 1002, "total": 1002}
    assert reply["sources"]["JF13T01V01"]["error"] == "image buffer: HTTP 500 after 5 tries"
    await broker.close()

    restarted = await start_broker()
    status, after = await status_of(restarted)
    assert status == 200
    assert after["sources"] == reply["sources"]
    if isinstance(worker, AmqpTransport):
        await worker.close()


@pytest.mark.parametrize("transport_factory", ["rabbitmq"], indirect=True)
async def test_events_sent_while_broker_is_down_are_applied_after_restart(
    start_broker: Callable[[], Any], transport_factory: Callable[[], Transport]
) -> None:
    broker = await start_broker()
    assert (await broker.post("/retrieve_from_buffers", json=REQUEST)).status == 200
    worker = transport_factory()
    if isinstance(worker, EmbeddedTransport):
        pytest.skip(
            "the embedded queue lives in the broker's process: nothing is sent while it is down"
        )
    await worker.connect()
    jobs = await take_jobs(worker)
    await broker.close()
    for job in jobs.values():
        await worker.publish_status(
            StatusEvent.for_job(Action.WRITE_FINISHED, job, "written", total=10)
        )
    restarted = await start_broker()

    async def done() -> bool:
        _, now = await status_of(restarted)
        return now["run_state"] == "done"

    await async_wait_until(
        done, timeout=PATIENCE, what="the events queued while the broker was down"
    )
    await worker.close()


async def test_unknown_runs(start_broker: Callable[[], Any], raw_dir: Any) -> None:
    broker = await start_broker()
    assert await status_of(broker, 7) == (
        404,
        {"status": "failed", "message": "run 7 of p12345 does not exist"},
    )
    response = await broker.get("/run_status", params={"pgroup": "p12345"})
    assert (response.status, (await response.json())["message"]) == (400, "run_number is missing")
    (raw_dir / "run_info" / "000000").mkdir(parents=True)
    (raw_dir / "run_info" / "000000" / "run_000007.json").write_text("{}")
    assert await status_of(broker, 7) == (
        404,
        {
            "status": "failed",
            "message": "run 7 of p12345 exists, but this broker has no job status for it",
        },
    )


async def test_a_reserved_run_says_it_is_reserved(start_broker: Callable[[], Any]) -> None:
    broker = await start_broker()
    response = await broker.post("/advance_run_number", json={"pgroup": "p12345"})
    assert (await response.json())["run_number"] == 1
    assert await status_of(broker, 1) == (
        404,
        {
            "status": "failed",
            "message": "run 1 of p12345 is reserved (/advance_run_number) but not retrieved yet: "
            "send /retrieve_from_buffers with run_number 1 to fill it",
        },
    )
    assert (await status_of(broker, 2))[1]["message"] == "run 2 of p12345 does not exist"
