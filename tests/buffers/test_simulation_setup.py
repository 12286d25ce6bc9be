"""The shipped simulation configuration, its validation, and the in-process Simulation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from sf_daq_broker.buffers.api1 import Api1Client
from sf_daq_broker.buffers.api1_format import TYPES
from sf_daq_broker.buffers.jungfrau_buffer import JungfrauBufferReader
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.config import (
    SimulationConfig,
    SimulationConfigError,
    load_simulation_config,
)
from sf_daq_broker.simulation.runner import Simulation
from tests.buffers.helpers import P0, T0_MS
from tests.support import async_wait_until, simulation_config

#: Far less than aiohttp's default graceful shutdown (60 s per server), far more than a stop takes.
STOP_PATIENCE = 30.0


def test_shipped_configuration() -> None:
    config = load_simulation_config()
    assert {c.type for c in config.databuffer.channels} == set(TYPES)  # one channel per type
    assert {c.byte_order for c in config.databuffer.channels} == {"BIG_ENDIAN", "LITTLE_ENDIAN"}
    assert len(config.imagebuffer.channels) == 2
    assert all(c.name.endswith(":FPICTURE") and c.compressed for c in config.imagebuffer.channels)
    assert {p.type for p in config.archiver.pvs} >= {"string", "float64"}
    assert any(p.shape for p in config.archiver.pvs)
    assert [(d.name, d.n_modules) for d in config.jungfrau.detectors] == [
        ("JF13T01V01", 1),
        ("JF07T03V01", 3),
    ]
    assert (config.databuffer.port, config.imagebuffer.port, config.archiver.port) == (
        8371,
        8372,
        8373,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[databuffer]\nprot = 1\n", "databuffer.prot"),
        ('[[databuffer.channels]]\nname = "X"\ntype = "float128"\n', "unknown type"),
        ('[[jungfrau.detectors]]\nname = "JF7T1V1"\n', "jungfrau.detectors.0.name"),
        ("[clock\n", "not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(text)
    with pytest.raises(SimulationConfigError, match=message):
        load_simulation_config(path)


async def test_simulation_in_process_with_a_manual_clock(tmp_path: Path) -> None:
    config = load_simulation_config()
    document = config.model_dump()
    for service in ("databuffer", "imagebuffer", "archiver", "control"):
        document[service]["port"] = 0
    document["jungfrau"]["buffer_root"] = tmp_path / "jf"
    document["jungfrau"]["calibration_root"] = tmp_path / "cal"
    document["jungfrau"]["detectors"] = [{"name": "JF13T01V01"}]
    clock = ManualClock(P0 + 990, T0_MS)
    async with Simulation(SimulationConfig.model_validate(document), clock) as simulation:
        assert set(simulation.addresses) == {"databuffer", "imagebuffer", "archiver", "control"}
        clock.advance_to(P0 + 1010)
        simulation.jungfrau.catch_up()
        reader = JungfrauBufferReader(tmp_path / "jf", "JF13T01V01")
        assert reader.latest_pulse_id(0) == P0 + 999
        async with aiohttp.ClientSession() as session:
            reply = await session.post(
                f"{simulation.addresses['control']}/jungfrau/materialise",
                json={
                    "detector": "JF13T01V01",
                    "start_pulse_id": P0 + 990,
                    "stop_pulse_id": P0 + 999,
                },
            )
            assert await reply.json() == {"written": 10}
            unknown = await session.post(
                f"{simulation.addresses['control']}/jungfrau/materialise",
                json={"detector": "JF99T01V01", "pulse_ids": [1]},
            )
            assert unknown.status == 404
        assert reader.read(range(P0 + 990, P0 + 1000)).is_good_frame().all()
        name = config.databuffer.channels[0].name
        async with Api1Client(simulation.addresses["databuffer"]) as client:
            timing = clock.timing
            result = await client.fetch([name], timing.ts_ns(P0 + 990), timing.ts_ns(P0 + 1000))
        assert result.channels[name].pulse_id.tolist() == list(range(P0 + 990, P0 + 1000))
        assert simulation.status()["jungfrau"]["frames_written"] == 10


async def test_stopping_does_not_wait_for_delayed_replies(tmp_path: Path) -> None:
    """A demo's Ctrl-C stops its buffers at once, although their replies are delayed a minute.

    aiohttp waits up to a minute (per server) for a request in progress to finish: with the
    data buffer and the image buffer each holding a delayed reply, a demo's Ctrl-C took over
    two minutes to return (seen in CI).
    """
    simulation = Simulation(simulation_config(tmp_path, []))
    for buffer in (simulation.databuffer, simulation.imagebuffer):
        buffer.faults.reply_delay = 3600.0
    await simulation.start()
    async with aiohttp.ClientSession() as session:
        replies = [
            asyncio.create_task(session.post(f"{simulation.addresses[name]}/api/1/query", json={}))
            for name in ("databuffer", "imagebuffer")
        ]
        await async_wait_until(
            lambda: simulation.databuffer.queries == simulation.imagebuffer.queries == 1,
            what="both queries to be in progress",
        )
        await asyncio.wait_for(simulation.stop(), timeout=STOP_PATIENCE)
        for reply in replies:
            with pytest.raises(aiohttp.ClientError):
                await reply
