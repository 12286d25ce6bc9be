"""A simulated Jungfrau detector behind ``detector_control.interface.DetectorControl``.

What it is set to decides the frames the simulated buffer holds (``jungfrau_writer``): every
command takes effect at the pulse after the clock's current one, and the detector remembers
since which pulse each state held (its *timeline*), so a lazily written record — made long
after the pulse — still shows the state of its own pulse. Per pulse and module
(``frame_kind``):

- stopped, or the module powered off: **no frame** (the record is never written, and a file
  without any frame is never created, so ``LATEST`` stops and the detector shows as missing);
- ``dynamic``: the frames of ``jungfrau_frames`` (photons, a spot), or, while the detector is
  dark (``illuminated`` false: shutter closed), pedestal + noise in G0;
- ``fixed_gain1`` / ``fixed_gain2``: every pixel in G1 / G2 at that stage's pedestal + noise,
  ``daq_rec`` bits 12-13 = 1 / 3;
- pedestal mode (``frames`` F, ``loops`` L): from the start, F frames each in G0, G1 and G2, L
  times, then no more frames (status ``run_finished``) until stopped and started again.
  Which stages the real firmware cycles through is not documented (UPSTREAM_HEAD §4 "?"); the
  simulator takes all three so that a pedestal made in pedestal mode is complete, and says how
  many frames it will take (``enable_pedestal_mode``), which is what the broker waits for;
- ``low_noise`` (high gain): ``daq_rec`` bit 0.

``illuminated`` is not part of the control interface: it stands for the beam and the shutter,
which the broker does not control (``POST /detectors/{name}/illumination`` of the control
endpoint, or the attribute in-process).

Temperatures follow the state (a running module is warmer), deterministically, so tests can
compare them exactly: ADC ``30 + module/2`` °C, FPGA ``40 + module/2`` °C, plus 8 °C while
running; None for a module without power.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from sf_daq_broker.buffers.jungfrau_format import n_modules
from sf_daq_broker.detector_control.interface import (
    DetectorMode,
    DetectorRefused,
    DetectorSettings,
    DetectorStatus,
    GainMode,
    ModuleState,
    PedestalMode,
)
from sf_daq_broker.simulation.clock import PulseClock

#: Gain stages a pedestal-mode loop goes through, in order.
PEDESTAL_MODE_STAGES = (0, 1, 2)
#: What ``power_on`` applies (the detector's configuration at the facility: exptime 5 µs).
DEFAULT_SETTINGS = DetectorSettings(
    delay=0.0, detector_mode=DetectorMode.NORMAL, exptime=5e-06, gain_mode=GainMode.DYNAMIC
)
HIGH_VOLTAGE = 120
TEMPERATURE_THRESHOLD = 55.0
#: Timeline entries older than this many pulses before the clock are forgotten.
HISTORY_PULSES = 1_000_000


class FrameKind(NamedTuple):
    """What a module's frame at one pulse looks like (``stage`` None: dynamic switching)."""

    stage: int | None
    high_gain: bool
    illuminated: bool


@dataclass(frozen=True)
class _State:
    """Everything that decides the frames, from pulse ``since`` on."""

    since: int
    running: bool
    started: int  # the pulse acquisition last started at (pedestal mode counts from it)
    powered: frozenset[int]
    settings: DetectorSettings
    pedestal_mode: PedestalMode | None
    illuminated: bool

    @property
    def pedestal_frames(self) -> int:
        mode = self.pedestal_mode
        return 0 if mode is None else len(PEDESTAL_MODE_STAGES) * mode.frames * mode.loops

    def kind(self, module: int, pid: int) -> FrameKind | None:
        if not self.running or module not in self.powered:
            return None
        high_gain = self.settings.detector_mode is DetectorMode.LOW_NOISE
        mode = self.pedestal_mode
        if mode is None:
            return FrameKind(self.settings.gain_mode.forced_stage, high_gain, self.illuminated)
        index = pid - self.started
        if index >= self.pedestal_frames:
            return None
        stage = PEDESTAL_MODE_STAGES[index // mode.frames % len(PEDESTAL_MODE_STAGES)]
        return FrameKind(stage, high_gain, self.illuminated)

    def produces(self, module: int, first: int, last: int) -> bool:
        """Whether the module makes a frame at some pulse of ``[first, last]``."""
        if not self.running or module not in self.powered or first > last:
            return False
        if self.pedestal_mode is None:
            return True
        return first < self.started + self.pedestal_frames and last >= self.started

    def module_state(self, module: int, pid: int) -> ModuleState:
        if module not in self.powered:
            return ModuleState.OFF
        if not self.running:
            return ModuleState.IDLE
        if self.pedestal_mode is not None and pid >= self.started + self.pedestal_frames:
            return ModuleState.FINISHED
        return ModuleState.RUNNING


class SimulatedJungfrau:
    """One simulated detector; thread-safe (the buffer writer reads it from its threads)."""

    def __init__(
        self,
        name: str,
        clock: PulseClock,
        *,
        high_gain: bool = False,
        history_pulses: int = HISTORY_PULSES,
    ) -> None:
        self._name = name
        self._n_modules = n_modules(name)
        self.clock = clock
        self.history_pulses = history_pulses
        settings = replace(
            DEFAULT_SETTINGS,
            detector_mode=DetectorMode.LOW_NOISE if high_gain else DetectorMode.NORMAL,
        )
        # Running since before the first pulse, as the detectors of a running facility are.
        self._timeline = [
            _State(
                since=0,
                running=True,
                started=0,
                powered=frozenset(range(self._n_modules)),
                settings=settings,
                pedestal_mode=None,
                illuminated=True,
            )
        ]
        self._lock = threading.Lock()
        self.commands: list[str] = []  # what was done to it, for tests and the log

    # -- what the frames see ------------------------------------------------------------

    def frame_kind(self, module: int, pid: int) -> FrameKind | None:
        """The frame of ``module`` at ``pid`` (None: the module makes no frame then)."""
        with self._lock:
            return self._state_at(pid).kind(module, pid)

    def produces_frames(self, module: int, first: int, last: int) -> bool:
        """Whether ``module`` makes any frame in ``[first, last]``."""
        with self._lock:
            starts = [state.since for state in self._timeline]
            index = max(0, bisect.bisect_right(starts, first) - 1)
            for position in range(index, len(self._timeline)):
                state = self._timeline[position]
                if state.since > last:
                    break
                end = self._timeline[position + 1].since - 1 if position + 1 < len(starts) else last
                if state.produces(module, max(first, state.since), min(last, end)):
                    return True
            return False

    @property
    def illuminated(self) -> bool:
        with self._lock:
            return self._timeline[-1].illuminated

    @illuminated.setter
    def illuminated(self, value: bool) -> None:
        self._change(f"illuminated {value}", illuminated=bool(value))

    # -- DetectorControl ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def n_modules(self) -> int:
        return self._n_modules

    def status(self) -> DetectorStatus:
        """The state last commanded (as a real detector answers right after a command),
        finished or not by the current pulse."""
        with self._lock:
            now = self.clock.current_pulse_id()
            state = self._timeline[-1]
            modules = tuple(state.module_state(m, now) for m in range(self._n_modules))
            return DetectorStatus(modules, state.pedestal_mode)

    def start(self) -> None:
        with self._lock:
            if self._timeline[-1].running:
                return
            pid = self._next_pulse()
            self._append(pid, "start", running=True, started=pid)

    def stop(self) -> None:
        self._change("stop", running=False)

    def power_on(self) -> None:
        """Stop, power every module, the default settings, no pedestal mode, start."""
        with self._lock:
            pid = self._next_pulse()
            current = self._timeline[-1]
            settings = replace(DEFAULT_SETTINGS, detector_mode=current.settings.detector_mode)
            self._append(
                pid,
                "power_on",
                running=True,
                started=pid,
                powered=frozenset(range(self._n_modules)),
                settings=settings,
                pedestal_mode=None,
            )

    def power_modules(self, modules: Sequence[int], on: bool) -> None:
        bad = [m for m in modules if not 0 <= m < self._n_modules]
        if bad:
            raise DetectorRefused(f"{self._name} has no module {bad[0]}")
        with self._lock:
            powered = set(self._timeline[-1].powered)
            powered = powered | set(modules) if on else powered - set(modules)
            verb = "on" if on else "off"
            self._append(
                self._next_pulse(), f"power {verb} {list(modules)}", powered=frozenset(powered)
            )

    def settings(self) -> DetectorSettings:
        with self._lock:
            return self._timeline[-1].settings

    def apply_settings(self, settings: DetectorSettings) -> None:
        self._change(f"settings {settings.to_json()}", settings=settings)

    def enable_pedestal_mode(self, mode: PedestalMode) -> int:
        with self._lock:
            if self._timeline[-1].running:
                raise DetectorRefused(f"{self._name}: stop the detector before pedestal mode")
            self._append(
                self._next_pulse(), f"pedestal mode {mode.frames}x{mode.loops}", pedestal_mode=mode
            )
            return len(PEDESTAL_MODE_STAGES) * mode.frames * mode.loops

    def disable_pedestal_mode(self) -> None:
        with self._lock:
            if self._timeline[-1].running:
                raise DetectorRefused(
                    f"{self._name}: stop the detector before leaving pedestal mode"
                )
            self._append(self._next_pulse(), "pedestal mode off", pedestal_mode=None)

    def temperatures(self) -> dict[str, list[float | None]]:
        status = self.status()
        adc: list[float | None] = []
        fpga: list[float | None] = []
        for module, state in enumerate(status.modules):
            if state is ModuleState.OFF:
                adc.append(None)
                fpga.append(None)
                continue
            warm = 8.0 if state is ModuleState.RUNNING else 0.0
            adc.append(30.0 + module / 2 + warm)
            fpga.append(40.0 + module / 2 + warm)
        return {
            "TEMPERATURE_ADC": adc,
            "TEMPERATURE_FPGA": fpga,
            "TEMPERATURE_THRESHOLDS": [TEMPERATURE_THRESHOLD] * self._n_modules,
        }

    def monitor(self) -> dict[str, list[object]]:
        powered = self.status().powered_modules
        on = [m in powered for m in range(self._n_modules)]
        return {
            "chip_power": list(on),
            "high_voltage": [HIGH_VOLTAGE if is_on else 0 for is_on in on],
        }

    def pings(self) -> list[bool]:
        return [True] * self._n_modules

    # -- the timeline -------------------------------------------------------------------

    def _next_pulse(self) -> int:
        return self.clock.current_pulse_id() + 1

    def _state_at(self, pid: int) -> _State:
        starts = [state.since for state in self._timeline]
        return self._timeline[max(0, bisect.bisect_right(starts, pid) - 1)]

    def _change(self, what: str, **changes: object) -> None:
        with self._lock:
            self._append(self._next_pulse(), what, **changes)

    def _append(self, pid: int, what: str, **changes: object) -> None:
        """A new state from ``pid`` on (the caller holds the lock)."""
        last = self._timeline[-1]
        state = replace(last, since=pid, **changes)  # type: ignore[arg-type]
        if last.since >= pid:  # several commands before the next pulse: the last one holds
            self._timeline[-1] = replace(state, since=last.since)
        else:
            self._timeline.append(state)
        self.commands.append(what)
        horizon = pid - self.history_pulses
        while len(self._timeline) > 1 and self._timeline[1].since <= horizon:
            self._timeline.pop(0)
