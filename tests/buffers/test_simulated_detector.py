"""The simulated Jungfrau detector: its buffer frames follow what it is told, pulse by pulse.

Eager and lazy buffers must agree: a record written long after its pulse (lazy) shows the
detector's state *at that pulse*.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from sf_daq_broker.buffers import jungfrau_format as fmt
from sf_daq_broker.buffers.jungfrau_buffer import DetectorFrames, JungfrauBufferReader
from sf_daq_broker.detector_control.http import HttpDetectorControl
from sf_daq_broker.detector_control.interface import (
    DetectorMode,
    DetectorRefused,
    DetectorUnreachable,
    GainMode,
    ModuleState,
    PedestalMode,
)
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.jungfrau_detector import SimulatedJungfrau
from sf_daq_broker.simulation.jungfrau_frames import expected_frame
from sf_daq_broker.simulation.jungfrau_writer import JungfrauBufferWriter
from tests.support import simulation_config

START = 15_000_000_000
ONE = "JF13T01V01"
THREE = "JF07T03V01"


@pytest.fixture(params=["eager", "lazy"])
def buffer(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ManualClock, JungfrauBufferWriter, dict[str, SimulatedJungfrau]]]:
    clock = ManualClock(START, 1_700_000_000_000)
    writer = JungfrauBufferWriter(tmp_path, [ONE, THREE], clock, mode=request.param)
    detectors = {name: SimulatedJungfrau(name, clock) for name in (ONE, THREE)}
    writer.attach_detectors(detectors.values())
    yield clock, writer, detectors
    writer.close()


def read(writer: JungfrauBufferWriter, detector: str, pids: range) -> DetectorFrames:
    """What a worker reads (lazy mode: after asking for the records, as a worker does)."""
    clock = writer.clock
    assert isinstance(clock, ManualClock)
    clock.advance_to(max(clock.current_pulse_id(), pids[-1] + 1))
    writer.catch_up()
    writer.materialise(detector, list(pids))
    return JungfrauBufferReader(writer.buffer_root, detector).read(
        np.asarray(pids, dtype=np.int64), missing="flag"
    )


def gain(detector: SimulatedJungfrau, mode: GainMode) -> None:
    detector.apply_settings(dataclasses.replace(detector.settings(), gain_mode=mode))


def test_forced_gains_and_dark_frames_have_the_stage_pedestal_and_daq_rec_bits(
    buffer: tuple[ManualClock, JungfrauBufferWriter, dict[str, SimulatedJungfrau]],
) -> None:
    clock, writer, detectors = buffer
    one = detectors[ONE]
    one.illuminated = False  # from START + 1
    clock.advance_to(START + 10)
    gain(one, GainMode.FIXED_GAIN1)  # from START + 11
    clock.advance_to(START + 20)
    gain(one, GainMode.FIXED_GAIN2)
    clock.advance_to(START + 30)
    gain(one, GainMode.DYNAMIC)
    one.illuminated = True  # both from START + 31
    frames = read(writer, ONE, range(START, START + 40))
    daq_rec = frames.daq_rec[:, 0]
    assert daq_rec.tolist() == [0] * 11 + [1 << 12] * 10 + [3 << 12] * 10 + [0] * 9
    for offset, stage, illuminated in [
        (0, None, True),
        (5, 0, False),
        (15, 1, False),
        (25, 2, False),
        (35, None, True),
    ]:
        pid = START + offset
        expected = expected_frame(ONE, 0, pid, stage=stage, illuminated=illuminated)
        np.testing.assert_array_equal(frames.data[offset], expected)
    codes = frames.data[15] >> 14
    assert set(np.unique(codes).tolist()) == {1}
    assert set(np.unique(frames.data[25] >> 14).tolist()) == {3}
    # the photons: G1 and G2 pixels only when dynamic and illuminated
    assert set(np.unique(frames.data[35] >> 14).tolist()) == {0, 1, 3}


def test_no_frames_while_stopped_or_powered_off_and_latest_stops(
    buffer: tuple[ManualClock, JungfrauBufferWriter, dict[str, SimulatedJungfrau]],
) -> None:
    clock, writer, detectors = buffer
    detectors[ONE].stop()  # not needed here: spare the disk 3000 frames
    three = detectors[THREE]
    three.power_modules([1], on=False)  # from START + 1
    clock.advance_to(START + 4)
    three.stop()  # from START + 5
    clock.advance_to(START + 2999)  # files of START .. START+2999 pass while stopped
    writer.catch_up()
    latest_before = [writer.buffer_root / THREE / f"M{m:02d}" / "LATEST" for m in range(3)]
    # The file of START closed (frames in it); the next two files had no frame: no file.
    assert [
        fmt.first_pulse_of_file(Path(p.read_text().strip()))
        for p in (latest_before[0], latest_before[2])
    ] == [START, START]
    assert not fmt.data_file(writer.buffer_root, THREE, 0, START + 1000).exists()
    assert three.status().modules == (ModuleState.IDLE, ModuleState.OFF, ModuleState.IDLE)
    three.start()  # from START + 3000
    frames = read(writer, THREE, range(START, START + 8))
    complete = frames.complete()
    assert complete[:, 0].tolist() == [True] * 5 + [False] * 3
    assert complete[:, 1].tolist() == [True] + [False] * 7  # powered off from START + 1
    assert frames.is_good_frame().tolist() == [True] + [False] * 7
    later = read(writer, THREE, range(START + 3000, START + 3004))
    assert later.complete()[:, 0].all() and not later.complete()[:, 1].any()
    three.stop()  # from START + 3005: the file of START + 3000 gets 5 frames
    clock.advance_to(START + 4000)
    writer.catch_up()
    assert fmt.first_pulse_of_file(Path(latest_before[0].read_text().strip())) == START + 3000


def test_pedestal_mode_cycles_the_stages_then_stops(
    buffer: tuple[ManualClock, JungfrauBufferWriter, dict[str, SimulatedJungfrau]],
) -> None:
    clock, writer, detectors = buffer
    one = detectors[ONE]
    with pytest.raises(DetectorRefused, match="stop the detector before pedestal mode"):
        one.enable_pedestal_mode(PedestalMode(2, 2))
    one.stop()
    assert one.enable_pedestal_mode(PedestalMode(2, 2)) == 12
    clock.advance_to(START + 9)
    one.start()  # from START + 10
    one.apply_settings(dataclasses.replace(one.settings(), detector_mode=DetectorMode.LOW_NOISE))
    frames = read(writer, ONE, range(START + 8, START + 26))
    stages = [0, 0, 1, 1, 2, 2] * 2
    codes = {0: 0, 1: 1, 2: 3}
    expected = [None, None] + [codes[s] << 12 | 1 for s in stages] + [None] * 4
    complete = frames.complete()[:, 0]
    daq_rec = frames.daq_rec[:, 0]
    assert [int(d) if c else None for d, c in zip(daq_rec, complete, strict=True)] == expected
    assert clock.current_pulse_id() > START + 21  # read() let the clock pass the range
    assert one.status().modules == (ModuleState.FINISHED,)
    assert one.status().pedestal_mode == PedestalMode(2, 2)


def test_temperatures_monitor_and_module_power() -> None:
    clock = ManualClock(START, 1_700_000_000_000)
    three = SimulatedJungfrau(THREE, clock)
    three.power_modules([2], on=False)
    three.stop()
    three.power_modules([0], on=True)
    assert three.temperatures() == {
        "TEMPERATURE_ADC": [30.0, 30.5, None],
        "TEMPERATURE_FPGA": [40.0, 40.5, None],
        "TEMPERATURE_THRESHOLDS": [55.0, 55.0, 55.0],
    }
    three.start()
    assert three.temperatures()["TEMPERATURE_ADC"] == [38.0, 38.5, None]
    assert three.monitor() == {"chip_power": [True, True, False], "high_voltage": [120, 120, 0]}
    assert three.pings() == [True, True, True]
    with pytest.raises(DetectorRefused, match="JF07T03V01 has no module 3"):
        three.power_modules([3], on=True)
    three.power_on()
    assert three.status().modules == (ModuleState.RUNNING,) * 3
    assert three.commands == ["power off [2]", "stop", "power on [0]", "start", "power_on"]


async def test_the_control_routes_speak_the_interface(tmp_path: Path) -> None:
    from sf_daq_broker.simulation.jungfrau_writer import DetectorSpec
    from sf_daq_broker.simulation.runner import Simulation

    config = simulation_config(tmp_path, [DetectorSpec(name=ONE, highgain=True)])
    simulation = Simulation(config, ManualClock(START, 1_700_000_000_000))
    await simulation.start(follow_clock=False)
    try:
        await asyncio.to_thread(exercise, simulation.addresses["control"])
    finally:
        await simulation.stop()


def exercise(url: str) -> None:
    """Blocking calls, as the broker makes them (in a thread)."""
    control = HttpDetectorControl(url, ONE)
    assert control.settings().detector_mode is DetectorMode.LOW_NOISE  # highgain = true
    assert control.status().summary == "running"
    with pytest.raises(DetectorRefused, match="stop the detector before pedestal mode"):
        control.enable_pedestal_mode(PedestalMode(50, 200))
    control.stop()
    assert control.enable_pedestal_mode(PedestalMode(50, 200)) == 30000
    assert control.status().pedestal_mode == PedestalMode(50, 200)
    control.disable_pedestal_mode()
    control.power_modules([0], on=False)
    assert control.status().modules == (ModuleState.OFF,)
    assert control.temperatures()["TEMPERATURE_ADC"] == [None]
    assert control.pings() == [True]
    with pytest.raises(DetectorUnreachable, match="the simulation has no detector JF07T32V01"):
        HttpDetectorControl(url, "JF07T32V01").status()
    reply = requests.post(f"{url}/detectors/{ONE}/modules", data="{", timeout=5)
    assert (reply.status_code, reply.json()) == (400, {"error": "the body is not JSON"})
    reply = requests.get(f"{url}/detectors", timeout=5)
    assert reply.json() == {"detectors": [ONE]}
    with pytest.raises(DetectorUnreachable, match="does not answer"):
        HttpDetectorControl("http://127.0.0.1:9", ONE, timeout=1).status()
