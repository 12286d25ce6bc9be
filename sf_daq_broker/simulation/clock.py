"""The simulated machine's pulse clock: 100 Hz pulse ids and their global timestamps.

Timestamps follow what real data shows (BUFFERS.md §1): the millisecond part advances 10 ms per
pulse and the sub-millisecond part is ``pid % 1_000_000`` ns,
``ts_ns(pid) = T0_ms*1_000_000 + (pid - P0)*10_000_000 + pid % 1_000_000``.
Two clocks share that timing: ``WallClock`` advances with real time (``sf-daq-broker
simulate``), ``ManualClock`` only when a test says so, so tests never wait and never race.
Every simulator asks its clock for the newest pulse at the moment it needs it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

PULSE_PERIOD_NS = 10_000_000
PULSE_RATE_HZ = 100
#: Default first pulse id of a simulation: the magnitude real pulse ids had around 2022.
DEFAULT_START_PULSE_ID = 15_000_000_000


@dataclass(frozen=True)
class PulseTiming:
    """Pulse id ↔ timestamp of a machine whose pulse ``p0`` happened at ``t0_ms``."""

    p0: int
    t0_ms: int

    def ts_ns(self, pid: int) -> int:
        """Global timestamp of pulse ``pid`` in ns since the epoch."""
        return self.t0_ms * 1_000_000 + (pid - self.p0) * PULSE_PERIOD_NS + pid % 1_000_000

    def ts_ns_array(self, pids: np.ndarray) -> np.ndarray:
        """``ts_ns`` of many pulse ids at once (int64)."""
        pids = np.asarray(pids, dtype=np.int64)
        offset: np.ndarray = (pids - self.p0) * PULSE_PERIOD_NS + pids % 1_000_000
        ts: np.ndarray = self.t0_ms * 1_000_000 + offset
        return ts

    def first_pulse_at_or_after(self, ns: int) -> int:
        """The smallest pulse id whose timestamp is ``>= ns`` (timestamps strictly increase)."""
        pid = self.p0 + (ns - self.t0_ms * 1_000_000) // PULSE_PERIOD_NS
        while self.ts_ns(pid) < ns:
            pid += 1
        while self.ts_ns(pid - 1) >= ns:
            pid -= 1
        return pid

    def pulses_in(self, start_ns: int, end_ns: int) -> range:
        """Pulse ids with ``start_ns <= ts < end_ns`` (the half-open api/1 range)."""
        return range(self.first_pulse_at_or_after(start_ns), self.first_pulse_at_or_after(end_ns))


class PulseClock(Protocol):
    """What the simulators need from a clock."""

    @property
    def timing(self) -> PulseTiming: ...

    @property
    def start_pulse_id(self) -> int: ...

    def current_pulse_id(self) -> int:
        """The newest pulse that has happened."""
        ...


class ManualClock:
    """A clock that stands still until told to move: ``advance_to(pid)`` or ``advance(n)``."""

    def __init__(self, start_pulse_id: int = DEFAULT_START_PULSE_ID, t0_ms: int | None = None):
        if t0_ms is None:
            t0_ms = time.time_ns() // 1_000_000
        self.timing = PulseTiming(start_pulse_id, t0_ms)
        self.start_pulse_id = start_pulse_id
        self._current = start_pulse_id
        self._lock = threading.Lock()

    def current_pulse_id(self) -> int:
        return self._current

    def advance_to(self, pid: int) -> None:
        """Make ``pid`` the newest pulse; a clock never goes back."""
        with self._lock:
            if pid < self._current:
                raise ValueError(f"the clock is at {self._current}, cannot go back to {pid}")
            self._current = pid

    def advance(self, pulses: int = 1) -> int:
        """Move ``pulses`` pulses forward; returns the new current pulse id."""
        with self._lock:
            if pulses < 0:
                raise ValueError("a clock never goes back")
            self._current += pulses
            return self._current


class WallClock:
    """A clock driven by real time: pulse ``start_pulse_id`` happened at ``t0_ms``.

    ``speed`` > 1 makes the pulses come that many times faster than 100 Hz (tests that wait
    for a buffer file to close); the timestamps stay 10 ms apart, so pulses then have
    timestamps ahead of the wall clock.
    """

    def __init__(
        self,
        start_pulse_id: int = DEFAULT_START_PULSE_ID,
        t0_ms: int | None = None,
        *,
        speed: float = 1.0,
    ):
        if t0_ms is None:
            t0_ms = time.time_ns() // 1_000_000
        self.timing = PulseTiming(start_pulse_id, t0_ms)
        self.start_pulse_id = start_pulse_id
        self.speed = speed

    def current_pulse_id(self) -> int:
        elapsed_ns = time.time_ns() - self.timing.t0_ms * 1_000_000
        return self.start_pulse_id + max(0, int(elapsed_ns * self.speed) // PULSE_PERIOD_NS)
