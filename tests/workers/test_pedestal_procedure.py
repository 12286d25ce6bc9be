"""The pedestal procedure against the simulated detector (over HTTP) and the simulated pulse
map: the detectors always end where they were, also when the procedure fails or an earlier
pedestal died half-way.

The clock is a ManualClock that the procedure's own progress reports advance, so every step
is deterministic: no test waits for time to pass, except the stall tests (0.2 s) and the tests of
the bound on restoring (0.2 s). A stop is ``Task.cancel`` (what SIGTERM does to a worker);
a kill is a SIGKILL of a child process running the procedure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
import threading
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
from tests.support import PATIENCE, simulation_config

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


class StopsIn(ClockDriver):
    """The machine stops in ``phase``; ``inside`` is set once the procedure waits there."""

    def __init__(self, clock: ManualClock, phase: str) -> None:
        super().__init__(clock, stall=(phase,))
        self.inside = asyncio.Event()

    async def stage(self, phase: str, done: int, total: int) -> None:
        await super().stage(phase, done, total)
        if phase in self.stall:
            self.inside.set()


async def stopped_inside(run: Procedure, driver: StopsIn) -> asyncio.Task[tuple[int, int]]:
    """``run`` started, waiting in the driver's stalled phase (not yet stopped)."""
    task = asyncio.create_task(run.run(driver))
    waiting = asyncio.create_task(driver.inside.wait())
    await asyncio.wait([task, waiting], timeout=PATIENCE, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    assert not task.done(), task  # a procedure that ended early would show here
    assert driver.inside.is_set(), f"not in {driver.stall} after {PATIENCE} s"
    return task


@pytest.mark.parametrize(
    ("pedestalmode", "phase", "inside", "restore"),
    [
        (False, "gain stage G1", ["fixed_gain1"], ["dynamic"]),
        (
            True,
            "pedestal mode",
            ["stop", "pedestal mode 2x1", "start"],
            ["stop", "pedestal mode off", "start"],
        ),
    ],
    ids=["manual", "pedestal-mode"],
)
async def test_a_procedure_stopped_inside_a_stage_restores_the_detectors(
    simulation: Simulation,
    tmp_path: Path,
    pedestalmode: bool,
    phase: str,
    inside: list[str],
    restore: list[str],
) -> None:
    """A worker stopped (SIGTERM cancels its task) while the procedure waits in a stage: the
    detectors are back as they were, the saved states removed, and the next pedestal of the
    same detectors starts from a clean slate."""
    clock = simulation.clock
    assert isinstance(clock, ManualClock)
    driver = StopsIn(clock, phase)
    run = procedure(simulation, tmp_path, pedestalmode=pedestalmode, stall_s=10 * PATIENCE)
    task = await stopped_inside(run, driver)
    for name in DETECTORS:
        assert (tmp_path / name / SAVED_STATE_NAME).exists()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert driver.phases[-1] == phase
    for name in DETECTORS:
        detector = simulation.detectors[name]
        if pedestalmode:
            assert detector.commands[1:] == inside + restore
        else:
            assert gains_set(simulation, name)[-2:] == inside + restore
        settings = detector.settings()
        assert settings.gain_mode is GainMode.DYNAMIC
        assert settings.detector_mode is DetectorMode.LOW_NOISE
        assert settings.exptime == 8e-06
        assert settings.delay == 0.0001
        assert settings == BEFORE
        status = detector.status()
        assert status.summary == "running"
        assert status.pedestal_mode is None
        assert not (tmp_path / name / SAVED_STATE_NAME).exists()
        detector.commands.clear()
    # The next pedestal: nothing earlier to restore, a whole pedestal, back as before.
    later = procedure(simulation, tmp_path)
    again = ClockDriver(clock)
    start, stop = await later.run(again)
    assert again.phases == ["gain stage G0", "gain stage G1", "gain stage G2"]
    assert stop >= start + 3 * 5 * 2
    for name in DETECTORS:
        assert gains_set(simulation, name) == ["dynamic", "fixed_gain1", "fixed_gain2", "dynamic"]
        assert simulation.detectors[name].settings() == BEFORE
        assert simulation.detectors[name].status().summary == "running"
        assert not (tmp_path / name / SAVED_STATE_NAME).exists()


class SlowToRestore(HttpDetectorControl):
    """A detector whose restore (its settings set back from a fixed gain) takes until
    ``go_on`` is set; ``restoring`` is set when it begins."""

    def __init__(self, control_url: str, name: str, go_on: threading.Event) -> None:
        super().__init__(control_url, name)
        self.loop = asyncio.get_running_loop()
        self.restoring = asyncio.Event()
        self.go_on = go_on

    def apply_settings(self, settings: DetectorSettings) -> None:
        if settings == BEFORE and self.settings().gain_mode is not GainMode.DYNAMIC:
            self.loop.call_soon_threadsafe(self.restoring.set)
            self.go_on.wait(PATIENCE)
        super().apply_settings(settings)


async def test_a_procedure_stopped_again_while_restoring_still_restores_every_detector(
    simulation: Simulation, tmp_path: Path
) -> None:
    """A second stop (a second SIGTERM or Ctrl-C, the broker's shutdown) while the detectors
    are being restored: the restore goes on to the end, then the procedure stops."""
    clock = simulation.clock
    assert isinstance(clock, ManualClock)
    go_on = threading.Event()
    run = procedure(simulation, tmp_path, stall_s=10 * PATIENCE)
    slow = SlowToRestore(simulation.addresses["control"], DETECTORS[0], go_on)
    run.controls[0] = slow
    task = await stopped_inside(run, StopsIn(clock, "gain stage G1"))
    task.cancel()
    try:
        await asyncio.wait_for(slow.restoring.wait(), PATIENCE)
        task.cancel()  # stopped again, in the middle of restoring the first detector
    finally:
        go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for name in DETECTORS:
        assert gains_set(simulation, name)[-2:] == ["fixed_gain1", "dynamic"]
        assert simulation.detectors[name].settings() == BEFORE
        assert simulation.detectors[name].status().summary == "running"
        assert not (tmp_path / name / SAVED_STATE_NAME).exists()


class Hangs(HttpDetectorControl):
    """A detector that stops answering once ``hanging`` is set: every call waits until
    ``released``, then fails as the control's own timeout would."""

    def __init__(self, control_url: str, name: str) -> None:
        super().__init__(control_url, name)
        self.hanging = threading.Event()
        self.released = threading.Event()

    def settings(self) -> DetectorSettings:
        if self.hanging.is_set():
            self.released.wait(PATIENCE)
            raise DetectorUnreachable(f"{self.name}: no answer from the module controllers")
        return super().settings()


async def test_a_restore_that_hangs_is_given_up_after_its_bound_and_the_states_kept(
    simulation: Simulation, tmp_path: Path
) -> None:
    """A detector whose restore never answers does not hold a stopping worker for ever: after
    ``restore_s`` the procedure stops anyway; the saved states stay, and the next pedestal
    restores them."""
    clock = simulation.clock
    assert isinstance(clock, ManualClock)
    run = procedure(simulation, tmp_path, stall_s=10 * PATIENCE, restore_s=0.2)
    hangs = Hangs(simulation.addresses["control"], DETECTORS[0])
    run.controls[0] = hangs
    task = await stopped_inside(run, StopsIn(clock, "gain stage G1"))
    hangs.hanging.set()  # the restore's first call (its settings) hangs
    task.cancel()
    try:
        done, _ = await asyncio.wait([task], timeout=PATIENCE)
        assert done == {task}
        assert task.cancelled()
        for name in DETECTORS:  # the first hangs, the second was not reached
            kept = json.loads((tmp_path / name / SAVED_STATE_NAME).read_text())
            assert kept == {"settings": BEFORE.to_json(), "running": True, "pedestal_mode": None}
            assert simulation.detectors[name].settings().gain_mode is GainMode.FIXED_GAIN1
    finally:
        hangs.released.set()
    await procedure(simulation, tmp_path).run(ClockDriver(clock))
    for name in DETECTORS:
        assert gains_set(simulation, name)[-4:] == [
            "dynamic",
            "fixed_gain1",
            "fixed_gain2",
            "dynamic",
        ]
        assert simulation.detectors[name].settings() == BEFORE
        assert not (tmp_path / name / SAVED_STATE_NAME).exists()


class BreaksIn(ClockDriver):
    """In ``phase``, the progress report fails (RabbitMQ away), after ``hanging`` is set."""

    def __init__(self, clock: ManualClock, phase: str, hanging: threading.Event) -> None:
        super().__init__(clock)
        self.phase = phase
        self.hanging = hanging

    async def stage(self, phase: str, done: int, total: int) -> None:
        await super().stage(phase, done, total)
        if phase == self.phase:
            self.hanging.set()
            raise RuntimeError("progress not announced")


async def test_a_restore_that_hangs_without_a_stop_fails_the_pedestal_after_its_bound(
    simulation: Simulation, tmp_path: Path
) -> None:
    """Not stopped: a restore given up after ``restore_s`` is the pedestal's error."""
    clock = simulation.clock
    assert isinstance(clock, ManualClock)
    run = procedure(simulation, tmp_path, restore_s=0.2)
    hangs = Hangs(simulation.addresses["control"], DETECTORS[0])
    run.controls[0] = hangs
    try:
        with pytest.raises(PedestalError) as failure:
            await asyncio.wait_for(
                run.run(BreaksIn(clock, "gain stage G1", hangs.hanging)), PATIENCE
            )
    finally:
        hangs.released.set()
    assert str(failure.value) == (
        "the detector settings before the pedestal were not restored within 0.2 s: check the "
        "detectors; the next pedestal of these detectors tries again"
    )
    for name in DETECTORS:
        assert (tmp_path / name / SAVED_STATE_NAME).exists()
        assert simulation.detectors[name].settings().gain_mode is GainMode.FIXED_GAIN1


#: A worker's procedure in a child process, against the test's simulated detectors: its
#: machine stops in G2, where the test kills it.
CHILD = """
import asyncio, logging, sys
from pathlib import Path
from sf_daq_broker.detector_control.http import HttpDetectorControl
from sf_daq_broker.detector_control.interface import PedestalMode
from sf_daq_broker.pedestals.procedure import Plan, Procedure

class Machine:
    pulse, stopped = 1000, False
    async def current_pulse_id(self):
        self.pulse += 0 if self.stopped else 1
        return self.pulse

class Driver:
    def __init__(self, machine):
        self.machine, self.phase = machine, None
    async def stage(self, phase, done, total):
        if phase != self.phase:
            self.phase = phase
            self.machine.stopped = phase == "gain stage G2"
            print(phase, flush=True)

url, root, *names = sys.argv[1:]
plan = Plan(rate=2, pedestalmode=False, frames_per_stage=5, mode=PedestalMode(2, 1),
            settle_s=0.0, poll_s=0.01, stall_s=3600.0)
controls = [HttpDetectorControl(url, name) for name in names]
machine = Machine()
run = Procedure(controls, machine, plan, Path(root), logging.getLogger("child"))
asyncio.run(run.run(Driver(machine)))
"""


async def test_a_worker_killed_inside_a_stage_is_restored_by_the_next_pedestal(
    simulation: Simulation, tmp_path: Path
) -> None:
    """SIGKILL leaves no chance to restore: the detectors stay in fixed_gain2 with the saved
    states on disk, and the next pedestal restores those (not the state it finds)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        simulation.addresses["control"],
        str(tmp_path),
        *DETECTORS,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        phases: list[str] = []
        while not phases or phases[-1] != "gain stage G2":
            line = await asyncio.wait_for(child.stdout.readline(), PATIENCE)
            assert line, f"the child ended ({await child.wait()}) after {phases}"
            phases.append(line.decode().strip())
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert phases == ["gain stage G0", "gain stage G1", "gain stage G2"]
    assert child.returncode == -signal.SIGKILL
    for name in DETECTORS:
        assert gains_set(simulation, name)[-1] == "fixed_gain2"
        assert simulation.detectors[name].settings().gain_mode is GainMode.FIXED_GAIN2
        kept = json.loads((tmp_path / name / SAVED_STATE_NAME).read_text())
        assert kept == {"settings": BEFORE.to_json(), "running": True, "pedestal_mode": None}
        simulation.detectors[name].commands.clear()
    assert isinstance(simulation.clock, ManualClock)
    await procedure(simulation, tmp_path).run(ClockDriver(simulation.clock))
    for name in DETECTORS:
        assert gains_set(simulation, name) == ["dynamic", "fixed_gain1", "fixed_gain2", "dynamic"]
        assert simulation.detectors[name].settings() == BEFORE
        assert simulation.detectors[name].status().summary == "running"
        assert not (tmp_path / name / SAVED_STATE_NAME).exists()
