"""Simulated archiver (EPICS PVs): ``POST /query`` of BUFFERS.md §3.

A PV changes every ``period_s`` seconds, at the times ``t_k = k*period_ns + phase_ns`` (ns since
the epoch, any integer k) with ``phase_ns = name_seed(name) % period_ns`` — so PVs change at
different instants and their ``globalSeconds`` carry real nanosecond digits. Its value after
change k is ``expected_pv_value(spec, k)``, a pure function of (PV, k):

- float types: ``((h >> 40) - 2**23) / 256`` (exact in float32 and float64),
- integer types: ``h % 2_000_001 - 1_000_000``,
- string: ``f"{STATES[h % 4]} #{k}"`` (one state is non-ASCII),
- waveform ``[n]``: element i from ``h(i)`` as for floats,

with ``h(i) = hash_grid(name_seed(name), k, n)[i]``. The archiver knows changes up to the
clock's current pulse time; it keeps them forever. A query returns the changes inside
``[startSeconds, endSeconds]`` (end excluded unless ``endInclusive``), plus the last change
before the start when ``startExpansion`` is set, one list element per known PV.

With a PV list directory (``pv_list_dir``: the EPICS buffer's ``sf.{beamline}.epics_buffer.json``
files that ``/set_pvlist`` writes) the archiver records exactly the PVs those files list —
re-read whenever one changes; a listed PV without a configured spec is a float64 changing
every 5 s — and answers no other PV.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sf_daq_broker.buffers.dates import global_seconds_to_ns, ns_to_global_seconds
from sf_daq_broker.simulation.clock import PulseClock
from sf_daq_broker.simulation.faults import ArchiverFaults
from sf_daq_broker.simulation.noise import hash_grid, name_seed

STATES = ("IN", "OUT", "MOVING", "Störung")
PV_TYPES = ("float64", "float32", "int64", "int32", "int16", "uint8", "string")
_FIELDS = ("globalSeconds", "value", "type", "shape")


class PvSpec(BaseModel):
    """One simulated PV: ``shape`` ``[]`` scalar or ``[n]`` waveform, a change every
    ``period_s`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: str = "float64"
    shape: tuple[int, ...] = ()
    period_s: float = Field(default=5.0, gt=0)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in PV_TYPES:
            raise ValueError(f"unknown PV type {value!r}; known: {', '.join(PV_TYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _scalar_or_waveform(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) > 1 or any(n < 1 for n in value):
            raise ValueError("shape is [] (scalar) or [n] (waveform)")
        return value

    @property
    def period_ns(self) -> int:
        return max(1, round(self.period_s * 1_000_000_000))

    @property
    def phase_ns(self) -> int:
        return name_seed(self.name) % self.period_ns


def pv_change_time(spec: PvSpec, k: int) -> int:
    """Time of change ``k`` in ns since the epoch."""
    return k * spec.period_ns + spec.phase_ns


def last_change_at_or_before(spec: PvSpec, ns: int) -> int:
    """The index k of the newest change with ``t_k <= ns``."""
    return (ns - spec.phase_ns) // spec.period_ns


def expected_pv_value(spec: PvSpec, k: int) -> Any:
    """The value after change ``k`` (float, int, str, or list of floats for a waveform)."""
    n = spec.shape[0] if spec.shape else 1
    h = hash_grid(name_seed(spec.name), [k], n)[0]
    if spec.type == "string":
        return f"{STATES[int(h[0] % 4)]} #{k}"
    if spec.type.startswith(("int", "uint")):
        ints = [int(v % 2_000_001) - 1_000_000 for v in h.tolist()]
        if spec.type == "uint8":
            ints = [v % 256 for v in ints]
        return ints if spec.shape else ints[0]
    floats = [((v >> 40) - 2**23) / 256.0 for v in h.tolist()]
    return floats if spec.shape else floats[0]


def pv_changes(
    spec: PvSpec,
    start_ns: int,
    end_ns: int,
    *,
    now_ns: int,
    start_expansion: bool = True,
    end_inclusive: bool = True,
) -> list[tuple[int, Any]]:
    """``(time_ns, value)`` of the changes a query for ``[start_ns, end_ns]`` returns."""
    newest = last_change_at_or_before(spec, now_ns)
    first = last_change_at_or_before(spec, start_ns - 1) + 1  # first with t >= start
    last = min(newest, last_change_at_or_before(spec, end_ns if end_inclusive else end_ns - 1))
    changes = list(range(first, last + 1))
    if start_expansion:
        changes.insert(0, min(first - 1, newest))  # the value in force at the start
    return [(pv_change_time(spec, k), expected_pv_value(spec, k)) for k in changes]


class PvListFiles:
    """The PVs listed in every ``sf.*.epics_buffer.json`` of a directory (re-read on change)."""

    PATTERN = "sf.*.epics_buffer.json"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._seen: dict[Path, float] = {}
        self._names: frozenset[str] = frozenset()

    def names(self) -> frozenset[str]:
        files = {path: path.stat().st_mtime for path in self.directory.glob(self.PATTERN)}
        if files != self._seen:
            names: set[str] = set()
            for path in files:
                try:
                    listed = json.loads(path.read_text(encoding="utf-8")).get("pv_list", [])
                except (OSError, ValueError, AttributeError):
                    continue  # being replaced, or not a PV list: the next query reads it again
                names.update(name for name in listed if isinstance(name, str))
            self._seen, self._names = files, frozenset(names)
        return self._names


class SimulatedArchiver:
    """The state behind the archiver server: PVs, clock, faults."""

    def __init__(
        self,
        pvs: Iterable[PvSpec],
        clock: PulseClock,
        *,
        max_changes: int = 100_000,
        pv_list_dir: Path | None = None,
    ):
        self.pvs: dict[str, PvSpec] = {spec.name: spec for spec in pvs}
        self.clock = clock
        self.max_changes = max_changes
        self.faults = ArchiverFaults()
        self.queries = 0
        self.pv_lists = PvListFiles(pv_list_dir) if pv_list_dir is not None else None

    def spec(self, name: str) -> PvSpec | None:
        """The PV the archiver records under ``name`` (None: it records no such PV)."""
        if self.pv_lists is None:
            return self.pvs.get(name)
        if name not in self.pv_lists.names():
            return None
        return self.pvs.get(name) or PvSpec(name=name)

    def now_ns(self) -> int:
        return self.clock.timing.ts_ns(self.clock.current_pulse_id())

    def answer(self, document: Any) -> list[dict[str, Any]]:
        """The reply to a query body (raises ValueError for a malformed one)."""
        if not isinstance(document, dict):
            raise ValueError("body must be a JSON object")
        query_range = document.get("range")
        names = document.get("channels")
        if not isinstance(query_range, dict) or not isinstance(names, list):
            raise ValueError("body needs 'range' (object) and 'channels' (list)")
        try:
            start_ns = global_seconds_to_ns(query_range["startSeconds"])
            end_ns = global_seconds_to_ns(query_range["endSeconds"])
        except (KeyError, ArithmeticError, ValueError) as exc:
            raise ValueError(f"range needs startSeconds and endSeconds ({exc!r})") from exc
        fields = document.get("fields") or list(_FIELDS)
        reply = []
        for name in names:
            spec = self.spec(name) if isinstance(name, str) else None
            if spec is None or name in self.faults.missing_pvs:
                continue
            if (end_ns - start_ns) // spec.period_ns > self.max_changes:
                raise ValueError(f"{name}: range holds too many changes")
            changes = pv_changes(
                spec,
                start_ns,
                end_ns,
                now_ns=self.now_ns(),
                start_expansion=bool(query_range.get("startExpansion", False)),
                end_inclusive=bool(query_range.get("endInclusive", False)),
            )
            sample_shape = list(spec.shape) or [1]
            data = []
            for time_ns, value in changes:
                sample = {
                    "globalSeconds": ns_to_global_seconds(time_ns),
                    "value": value,
                    "type": spec.type,
                    "shape": sample_shape,
                }
                data.append({key: sample[key] for key in fields if key in sample})
            reply.append(
                {"channel": {"name": name, "backend": "sf-archiverappliance"}, "data": data}
            )
        return reply


ARCHIVER_KEY = web.AppKey("archiver", SimulatedArchiver)


def create_archiver_app(archiver: SimulatedArchiver) -> web.Application:
    """The aiohttp application of the simulated archiver."""
    app = web.Application()
    app[ARCHIVER_KEY] = archiver
    app.add_routes([web.post("/query", _query)])
    return app


async def _query(request: web.Request) -> web.Response:
    archiver = request.app[ARCHIVER_KEY]
    archiver.queries += 1
    faults = archiver.faults
    if faults.reply_delay:
        await asyncio.sleep(faults.reply_delay)
    status = faults.take_http_error()
    if status is not None:
        return web.json_response({"error": "injected fault"}, status=status)
    try:
        document = json.loads(await request.text(), parse_float=Decimal)
        return web.json_response(archiver.answer(document))
    except ValueError as exc:  # includes JSONDecodeError
        return web.json_response({"error": str(exc)}, status=400)
