"""Fault injection: the ways real buffers misbehave, switchable per test and from the CLI.

Each simulator owns one mutable faults object (``buffer.faults``, ``archiver.faults``,
``writer.faults``); a test sets a field, exercises the client, and expects the documented
behaviour. Which pulses a fault hits is a ``PulseSelection`` — explicit pulse ids and/or every
k-th pulse — so a test knows exactly which pulses to expect missing or doubled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

#: Key of a per-channel fault that applies to every channel.
ALL = "*"


@dataclass(frozen=True)
class PulseSelection:
    """Pulse ids ``pulses`` plus every pulse with ``pid % every == phase`` (``every`` > 0)."""

    pulses: frozenset[int] = frozenset()
    every: int = 0
    phase: int = 0

    def mask(self, pids: ArrayLike) -> np.ndarray:
        """Boolean mask: which of ``pids`` are selected."""
        array = np.atleast_1d(np.asarray(pids, dtype=np.int64))
        selected = np.zeros(array.shape, dtype=bool)
        if self.every > 0:
            selected |= array % self.every == self.phase % self.every
        if self.pulses:
            selected |= np.isin(array, np.fromiter(self.pulses, dtype=np.int64))
        return selected

    def __contains__(self, pid: int) -> bool:
        return bool(self.mask([pid])[0])

    @classmethod
    def of(cls, *pulses: int) -> PulseSelection:
        return cls(pulses=frozenset(pulses))


def _reset(faults: object) -> None:
    """Set every field of a faults dataclass back to its default."""
    vars(faults).update(vars(type(faults)()))


def _selection_for(table: dict[str, PulseSelection], key: str) -> PulseSelection | None:
    return table.get(key, table.get(ALL))


@dataclass
class Api1Faults:
    """Faults of a data or image buffer (api/1 server).

    - ``gaps[channel]``: pulses never delivered (``"*"`` = every channel);
    - ``duplicates[channel]``: pulses delivered twice in a row;
    - ``out_of_order[channel]``: pulses delivered after all the channel's other events;
    - ``missing_channels``: channels answered as unknown, as a name-only header
      (``missing_style="name_only"``, older servers) or not at all (``"absent"``);
    - ``http_errors``: the next n queries answer ``http_error_status`` with a JSON body;
    - ``cut_after_bytes``: the next reply stops after that many body bytes, by closing the
      connection (``cut_mode="abort"``) or by ending the HTTP body cleanly (``"eof"``);
      ``cut_count`` replies are cut (then the field resets itself);
    - ``reply_delay``: seconds before each reply starts; ``batch_delay``: seconds between
      the reply's writes (a slow stream);
    - ``failed_status``: the next n requests report ``errors`` in their requestStatus.
    """

    gaps: dict[str, PulseSelection] = field(default_factory=dict)
    duplicates: dict[str, PulseSelection] = field(default_factory=dict)
    out_of_order: dict[str, PulseSelection] = field(default_factory=dict)
    missing_channels: set[str] = field(default_factory=set)
    missing_style: Literal["absent", "name_only"] = "absent"
    http_errors: int = 0
    http_error_status: int = 500
    cut_after_bytes: int | None = None
    cut_mode: Literal["abort", "eof"] = "abort"
    cut_count: int = 1
    reply_delay: float = 0.0
    batch_delay: float = 0.0
    failed_status: int = 0

    def gaps_for(self, channel: str) -> PulseSelection | None:
        return _selection_for(self.gaps, channel)

    def duplicates_for(self, channel: str) -> PulseSelection | None:
        return _selection_for(self.duplicates, channel)

    def out_of_order_for(self, channel: str) -> PulseSelection | None:
        return _selection_for(self.out_of_order, channel)

    def take_http_error(self) -> int | None:
        """The status to answer this query with, counting the injected error down."""
        if self.http_errors <= 0:
            return None
        self.http_errors -= 1
        return self.http_error_status

    def take_cut(self) -> tuple[int, Literal["abort", "eof"]] | None:
        """Where and how to cut this reply, counting the injected cut down."""
        if self.cut_after_bytes is None or self.cut_count <= 0:
            return None
        cut = (self.cut_after_bytes, self.cut_mode)
        self.cut_count -= 1
        if self.cut_count == 0:
            self.cut_after_bytes = None
            self.cut_count = 1
        return cut

    def take_failed_status(self) -> bool:
        if self.failed_status <= 0:
            return False
        self.failed_status -= 1
        return True

    def clear(self) -> None:
        """Back to a well-behaved buffer."""
        _reset(self)


@dataclass
class ArchiverFaults:
    """Faults of the archiver: unknown PVs, HTTP errors for the next n queries, slow replies."""

    missing_pvs: set[str] = field(default_factory=set)
    http_errors: int = 0
    http_error_status: int = 500
    reply_delay: float = 0.0

    def take_http_error(self) -> int | None:
        if self.http_errors <= 0:
            return None
        self.http_errors -= 1
        return self.http_error_status

    def clear(self) -> None:
        _reset(self)


ModuleKey = tuple[str, int]


@dataclass
class JungfrauFaults:
    """Faults of the Jungfrau buffer writer, per module ``(detector, module index)``.

    - ``missing_modules``: modules that write nothing (no records, LATEST goes stale);
    - ``dropped_frames[module]``: pulses whose record is never written (slot stays zero);
    - ``incomplete_frames[module]``: pulses written with ``lost_packets`` packets missing:
      ``n_recv_packets = 128 - lost_packets`` and the lost packets' rows zero
      (one packet = 4 rows). ``("*", -1)`` as key applies to every module.
    - ``event_bits[bit]``: pulses whose ``daq_rec`` has that bit set in every module (the
      timing system's event flags: 16 laser, 17 darkshot, 18 FEL, 19 pulse picker).
    Files aged out of retention: ``JungfrauBufferWriter.age_out(before_pid)``.
    """

    missing_modules: set[ModuleKey] = field(default_factory=set)
    dropped_frames: dict[ModuleKey, PulseSelection] = field(default_factory=dict)
    incomplete_frames: dict[ModuleKey, PulseSelection] = field(default_factory=dict)
    lost_packets: int = 3
    event_bits: dict[int, PulseSelection] = field(default_factory=dict)

    def event_bits_for(self, pid: int) -> int:
        """The ``daq_rec`` event bits of pulse ``pid``."""
        return sum(1 << bit for bit, pulses in self.event_bits.items() if pid in pulses)

    def dropped_for(self, module: ModuleKey) -> PulseSelection | None:
        return self.dropped_frames.get(module, self.dropped_frames.get((ALL, -1)))

    def incomplete_for(self, module: ModuleKey) -> PulseSelection | None:
        return self.incomplete_frames.get(module, self.incomplete_frames.get((ALL, -1)))

    def clear(self) -> None:
        _reset(self)
