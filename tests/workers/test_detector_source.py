"""Detector worker end to end: broker → RabbitMQ → detector worker → HDF5 file, against the
simulated Jungfrau buffer (lazy mode, records written on demand through the simulation's
control endpoint, as with ``sf-daq-broker simulate``).

Every file is compared with what it must hold: the simulator's raw frames are a pure function
of (detector, module, pulse), and converted frames must equal the conversion kernel applied to
them with the simulator's calibration files.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - detector chunks are bitshuffle+LZ4
import numpy as np
import pytest

from sf_daq_broker.api.app import create_app
from sf_daq_broker.buffers import jungfrau_format as fmt
from sf_daq_broker.jobs import Action, StatusEvent
from sf_daq_broker.jungfrau import ConversionOptions, Converter
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.config import (
    Api1Config,
    ArchiverConfig,
    JungfrauConfig,
    ServerConfig,
    SimulationConfig,
)
from sf_daq_broker.simulation.faults import PulseSelection
from sf_daq_broker.simulation.jungfrau_writer import DetectorSpec
from sf_daq_broker.simulation.runner import Simulation
from sf_daq_broker.transport import StatusSubscription
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.workers.detector_source import DetectorSource
from sf_daq_broker.workers.lease import LeasePolicy
from sf_daq_broker.workers.loop import RetryPolicy, Worker
from tests.support import PATIENCE, async_wait_until

START = 15_000_000_000  # a file boundary: pulses START..START+999 are one buffer file
#: The requests ask for pulses of the buffer's second file, which closes only when the test
#: lets the clock pass it: the worker waits for that (readiness), then reads.
RANGE = START + 1000
ONE = "JF13T01V01"  # 1 module
FOUR = "JF06T04V01"  # 4 modules, quarter-turned geometry (det_rot90 = 1)
EVERY = 4


@dataclass
class System:
    simulation: Simulation
    clock: ManualClock
    broker: Any
    events: StatusSubscription
    raw_dir: Path

    async def request(self, detectors: dict[str, Any], **fields: Any) -> int:
        body = {
            "pgroup": "p12345",
            "start_pulseid": RANGE + 11,
            "stop_pulseid": RANGE + 30,
            "rate_multiplicator": EVERY,
            "detectors": detectors,
            **fields,
        }
        response = await self.broker.post("/retrieve_from_buffers", json=body)
        document = await response.json()
        assert response.status == 200, document
        return int(document["run_number"])

    def pass_files(self, until: int = RANGE + 1000) -> None:
        """Let the buffer close its files up to ``until`` (LATEST passes the range)."""
        self.clock.advance_to(until)
        self.simulation.jungfrau.catch_up()

    async def outcomes(self, count: int, timeout: float = 2 * PATIENCE) -> dict[str, StatusEvent]:
        """The next ``count`` write_finished / write_rejected events, by source (a fresh
        environment compiles the conversion kernels on the way: minutes on a loaded machine)."""
        seen: dict[str, StatusEvent] = {}
        async with asyncio.timeout(timeout):
            while len(seen) < count:
                event = await self.events.__anext__()
                if event.action in (Action.WRITE_FINISHED, Action.WRITE_REJECTED):
                    seen[event.source] = event
        return seen


@pytest.fixture
async def system(
    tmp_path: Path,
    aiohttp_client: Any,
    make_settings: Any,
    raw_dir: Path,
    amqp_url: str,
    amqp_prefix: str,
) -> AsyncIterator[System]:
    clock = ManualClock(START, 1_700_000_000_000)
    config = SimulationConfig(
        databuffer=Api1Config(port=0),
        imagebuffer=Api1Config(port=0),
        archiver=ArchiverConfig(port=0),
        control=ServerConfig(port=0),
        jungfrau=JungfrauConfig(
            buffer_root=tmp_path / "buffer",
            calibration_root=tmp_path / "calibration",
            mode="lazy",
            detectors=[DetectorSpec(name=ONE), DetectorSpec(name=FOUR)],
        ),
    )
    simulation = Simulation(config, clock)
    await simulation.start(follow_clock=False)
    clock.advance_to(RANGE)  # the first file closes: every module has a LATEST
    simulation.jungfrau.catch_up()
    detectors = {
        name: {"beamline": "bernina", "gain_file": str(gain), "pedestal_file": str(pedestal)}
        for name, (gain, pedestal) in simulation.calibration_files.items()
    }
    settings = make_settings(
        buffers={
            "jungfrau_root": str(config.jungfrau.buffer_root),
            "jungfrau_control_url": simulation.addresses["control"],
            "ingestion_window_s": 0.0,
        },
        detectors=detectors,
    )
    transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    worker_transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    await transport.connect()
    events = await transport.subscribe_status()
    broker = await aiohttp_client(create_app(settings, transport))
    source = DetectorSource.from_settings(settings)
    source.poll_seconds = 0.02
    source.batch_bytes = 3 * 4 * 1024 * 1024  # 3 frames of 4 modules: several batches per job
    worker = asyncio.create_task(
        Worker(
            worker_transport,
            [source],
            RetryPolicy(first_delay=0.01),
            lease=LeasePolicy(heartbeat=0.2, stale_after=5, poll=0.02),
        ).run()
    )
    yield System(simulation, clock, broker, events, raw_dir)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    await events.close()
    await worker_transport.close()
    await simulation.stop()


def pulses() -> list[int]:
    """The detector range of the requests: beam pulses (multiples of 4) in [RANGE+11, RANGE+30]."""
    return list(range(RANGE + 12, RANGE + 29, EVERY))


def raw_frames(system: System, detector: str, pids: list[int]) -> np.ndarray:
    """What the buffer holds for ``pids`` (all modules stacked), faults included."""
    writer = system.simulation.jungfrau
    n_modules = int(detector[5:7])
    frames = np.zeros((len(pids), 512 * n_modules, 1024), dtype=np.uint16)
    for i, pid in enumerate(pids):
        for module in range(n_modules):
            record = writer.expected_record(detector, module, pid)
            if record is not None:
                frames[i, module * 512 : (module + 1) * 512] = record["data"][0]
    return frames


def converted(system: System, detector: str, **options: Any) -> Converter:
    gain, pedestal = system.simulation.calibration_files[detector]
    return Converter.from_files(detector, gain, pedestal, ConversionOptions(**options))


def check_rows(group: h5py.Group, pids: list[int], good: list[int]) -> None:
    assert group["requested_pulse_id"][:, 0].tolist() == pids
    assert group["is_good_frame"][:, 0].tolist() == good
    assert group["is_good_frame"].dtype == np.uint8
    assert group["pulse_id"].dtype == np.uint64 and group["pulse_id"].shape == (len(pids), 1)
    # frame_index of the simulator: pid - (first pulse it passed) + 1
    assert group["frame_index"][:, 0].tolist() == [
        p - START + 1 if g else 0 for p, g in zip(pids, good, strict=True)
    ]
    assert group["daq_rec"].dtype == np.uint32


def check_chunks(data: h5py.Dataset) -> None:
    assert data.chunks == (1, *data.shape[1:])
    plist = data.id.get_create_plist()
    assert plist.get_nfilters() == 1 and plist.get_filter(0)[0] == 32008  # bitshuffle+LZ4


async def test_converted_files_equal_the_kernel(system: System) -> None:
    """1-module defaults and factor, 4-module factor+disabled module and geometry."""
    first = await system.request({ONE: {}, FOUR: {"factor": 12.4, "disabled_modules": [1]}})
    second = await system.request({ONE: {"factor": 0.5}, FOUR: {"geometry": True}})
    system.pass_files()
    outcomes = await system.outcomes(2)
    outcomes.update(await system.outcomes(2))
    assert {e.action for e in outcomes.values()} == {Action.WRITE_FINISHED}
    pids = pulses()
    cases: list[tuple[int, str, dict[str, Any], type]] = [
        (first, ONE, {}, np.float32),
        (first, FOUR, {"factor": 12.4, "disabled_modules": (1,)}, np.int32),
        (second, ONE, {"factor": 0.5}, np.int32),
        (second, FOUR, {"geometry": True}, np.float32),
    ]
    for run, detector, options, dtype in cases:
        raw = raw_frames(system, detector, pids)
        converter = converted(system, detector, **options)
        expected = converter.convert(raw)
        path = system.raw_dir / f"run_{run:06d}.{detector}.h5"
        with h5py.File(path) as file:
            assert file["general/detector_name"][()].decode() == detector
            assert file.attrs["run_number"] == run
            assert file.attrs["start_pulse_id"] == pids[0]
            group = file[f"data/{detector}"]
            data = group["data"]
            assert data.dtype == dtype
            assert data.shape == (len(pids), *converter.frame_shape)
            check_chunks(data)
            np.testing.assert_array_equal(data[:], expected)
            np.testing.assert_array_equal(group["pixel_mask"][:], converter.pixel_mask)
            assert group["conversion_factor"][()] == options.get("factor", 1.0)
            check_rows(group, pids, [1] * len(pids))
            assert group["pulse_id"][:, 0].tolist() == pids
    assert converted(system, FOUR, geometry=True).frame_shape == (2136, 1132)
    report = outcomes[ONE].details["report"]["names"][0]
    assert report["expected"] == report["found"] == len(pids) == 5
    assert report["extra"] == {
        "frames_written": 5,
        "bad_frames": 0,
        "bad_frames_per_module": [0],
        "missing_modules": [],
    }
    await no_leases_left(system.raw_dir)


async def no_leases_left(directory: Path) -> None:
    """Leases go once the job is acknowledged, just after its status event."""
    await async_wait_until(
        lambda: not any(directory.rglob(".*.lease")), what="the job leases to be removed"
    )


async def test_raw_files_equal_the_buffer_bytes(system: System) -> None:
    """adc_to_energy false: the raw layout; keep_raw: the raw file under RAW_DATA as well."""
    run = await system.request(
        {FOUR: {"adc_to_energy": False}, ONE: {"keep_raw": True, "factor": 1.0}},
        directory_name="scan/a",
    )
    system.pass_files()
    outcomes = await system.outcomes(2)
    assert {e.action for e in outcomes.values()} == {Action.WRITE_FINISHED}
    pids = pulses()
    for detector, path in [
        (FOUR, system.raw_dir / "scan" / "a" / f"run_{run:06d}.{FOUR}.h5"),
        (ONE, system.raw_dir / "RAW_DATA" / "scan" / "a" / f"run_{run:06d}.{ONE}.h5"),
    ]:
        with h5py.File(path) as file:
            group = file[f"data/{detector}"]
            data = group["data"]
            assert data.dtype == np.uint16
            assert data.shape == (len(pids), 512 * int(detector[5:7]), 1024)
            check_chunks(data)
            np.testing.assert_array_equal(data[:], raw_frames(system, detector, pids))
            assert "pixel_mask" not in group and "conversion_factor" not in group
            check_rows(group, pids, [1] * len(pids))
    converted_file = system.raw_dir / "scan" / "a" / f"run_{run:06d}.{ONE}.h5"
    with h5py.File(converted_file) as file:
        assert file[f"data/{ONE}/data"].dtype == np.int32


async def test_keep_raw_into_raw_data_swapped_for_a_symlink_fails_the_job(
    system: System, tmp_path: Path
) -> None:
    """RAW_DATA becomes a symlink out of raw/ while the job waits for its data: the job fails
    with the reason, nothing is written outside, no file is published."""
    outside = tmp_path / "outside"
    (outside / "scan").mkdir(parents=True)
    run = await system.request({ONE: {"keep_raw": True}}, directory_name="scan")
    os.symlink(outside, system.raw_dir / "RAW_DATA")
    system.pass_files()
    outcome = (await system.outcomes(1))[ONE]
    assert outcome.action is Action.WRITE_REJECTED
    assert outcome.message == (
        f"pulses {RANGE + 11}-{RANGE + 30}: refusing to write below "
        f"{system.raw_dir}/RAW_DATA/scan: {system.raw_dir}/RAW_DATA is a symlink to {outside}, "
        f"outside {system.raw_dir}"
    )
    assert [p.name for p in outside.rglob("*")] == ["scan"]
    # No file, no temporary file; the lease goes once the job is dead-lettered.
    await async_wait_until(
        lambda: not any((system.raw_dir / "scan").iterdir()), what="the lease removed"
    )
    assert (
        not (system.raw_dir / "RAW_DATA")
        .resolve()
        .joinpath("scan", f"run_{run:06d}.{ONE}.h5")
        .exists()
    )


async def test_incomplete_frames_and_a_missing_module_are_flagged(system: System) -> None:
    faults = system.simulation.jungfrau.faults
    pids = pulses()
    faults.incomplete_frames[(ONE, 0)] = PulseSelection.of(pids[1])
    faults.dropped_frames[(ONE, 0)] = PulseSelection.of(pids[3])
    faults.incomplete_frames[(FOUR, 0)] = PulseSelection.of(pids[2])
    # Module 2 of the 4-module detector never had a buffer: it writes nothing, no LATEST.
    faults.missing_modules.add((FOUR, 2))
    shutil.rmtree(system.simulation.jungfrau.buffer_root / FOUR / "M02")
    run = await system.request({ONE: {}, FOUR: {}})
    system.pass_files()
    outcomes = await system.outcomes(2)
    assert {e.action for e in outcomes.values()} == {Action.WRITE_FINISHED}
    for detector, good in [(ONE, [1, 0, 1, 0, 1]), (FOUR, [0] * 5)]:
        raw = raw_frames(system, detector, pids)
        expected = converted(system, detector).convert(raw)
        with h5py.File(system.raw_dir / f"run_{run:06d}.{detector}.h5") as file:
            group = file[f"data/{detector}"]
            assert group["data"].shape[0] == len(pids)  # kept, not dropped
            np.testing.assert_array_equal(group["data"][:], expected)
            assert group["requested_pulse_id"][:, 0].tolist() == pids
            assert group["is_good_frame"][:, 0].tolist() == good
    with h5py.File(system.raw_dir / f"run_{run:06d}.{ONE}.h5") as file:
        # The incomplete frame still names its pulse; the dropped one has no complete module.
        assert file[f"data/{ONE}/pulse_id"][:, 0].tolist() == [pids[0], 0, pids[2], 0, pids[4]]
    with h5py.File(system.raw_dir / f"run_{run:06d}.{FOUR}.h5") as file:
        # Every frame lacks module 2; the first complete module still names the pulse.
        assert file[f"data/{FOUR}/pulse_id"][:, 0].tolist() == pids
    one = outcomes[ONE].details["report"]["names"][0]
    assert (one["expected"], one["found"], one["missing"]) == (5, 3, 2)
    assert one["missing_pulse_ids"] == [pids[1], pids[3]]
    assert one["extra"]["bad_frames_per_module"] == [2]
    four = outcomes[FOUR].details["report"]["names"][0]
    assert (four["found"], four["missing"]) == (0, 5)
    assert four["extra"] == {
        "frames_written": 5,
        "bad_frames": 5,
        "bad_frames_per_module": [1, 0, 5, 0],
        "missing_modules": [2],
    }
    assert not outcomes[FOUR].details["report"]["complete"]
    log = (system.raw_dir / "run_info" / "000000" / f"run_{run:06d}.{FOUR}.log").read_text()
    assert "modules 2 have no buffer" in log


async def test_aged_out_files_fail_with_that_reason(system: System) -> None:
    system.pass_files(RANGE + 3000)
    system.simulation.jungfrau.age_out(RANGE + 1000)  # the range's file is gone, newer ones not
    run = await system.request({ONE: {}})
    outcome = (await system.outcomes(1))[ONE]
    assert outcome.action is Action.WRITE_REJECTED
    path = fmt.data_file(system.simulation.jungfrau.buffer_root, ONE, 0, RANGE)
    assert outcome.message == (
        f"pulses {RANGE + 11}-{RANGE + 30}: {ONE}: pulses {RANGE + 12}-{RANGE + 28} aged out "
        f"of the Jungfrau buffer: module 0's file {path} is gone and its oldest file starts at "
        f"pulse {RANGE + 1000} (the buffer keeps only its newest files; or the module was not "
        "writing yet); retrieve sooner after the run"
    )
    assert not (system.raw_dir / f"run_{run:06d}.{ONE}.h5").exists()
    await no_leases_left(system.raw_dir)


async def test_a_gap_in_the_buffer_files_is_flagged_not_aged_out(system: System) -> None:
    """A module stopped for a whole buffer file inside the range (older and newer files
    exist): the job finishes with every row; the gap's rows are flagged, the others exact."""
    system.pass_files(RANGE + 2000)  # files START, RANGE, RANGE+1000 closed
    root = system.simulation.jungfrau.buffer_root
    gaps = [(ONE, 0), (FOUR, 1)]
    for detector, module in gaps:
        fmt.data_file(root, detector, module, RANGE).unlink()
    # Beam pulses every 100: RANGE-100 (file START), 10 in the gap file, RANGE+1000.
    run = await system.request(
        {ONE: {}, FOUR: {}},
        start_pulseid=RANGE - 100,
        stop_pulseid=RANGE + 1000,
        rate_multiplicator=100,
    )
    outcomes = await system.outcomes(2)
    assert {e.action for e in outcomes.values()} == {Action.WRITE_FINISHED}
    pids = list(range(RANGE - 100, RANGE + 1001, 100))
    in_gap = [RANGE <= p < RANGE + 1000 for p in pids]
    good = [0 if gap else 1 for gap in in_gap]
    assert len(pids) == 12 and good == [1] + [0] * 10 + [1]
    for detector, module in gaps:
        raw = raw_frames(system, detector, pids)
        raw[np.array(in_gap), module * 512 : (module + 1) * 512] = 0  # the gap reads as zeros
        expected = converted(system, detector).convert(raw)
        with h5py.File(system.raw_dir / f"run_{run:06d}.{detector}.h5") as file:
            group = file[f"data/{detector}"]
            assert group["data"].shape[0] == len(pids)  # every row, none dropped
            np.testing.assert_array_equal(group["data"][:], expected)
            assert group["requested_pulse_id"][:, 0].tolist() == pids
            assert group["is_good_frame"][:, 0].tolist() == good
            pulse_id = group["pulse_id"][:, 0].tolist()
            frame_index = group["frame_index"][:, 0].tolist()
        if detector == ONE:  # no module complete in the gap: pulse id and frame index 0
            assert pulse_id == [p * g for p, g in zip(pids, good, strict=True)]
            assert frame_index == [(p - START + 1) * g for p, g in zip(pids, good, strict=True)]
        else:  # the first complete module (0) still names the pulse
            assert pulse_id == pids
            assert frame_index == [p - START + 1 for p in pids]
        report = outcomes[detector].details["report"]["names"][0]
        assert (report["expected"], report["found"], report["missing"]) == (12, 2, 10)
        assert report["missing_pulse_ids"] == pids[1:11]
        per_module = [0] * int(detector[5:7])
        per_module[module] = 10
        assert report["extra"] == {
            "frames_written": 12,
            "bad_frames": 10,
            "bad_frames_per_module": per_module,
            "missing_modules": [],
        }
    await no_leases_left(system.raw_dir)


async def test_a_range_the_buffer_has_not_reached_says_what_it_waits_for(system: System) -> None:
    """Every module's newest closed pulse is RANGE-1; the run ends 5 s of pulses later."""
    await system.request({ONE: {}}, stop_pulseid=RANGE + 500)
    async with asyncio.timeout(PATIENCE):
        while True:
            event = await system.events.__anext__()
            if event.action is Action.WRITE_PROGRESS and "waiting" in event.details:
                break
    waiting = event.details["waiting"]
    assert (waiting["pulse_id"], waiting["buffers_at"]) == (RANGE + 500, RANGE - 1)
    assert 0 < waiting["seconds"] <= 5.01  # when the stop comes, from the age of LATEST
    assert event.message == (
        f"waiting for pulse {RANGE + 500} (the buffers are at {RANGE - 1}, "
        f"about {waiting['seconds']:.0f} s)"
    )
    system.pass_files()
    assert (await system.outcomes(1))[ONE].action is Action.WRITE_FINISHED


async def test_a_stop_far_in_the_future_is_rejected_at_once(system: System) -> None:
    """A typo (an extra digit: 10^8 pulses, 11 days ahead) must not block the worker."""
    start = RANGE + 100_000_000
    run = await system.request({ONE: {}}, start_pulseid=start, stop_pulseid=start + 20)
    outcome = (await system.outcomes(1, timeout=PATIENCE))[ONE]  # not 11 days for the stop
    assert outcome.action is Action.WRITE_REJECTED
    # Newest pulse RANGE-1, so the stop is (10^8 + 21) / 100 Hz = 1 000 000.21 s after the
    # time LATEST was written, a moment before the check.
    match = re.fullmatch(
        rf"pulses {start}-{start + 20}: {ONE}: stop pulse {start + 20} is about (\d+) s in the "
        rf"future \(newest pulse in the buffer: {RANGE - 1}\); not waiting for it \(the limit "
        r"is 300 s: is stop_pulseid a typo\?\)",
        outcome.message,
    )
    assert match is not None, outcome.message
    assert 999_990 <= int(match.group(1)) <= 1_000_000
    assert not (system.raw_dir / f"run_{run:06d}.{ONE}.h5").exists()
    log = (system.raw_dir / "run_info" / "000000" / f"run_{run:06d}.{ONE}.log").read_text()
    assert "waiting for modules" not in log
    await no_leases_left(system.raw_dir)
