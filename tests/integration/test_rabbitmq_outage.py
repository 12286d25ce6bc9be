"""RabbitMQ goes away and comes back: nothing accepted is lost, no status stays unfinished.

The outages are real: ``rabbitmqctl stop_app``/``start_app`` on a private RabbitMQ node this
session starts for itself (``tests.private_rabbitmq``), never on the shared server. The broker
is the real application (HTTP), the workers the real loop with a source that writes small
files; both talk to the private node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.api.state import HANDOVER, STATUS
from sf_daq_broker.bookkeeping.atomic import partial_files
from sf_daq_broker.config import Settings
from sf_daq_broker.jobs import Action, Job, SourceKind
from sf_daq_broker.status.reconcile import ReconcilePolicy, Reconciler
from sf_daq_broker.status.store import StatusStore
from sf_daq_broker.transport.amqp import BROKER_STATUS_QUEUE, AmqpTransport
from sf_daq_broker.workers.lease import LeasePolicy, lease_path
from sf_daq_broker.workers.loop import Progress, RetryPolicy, Source, Worker
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses
from tests.private_rabbitmq import PrivateRabbitMQ, private_rabbitmq  # noqa: F401
from tests.support import async_wait_until, dead_owner

pytestmark = pytest.mark.rabbitmq

REQUEST = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 1009,
    "channels_list": ["A:B"],
}
REPR = re.compile(r"object at 0x[0-9a-f]+")
LEASES = LeasePolicy(heartbeat=0.2, stale_after=30, poll=0.05, reconsume_delay=0.1)
#: The background reconciler of the broker: it runs, but never judges within a test.
PATIENT = ReconcilePolicy(interval=0.5, grace=3600)


class FileSource(Source):
    """Writes ``run N`` as the job's file; ``hold`` keeps it busy until released."""

    kind = SourceKind.DATABUFFER

    def __init__(self) -> None:
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        target.write_bytes(f"run {job.run_number}".encode())
        pulses = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        return CompletenessReport(names=[NameReport.judge("A:B", pulses, pulses)])


@pytest.fixture
async def node(private_rabbitmq: PrivateRabbitMQ) -> AsyncIterator[PrivateRabbitMQ]:  # noqa: F811
    """The private node, its app running again after the test whatever happened (start_app
    on a running app changes nothing)."""
    yield private_rabbitmq
    await asyncio.to_thread(private_rabbitmq.start_app)


@pytest.fixture
def prefix() -> str:
    return f"outage-{uuid.uuid4().hex[:10]}"


async def start_worker(
    node: PrivateRabbitMQ, prefix: str, state: Path, source: Source
) -> tuple[AmqpTransport, asyncio.Task[None]]:
    transport = AmqpTransport(node.url, prefix=prefix, status_outbox=state / "outbox")
    await transport.connect()
    retry = RetryPolicy(attempts=2, first_delay=0.01)
    task = asyncio.create_task(Worker(transport, [source], retry=retry, lease=LEASES).run())
    return transport, task


async def stop_worker(transport: AmqpTransport, task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await transport.close()


async def run_status(client: TestClient[Any, Any], run: int) -> dict[str, Any]:
    response = await client.get("/run_status", params={"pgroup": "p12345", "run_number": run})
    body: dict[str, Any] = await response.json()
    return body


async def test_a_burst_of_requests_through_stop_app_and_start_app(
    node: PrivateRabbitMQ,
    prefix: str,
    settings: Settings,
    raw_dir: Path,
    tmp_path: Path,
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """40 requests from 4 clients; RabbitMQ's app stops after the 10th reply and starts after
    the 25th: every request gets 200 and its own run number, every run ends done with its
    file, nothing is left running or queued, and no message shows an object repr."""
    caplog.set_level(logging.INFO)
    client = await aiohttp_client(
        create_app(settings, AmqpTransport(node.url, prefix=prefix), PATIENT)
    )
    source = FileSource()
    worker = await start_worker(node, prefix, tmp_path / "worker", source)
    replies: list[tuple[int, dict[str, Any]]] = []

    async def requests(count: int) -> None:
        for _ in range(count):
            response = await client.post("/retrieve_from_buffers", json=REQUEST)
            replies.append((response.status, await response.json()))

    async def outage() -> None:
        await async_wait_until(lambda: len(replies) >= 10, timeout=120, what="10 replies")
        await asyncio.to_thread(node.stop_app)
        await async_wait_until(lambda: len(replies) >= 25, timeout=120, what="25 replies")
        await asyncio.to_thread(node.start_app)

    await asyncio.gather(outage(), *(requests(10) for _ in range(4)))
    assert [status for status, _ in replies] == [200] * 40
    runs = sorted(body["run_number"] for _, body in replies)
    assert runs == list(range(1, 41))

    async def all_done() -> bool:
        states = [(await run_status(client, run))["run_state"] for run in runs]
        return states == ["done"] * 40

    await async_wait_until(all_done, timeout=180, what="every run done")
    for run in runs:
        status = await run_status(client, run)
        assert status["message"] == f"run {run} of p12345 is done: 1 of 1 sources done"
        assert (raw_dir / f"run_{run:06d}.BSDATA.h5").read_bytes() == f"run {run}".encode()
    assert sorted(p.name for p in raw_dir.glob(".*")) == []  # no lease, no partial file
    health = await (await client.get("/health")).json()
    assert (health["handover_backlog"], health["handover_oldest_age_seconds"]) == (0, None)
    await stop_worker(*worker)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("sf_daq_broker")]
    assert [message for message in ours if REPR.search(message)] == []
    assert not [body for _, body in replies if REPR.search(json.dumps(body))]


async def test_status_events_of_an_outage_arrive_after_it(
    node: PrivateRabbitMQ,
    prefix: str,
    raw_dir: Path,
    tmp_path: Path,
    aiohttp_client: Any,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The job ends while RabbitMQ is away: its worker's final event waits in the worker's
    outbox and reaches the broker once RabbitMQ is back; the run ends done, with its report."""
    caplog.set_level(logging.INFO)
    client = await aiohttp_client(
        create_app(settings, AmqpTransport(node.url, prefix=prefix), PATIENT)
    )
    source = FileSource()
    source.hold = asyncio.Event()
    worker = await start_worker(node, prefix, tmp_path / "worker", source)
    response = await client.post("/retrieve_from_buffers", json=REQUEST)
    assert response.status == 200
    await asyncio.wait_for(source.started.wait(), 60)
    await async_wait_until(
        lambda: (raw_dir / ".run_000001.BSDATA.h5.lease").exists(), timeout=60, what="lease"
    )
    await asyncio.to_thread(node.stop_app)
    source.hold.set()  # the file is written while RabbitMQ is away
    await async_wait_until(
        lambda: "status event write_finished of" in caplog.text, timeout=60, what="outbox"
    )
    assert (await run_status(client, 1))["run_state"] == "running"
    await asyncio.to_thread(node.start_app)

    async def done() -> bool:
        return (await run_status(client, 1))["run_state"] == "done"

    await async_wait_until(done, timeout=120, what="the final event after the outage")
    status = await run_status(client, 1)
    assert status["sources"]["BSDATA"]["completeness"]["complete"] is True
    assert (raw_dir / "run_000001.BSDATA.h5").read_bytes() == b"run 1"
    await async_wait_until(
        lambda: not lease_path_of(raw_dir).exists(), timeout=60, what="the job settled"
    )
    await stop_worker(*worker)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("sf_daq_broker")]
    assert [message for message in ours if REPR.search(message)] == []
    waits = [message for message in ours if "waits in the outbox" in message]
    assert waits[0] == (
        f"status event write_finished of {status['sources']['BSDATA']['job_id']} waits in the "
        f"outbox: RabbitMQ at 127.0.0.1:{node.port} is not reachable (connection closed)"
    )


def lease_path_of(raw_dir: Path) -> Path:
    return raw_dir / ".run_000001.BSDATA.h5.lease"


async def test_accepted_jobs_wait_in_the_outbox_and_health_shows_them(
    node: PrivateRabbitMQ, prefix: str, settings: Settings, tmp_path: Path, aiohttp_client: Any
) -> None:
    """While RabbitMQ's app is stopped: 3 runs accepted, /health shows exactly 3 jobs waiting
    and the oldest's age; after start_app they are handed over in order and /health is clear."""
    client = await aiohttp_client(
        create_app(settings, AmqpTransport(node.url, prefix=prefix), PATIENT)
    )
    assert (await client.get("/health")).status == 200
    await asyncio.to_thread(node.stop_app)
    before = time.time()
    for run in (1, 2, 3):
        response = await client.post("/retrieve_from_buffers", json=REQUEST)
        assert (response.status, (await response.json())["run_number"]) == (200, run)
    health = await client.get("/health")
    after = time.time()
    body = await health.json()
    age = body["handover_oldest_age_seconds"]
    assert (health.status, body["transport_ok"], body["handover_backlog"]) == (503, False, 3)
    assert 0 <= age <= after - before + 0.1
    assert body["message"] == (
        f"rabbitmq transport is not reachable (3 accepted jobs wait for it, the oldest for "
        f"{age:.0f} s)"
    )
    for run in (1, 2, 3):
        status = await run_status(client, run)
        assert status["sources"]["BSDATA"]["message"] == "queued (waiting for the queue)"
    await asyncio.to_thread(node.start_app)

    async def clear() -> bool:
        return (await (await client.get("/health")).json())["handover_backlog"] == 0

    await async_wait_until(clear, timeout=120, what="the backlog handed over")
    health = await client.get("/health")
    body = await health.json()
    assert (health.status, body["message"], body["handover_oldest_age_seconds"]) == (
        200,
        "healthy",
        None,
    )
    transport = AmqpTransport(node.url, prefix=prefix)
    consumer = transport.consume_jobs(SourceKind.DATABUFFER)
    runs = []
    for _ in range(3):
        delivery = await asyncio.wait_for(consumer.__anext__(), 60)
        runs.append(delivery.job.run_number)
        await delivery.ack()
    await consumer.aclose()
    await transport.close()
    assert runs == [1, 2, 3]
    for run in (1, 2, 3):
        status = await run_status(client, run)
        assert status["sources"]["BSDATA"]["message"] == "queued"


KILLED_WORKER = """
import asyncio, sys
from pathlib import Path
from sf_daq_broker.jobs import Action, StatusEvent
from sf_daq_broker.transport.amqp import AmqpTransport

async def main():
    transport = AmqpTransport("amqp://guest:guest@127.0.0.1:1/", prefix=sys.argv[1],
                              status_outbox=Path(sys.argv[2]))
    for action in ("write_start", "write_progress", "write_finished"):
        await transport.publish_status(StatusEvent(
            action=Action(action), request_id="req", job_id="job-1", pgroup="p12345",
            run_number=1, source="BSDATA", file="/x.h5", message=action))
    print("in the outbox", flush=True)
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


async def test_a_killed_workers_events_are_sent_by_the_next_process(
    amqp_url: str, amqp_prefix: str, tmp_path: Path
) -> None:
    """A worker whose events could not be sent is killed (SIGKILL): its events stay in its
    outbox file, and the next worker process on the same state directory sends them, in
    the order they were published."""
    outbox = tmp_path / "outbox"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WORKER,
        amqp_prefix,
        str(outbox),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 60)
    assert line == b"in the outbox\n"
    child.kill()
    await child.wait()
    listener = AmqpTransport(amqp_url, prefix=amqp_prefix)
    events = await listener.subscribe_status()
    following = AmqpTransport(amqp_url, prefix=amqp_prefix, status_outbox=outbox)
    await following.connect()
    received = [await asyncio.wait_for(events.__anext__(), 60) for _ in range(3)]
    assert [(e.action, e.job_id, e.message) for e in received] == [
        (Action.WRITE_START, "job-1", "write_start"),
        (Action.WRITE_PROGRESS, "job-1", "write_progress"),
        (Action.WRITE_FINISHED, "job-1", "write_finished"),
    ]
    await async_wait_until(lambda: following.status_backlog() == 0, what="outbox empty")
    await events.close()
    await following.close()
    await listener.close()


async def test_a_job_no_one_works_on_is_failed_and_its_leftovers_removed(
    amqp_url: str, amqp_prefix: str, settings: Settings, raw_dir: Path, aiohttp_client: Any
) -> None:
    """Judged by what can be seen: a job waiting in its queue stays queued however often it is
    looked at; once its message is gone (taken by a worker that was killed) and its lease is
    a dead process's, it ends failed with the reason, its lease and partial file removed."""
    client = await aiohttp_client(
        create_app(settings, AmqpTransport(amqp_url, prefix=amqp_prefix), PATIENT)
    )
    for _ in range(2):
        assert (await client.post("/retrieve_from_buffers", json=REQUEST)).status == 200
    app = client.app
    reconciler = Reconciler(
        AmqpTransport(amqp_url, prefix=amqp_prefix),
        app[STATUS],
        app[HANDOVER].waiting_job_ids,
        BROKER_STATUS_QUEUE,
        ReconcilePolicy(grace=0),  # judged on the second look
    )
    await async_wait_until(no_status_backlog(amqp_url, amqp_prefix), timeout=60, what="events")
    for _ in range(3):
        assert await reconciler.check() == []  # both wait in the queue: alive
    worker = AmqpTransport(amqp_url, prefix=amqp_prefix)
    consumer = worker.consume_jobs(SourceKind.DATABUFFER, prefetch=2)
    taken = [await asyncio.wait_for(consumer.__anext__(), 60) for _ in range(2)]
    for delivery in taken:  # the worker took both and was killed after acknowledging them
        await delivery.ack()
    await consumer.aclose()
    await worker.close()
    first, second = (delivery.job for delivery in taken)
    owner = dead_owner()
    killed = {"job_id": first.job_id, "owner": owner, "state": "running", "reason": ""}
    lease_path(first).write_text(json.dumps(killed))
    partial = Path(first.output_file).with_name(f".{Path(first.output_file).name}.dead.partial")
    partial.write_bytes(b"half a file")
    Path(second.output_file).write_bytes(b"run 2")  # published; its final event never came
    written = time.time()
    assert await reconciler.check() == []  # first look: suspects
    assert sorted(await reconciler.check()) == sorted([first.job_id, second.job_id])
    took = time.time() - written
    status = await run_status(client, 1)
    assert status["run_state"] == "failed"
    error = status["sources"]["BSDATA"]["error"]
    found = re.fullmatch(
        rf"lost: its worker {re.escape(owner)} is gone \(lease (\d+) s old\) and the "
        r"databuffer queue does not hold it; no file was written, send the request again",
        error,
    )
    assert found is not None, error
    assert 0 <= int(found[1]) <= took + 1  # the lease's age when it was judged
    assert status["message"] == "run 1 of p12345 is failed: 0 of 1 sources done"
    assert not lease_path(first).exists()
    assert partial_files(Path(first.output_file)) == []
    status = await run_status(client, 2)
    assert (status["run_state"], status["sources"]["BSDATA"]["message"]) == (
        "done",
        f"written ({second.output_file}), but its worker's final status never arrived: "
        "completeness not known",
    )
    await reconciler.transport.close()


async def test_a_running_job_with_a_live_lease_is_left_alone(
    amqp_url: str, amqp_prefix: str, settings: Settings, raw_dir: Path, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(
        create_app(settings, AmqpTransport(amqp_url, prefix=amqp_prefix), PATIENT)
    )
    assert (await client.post("/retrieve_from_buffers", json=REQUEST)).status == 200
    worker = AmqpTransport(amqp_url, prefix=amqp_prefix)
    consumer = worker.consume_jobs(SourceKind.DATABUFFER)
    delivery = await asyncio.wait_for(consumer.__anext__(), 60)
    job = delivery.job
    # A worker on another host, touching its lease: judged by the lease's age alone.
    alive = {"job_id": job.job_id, "owner": "elsewhere:1:1:live", "state": "running"}
    lease_path(job).write_text(json.dumps(alive))
    app = client.app
    reconciler = Reconciler(
        AmqpTransport(amqp_url, prefix=amqp_prefix),
        app[STATUS],
        app[HANDOVER].waiting_job_ids,
        BROKER_STATUS_QUEUE,
        ReconcilePolicy(grace=0),
    )
    await async_wait_until(no_status_backlog(amqp_url, amqp_prefix), timeout=60, what="events")
    for _ in range(3):
        assert await reconciler.check() == []
    assert (await run_status(client, 1))["run_state"] == "queued"
    await delivery.ack()
    await consumer.aclose()
    await worker.close()
    await reconciler.transport.close()


def no_status_backlog(amqp_url: str, prefix: str) -> Any:
    """A condition: the broker has applied every status event sent so far."""

    async def empty() -> bool:
        transport = AmqpTransport(amqp_url, prefix=prefix, declare_topology=False)
        try:
            return await transport.status_queue_depth(BROKER_STATUS_QUEUE) == 0
        finally:
            await transport.close()

    return empty


async def test_the_broker_ends_a_lost_job_by_itself(
    amqp_url: str, amqp_prefix: str, settings: Settings, raw_dir: Path, aiohttp_client: Any
) -> None:
    """The broker's own reconciler: a job taken from its queue by a worker that then vanished
    (no lease, nothing in the queue) ends failed within the grace, so a client waiting for the
    run (``daq_client --wait``) stops waiting."""
    quick = ReconcilePolicy(interval=0.05, grace=0.5)
    client = await aiohttp_client(
        create_app(settings, AmqpTransport(amqp_url, prefix=amqp_prefix), quick)
    )
    assert (await client.post("/retrieve_from_buffers", json=REQUEST)).status == 200
    worker = AmqpTransport(amqp_url, prefix=amqp_prefix)
    consumer = worker.consume_jobs(SourceKind.DATABUFFER)
    delivery = await asyncio.wait_for(consumer.__anext__(), 60)
    await delivery.ack()  # and the worker was gone before it wrote anything
    await consumer.aclose()
    await worker.close()

    async def ended() -> bool:
        return (await run_status(client, 1))["run_state"] == "failed"

    await async_wait_until(ended, timeout=60, what="the lost job ended")
    assert (await run_status(client, 1))["sources"]["BSDATA"]["error"] == (
        "lost: no worker holds it (no lease) and the databuffer queue does not hold it; no file "
        "was written, send the request again"
    )


async def test_a_lost_pedestal_job_is_failed_not_done(
    amqp_url: str, amqp_prefix: str, raw_dir: Path
) -> None:
    """A pedestal job's output is its request record, which the broker writes itself: that
    it exists says nothing about the job."""
    record = raw_dir / "JF_pedestals" / "20261202_120000.json"
    record.parent.mkdir()
    record.write_text("{}")
    job = Job(
        job_id="pedestal-1",
        request_id="req",
        kind=SourceKind.PEDESTAL,
        source="pedestal",
        names=("JF13T01V01",),
        start_pulse_id=0,
        stop_pulse_id=0,
        requested_start=0,
        requested_stop=0,
        rate_multiplicator=1,
        pgroup="p12345",
        beamline="bernina",
        run_number=0,
        output_file=str(record),
        log_file=str(record.with_suffix(".log")),
        run_info_file=str(record),
        request_time="2026-12-02 12:00:00.000000",
    )
    store = StatusStore()
    store.record_queued([job])
    transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    await transport.connect()
    reconciler = Reconciler(transport, store, set, BROKER_STATUS_QUEUE, ReconcilePolicy(grace=0))
    await transport.subscribe_status(BROKER_STATUS_QUEUE)  # the broker's queue, empty
    assert await reconciler.check() == []
    assert await reconciler.check() == ["pedestal-1"]
    status = store.job_status("pedestal-1")
    assert status is not None
    assert (status["state"], status["error"]) == (
        "failed",
        "lost: no worker holds it (no lease) and the pedestal queue does not hold it; no file "
        "was written, send the request again",
    )
    await transport.close()
