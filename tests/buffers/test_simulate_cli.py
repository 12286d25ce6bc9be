"""`sf-daq-broker simulate` as a real process: starts, answers every interface, stops on SIGINT."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from sf_daq_broker.buffers.api1 import Api1Client
from sf_daq_broker.buffers.archiver import ArchiverClient
from sf_daq_broker.buffers.errors import BufferServerError
from sf_daq_broker.buffers.jungfrau_buffer import JungfrauBufferReader
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.simulation.channels import expected_values
from sf_daq_broker.simulation.config import load_simulation_config
from sf_daq_broker.simulation.control import http_materialiser
from sf_daq_broker.simulation.jungfrau_frames import expected_frame
from tests.support import PATIENCE, async_wait_until

START = 15_000_000_990  # the first Jungfrau file closes after 10 pulses
STARTUP_TIMEOUT = 60.0


async def read_banner(process: asyncio.subprocess.Process) -> dict[str, str]:
    """Service name → address, from the lines printed before ``ready``."""
    assert process.stdout is not None
    addresses: dict[str, str] = {}
    while True:
        line = (await process.stdout.readline()).decode()
        if not line:
            raise AssertionError("simulate exited before it was ready")
        if line.strip() == "ready":
            return addresses
        match = re.match(r"^(\w+)\s+(http://\S+)", line)
        if match:
            addresses[match.group(1)] = match.group(2)


async def test_simulate_starts_answers_and_stops(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sf_daq_broker", "--log-level", "WARNING", "simulate",
        "--databuffer-port", "0", "--imagebuffer-port", "0", "--archiver-port", "0",
        "--control-port", "0", "--start-pulse-id", str(START),
        "--buffer-root", str(tmp_path / "jungfrau"), "--calibration-root", str(tmp_path / "cal"),
        "--missing-channel", "SAROP11-PBPS117:INTENSITY", "--http-errors", "1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        addresses = await asyncio.wait_for(read_banner(process), STARTUP_TIMEOUT)
        assert set(addresses) == {"databuffer", "imagebuffer", "archiver", "control"}
        await check_services(addresses, tmp_path)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        output = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert output[0].decode().strip().endswith("stopped")


async def check_services(addresses: dict[str, str], tmp_path: Path) -> None:
    config = load_simulation_config()
    channels = {spec.name: spec for spec in config.databuffer.channels}
    async with PulseMapClient(addresses["databuffer"]) as pulse_map:
        await async_wait_until(
            lambda: pulse_map.timestamp_ns(START + 20), timeout=PATIENCE, what="pulse START+20"
        )
        start_ns, end_ns = await pulse_map.range_ns(START, START + 19)
    names = ["SARFE10-PBPG050:HAMP-INTENSITY-CAL", "SAROP11-PBPS117:INTENSITY"]
    async with Api1Client(addresses["databuffer"]) as databuffer:
        with pytest.raises(BufferServerError):  # --http-errors 1
            await databuffer.fetch(names, start_ns, end_ns)
        result = await databuffer.fetch(names, start_ns, end_ns)
    assert result.missing == ["SAROP11-PBPS117:INTENSITY"]  # --missing-channel
    data = result.channels[names[0]]
    assert data.pulse_id.tolist() == list(range(START, START + 20))
    assert data.values is not None
    np.testing.assert_array_equal(data.values, expected_values(channels[names[0]], data.pulse_id))
    camera = config.imagebuffer.channels[0]
    async with Api1Client(addresses["imagebuffer"]) as imagebuffer:
        with pytest.raises(BufferServerError):  # every buffer answers 500 once
            await imagebuffer.fetch([camera.name], start_ns, end_ns)
        images = await imagebuffer.fetch([camera.name], start_ns, end_ns)
    values = images.channels[camera.name].values
    assert values is not None
    assert values.shape == (20, *camera.shape)
    async with ArchiverClient(addresses["archiver"]) as archiver:
        with pytest.raises(BufferServerError):
            await archiver.query(["SARUN:FELPHOTENE"], start_ns, end_ns)
        pvs = await archiver.query(["SARUN:FELPHOTENE"], start_ns, end_ns)
    assert len(pvs["SARUN:FELPHOTENE"]) >= 1
    async with aiohttp.ClientSession() as session:
        status = await (await session.get(f"{addresses['control']}/status")).json()
    assert status["start_pulse_id"] == START and status["jungfrau"]["mode"] == "lazy"
    gain_file = Path(status["jungfrau"]["detectors"]["JF13T01V01"]["gain_file"])
    assert gain_file == tmp_path / "cal" / "JF13T01V01" / "gains.h5" and gain_file.exists()
    reader = JungfrauBufferReader(
        tmp_path / "jungfrau", "JF13T01V01", before_read=http_materialiser(addresses["control"])
    )
    await async_wait_until(lambda: reader.latest_pulse_id(0), timeout=PATIENCE, what="LATEST")
    frames = await asyncio.to_thread(reader.read, [START + 1, START + 5])
    assert frames.is_good_frame().all()
    np.testing.assert_array_equal(frames.data[1], expected_frame("JF13T01V01", 0, START + 5))
