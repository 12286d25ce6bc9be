"""What the demo asks for: a retrieval request built from the simulation and the workers there are.

The request mixes channels of different types, shapes and rates, cameras, PVs and detectors,
picked from the simulation's configuration, so the one run shows every kind of file. A kind of
source is requested only when a worker for it is registered (``workers.cli.SOURCE_CLASSES``):
a request for a source nobody serves would wait forever and make the demo fail for a reason
that is not a fault. What is left out is said in the report, and the demo covers a new source
as soon as its worker is registered, with no change here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sf_daq_broker.buffers import jungfrau_format
from sf_daq_broker.demo import (
    DEFAULT_CAMERAS,
    DEFAULT_CHANNELS,
    DEFAULT_DETECTORS,
    DEFAULT_PULSES,
    DEFAULT_PVS,
    DEFAULT_RATE_MULTIPLICATOR,
)
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.simulation.config import SimulationConfig

#: The first pulse requested lies this many pulses after the simulation's first pulse: the
#: channel jobs may widen the range by one pulse before ``start`` (SPEC §3), which must exist.
START_OFFSET = jungfrau_format.PULSES_PER_FILE
#: Pulses the clock is ahead of ``stop`` at start-up, beyond the end of ``stop``'s Jungfrau
#: buffer file: LATEST names a file only once it is closed, and the run should not wait for it.
CLOCK_LEAD = 100

T = TypeVar("T")


@dataclass(frozen=True)
class Content:
    """How much of each kind the run asks for (the demo's options)."""

    pulses: int = DEFAULT_PULSES
    rate_multiplicator: int = DEFAULT_RATE_MULTIPLICATOR
    channels: int = DEFAULT_CHANNELS
    cameras: int = DEFAULT_CAMERAS
    pvs: int = DEFAULT_PVS
    detectors: tuple[str, ...] = DEFAULT_DETECTORS


@dataclass(frozen=True)
class PulseRange:
    """The run's pulses, and where the simulated clock stands when the demo starts."""

    first_pulse_id: int  # the simulation's first pulse
    start: int
    stop: int
    clock_at_start: int  # the clock's pulse at start-up: the range is history by then

    @classmethod
    def for_run(cls, first_pulse_id: int, pulses: int) -> PulseRange:
        """A range of ``pulses`` pulses the buffers hold completely from the first moment.

        A run is defined after the fact: the demo starts its clock in the past, so the range
        is already in every buffer (and in a closed Jungfrau file) when the request arrives.
        """
        start = first_pulse_id + START_OFFSET
        stop = start + pulses - 1
        stop_file_end = jungfrau_format.file_first_pulse(stop) + jungfrau_format.PULSES_PER_FILE
        return cls(first_pulse_id, start, stop, stop_file_end + CLOCK_LEAD)

    def beam_pulses(self, rate: int) -> list[int]:
        first = -(-self.start // rate) * rate
        return list(range(first, self.stop + 1, rate))


@dataclass
class Plan:
    """The request the demo sends, and what it left out and why."""

    request: dict[str, Any]
    left_out: list[str] = field(default_factory=list)

    @property
    def detectors(self) -> list[str]:
        return list(self.request.get("detectors", {}))

    def summary(self) -> str:
        """One line: how many of each kind are requested."""
        parts = []
        for key, word in (
            ("channels_list", "channel"),
            ("camera_list", "camera"),
            ("pv_list", "PV"),
            ("detectors", "detector"),
        ):
            count = len(self.request.get(key, ()))
            if count:
                parts.append(f"{count} {word}{'s' if count > 1 else ''}")
        return ", ".join(parts) or "nothing"


def pick_diverse(
    items: Sequence[T], count: int, features: Callable[[T], tuple[Any, ...]]
) -> list[T]:
    """``count`` items, each time the one adding most features not seen yet (ties: file order).

    So a handful of channels shows different types, shapes, rates and compressions instead of
    the first few lines of the configuration.
    """
    chosen: list[T] = []
    seen: set[tuple[int, Any]] = set()
    remaining = list(items)
    while remaining and len(chosen) < count:

        def new_features(item: T) -> int:
            return sum((i, f) not in seen for i, f in enumerate(features(item)))

        best = max(remaining, key=new_features)  # max keeps the first of equals
        chosen.append(best)
        remaining.remove(best)
        seen.update(enumerate(features(best)))
    return chosen


def build_plan(
    config: SimulationConfig,
    content: Content,
    registered: Collection[SourceKind],
    pgroup: str,
    pulses: PulseRange,
    directory_name: str | None = None,
    why_not: Mapping[SourceKind, str] | None = None,
) -> Plan:
    """The retrieval request of the demo run, restricted to sources a worker serves
    (``registered``); ``why_not`` says why a kind has no worker."""
    request: dict[str, Any] = {
        "pgroup": pgroup,
        "start_pulseid": pulses.start,
        "stop_pulseid": pulses.stop,
        "rate_multiplicator": content.rate_multiplicator,
    }
    if directory_name:
        request["directory_name"] = directory_name
    left_out: list[str] = []
    # Only channels with an event at every beam pulse: a 50 Hz channel in a 100 Hz run misses
    # half of the beam pulses, and the consistency check rightly says so.
    rate = content.rate_multiplicator

    def wanted(kind: SourceKind, count: int, what: str) -> bool:
        if count <= 0:
            return False
        if kind not in registered:
            reason = (why_not or {}).get(kind, f"no {kind.value} worker is registered yet")
            left_out.append(f"{what}: {reason}")
            return False
        return True

    if wanted(SourceKind.DATABUFFER, content.channels, "channels"):
        channels = pick_diverse(
            [c for c in config.databuffer.channels if rate % c.rate_divisor == 0],
            content.channels,
            lambda c: (c.type, c.rate_divisor, len(c.shape), c.compression),
        )
        request["channels_list"] = [c.name for c in channels]
    if wanted(SourceKind.IMAGEBUFFER, content.cameras, "cameras"):
        cameras = pick_diverse(
            [c for c in config.imagebuffer.channels if rate % c.rate_divisor == 0],
            content.cameras,
            lambda c: (c.rate_divisor, c.shape),
        )
        request["camera_list"] = [c.name for c in cameras]
    if wanted(SourceKind.ARCHIVER, content.pvs, "PVs"):
        pvs = pick_diverse(config.archiver.pvs, content.pvs, lambda p: (p.type, len(p.shape)))
        request["pv_list"] = [p.name for p in pvs]
    if wanted(SourceKind.DETECTOR, len(content.detectors), "detectors"):
        # Conversion on (the default), said explicitly: the demo shows the converted layout.
        request["detectors"] = {
            name: {"adc_to_energy": True, "compression": True} for name in content.detectors
        }
    for key, what in (
        ("channels_list", "channels"),
        ("camera_list", "cameras"),
        ("pv_list", "PVs"),
    ):
        if key in request and not request[key]:
            del request[key]
            left_out.append(f"{what}: the simulation has none with an event at every beam pulse")
    return Plan(request, left_out)
