"""A real `sf-daq-broker worker` process on the real RabbitMQ, killed with SIGKILL mid-job.

The run is followed through /run_status the whole way: queued while no worker runs, running
once a worker has the job, still running (and no file under the final name) after the worker
was killed in the middle of reading the buffer and after a broker restart, then done when a
new worker process gets the redelivered job and writes the file — with exactly the simulated
values, once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from sf_daq_broker.api.app import create_app
from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.channels import ChannelSpec, channel_pulse_ids, expected_values
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.transport.amqp import AmqpTransport
from tests.support import async_wait_until

START = 16_000_000_000
CHANNELS = [
    ChannelSpec(name="SLOW:WAVE", type="float32", shape=(256,)),
    ChannelSpec(name="SLOW:TEXT", type="string", rate_divisor=10),
]


def worker_process(config: Path, amqp_url: str, prefix: str, log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "SF_DAQ_CONFIG": str(config),
        "SF_DAQ_AMQP_URL": amqp_url,
        "SF_DAQ_AMQP_PREFIX": prefix,
    }
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "sf_daq_broker", "worker", "databuffer"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
async def opened() -> AsyncIterator[list[TestClient]]:
    """Broker clients the test opened, closed even when it fails half-way."""
    clients: list[TestClient] = []
    yield clients
    for client in clients:
        await client.close()


async def test_killed_worker_redelivered_job_completes_and_status_survives_restart(
    opened: list[TestClient],
    aiohttp_server: Any,
    make_settings: Callable[..., Any],
    amqp_url: str,
    amqp_prefix: str,
    data_root: Path,
    raw_dir: Path,
    tmp_path: Path,
) -> None:
    clock = ManualClock(start_pulse_id=START, t0_ms=time.time_ns() // 1_000_000 - 600_000)
    buffer = SimulatedApi1Buffer(CHANNELS, clock, batch_bytes=16 * 1024)
    server = await aiohttp_server(create_api1_app(buffer))
    url = str(server.make_url(""))
    settings = make_settings(buffers={"databuffer_url": url})
    config = tmp_path / "worker.toml"
    config.write_text(
        f'data_root = "{data_root}"\nlocal_beamline = "bernina"\n'
        f'[beamlines.bernina]\nsubnets = ["129.129.243.0/24"]\n'
        f'[buffers]\ndatabuffer_url = "{url}"\n'
    )
    worker_log = tmp_path / "worker.log"

    async def start_broker() -> TestClient:
        client = TestClient(TestServer(create_app(settings, AmqpTransport(amqp_url, amqp_prefix))))
        await client.start_server()
        opened.append(client)
        return client

    async def status() -> dict[str, Any]:
        response = await broker.get("/run_status", params={"pgroup": "p12345", "run_number": 1})
        reply: dict[str, Any] = await response.json()
        return reply

    broker = await start_broker()
    request = {
        "pgroup": "p12345",
        "start_pulseid": START + 1,
        "stop_pulseid": START + 1000,
        "channels_list": [c.name for c in CHANNELS],
    }
    response = await broker.post("/retrieve_from_buffers", json=request)
    assert response.status == 200, await response.text()
    assert (await status())["sources"]["BSDATA"]["state"] == "queued"

    clock.advance_to(START + 2000)  # the buffer holds the range
    # ... and streams it slowly (about 70 batches, a second each): the kill surely comes
    # mid-read, however slow a loaded machine makes the steps before it
    buffer.faults.batch_delay = 1.0
    first = worker_process(config, amqp_url, amqp_prefix, worker_log)
    try:
        await async_wait_until(lambda: buffer.queries >= 1, what="the first read")

        async def running() -> bool:
            return (await status())["sources"]["BSDATA"]["state"] == "running"

        await async_wait_until(running, what="/run_status to say running")
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    final = raw_dir / "run_000001.BSDATA.h5"
    assert not final.exists()

    await broker.close()  # the broker restarts while the job waits in the queue
    broker = await start_broker()
    assert (await status())["sources"]["BSDATA"]["state"] == "running"

    buffer.faults.batch_delay = 0.0
    second = worker_process(config, amqp_url, amqp_prefix, worker_log)
    try:

        async def done() -> bool:
            return (await status())["run_state"] == "done"

        await async_wait_until(done, timeout=120, what="the redelivered job to finish")
    finally:
        # "done" comes with write_finished, before the ack and the removal of the lease: a
        # stop now lets the worker settle the job first, so nothing is left beside the file
        second.send_signal(signal.SIGTERM)
        try:
            stopped = second.wait(timeout=60)
        finally:
            if second.poll() is None:
                second.kill()
    assert stopped == 0
    reply = await status()
    assert reply["sources"]["BSDATA"]["state"] == "done"
    assert reply["sources"]["BSDATA"]["file"] == str(final)
    assert buffer.queries >= 2  # read again by the second worker
    with h5py.File(final) as file:
        for spec in CHANNELS:
            pids = channel_pulse_ids(spec, START, START + 1001)  # rate 1: widened by one
            assert file[spec.name]["pulse_id"][:].tolist() == pids.tolist()
            expected = expected_values(spec, pids)
            if spec.type == "string":
                assert file[spec.name]["data"].asstr()[:].tolist() == list(expected)
            else:
                np.testing.assert_array_equal(file[spec.name]["data"][:], expected)
    assert sorted(p.name for p in raw_dir.iterdir() if p.is_file()) == ["run_000001.BSDATA.h5"]
    job_log = (raw_dir / "run_info" / "000000" / "run_000001.BSDATA.log").read_text()
    assert job_log.count("BSDATA of run 1 (p12345)") == 2
    assert "delivered again" in job_log
    assert job_log.count("written ") == 1
    await broker.close()
