"""The placement table: where each detector's modules sit in the output image.

The table is data (``configs/geometry.toml``, keyed by the detector name without version) so a
new detector needs a configuration entry, never a code change. ``SF_DAQ_GEOMETRY_FILE`` points
to another file. A malformed entry stops the conversion with a message naming file and key:
a wrong module count or a typo would otherwise silently place modules in the wrong spot.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sf_daq_broker.defaults import GEOMETRY_CONFIG, default_config
from sf_daq_broker.jungfrau.errors import GeometryConfigError

GEOMETRY_ENV = "SF_DAQ_GEOMETRY_FILE"
DEFAULT_GEOMETRY_FILE = default_config(GEOMETRY_CONFIG)

PIXEL_SENSOR = "pixel"
STRIP_SENSOR = "strip"

_BASE_NAME = re.compile(r"^JF\d\dT(\d\d)$")
_KEYS = {"origin_y", "origin_x", "mod_rot90", "det_rot90", "sensor"}


@dataclass(frozen=True)
class DetectorGeometry:
    """One detector's entry: module origins (gapped output frame), rotations, sensor type."""

    origin_y: tuple[int, ...]
    origin_x: tuple[int, ...]
    mod_rot90: tuple[int, ...]
    det_rot90: int = 0
    sensor: str = PIXEL_SENSOR

    @property
    def is_strip(self) -> bool:
        return self.sensor == STRIP_SENSOR


@dataclass(frozen=True)
class GeometryTable:
    path: Path
    entries: Mapping[str, DetectorGeometry]

    def lookup(self, base_name: str) -> DetectorGeometry | None:
        return self.entries.get(base_name)


def load_geometry_table(path: Path | str | None = None) -> GeometryTable:
    """Read and check a geometry file (default: ``$SF_DAQ_GEOMETRY_FILE``, else the shipped one)."""
    file = Path(path or os.environ.get(GEOMETRY_ENV) or DEFAULT_GEOMETRY_FILE)
    try:
        document = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GeometryConfigError(f"geometry file {file}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise GeometryConfigError(f"geometry file {file}: {exc}") from exc
    unknown = set(document) - {"detectors"}
    if unknown:
        raise GeometryConfigError(f"geometry file {file}: unknown key {sorted(unknown)[0]!r}")
    detectors = document.get("detectors", {})
    if not isinstance(detectors, dict):
        raise GeometryConfigError(f"geometry file {file}: 'detectors' must be a table")
    entries = {name: _parse_entry(file, name, entry) for name, entry in detectors.items()}
    return GeometryTable(path=file, entries=entries)


@functools.cache
def default_geometry_table() -> GeometryTable:
    """The table every converter uses unless given another; read once per process."""
    return load_geometry_table()


def _parse_entry(file: Path, name: str, entry: Any) -> DetectorGeometry:
    where = f"geometry file {file}: detectors.{name}"
    match = _BASE_NAME.match(name)
    if match is None:
        raise GeometryConfigError(f"{where}: name must look like JF06T04 (no version)")
    if not isinstance(entry, dict):
        raise GeometryConfigError(f"{where}: must be a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise GeometryConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    sensor = entry.get("sensor", PIXEL_SENSOR)
    if sensor not in (PIXEL_SENSOR, STRIP_SENSOR):
        raise GeometryConfigError(f"{where}.sensor: must be 'pixel' or 'strip', not {sensor!r}")
    det_rot90 = _quarter_turns(where + ".det_rot90", entry.get("det_rot90", 0))
    if sensor == STRIP_SENSOR and "origin_y" not in entry and "origin_x" not in entry:
        return DetectorGeometry((), (), (), det_rot90, sensor)
    n_modules = int(match.group(1))
    origin_y = _int_list(where + ".origin_y", entry.get("origin_y"), n_modules)
    origin_x = _int_list(where + ".origin_x", entry.get("origin_x"), n_modules)
    if any(value < 0 for value in origin_y + origin_x):
        raise GeometryConfigError(f"{where}: origins must not be negative")
    rotations = entry.get("mod_rot90", [0] * n_modules)
    mod_rot90 = _int_list(where + ".mod_rot90", rotations, n_modules)
    for value in mod_rot90:
        _quarter_turns(where + ".mod_rot90", value)
    return DetectorGeometry(origin_y, origin_x, mod_rot90, det_rot90, sensor)


def _int_list(where: str, value: Any, length: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise GeometryConfigError(f"{where}: must be a list of {length} integers")
    if len(value) != length:
        raise GeometryConfigError(
            f"{where}: has {len(value)} entries, the detector has {length} modules"
        )
    return tuple(value)


def _quarter_turns(where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 3:
        raise GeometryConfigError(f"{where}: must be 0, 1, 2 or 3 quarter turns, not {value!r}")
    return value
