"""`sf-daq-broker serve --workers …`: the single-machine setup, broker and workers in one
process on the embedded queue, as a real process answering a real request."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import h5py

from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.archiver import PvSpec, SimulatedArchiver, create_archiver_app
from sf_daq_broker.simulation.channels import ChannelSpec
from sf_daq_broker.simulation.clock import ManualClock
from tests.integration.test_run_numbers import free_port
from tests.support import PATIENCE, async_wait_until

START = 17_000_000_000


def serve(config: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SF_DAQ_")}
    return subprocess.Popen(
        [sys.executable, "-m", "sf_daq_broker", "serve", "--config", str(config), *extra],
        env=env | {"SF_DAQ_CONFIG": str(config)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def write_config(path: Path, data_root: Path, port: int, urls: dict[str, str]) -> Path:
    buffers = "".join(f'{key} = "{url}"\n' for key, url in urls.items())
    path.write_text(
        f'data_root = "{data_root}"\nlocal_beamline = "bernina"\nrest_port = {port}\n'
        f'state_dir = "{path.parent / "state"}"\n'
        f'[beamlines.bernina]\nsubnets = ["129.129.243.0/24"]\n[buffers]\n{buffers}'
    )
    return path


async def test_broker_with_workers_in_one_process_writes_the_files(
    aiohttp_server: Any, data_root: Path, raw_dir: Path, tmp_path: Path
) -> None:
    clock = ManualClock(start_pulse_id=START, t0_ms=time.time_ns() // 1_000_000 - 600_000)
    clock.advance_to(START + 500)
    data = await aiohttp_server(
        create_api1_app(SimulatedApi1Buffer([ChannelSpec(name="ONE:F64")], clock))
    )
    archiver = await aiohttp_server(
        create_archiver_app(SimulatedArchiver([PvSpec(name="ONE:PV", period_s=0.5)], clock))
    )
    port = free_port()
    urls = {"databuffer_url": str(data.make_url("")), "archiver_url": str(archiver.make_url(""))}
    config = write_config(tmp_path / "broker.toml", data_root, port, urls)
    process = serve(config, "--workers", "databuffer", "archiver")
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def healthy() -> bool:
                try:
                    async with session.get(f"{base}/health") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await async_wait_until(healthy, timeout=PATIENCE, what="the broker to answer")
            request = {
                "pgroup": "p12345",
                "start_pulseid": START + 1,
                "stop_pulseid": START + 100,
                "channels_list": ["ONE:F64"],
                "pv_list": ["ONE:PV"],
            }
            async with session.post(f"{base}/retrieve_from_buffers", json=request) as response:
                assert response.status == 200, await response.text()

            async def done() -> bool:
                params = {"pgroup": "p12345", "run_number": "1"}
                async with session.get(f"{base}/run_status", params=params) as response:
                    return (await response.json()).get("run_state") == "done"

            await async_wait_until(done, timeout=PATIENCE, what="the run to be done")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=PATIENCE)
    assert process.returncode == 0, output
    assert "workers for databuffer, archiver run in the broker's process" in output
    with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
        assert file["ONE:F64/pulse_id"][:].tolist() == list(range(START, START + 102))
    with h5py.File(raw_dir / "run_000001.PVCHANNELS.h5") as file:
        changed = file["ONE:PV/changed_in_interval"][:].tolist()
    # the value in force at the start, then the changes every 0.5 s inside the 1 s run
    assert changed[0] is False
    assert changed[1:] == [True] * (len(changed) - 1)
    assert len(changed) >= 2


def test_unknown_worker_source_is_refused(tmp_path: Path, data_root: Path) -> None:
    config = write_config(tmp_path / "broker.toml", data_root, free_port(), {})
    process = serve(config, "--workers", "databuffer", "cameras")
    output, _ = process.communicate(timeout=PATIENCE)
    assert process.returncode == 2
    assert (
        "--workers: unknown source cameras; known: databuffer, imagebuffer, archiver, detector, "
        "pedestal, all" in output
    )
