"""broker_debugger on a real RabbitMQ: the events of a run in order, filters, a clean exit."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiohttp
import pytest
from aio_pika.exceptions import DeliveryError

from sf_daq_broker.jobs import Action, SourceKind, StatusEvent
from sf_daq_broker.tools.broker_debugger import format_event
from sf_daq_broker.transport.amqp import BROKER_STATUS_QUEUE, AmqpTransport, Topology
from tests.support import PATIENCE
from tests.tools.support import SEED_START, SEED_STOP, LiveBroker, read_until, take_job, write_job

REQUEST = {
    "pgroup": "p12345",
    "start_pulseid": SEED_START,
    "stop_pulseid": SEED_STOP,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet"],
    "detectors": {"JF07T32V01": {}},
}
REASON = "detector buffer of JF07T32V01 holds no pulse of 11884948775-11884949774"


def event(pgroup: str, action: Action, message: str = "", **details: object) -> StatusEvent:
    return StatusEvent(
        action=action,
        request_id="req-1",
        job_id="job-1",
        pgroup=pgroup,
        run_number=3,
        source="BSDATA",
        file=f"/sf/bernina/data/{pgroup}/raw/run_000003.BSDATA.h5",
        message=message,
        timestamp=1_700_000_000.25,
        details=dict(details),
    )


@pytest.fixture
async def worker(amqp_url: str, amqp_prefix: str) -> AsyncIterator[AmqpTransport]:
    transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    await transport.connect()
    yield transport
    await transport.close()


@pytest.fixture
async def start_debugger(
    amqp_url: str, amqp_prefix: str
) -> AsyncIterator[Callable[..., Awaitable[asyncio.subprocess.Process]]]:
    processes: list[asyncio.subprocess.Process] = []

    async def start(*options: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sf_daq_broker.tools.broker_debugger",
            "--amqp-url",
            amqp_url,
            "--prefix",
            amqp_prefix,
            *options,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        processes.append(process)
        assert process.stderr is not None
        # Its queue is bound once it says so: events published from now on reach it.
        said = await read_until(process.stderr, " (Ctrl-C to stop)\n")
        assert re.fullmatch(
            rf"listening to {amqp_prefix}\.status through queue \S+ \(Ctrl-C to stop\)\n",
            said,
        )
        return process

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stop(process: asyncio.subprocess.Process, signum: int) -> tuple[int, str]:
    """Send the signal; the exit status and what it still wrote on stderr."""
    assert process.stderr is not None
    process.send_signal(signum)
    status = await asyncio.wait_for(process.wait(), PATIENCE)
    return status, (await process.stderr.read()).decode()


async def read_lines(process: asyncio.subprocess.Process, count: int) -> list[str]:
    assert process.stdout is not None
    return [
        (await asyncio.wait_for(process.stdout.readline(), PATIENCE)).decode().rstrip("\n")
        for _ in range(count)
    ]


@pytest.mark.rabbitmq
async def test_json_lines_follow_a_run_and_nothing_is_left_behind(
    start_broker: Callable[..., Awaitable[LiveBroker]],
    start_debugger: Callable[..., Awaitable[asyncio.subprocess.Process]],
    worker: AmqpTransport,
    amqp_url: str,
    amqp_prefix: str,
) -> None:
    broker = await start_broker(AmqpTransport(amqp_url, prefix=amqp_prefix))
    debugger = await start_debugger("--json")
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{broker.url}/retrieve_from_buffers", json=REQUEST) as response,
    ):
        assert response.status == 200
    channels = await take_job(worker, SourceKind.DATABUFFER)
    detector = await take_job(worker, SourceKind.DETECTOR)
    await write_job(worker, channels)
    await write_job(worker, detector, fail=REASON)

    events = [json.loads(line) for line in await read_lines(debugger, 8)]
    assert {(e["action"], e["source"]) for e in events[:2]} == {
        ("write_request", "BSDATA"),
        ("write_request", "JF07T32V01"),
    }
    assert [(e["action"], e["source"]) for e in events[2:]] == [
        ("write_start", "BSDATA"),
        ("write_progress", "BSDATA"),
        ("write_finished", "BSDATA"),
        ("write_start", "JF07T32V01"),
        ("write_progress", "JF07T32V01"),
        ("write_rejected", "JF07T32V01"),
    ]
    jobs = {"BSDATA": channels, "JF07T32V01": detector}
    for shown in events:
        job = jobs[shown["source"]]
        assert (shown["pgroup"], shown["run_number"], shown["file"], shown["job_id"]) == (
            "p12345",
            1,
            job.output_file,
            job.job_id,
        )
    assert events[3]["details"] == {"done": 500, "total": 1000}
    assert events[4]["details"]["report"]["complete"] is True
    assert events[7]["message"] == REASON

    # Only the debugger's queue remains bound to the status exchange once the broker is gone:
    # a mandatory status message is routed while the debugger runs and returned after it.
    await broker.server.close()
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.queue_delete(Topology(amqp_prefix).status_queue(BROKER_STATUS_QUEUE))
        exchange = await channel.get_exchange(f"{amqp_prefix}.status")
        probe = event("p12345", Action.WRITE_FINISHED, "probe")
        await exchange.publish(aio_pika.Message(probe.to_json()), "", mandatory=True)
        assert json.loads((await read_lines(debugger, 1))[0])["message"] == "probe"

        assert await stop(debugger, signal.SIGTERM) == (0, "")
        with pytest.raises(DeliveryError):
            await exchange.publish(aio_pika.Message(probe.to_json()), "", mandatory=True)


@pytest.mark.rabbitmq
async def test_lines_for_people_filtered_by_pgroup(
    start_debugger: Callable[..., Awaitable[asyncio.subprocess.Process]], worker: AmqpTransport
) -> None:
    debugger = await start_debugger("--pgroup", "p12345", "--no-color")
    await worker.publish_status(event("p54321", Action.WRITE_FINISHED, "complete"))
    await worker.publish_status(event("p12345", Action.WRITE_PROGRESS, "1 of 2", done=1, total=2))
    await worker.publish_status(event("p12345", Action.WRITE_REJECTED, "archiver: HTTP 500"))
    lines = await read_lines(debugger, 2)
    file = "/sf/bernina/data/p12345/raw/run_000003.BSDATA.h5"
    time = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.250"
    assert re.fullmatch(rf"{time} write_progress +BSDATA +p12345 run 3 {file} 1/2", lines[0])
    assert re.fullmatch(
        rf"{time} write_rejected +BSDATA +p12345 run 3 {file} reason: archiver: HTTP 500",
        lines[1],
    )
    assert await stop(debugger, signal.SIGINT) == (0, "")


def test_actions_are_coloured_on_a_terminal() -> None:
    rejected = event("p12345", Action.WRITE_REJECTED, "gone")
    assert "\033[1;31mwrite_rejected" in format_event(rejected, colour=True)
    assert "\033[" not in format_event(rejected, colour=False)


async def test_unreachable_rabbitmq_is_one_line() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sf_daq_broker.tools.broker_debugger",
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), PATIENCE)
    assert (process.returncode, stdout) == (3, b"")
    assert stderr.decode() == (
        "error: RabbitMQ at 127.0.0.1:1 is not reachable (connection refused)\n"
    )
