"""Data buffer and image buffer workers end to end: broker → queue → worker → HDF5 file,
against the api/1 simulator, with the values its deterministic functions predict."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - camera chunks are bitshuffle+LZ4
import numpy as np
import pytest

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import Action
from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.channels import ChannelSpec, channel_pulse_ids, expected_values
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.transport import Transport
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.api1_source import DataBufferSource, ImageBufferSource
from sf_daq_broker.workers.loop import RetryPolicy, Worker

START = 15_000_000_000
CHANNELS = [
    ChannelSpec(name="SAR:F64", type="float64"),
    ChannelSpec(name="SAR:I16-LE", type="int16", byte_order="LITTLE_ENDIAN", rate_divisor=2),
    ChannelSpec(name="SAR:WAVE", type="uint16", shape=(64,), compression="bitshuffle_lz4"),
    ChannelSpec(name="SAR:TEXT", type="string", rate_divisor=5),
]
CAMERAS = [
    ChannelSpec(name="CAM1:FPICTURE", type="uint16", shape=(48, 64), compression="bitshuffle_lz4")
]


@pytest.fixture(params=["embedded", "rabbitmq"])
async def system(
    request: pytest.FixtureRequest, aiohttp_server: Any, aiohttp_client: Any, make_settings: Any
) -> Any:
    clock = ManualClock(start_pulse_id=START)
    data = await aiohttp_server(create_api1_app(SimulatedApi1Buffer(CHANNELS, clock)))
    images = await aiohttp_server(
        create_api1_app(SimulatedApi1Buffer(CAMERAS, clock, name="image buffer"))
    )
    transport: Transport = EmbeddedTransport()
    worker_transport = transport
    if request.param == "rabbitmq":
        url, prefix = request.getfixturevalue("amqp_url"), request.getfixturevalue("amqp_prefix")
        transport = AmqpTransport(url, prefix=prefix)
        worker_transport = AmqpTransport(url, prefix=prefix)
    settings = make_settings(
        buffers={
            "databuffer_url": str(data.make_url("")),
            "imagebuffer_url": str(images.make_url("")),
        }
    )
    broker = await aiohttp_client(create_app(settings, transport))
    sources = [DataBufferSource.from_settings(settings), ImageBufferSource.from_settings(settings)]
    for source in sources:
        source.poll_seconds = 0.02
    worker = asyncio.create_task(
        Worker(worker_transport, sources, RetryPolicy(first_delay=0.01)).run()
    )
    yield clock, broker, transport
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    await worker_transport.close()


async def test_channels_and_cameras_written_exactly(system: Any, raw_dir: Path) -> None:
    clock, broker, transport = system
    events = await transport.subscribe_status()
    request = {
        "pgroup": "p12345",
        "start_pulseid": START + 10,
        "stop_pulseid": START + 109,
        "rate_multiplicator": 2,
        "channels_list": [c.name for c in CHANNELS] + ["SAR:NONE"],
        "camera_list": ["CAM1:FPICTURE"],
    }
    response = await broker.post("/retrieve_from_buffers", json=request)
    assert response.status == 200
    clock.advance_to(START + 200)  # the buffer now holds the range: the workers go
    finished = {}
    async with asyncio.timeout(30):
        while len(finished) < 2:
            event = await events.__anext__()
            assert event.action is not Action.WRITE_REJECTED, event.message
            if event.action is Action.WRITE_FINISHED:
                finished[event.source] = event
    # rate 2: start is a beam pulse, so the range starts one earlier; stop (odd) is not widened
    first, last = START + 9, START + 109
    with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
        assert dict(file.attrs)["run_number"] == 1
        assert sorted(file) == sorted(c.name for c in CHANNELS)
        for spec in CHANNELS:
            pids = channel_pulse_ids(spec, first, last)
            group = file[spec.name]
            assert group["pulse_id"][:].tolist() == pids.tolist()
            expected = expected_values(spec, pids)
            if spec.type == "string":
                assert group["data"].asstr()[:].tolist() == list(expected)
            else:
                np.testing.assert_array_equal(group["data"][:], expected)
                assert group["data"].dtype.newbyteorder("=") == np.dtype(spec.type).newbyteorder(
                    "="
                )
            assert group["timestamp"].dtype == np.int64
    with h5py.File(raw_dir / "run_000001.CAMERAS.h5") as file:
        camera = file["CAM1:FPICTURE"]
        pids = channel_pulse_ids(CAMERAS[0], first, last)
        assert camera["data"].shape == (pids.size, 48, 64)
        assert camera["data"].chunks == (1, 48, 64)
        np.testing.assert_array_equal(camera["data"][:], expected_values(CAMERAS[0], pids))
    report = finished["BSDATA"].details["report"]
    assert report["absent"] == ["SAR:NONE"]
    by_name = {r["name"]: r for r in report["names"]}
    assert by_name["SAR:F64"]["expected"] == 50  # beam pulses at rate 2 in the requested range
    assert by_name["SAR:F64"]["found"] == 50
    assert by_name["SAR:TEXT"]["found"] == 10  # every 5th pulse: 10 of the 50 beam pulses
    assert not (raw_dir / ".run_000001.BSDATA.h5.partial").exists()
    await events.close()
