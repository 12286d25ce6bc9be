"""A disk that fills up while a worker writes a job's file (ENOSPC in the middle of the file).

The pgroup's ``raw/`` is a real tmpfs (``tests.support.tmpfs``: mounting needs root; skipped
without it, a failure when ``CI`` is set) too small for the file of a data buffer job, which a
real worker loop writes from the simulated data buffer. The job must end ``failed`` at once
with a reason a user can act on, leave neither its temporary file nor its lease in ``raw/``,
write nothing outside ``raw/``, and the worker must go on: once an operator has made room (the
tmpfs grows, as a quota raised or a disk cleaned up would), the same worker writes the next
run's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.channels import ChannelSpec, expected_values
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.transport import REJECTED_BY_WORKER, Transport
from sf_daq_broker.workers.api1_source import DataBufferSource
from sf_daq_broker.workers.loop import RetryPolicy, Worker
from tests.support import PATIENCE, async_wait_until, dead_letters, ended_run_status, tmpfs
from tests.workers.test_end_to_end import transports_for

START = 15_000_000_000
#: 16 KiB a pulse: the 102 rows of a run of pulses START+10..START+109 (widened by one pulse at
#: each end) need 1.6 MiB, more than the 1 MiB tmpfs holds.
BIG = ChannelSpec(name="SAR:BIG", type="float64", shape=(2048,))
SMALL_DISK = "size=1m"
ROOMY_DISK = "size=16m"
FAST = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05)


@dataclass
class System:
    broker: TestClient
    transport: Transport
    clock: ManualClock
    worker: asyncio.Task[None]

    async def request(self) -> int:
        body = {
            "pgroup": "p12345",
            "start_pulseid": START + 10,
            "stop_pulseid": START + 109,
            "channels_list": [BIG.name],
        }
        response = await self.broker.post("/retrieve_from_buffers", json=body)
        reply = await response.json()
        assert response.status == 200, reply
        return int(reply["run_number"])

    async def ended(self, run: int) -> dict[str, Any]:
        """The run's /run_status once it has ended."""

        result: dict[str, Any] = await async_wait_until(
            lambda: ended_run_status(self.broker, run), PATIENCE, f"run {run} to end"
        )
        return result


@pytest.fixture
def small_raw(raw_dir: Path) -> Iterator[Path]:
    """The pgroup's raw/ on a 1 MiB tmpfs, unmounted at the end."""
    with tmpfs(raw_dir, SMALL_DISK) as mounted:
        yield mounted


def make_room(raw: Path) -> None:
    """What an operator does: the file system of raw/ gets room (its content is kept)."""
    subprocess.run(["mount", "-o", f"remount,{ROOMY_DISK}", str(raw)], check=True)


@pytest.fixture(params=["embedded", "rabbitmq"])
async def system(
    request: pytest.FixtureRequest,
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Any,
    small_raw: Path,
) -> AsyncIterator[System]:
    transport, worker_transport = transports_for(request)
    # the run lies ten minutes in the past: no waiting for late data
    clock = ManualClock(start_pulse_id=START, t0_ms=time.time_ns() // 1_000_000 - 600_000)
    server = await aiohttp_server(create_api1_app(SimulatedApi1Buffer([BIG], clock)))
    settings = make_settings(
        buffers={"databuffer_url": str(server.make_url(""))}, min_free_bytes=65536
    )
    broker = await aiohttp_client(create_app(settings, transport))
    source = DataBufferSource.from_settings(settings)
    source.poll_seconds = 0.02
    worker = asyncio.create_task(Worker(worker_transport, [source], FAST).run())
    try:
        yield System(broker, transport, clock, worker)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        if worker_transport is not transport:
            await worker_transport.close()


def tree(root: Path, leave_out: Path) -> list[str]:
    """Every path below ``root`` except those below ``leave_out``."""
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path != leave_out and leave_out not in path.parents
    )


async def test_a_disk_that_fills_up_fails_the_job_at_once_and_the_worker_goes_on(
    system: System, small_raw: Path, data_root: Path
) -> None:
    outside = tree(data_root, small_raw)
    run = await system.request()
    system.clock.advance_to(START + 200)  # the buffer now holds the range: the worker goes
    status = await system.ended(run)
    reason = (
        f"pulses {START + 10}-{START + 109}: no space left on device while writing "
        f"run_000001.BSDATA.h5 in {small_raw}: the file was not kept; free space there and "
        "send the request again while the buffers still hold the data (they keep it for a "
        "limited time only)"
    )
    job = status["sources"]["BSDATA"]
    assert (status["run_state"], job["state"], job["message"], job["error"]) == (
        "failed",
        "failed",
        reason,
        reason,
    )
    dead = await dead_letters(system.transport)
    assert [(d.job.source if d.job else None, d.reason) for d in dead] == [
        ("BSDATA", REJECTED_BY_WORKER)
    ]
    assert sorted(path.name for path in small_raw.iterdir()) == ["run_info"]  # no file at all
    assert [p.name for p in small_raw.rglob(".*") if p.suffix in (".partial", ".lease")] == []
    assert tree(data_root, small_raw) == outside
    log_text = (small_raw / "run_info" / "000000" / "run_000001.BSDATA.log").read_text()
    assert f"failed, no file written: {reason}\n" in log_text
    assert "try 1 failed" not in log_text  # no retry: a full disk does not empty itself

    assert not system.worker.done()
    make_room(small_raw)
    run = await system.request()
    status = await system.ended(run)
    assert (status["run_state"], status["sources"]["BSDATA"]["state"]) == ("done", "done")
    pulse_ids = np.arange(START + 9, START + 111)
    with h5py.File(small_raw / "run_000002.BSDATA.h5") as file:
        assert file[f"{BIG.name}/pulse_id"][:].tolist() == pulse_ids.tolist()
        np.testing.assert_array_equal(file[f"{BIG.name}/data"][:], expected_values(BIG, pulse_ids))
    assert [p.name for p in small_raw.rglob(".*") if p.suffix in (".partial", ".lease")] == []
    assert tree(data_root, small_raw) == outside
