"""`sf-daq-broker serve --workers all` stopped in the middle of a job (kill -9, SIGTERM) and
started again on the same state directory: every accepted job is resumed from the embedded
queue on disk, the run ends ``done`` with the whole file, and nothing is left behind in raw/.

The buffer is a real HTTP simulator in this test's process, slowed down so that the first
run is in the middle of its job (a temporary file and a lease in raw/) and the second run is
queued behind it when the broker is stopped; it is sped up again for the restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import h5py
import numpy as np
import pytest

from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.channels import ChannelSpec, expected_values
from sf_daq_broker.simulation.clock import ManualClock
from tests.integration.test_run_numbers import free_port
from tests.integration.test_serve_with_workers import write_config
from tests.support import async_wait_until

START = 17_000_000_000
WAVE = ChannelSpec(name="ONE:WAVE", shape=(8,))
PGROUP = "p12345"
#: Generous: the suite runs on a loaded 2-core machine.
TIMEOUT = 120.0


class Broker:
    """One `sf-daq-broker serve --workers all` process, its output in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SF_DAQ_")}
        command = [sys.executable, "-m", "sf_daq_broker", "serve", "--config", str(config)]
        self.log = log
        with log.open("a") as output:
            self.process = subprocess.Popen(
                [*command, "--workers", "all"],
                env=env | {"SF_DAQ_CONFIG": str(config)},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, signum: int) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=TIMEOUT)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def get(session: aiohttp.ClientSession, url: str, **params: Any) -> tuple[int, Any]:
    try:
        async with session.get(url, params=params) as response:
            return response.status, await response.json()
    except aiohttp.ClientConnectionError:
        return 0, None


async def run_status(session: aiohttp.ClientSession, base: str, run: int) -> dict[str, Any]:
    status, reply = await get(session, f"{base}/run_status", pgroup=PGROUP, run_number=run)
    return reply if status == 200 else {}


async def retrieve(session: aiohttp.ClientSession, base: str, first: int, last: int) -> int:
    request = {
        "pgroup": PGROUP,
        "start_pulseid": first,
        "stop_pulseid": last,
        "channels_list": [WAVE.name],
    }
    async with session.post(f"{base}/retrieve_from_buffers", json=request) as response:
        reply = await response.json()
        assert response.status == 200, reply
        return int(reply["run_number"])


def leftovers(raw_dir: Path) -> list[str]:
    """Temporary files and leases anywhere below raw/."""
    return sorted(
        str(path.relative_to(raw_dir))
        for path in raw_dir.rglob("*")
        if path.name.endswith((".partial", ".lease")) or ".lease." in path.name
    )


def check_file(raw_dir: Path, run: int, first: int, last: int) -> None:
    """The whole range, one pulse more on each side, with the simulator's exact values."""
    pulse_ids = np.arange(first - 1, last + 2)
    with h5py.File(raw_dir / f"run_{run:06d}.BSDATA.h5") as file:
        assert file[f"{WAVE.name}/pulse_id"][:].tolist() == pulse_ids.tolist()
        data = file[f"{WAVE.name}/data"]
        assert data.shape == (len(pulse_ids), 8)
        np.testing.assert_array_equal(data[:], expected_values(WAVE, pulse_ids))


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_serve_with_workers_resumes_its_jobs_after_a_restart(
    signum: int,
    aiohttp_server: Any,
    data_root: Path,
    raw_dir: Path,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    clock = ManualClock(start_pulse_id=START, t0_ms=time.time_ns() // 1_000_000 - 600_000)
    clock.advance_to(START + 2_000)
    buffer = SimulatedApi1Buffer([WAVE], clock, batch_bytes=1)  # one event per write
    buffer.faults.batch_delay = 0.02  # ~8 s for the first run's 402 events
    server = await aiohttp_server(create_api1_app(buffer))
    port = free_port()
    config = write_config(
        tmp_path / "broker.toml", data_root, port, {"databuffer_url": str(server.make_url(""))}
    )
    base = f"http://127.0.0.1:{port}"
    ranges = {1: (START + 1, START + 400), 2: (START + 501, START + 600)}

    broker = Broker(config, tmp_path / "first.log")
    try:
        await async_wait_until(
            lambda: healthy(session, base), timeout=TIMEOUT, what="the broker to answer"
        )
        assert [await retrieve(session, base, *ranges[run]) for run in (1, 2)] == [1, 2]

        async def in_the_middle() -> bool:
            """Run 1 running, its temporary file created and its data streaming (for ~8 s);
            run 2 in the worker's hands too (it takes several jobs of a kind at once), started
            and waiting for run 1 to free the work slot."""
            states = [(await run_status(session, base, run)).get("run_state") for run in (1, 2)]
            streaming = buffer.queries >= 1 and any(raw_dir.glob(".run_000001.*.partial"))
            return states == ["running", "running"] and streaming

        await async_wait_until(in_the_middle, timeout=TIMEOUT, what="runs 1 and 2 started")
    finally:
        returncode = broker.stop(signum)
    assert returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 0), broker.output()
    # What the stop left behind: both runs' leases, and after kill -9 run 1's temporary file
    # (and run 2's, if it had created it already); a stopped worker removes its own.
    left = leftovers(raw_dir)
    leases = [f".run_00000{run}.BSDATA.h5.lease" for run in (1, 2)]
    partials = [name for name in left if name.endswith(".partial")]
    runs = [name.split(".")[1] for name in partials]
    if signum == signal.SIGKILL:
        assert runs in (["run_000001"], ["run_000001", "run_000002"]), left
    else:
        assert runs == [], left
    assert left == sorted([*partials, *leases])
    for name in leases:
        lease = json.loads((raw_dir / name).read_text())
        assert lease["state"] == ("running" if signum == signal.SIGKILL else "released")

    buffer.faults.batch_delay = 0.0
    restarted = Broker(config, tmp_path / "second.log")
    try:
        await async_wait_until(
            lambda: healthy(session, base), timeout=TIMEOUT, what="the restarted broker"
        )

        async def both_done() -> bool:
            states = [(await run_status(session, base, run)).get("run_state") for run in (1, 2)]
            return states == ["done", "done"]

        await async_wait_until(both_done, timeout=TIMEOUT, what="runs 1 and 2 to be done")
        ranges[3] = (START + 1_001, START + 1_010)
        assert await retrieve(session, base, *ranges[3]) == 3  # no run number given out twice

        async def third_done() -> bool:
            return (await run_status(session, base, 3)).get("run_state") == "done"

        await async_wait_until(third_done, timeout=TIMEOUT, what="run 3 to be done")
        for run in (1, 2, 3):
            reply = await run_status(session, base, run)
            assert reply["message"] == f"run {run} of {PGROUP} is done: 1 of 1 sources done"
            assert reply["sources"]["BSDATA"]["state"] == "done"
            beam = ranges[run][1] - ranges[run][0] + 1
            assert reply["sources"]["BSDATA"]["progress"] == {"done": beam, "total": beam}
    finally:
        assert restarted.stop(signal.SIGTERM) == 0, restarted.output()
    assert leftovers(raw_dir) == []
    outside = [p for p in data_root.rglob("*") if p.is_file() and raw_dir not in p.parents]
    assert outside == []
    assert sorted(path.name for path in raw_dir.glob("run_*.h5")) == [
        f"run_00000{run}.BSDATA.h5" for run in (1, 2, 3)
    ]
    for run, (first, last) in ranges.items():
        check_file(raw_dir, run, first, last)
    job_log = (raw_dir / "run_info" / "000000" / "run_000001.BSDATA.log").read_text()
    assert ", delivered again" in job_log
    lease_state = "running" if signum == signal.SIGKILL else "released"
    assert f"(lease {lease_state}, " in job_log
    if signum == signal.SIGTERM:
        assert (
            "worker stopped in the middle: lease released, the job is left unsettled for its "
            "queue to deliver again" in job_log
        )
    second = restarted.output()
    assert "queue.sqlite opened: 2 waiting jobs, 2 of them delivered before" in second, second


async def healthy(session: aiohttp.ClientSession, base: str) -> bool:
    status, _ = await get(session, f"{base}/health")
    return status == 200
