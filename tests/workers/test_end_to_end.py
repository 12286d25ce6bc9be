"""Data buffer, image buffer and archiver workers end to end: broker → queue → worker → HDF5,
against the simulators, with the values their deterministic functions predict — and each fault
of the buffers ending as documented (retried, reported, or rejected to the dead-letter queue).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - camera chunks are bitshuffle+LZ4
import numpy as np
import pytest

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import Action, StatusEvent
from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.archiver import (
    PvSpec,
    SimulatedArchiver,
    create_archiver_app,
    expected_pv_value,
    last_change_at_or_before,
    pv_change_time,
)
from sf_daq_broker.simulation.channels import ChannelSpec, channel_pulse_ids, expected_values
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.faults import ALL, PulseSelection
from sf_daq_broker.transport import REJECTED_BY_WORKER, StatusSubscription, Transport
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers import api1_source
from sf_daq_broker.workers.api1_source import DataBufferSource, ImageBufferSource
from sf_daq_broker.workers.archiver_source import ArchiverSource
from sf_daq_broker.workers.loop import RetryPolicy, Source, Worker
from tests.support import PATIENCE, async_wait_until, dead_letters

START = 15_000_000_000
CHANNELS = [
    ChannelSpec(name="SAR:F64", type="float64"),
    ChannelSpec(name="SAR:I16-LE", type="int16", byte_order="LITTLE_ENDIAN", rate_divisor=2),
    ChannelSpec(name="SAR:WAVE", type="uint16", shape=(64,), compression="bitshuffle_lz4"),
    ChannelSpec(name="SAR:TEXT", type="string", rate_divisor=5),
    ChannelSpec(name="SAR:BOOL", type="bool", rate_divisor=4),
]
CAMERAS = [
    ChannelSpec(name="CAM1:FPICTURE", type="uint16", shape=(48, 64), compression="bitshuffle_lz4"),
    ChannelSpec(
        name="CAM2:FPICTURE",
        type="uint8",
        shape=(20, 30),
        compression="bitshuffle_lz4",
        rate_divisor=2,
    ),
]
PVS = [
    PvSpec(name="SAR:PV-F64", type="float64", period_s=0.25),
    PvSpec(name="SAR:PV-I32", type="int32", period_s=0.4),
    PvSpec(name="SAR:PV-STATE", type="string", period_s=0.3),
    PvSpec(name="SAR:PV-WAVE", type="float32", shape=(4,), period_s=5.0),
]
FAST_RETRY = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05)


@dataclass
class System:
    clock: ManualClock
    data: SimulatedApi1Buffer
    images: SimulatedApi1Buffer
    archiver: SimulatedArchiver
    broker: Any
    transport: Transport
    sources: list[Source]

    async def request(self, **fields: Any) -> int:
        """Send a retrieval request like a user; returns the run number."""
        body = {"pgroup": "p12345", "start_pulseid": START + 10, "stop_pulseid": START + 109}
        response = await self.broker.post("/retrieve_from_buffers", json=body | fields)
        reply = await response.json()
        assert response.status == 200, reply
        return int(reply["run_number"])


def transports_for(request: pytest.FixtureRequest) -> tuple[Transport, Transport]:
    """The broker's and the worker's transport for the fixture's parameter: one embedded queue
    they share, or two connections to RabbitMQ (as two processes would have)."""
    if request.param == "rabbitmq":
        url, prefix = request.getfixturevalue("amqp_url"), request.getfixturevalue("amqp_prefix")
        return AmqpTransport(url, prefix=prefix), AmqpTransport(url, prefix=prefix)
    transport = EmbeddedTransport()
    return transport, transport


async def start_system(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Any,
    transport: Transport,
    worker_transport: Transport,
) -> AsyncIterator[System]:
    # the run lies ten minutes in the past, so the ingestion window is the source's to set
    clock = ManualClock(start_pulse_id=START, t0_ms=time.time_ns() // 1_000_000 - 600_000)
    data = SimulatedApi1Buffer(CHANNELS, clock)
    images = SimulatedApi1Buffer(CAMERAS, clock, name="image buffer")
    archiver = SimulatedArchiver(PVS, clock)
    servers = [
        await aiohttp_server(create_api1_app(data)),
        await aiohttp_server(create_api1_app(images)),
        await aiohttp_server(create_archiver_app(archiver)),
    ]
    urls = [str(server.make_url("")) for server in servers]
    settings = make_settings(
        buffers={"databuffer_url": urls[0], "imagebuffer_url": urls[1], "archiver_url": urls[2]}
    )
    broker = await aiohttp_client(create_app(settings, transport))
    sources: list[Source] = [
        DataBufferSource.from_settings(settings),
        ImageBufferSource.from_settings(settings),
        ArchiverSource.from_settings(settings),
    ]
    for source in sources:
        source.poll_seconds = 0.02  # type: ignore[attr-defined]
    worker = asyncio.create_task(Worker(worker_transport, sources, FAST_RETRY).run())
    yield System(clock, data, images, archiver, broker, transport, sources)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker


@pytest.fixture(params=["embedded", "rabbitmq"])
async def system(
    request: pytest.FixtureRequest, aiohttp_server: Any, aiohttp_client: Any, make_settings: Any
) -> AsyncIterator[System]:
    transport, worker_transport = transports_for(request)
    async for system in start_system(
        aiohttp_server, aiohttp_client, make_settings, transport, worker_transport
    ):
        yield system
    await worker_transport.close()


@pytest.fixture
async def embedded(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Any
) -> AsyncIterator[System]:
    """The same system on the embedded transport, for the fault cases."""
    transport = EmbeddedTransport()
    async for system in start_system(
        aiohttp_server, aiohttp_client, make_settings, transport, transport
    ):
        yield system


async def outcome(events: StatusSubscription, sources: int = 1) -> dict[str, StatusEvent]:
    """The final event (finished or rejected) of each of ``sources`` jobs."""
    final: dict[str, StatusEvent] = {}
    async with asyncio.timeout(PATIENCE):
        while len(final) < sources:
            event = await events.__anext__()
            if event.action in (Action.WRITE_FINISHED, Action.WRITE_REJECTED):
                final[event.source] = event
    return final


def pulse_at_or_before(clock: ManualClock, ns: int) -> int:
    return clock.timing.first_pulse_at_or_after(ns + 1) - 1


async def test_three_files_hold_exactly_the_simulated_values(system: System, raw_dir: Path) -> None:
    events = await system.transport.subscribe_status()
    run = await system.request(
        rate_multiplicator=2,
        channels_list=[c.name for c in CHANNELS] + ["SAR:NONE"],
        camera_list=[c.name for c in CAMERAS],
        pv_list=[p.name for p in PVS] + ["SAR:PV-NONE"],
    )
    assert run == 1
    system.clock.advance_to(START + 200)  # the buffers now hold the range: the workers go
    final = await outcome(events, sources=3)
    for event in final.values():
        assert event.action is Action.WRITE_FINISHED, event.message
    # rate 2: start is a beam pulse, so the range starts one earlier; stop (odd) is not widened
    first, last = START + 9, START + 109
    with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
        assert dict(file.attrs)["run_number"] == 1
        assert dict(file.attrs)["start_pulse_id"] == first
        assert sorted(file) == sorted(c.name for c in CHANNELS)
        for spec in CHANNELS:
            pids = channel_pulse_ids(spec, first, last)
            group = file[spec.name]
            assert group["pulse_id"][:].tolist() == pids.tolist()
            assert group["pulse_id"].dtype == np.int64
            expected = expected_values(spec, pids)
            if spec.type == "string":
                assert group["data"].asstr()[:].tolist() == list(expected)
            else:
                np.testing.assert_array_equal(group["data"][:], expected)
                assert group["data"].dtype.newbyteorder("=") == np.dtype(spec.type).newbyteorder(
                    "="
                )
            timestamps = group["timestamp"][:]
            assert timestamps.dtype == np.int64
            assert timestamps.tolist() == system.clock.timing.ts_ns_array(pids).tolist()
    with h5py.File(raw_dir / "run_000001.CAMERAS.h5") as file:
        assert sorted(file) == ["CAM1:FPICTURE", "CAM2:FPICTURE"]
        for spec in CAMERAS:
            camera = file[spec.name]
            pids = channel_pulse_ids(spec, first, last)
            assert camera["data"].shape == (pids.size, *spec.shape)
            assert camera["data"].chunks == (1, *spec.shape)
            # the blobs go in as received: in the buffer's byte order
            assert camera["data"].dtype == np.dtype(spec.type).newbyteorder(">")
            np.testing.assert_array_equal(camera["data"][:], expected_values(spec, pids))
    start_ns = system.clock.timing.ts_ns(first)
    end_ns = system.clock.timing.ts_ns(last + 1)
    with h5py.File(raw_dir / "run_000001.PVCHANNELS.h5") as file:
        assert dict(file.attrs)["pgroup"] == "p12345"
        assert sorted(file) == sorted(p.name for p in PVS)
        for pv in PVS:
            ks = range(
                last_change_at_or_before(pv, start_ns - 1),
                last_change_at_or_before(pv, end_ns - 1) + 1,
            )
            times = [pv_change_time(pv, k) for k in ks]
            group = file[pv.name]
            assert group["timestamp"][:].tolist() == times
            assert group["changed_in_interval"][:].tolist() == [t >= start_ns for t in times]
            assert group["changed_in_interval"].dtype == np.bool_
            assert group["pulse_id"][:].tolist() == [
                pulse_at_or_before(system.clock, t) for t in times
            ]
            values = [expected_pv_value(pv, k) for k in ks]
            if pv.type == "string":
                assert group["data"].asstr()[:].tolist() == values
            else:
                assert group["data"].dtype == np.dtype(pv.type)
                np.testing.assert_array_equal(group["data"][:], np.array(values, pv.type))
        # the fast PVs changed inside the run; the slow one only has its value at the start
        assert file["SAR:PV-F64/changed_in_interval"][:].sum() >= 3
        assert file["SAR:PV-WAVE/data"].shape[1] == 4
    report = final["BSDATA"].details["report"]
    assert report["absent"] == ["SAR:NONE"]
    by_name = {r["name"]: r for r in report["names"]}
    assert by_name["SAR:F64"]["expected"] == 50  # beam pulses at rate 2 in the requested range
    assert by_name["SAR:F64"]["found"] == 50
    assert by_name["SAR:TEXT"]["found"] == 10  # every 5th pulse: 10 of the 50 beam pulses
    assert final["PVCHANNELS"].details["report"]["absent"] == ["SAR:PV-NONE"]
    assert not list(raw_dir.glob(".*.partial"))
    await events.close()


async def test_gaps_and_duplicates_are_reported_and_rows_are_unique(
    embedded: System, raw_dir: Path
) -> None:
    events = await embedded.transport.subscribe_status()
    embedded.data.faults.gaps["SAR:F64"] = PulseSelection.of(START + 20, START + 21, START + 50)
    embedded.data.faults.duplicates["SAR:F64"] = PulseSelection.of(START + 30, START + 31)
    await embedded.request(channels_list=["SAR:F64"])
    embedded.clock.advance_to(START + 200)
    final = await outcome(events)
    report = final["BSDATA"].details["report"]
    assert final["BSDATA"].message == ("incomplete: 1 of 1 names with missing pulses")
    assert report["names"] == [
        {
            "name": "SAR:F64",
            "expected": 100,
            "found": 97,
            "missing": 3,
            "missing_pulse_ids": [START + 20, START + 21, START + 50],
            "duplicates_removed": 2,
            "extra": {},
            "unit": "beam pulses",
        }
    ]
    with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
        pids = file["SAR:F64/pulse_id"][:]
    gaps = (START + 20, START + 21, START + 50)
    expected = [p for p in range(START + 9, START + 111) if p not in gaps]  # rate 1: widened
    assert pids.tolist() == expected
    await events.close()


async def test_out_of_order_and_repeated_rows_across_batches_are_sorted_and_unique(
    embedded: System, raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buffer sends three pulses (one of them twice) after all the others, in small
    writes: the worker hands every decoded batch to the file on its own, so those rows come
    in batches after the ones already written and must be merged in."""
    monkeypatch.setattr(api1_source, "BATCH_BYTES", 1)
    events = await embedded.transport.subscribe_status()
    embedded.data.batch_bytes = 300
    embedded.data.faults.batch_delay = 0.005
    embedded.data.faults.out_of_order[ALL] = PulseSelection.of(START + 9, START + 56, START + 57)
    embedded.data.faults.duplicates[ALL] = PulseSelection.of(START + 30, START + 57)
    names = ["SAR:F64", "SAR:WAVE"]
    await embedded.request(channels_list=names)
    embedded.clock.advance_to(START + 200)
    final = await outcome(events)
    assert final["BSDATA"].action is Action.WRITE_FINISHED, final["BSDATA"].message
    report = final["BSDATA"].details["report"]
    assert report["complete"] is True
    assert [(r["name"], r["found"], r["duplicates_removed"]) for r in report["names"]] == [
        ("SAR:F64", 100, 2),
        ("SAR:WAVE", 100, 2),
    ]
    sent = embedded.data.event_pulse_ids("SAR:F64", START + 9, START + 110)
    assert sent[-4:].tolist() == [START + 9, START + 56, START + 57, START + 57]  # the stream
    pids = np.arange(START + 9, START + 111)
    with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
        for spec in CHANNELS[:3:2]:
            assert file[spec.name]["pulse_id"][:].tolist() == pids.tolist()
            np.testing.assert_array_equal(file[spec.name]["data"][:], expected_values(spec, pids))
            timestamps = embedded.clock.timing.ts_ns_array(pids).tolist()
            assert file[spec.name]["timestamp"][:].tolist() == timestamps
    await events.close()


@pytest.mark.parametrize("style", ["absent", "name_only"])
async def test_missing_channel_is_named_and_gets_no_group(
    embedded: System, raw_dir: Path, style: Any
) -> None:
    events = await embedded.transport.subscribe_status()
    embedded.data.faults.missing_channels = {"SAR:TEXT"}
    embedded.data.faults.missing_style = style
    await embedded.request(channels_list=["SAR:F64", "SAR:TEXT"])
    embedded.clock.advance_to(START + 200)
    final = await outcome(events)
    assert final["BSDATA"].details["report"]["absent"] == ["SAR:TEXT"]
    with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
        assert list(file) == ["SAR:F64"]
    log_text = (raw_dir / "run_info" / "000000" / "run_000001.BSDATA.log").read_text()
    assert "SAR:TEXT: no data at all" in log_text
    await events.close()


@pytest.mark.parametrize("fault", ["http_500", "cut_stream", "archiver_500"])
async def test_transient_faults_are_retried_and_the_file_is_complete(
    embedded: System, raw_dir: Path, fault: str
) -> None:
    events = await embedded.transport.subscribe_status()
    if fault == "http_500":
        embedded.data.faults.http_errors = 2
        fields: dict[str, Any] = {"channels_list": ["SAR:F64", "SAR:WAVE"]}
        source, retry_line = "BSDATA", "try 1 failed: data buffer at http"
    elif fault == "cut_stream":
        embedded.data.faults.cut_after_bytes = 3000
        fields = {"channels_list": ["SAR:F64", "SAR:WAVE"]}
        source, retry_line = "BSDATA", "try 1 failed: data buffer"
    else:
        embedded.archiver.faults.http_errors = 2
        fields = {"pv_list": ["SAR:PV-F64"]}
        source, retry_line = "PVCHANNELS", "try 2 failed: archiver at http"
    await embedded.request(**fields)
    embedded.clock.advance_to(START + 200)
    final = await outcome(events)
    assert final[source].action is Action.WRITE_FINISHED, final[source].message
    assert final[source].details["report"]["complete"] is True
    log_text = (raw_dir / "run_info" / "000000" / f"run_000001.{source}.log").read_text()
    assert retry_line in log_text
    if source == "BSDATA":
        with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
            assert file["SAR:WAVE/pulse_id"][:].tolist() == list(range(START + 9, START + 111))
    await events.close()


async def test_persistent_http_500_is_dead_lettered_with_buffer_range_and_reason(
    system: System, raw_dir: Path
) -> None:
    events = await system.transport.subscribe_status()
    system.data.faults.http_errors = 100
    await system.request(channels_list=["SAR:F64"])
    system.clock.advance_to(START + 200)
    final = await outcome(events)
    message = final["BSDATA"].message
    assert final["BSDATA"].action is Action.WRITE_REJECTED
    assert message.startswith(f"pulses {START + 10}-{START + 109}: data buffer at http://")
    assert "/api/1/query: HTTP 500" in message
    assert message.endswith("(gave up after 3 tries)")
    dead = await dead_letters(system.transport)
    assert [(d.job.source if d.job else None, d.reason) for d in dead] == [
        ("BSDATA", REJECTED_BY_WORKER)
    ]
    assert not (raw_dir / "run_000001.BSDATA.h5").exists()
    assert not list(raw_dir.glob(".*.partial"))
    status = await (await system.broker.get("/run_status?pgroup=p12345&run_number=1")).json()
    assert status["sources"]["BSDATA"]["state"] == "failed"
    assert status["sources"]["BSDATA"]["error"] == message
    await events.close()


async def test_slow_ingest_waits_for_the_tail(embedded: System, raw_dir: Path) -> None:
    """The map knows stop + 1 but a channel's last pulses are not in yet: the worker waits
    inside the ingestion window and fetches the tail when it arrives."""
    events = await embedded.transport.subscribe_status()
    for source in embedded.sources:
        source.ingestion_window = 3600.0  # type: ignore[attr-defined]
    tail = PulseSelection.of(*range(START + 100, START + 111))
    embedded.data.faults.gaps["SAR:F64"] = tail
    await embedded.request(channels_list=["SAR:F64", "SAR:WAVE"])
    embedded.clock.advance_to(START + 200)
    log_file = raw_dir / "run_info" / "000000" / "run_000001.BSDATA.log"
    await async_wait_until(
        lambda: log_file.exists() and "waiting for late data of SAR:F64" in log_file.read_text(),
        what="the worker waiting for the tail",
    )
    embedded.data.faults.gaps.clear()  # the late data arrives
    final = await outcome(events)
    assert final["BSDATA"].details["report"]["complete"] is True
    with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
        assert file["SAR:F64/pulse_id"][:].tolist() == list(range(START + 9, START + 111))
    await events.close()


async def test_after_the_ingestion_window_the_tail_is_reported_missing(
    embedded: System, raw_dir: Path
) -> None:
    events = await embedded.transport.subscribe_status()
    for source in embedded.sources:
        source.ingestion_window = 0.0  # type: ignore[attr-defined]
    embedded.data.faults.gaps["SAR:F64"] = PulseSelection.of(*range(START + 105, START + 111))
    await embedded.request(channels_list=["SAR:F64"])
    embedded.clock.advance_to(START + 200)
    final = await outcome(events)
    (report,) = final["BSDATA"].details["report"]["names"]
    assert (report["found"], report["missing"]) == (95, 5)
    assert report["missing_pulse_ids"] == list(range(START + 105, START + 110))
    await events.close()


async def test_a_range_older_than_the_retention_fails_at_once(
    embedded: System, raw_dir: Path
) -> None:
    events = await embedded.transport.subscribe_status()
    embedded.sources[0].retention_pulses = 1000  # type: ignore[attr-defined]
    embedded.data.retention_pulses = 1000
    embedded.clock.advance_to(START + 5000)  # the run's pulses left the buffer
    await embedded.request(channels_list=["SAR:F64"])
    final = await outcome(events)
    assert final["BSDATA"].message == (
        f"pulses {START + 10}-{START + 109}: data buffer: aged out — the buffer keeps 1000 "
        f"pulses, the oldest now is {START + 4001}, so the data of this range is gone"
    )
    log_text = (raw_dir / "run_info" / "000000" / "run_000001.BSDATA.log").read_text()
    assert "try 1 failed" not in log_text  # no retry: it cannot help
    assert not (raw_dir / "run_000001.BSDATA.h5").exists()
    await events.close()


async def test_a_retention_set_too_low_keeps_the_data_the_buffer_still_has(
    embedded: System, raw_dir: Path
) -> None:
    """The configured retention is only a presumption: if the buffer still returns the data,
    the file is written, and the log says the configuration is off."""
    events = await embedded.transport.subscribe_status()
    embedded.sources[0].retention_pulses = 1000  # type: ignore[attr-defined]
    embedded.clock.advance_to(START + 5000)  # the buffer itself keeps an hour
    await embedded.request(channels_list=["SAR:F64"])
    final = await outcome(events)
    assert final["BSDATA"].action is Action.WRITE_FINISHED
    assert final["BSDATA"].details["report"]["complete"] is True
    log_text = (raw_dir / "run_info" / "000000" / "run_000001.BSDATA.log").read_text()
    assert "data buffer: aged out — the buffer keeps 1000 pulses" in log_text
    assert "but it still has data: keeping what there is" in log_text
    await events.close()
