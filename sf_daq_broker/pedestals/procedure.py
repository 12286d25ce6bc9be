"""Driving detectors through the gain stages of a pedestal, and back to where they were.

**Manual** (upstream's default): every detector to ``dynamic`` gain, ``settle_s`` seconds,
note the start pulse; ``frames_per_stage`` beam pulses in G0, then ``fixed_gain1``, as many
in G1, then ``fixed_gain2``, as many in G2; note the stop pulse. Upstream sleeps
``10·rate`` s per stage; here each stage lasts until the machine's pulse id has passed
``frames_per_stage·rate`` pulses after the switch (read from the pulse map), so a stage
never has fewer frames than asked, however slow the switching.

**Pedestal mode**: stop the detectors, switch pedestal mode on (``mode_frames`` x ``mode_loops``),
note the start pulse, start; wait until the pulses of as many frames as the detectors say
they take have passed; note the stop pulse.

Which frame is in which stage does not matter downstream: the pedestal computation sorts
frames by the gain bits of their own ``daq_rec``, so frames taken while switching only land in
the stage they really are in.

**Restoring.** Before anything is changed, each detector's settings, run state and pedestal
mode are saved in ``{pedestal_root}/{DET}/.state_before_pedestal.json``; afterwards — also
when anything failed or the worker is stopped — they are restored (stop, pedestal mode off,
the saved settings, started again if it was running) and the file is removed. A stop
(``Task.cancel``: SIGTERM, the broker's shutdown) waits for the restore, also when it is asked
again while restoring, for at most ``restore_s`` seconds (``Procedure._restore_surely``). If a
worker dies in the middle (SIGKILL), or a restore fails or is given up, the file stays, and the
next pedestal of that detector restores *that* state, not the half-switched one it finds.
Nothing else restores it: not the broker's or the worker's start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from sf_daq_broker.bookkeeping.atomic import dump_json
from sf_daq_broker.bookkeeping.confined import replace_file
from sf_daq_broker.buffers.errors import BufferClientError, DataNotYetAvailable
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.cancellation import through_stops
from sf_daq_broker.detector_control.interface import (
    DetectorControl,
    DetectorControlError,
    DetectorSettings,
    DetectorStatus,
    GainMode,
    ModuleState,
    PedestalMode,
)
from sf_daq_broker.jungfrau.errors import ConversionError

SAVED_STATE_NAME = ".state_before_pedestal.json"
#: The manual procedure's stages, in order.
STAGES = (("G0", GainMode.DYNAMIC), ("G1", GainMode.FIXED_GAIN1), ("G2", GainMode.FIXED_GAIN2))
#: A pulse id that does not move for this long means the pulse map (or the machine) stopped.
STALL_SECONDS = 60.0
#: The longest a restore may hold up a stopping worker (a few detector calls each, every call
#: bounded by the control's own timeout, 10 s over HTTP): well inside systemd's 90 s to stop.
RESTORE_SECONDS = 30.0


class PedestalError(ConversionError):
    """The pedestal cannot be taken; the message says which detector and why."""


class PulseIdSource(Protocol):
    async def current_pulse_id(self) -> int: ...


class PulseMapPulseIds:
    """The machine's current pulse id from the pulse map (as ``/current_pulse_id``)."""

    def __init__(self, databuffer_url: str) -> None:
        self.url = databuffer_url
        self._known = 1

    async def current_pulse_id(self) -> int:
        async with PulseMapClient(self.url) as pulse_map:
            try:
                newest = await pulse_map.newest_pulse_id(self._known)
            except DataNotYetAvailable:
                newest = await pulse_map.newest_pulse_id(1)
        self._known = newest
        return newest


class StageProgress(Protocol):
    """What the procedure reports to (``workers.loop.Progress.for_phase``)."""

    async def stage(self, phase: str, done: int, total: int) -> None: ...


@dataclass(frozen=True)
class Plan:
    rate: int
    pedestalmode: bool
    frames_per_stage: int
    mode: PedestalMode
    settle_s: float
    poll_s: float = 0.1
    stall_s: float = STALL_SECONDS
    restore_s: float = RESTORE_SECONDS


@dataclass(frozen=True)
class SavedState:
    """A detector's state before the pedestal: what ``restore`` brings back."""

    settings: DetectorSettings
    running: bool
    pedestal_mode: PedestalMode | None

    def to_json(self) -> dict[str, Any]:
        mode = self.pedestal_mode
        return {
            "settings": self.settings.to_json(),
            "running": self.running,
            "pedestal_mode": None if mode is None else {"frames": mode.frames, "loops": mode.loops},
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> SavedState:
        mode = document.get("pedestal_mode")
        return cls(
            settings=DetectorSettings.from_json(document["settings"]),
            running=bool(document["running"]),
            pedestal_mode=None if mode is None else PedestalMode(mode["frames"], mode["loops"]),
        )


def _running(status: DetectorStatus) -> bool:
    return any(state is ModuleState.RUNNING for state in status.modules)


class Procedure:
    """One pedestal on a set of detectors (all switched together, as upstream)."""

    def __init__(
        self,
        controls: Sequence[DetectorControl],
        pulse_ids: PulseIdSource,
        plan: Plan,
        pedestal_root: Path,
        log: logging.Logger,
    ) -> None:
        self.controls = list(controls)
        self.pulse_ids = pulse_ids
        self.plan = plan
        self.pedestal_root = pedestal_root
        self.log = log
        #: In pedestal mode, after ``run``: the frames each detector took (the rest of the
        #: range has none).
        self.mode_frames: int | None = None

    async def run(self, progress: StageProgress) -> tuple[int, int]:
        """Take the frames; returns the first and last pulse id of the pedestal."""
        saved = await self._save_states()
        stopping = False
        try:
            if self.plan.pedestalmode:
                return await self._pedestal_mode(progress)
            return await self._manual(progress)
        except asyncio.CancelledError:
            stopping = True
            raise
        finally:
            await self._restore_surely(saved, stopping)

    # -- the two procedures ---------------------------------------------------------------

    async def _manual(self, progress: StageProgress) -> tuple[int, int]:
        plan = self.plan
        await self._all("switch to dynamic gain", lambda c: self._set_gain(c, GainMode.DYNAMIC))
        await asyncio.sleep(plan.settle_s)  # the detector's own settling time, as upstream
        start = await self.pulse_ids.current_pulse_id()
        begin = start
        for index, (stage, gain) in enumerate(STAGES):
            if index:
                await self._all(f"switch to {gain}", lambda c, g=gain: self._set_gain(c, g))
                begin = await self.pulse_ids.current_pulse_id()
            self.log.info("gain stage %s from pulse %d (%s)", stage, begin, gain)
            await self._wait_frames(f"gain stage {stage}", begin, plan.frames_per_stage, progress)
        stop = await self.pulse_ids.current_pulse_id()
        return start, stop

    async def _pedestal_mode(self, progress: StageProgress) -> tuple[int, int]:
        plan = self.plan
        await self._all("stop", lambda c: c.stop())
        frames = await self._all("pedestal mode on", lambda c: c.enable_pedestal_mode(plan.mode))
        start = await self.pulse_ids.current_pulse_id()
        await self._all("start", lambda c: c.start())
        # The frames start after the start command: count them from a pulse read after it.
        begin = await self.pulse_ids.current_pulse_id()
        total = self.mode_frames = max(frames)
        self.log.info(
            "pedestal mode (%d frames x %d loops): %d frames from pulse %d",
            plan.mode.frames,
            plan.mode.loops,
            total,
            begin,
        )
        await self._wait_frames("pedestal mode", begin, total, progress)
        stop = await self.pulse_ids.current_pulse_id()
        return start, stop

    # -- steps ------------------------------------------------------------------------------

    @staticmethod
    def _set_gain(control: DetectorControl, gain: GainMode) -> None:
        control.apply_settings(replace(control.settings(), gain_mode=gain))

    async def _all(self, what: str, step: Any) -> list[Any]:
        """``step(control)`` on every detector (in threads: the detector library blocks)."""
        results = []
        for control in self.controls:
            try:
                results.append(await asyncio.to_thread(step, control))
            except DetectorControlError as exc:
                raise PedestalError(f"{control.name}: {what} failed: {exc}") from exc
        return results

    async def _wait_frames(
        self, phase: str, begin: int, frames: int, progress: StageProgress
    ) -> None:
        """Until ``frames`` beam pulses have passed after ``begin``."""
        rate = self.plan.rate
        target = begin + frames * rate
        last_seen, last_change = begin, time.monotonic()
        while True:
            try:
                current = await self.pulse_ids.current_pulse_id()
            except BufferClientError as exc:
                current = last_seen
                self.log.warning("%s: pulse id not read (%s)", phase, exc)
            done = min(frames, max(0, current - begin) // rate)
            self.log.debug("%s: pulse %d, %d of %d frames", phase, current, done, frames)
            await progress.stage(phase, done, frames)
            if current >= target:
                return
            if current != last_seen:
                last_seen, last_change = current, time.monotonic()
            elif time.monotonic() - last_change > self.plan.stall_s:
                raise PedestalError(
                    f"{phase}: the pulse id stayed at {current} for {self.plan.stall_s:g} s "
                    f"(pulse map {getattr(self.pulse_ids, 'url', '?')}): is the machine running?"
                )
            await asyncio.sleep(self.plan.poll_s)  # following the machine's clock

    # -- saving and restoring -----------------------------------------------------------------

    def _saved_file(self, control: DetectorControl) -> Path:
        return self.pedestal_root / control.name / SAVED_STATE_NAME

    async def _save_states(self) -> dict[str, SavedState]:
        """Each detector's state before the pedestal (an unrestored earlier one wins). Every
        detector is checked before anything is written: one that makes no frames (stopped, a
        module powered off) fails the pedestal before any detector is touched."""
        saved: dict[str, SavedState] = {}
        fresh: list[tuple[Path, SavedState]] = []
        for control in self.controls:
            path = self._saved_file(control)
            earlier = await asyncio.to_thread(_read_saved, path)
            if earlier is not None:
                self.log.warning(
                    "%s: an earlier pedestal did not restore its settings (%s): restoring those",
                    control.name,
                    path,
                )
                saved[control.name] = earlier
                continue
            status, settings = await self._all_one(control)
            self._check_takes_frames(control, status)
            state = SavedState(settings, _running(status), status.pedestal_mode)
            saved[control.name] = state
            fresh.append((path, state))
        for path, state in fresh:
            await asyncio.to_thread(_write_saved, path, state)
        for name, state in saved.items():
            self.log.info("%s: settings before the pedestal %s", name, state.settings.to_json())
        return saved

    def _check_takes_frames(self, control: DetectorControl, status: DetectorStatus) -> None:
        """Manual: every module must be taking frames; pedestal mode: every module powered
        (the procedure starts the detector itself)."""
        if self.plan.pedestalmode:
            bad = [m for m, state in enumerate(status.modules) if state is ModuleState.OFF]
        else:
            bad = [m for m, state in enumerate(status.modules) if state is not ModuleState.RUNNING]
        if bad:
            states = ", ".join(f"{m}: {status.modules[m].value}" for m in bad)
            raise PedestalError(
                f"{control.name} cannot take a pedestal: modules {states} (power it on or "
                "start it first; a pedestal needs frames of every module)"
            )

    async def _all_one(self, control: DetectorControl) -> tuple[DetectorStatus, DetectorSettings]:
        try:
            status = await asyncio.to_thread(control.status)
            settings = await asyncio.to_thread(control.settings)
        except DetectorControlError as exc:
            raise PedestalError(f"{control.name}: cannot read its state: {exc}") from exc
        return status, settings

    async def _restore_surely(self, saved: dict[str, SavedState], stopping: bool) -> None:
        """``_restore``, to its end even if the procedure is stopped (again) meanwhile, and
        bounded by ``plan.restore_s``.

        Why shielded: the first stop arrives in a stage, and the ``finally`` of ``run`` restores.
        But a second ``cancel`` (a second SIGTERM or Ctrl-C, the broker's shutdown cancelling
        what is left) would be thrown into the restore's awaits: the detectors not yet
        restored would be left in a fixed gain or pedestal mode, taking the next run's data
        with the wrong settings. So the restore runs in a task of its own, which a stop does
        not reach; the stop is remembered and raised once the restore has ended.

        Why bounded: a detector library that hangs would otherwise hold a stopping worker for
        ever. After ``restore_s`` the restore is given up; the detectors it did not finish keep
        their saved state on disk, and the next pedestal restores them (the thread of a call in
        flight is not interrupted: Python cannot, it ends by the control's own timeout).

        A stopped procedure ends with CancelledError even if the restore failed (it is
        logged): a stop stays a stop. Otherwise a failed or given-up restore is a PedestalError.
        """
        restoring, stopped = await through_stops(
            asyncio.wait_for(self._restore(saved), self.plan.restore_s),
            lambda: self.log.warning("stopped while restoring the detectors: restoring them first"),
        )
        stopping = stopping or stopped is not None
        error = restoring.exception()
        if isinstance(error, TimeoutError):
            error = PedestalError(
                f"the detector settings before the pedestal were not restored within "
                f"{self.plan.restore_s:g} s: check the detectors; the next pedestal of these "
                "detectors tries again"
            )
        if stopping:
            if error is not None:
                self.log.error("stopped, and %s", error)
            raise asyncio.CancelledError
        if error is not None:
            raise error

    async def _restore(self, saved: dict[str, SavedState]) -> None:
        """Bring every detector back; raises PedestalError naming those that failed."""
        failures = []
        for control in self.controls:
            state = saved.get(control.name)
            if state is None:
                continue
            try:
                await asyncio.to_thread(_restore_one, control, state, self.plan.pedestalmode)
                await asyncio.to_thread(self._saved_file(control).unlink, missing_ok=True)
                self.log.info("%s: settings restored %s", control.name, state.settings.to_json())
            except DetectorControlError as exc:
                self.log.error("%s: settings NOT restored: %s", control.name, exc)
                failures.append(f"{control.name}: {exc}")
        if failures:
            raise PedestalError(
                "the detector settings before the pedestal could not be restored ("
                + "; ".join(failures)
                + "): check the detectors; the next pedestal of these detectors tries again"
            )


def _restore_one(control: DetectorControl, state: SavedState, pedestalmode: bool) -> None:
    if pedestalmode or state.pedestal_mode is not None:
        control.stop()
        if state.pedestal_mode is None:
            control.disable_pedestal_mode()
        else:
            control.enable_pedestal_mode(state.pedestal_mode)
    if control.settings() != state.settings:
        control.apply_settings(state.settings)
    if state.running:
        control.start()
    else:
        control.stop()


def _read_saved(path: Path) -> SavedState | None:
    try:
        return SavedState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: the detector's present state is the best there is


def _write_saved(path: Path, state: SavedState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, dump_json(state.to_json()))
