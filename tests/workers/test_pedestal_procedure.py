"""The pedestal procedure against the simulated detector (over HTTP) and the simulated pulse
map: the detectors always end where they were, also when the procedure fails or an earlier
pedestal died half-way.

The clock is a ManualClock that the procedure's own progress reports advance, so every step
is deterministic: no test waits for time to pass, except the stall test (0.2 s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sf_daq_broker.detector_control.http import HttpDetectorControl
from sf_daq_broker.detector_control.interface import (
    DetectorMode,
    DetectorSettings,
    DetectorUnreachable,
    GainMode,
    PedestalMode,
)
from sf_daq_broker.pedestals.procedure import (
    SAVED_STATE_NAME,
    PedestalError,
    Plan,
    Procedure,
    PulseMapPulseIds,
)
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.runner import Simulation
from tests.support import simulation_config

START = 15_000_000_000
DETECTORS = ("JF13T01V01", "JF07T03V01")
BEFORE = DetectorSettings(
    delay=0.0001, detector_mode=DetectorMode.LOW_NOISE, exptime=8e-06, gain_mode=GainMode.DYNAMIC
)
log = logging.getLogger("test.pedestal")


class ClockDriver:
    """Progress reports that move the machine on by one pulse per report, except in the
    stages named in ``stall`` (the machine stops there)."""

    def __init__(self, clock: ManualClock, stall: tuple[str, ...] = ()) -> None:
        self.clock = clock
        self.stall = stall
        self.phases: list[str] = []

    async def stage(self, phase: str, done: int, total: int) -> None:
        if not self.phases or self.phases[-1] != phase:
            self.phases.append(phase)
        if phase not in self.stall:
            self.clock.advance(3)


@pytest.fixture
async def simulation(tmp_path: Path) -> AsyncIterator[Simulation]:
    config = simulation_config(tmp_path, list(DETECTORS))
    simulation = Simulation(config, ManualClock(START, 1_700_000_000_000))
    await simulation.start(follow_clock=False)
    simulation.clock.advance(100)  # type: ignore[attr-defined]
    for detector in simulation.detectors.values():
        detector.apply_settings(BEFORE)
    yield simulation
    await simulation.stop()


def procedure(
    simulation: Simulation, root: Path, *, pedestalmode: bool = False, **plan: Any
) -> Procedure:
    controls = [HttpDetectorControl(simulation.addresses["control"], name) for name in DETECTORS]
    values: dict[str, Any] = {
        "rate": 2,
        "pedestalmode": pedestalmode,
        "frames_per_stage": 5,
        "mode": PedestalMode(2, 1),
        "settle_s": 0.0,
        "poll_s": 0.0,
    }
    values.update(plan)
    pulse_ids = PulseMapPulseIds(simulation.addresses["databuffer"])
    return Procedure(controls, pulse_ids, Plan(**values), root, log)


def gains_set(simulation: Simulation, name: str) -> list[str]:
    return [
        json.loads(c.split(" ", 1)[1].replace("'", '"'))["gain_mode"]
        for c in simulation.detectors[name].commands
        if c.startswith("settings ")
    ]


async def test_the_manual_procedure_switches_every_detector_and_restores_them(
    simulation: Simulation, tmp_path: Path
) -> None:
    clock = simulation.clock
    assert isinstance(clock, ManualClock)
    driver = ClockDriver(clock)
    first = clock.current_pulse_id()
    start, stop = await procedure(simulation, tmp_path).run(driver)
    assert driver.phases == ["gain stage G0", "gain stage G1", "gain stage G2"]
    assert start == first
    assert stop >= start + 3 * 5 * 2  # three stages of 5 beam pulses at rate 2
    for name in DETECTORS:
        detector = simulation.detectors[name]
        assert detector.settings() == BEFORE
        assert gains_set(simulation, name)[1:] == [  # [0] is the fixture's
            "dynamic",
            "fixed_gain1",
            "fixed_gain2",
            "dynamic",
        ]
        assert detector.status().summary == "running"
        assert not (tmp_path / name / SAVED_STATE_NAME).exists()


async def test_a_machine_that_stops_fails_the_pedestal_and_restores_the_detectors(
    simulation: Simulation, tmp_path: Path
) -> None:
    assert isinstance(simulation.clock, ManualClock)
    driver = ClockDriver(simulation.clock, stall=("gain stage G1",))
    with pytest.raises(PedestalError) as failure:
        await procedure(simulation, tmp_path, stall_s=0.2).run(driver)
    assert str(failure.value).startswith("gain stage G1: the pulse id stayed at ")
    for name in DETECTORS:
        assert simulation.detectors[name].settings() == BEFORE
        assert gains_set(simulation, name)[-2:] == ["fixed_gain1", "dynamic"]
        assert not (tmp_path / name / SAVED_STATE_NAME).exists()


async def test_pedestal_mode_stops_enables_starts_and_leaves_as_it_found(
    simulation: Simulation, tmp_path: Path
) -> None:
    assert isinstance(simulation.clock, ManualClock)
    run = procedure(simulation, tmp_path, pedestalmode=True)
    start, stop = await run.run(ClockDriver(simulation.clock))
    assert run.mode_frames == 6  # 2 frames x 1 loop in each of G0, G1, G2
    assert stop >= start + 6 * 2
    for name in DETECTORS:
        detector = simulation.detectors[name]
        assert detector.commands[1:] == [
            "stop",
            "pedestal mode 2x1",
            "start",
            "stop",
            "pedestal mode off",
            "start",
        ]
        assert detector.settings() == BEFORE
        assert detector.status().pedestal_mode is None


async def test_an_earlier_pedestal_that_died_is_undone_by_the_next(
    simulation: Simulation, tmp_path: Path
) -> None:
    """A worker killed in G2 left its saved state; the detector is still in fixed_gain2."""
    name = DETECTORS[0]
    saved = tmp_path / name / SAVED_STATE_NAME
    saved.parent.mkdir(parents=True)
    saved.write_text(
        json.dumps({"settings": BEFORE.to_json(), "running": True, "pedestal_mode": None})
    )
    half_way = dataclasses.replace(BEFORE, gain_mode=GainMode.FIXED_GAIN2, exptime=9e-06)
    simulation.detectors[name].apply_settings(half_way)
    assert isinstance(simulation.clock, ManualClock)
    await procedure(simulation, tmp_path).run(ClockDriver(simulation.clock))
    assert simulation.detectors[name].settings() == BEFORE  # not the half-way state it found
    assert not saved.exists()


class FailingDetector(HttpDetectorControl):
    """A detector that stops answering after it was switched to G1."""

    def apply_settings(self, settings: DetectorSettings) -> None:
        if settings.gain_mode is GainMode.FIXED_GAIN2 or (
            settings.gain_mode is GainMode.DYNAMIC
            and self.settings().gain_mode is not GainMode.DYNAMIC
        ):
            raise DetectorUnreachable(f"{self.name}: no answer from the module controllers")
        super().apply_settings(settings)


async def test_a_detector_that_stops_answering_is_named_and_its_state_kept(
    simulation: Simulation, tmp_path: Path
) -> None:
    name = DETECTORS[1]
    run = procedure(simulation, tmp_path)
    run.controls[1] = FailingDetector(simulation.addresses["control"], name)
    assert isinstance(simulation.clock, ManualClock)
    with pytest.raises(PedestalError) as failure:
        await run.run(ClockDriver(simulation.clock))
    assert str(failure.value) == (
        "the detector settings before the pedestal could not be restored ("
        f"{name}: {name}: no answer from the module controllers): check the detectors; the "
        "next pedestal of these detectors tries again"
    )
    assert simulation.detectors[DETECTORS[0]].settings() == BEFORE  # the other one is back
    kept = json.loads((tmp_path / name / SAVED_STATE_NAME).read_text())
    assert kept["settings"] == BEFORE.to_json()  # for the next pedestal to restore
