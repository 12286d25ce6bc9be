"""A retrieval request: every rule of SPEC §3, and the normalised form that is kept.

Validation is written out rule by rule rather than generated from a schema, because each rule
has a message that names the key and says what to do: a beamline user reads it at 3 a.m. and
must be able to fix the request without a manual. This module does no I/O; the rules that need
the file system (pgroup exists, paths stay inside raw/, closed pgroup) live in bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from sf_daq_broker.bookkeeping.paths import check_pgroup_name
from sf_daq_broker.config import DETECTOR_NAME
from sf_daq_broker.errors import BadRequest, Forbidden
from sf_daq_broker.run_options import RunOptions, parse_run_options

RATE_MULTIPLICATORS = (1, 2, 4, 8, 10, 20, 40, 50, 100)
CAMERA_SUFFIX = ":FPICTURE"
LIST_KEYS = ("channels_list", "camera_list", "pv_list")
_INTEGER_STRING = re.compile(r"^\s*[+-]?\d+\s*$")


@dataclass(frozen=True)
class DetectorOptions:
    """Per-detector options of SPEC §5.4, with their defaults."""

    adc_to_energy: bool = True
    compression: bool = True
    mask: bool = True
    mask_double_pixels: bool = True
    geometry: bool = False
    gap_pixels: bool = True
    factor: float | None = None
    disabled_modules: tuple[int, ...] = ()
    keep_raw: bool = False

    def to_json(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["disabled_modules"] = list(self.disabled_modules)
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> DetectorOptions:
        values = dict(document)
        values["disabled_modules"] = tuple(values.get("disabled_modules", ()))
        return cls(**values)


_BOOL_OPTIONS = tuple(
    f.name for f in dataclasses.fields(DetectorOptions) if f.type in ("bool", bool)
)
_KNOWN_OPTIONS = tuple(f.name for f in dataclasses.fields(DetectorOptions))


@dataclass(frozen=True)
class RetrieveRequest:
    """A validated request. ``record`` is the normalised body kept in the bookkeeping JSON."""

    pgroup: str
    start_pulseid: int
    stop_pulseid: int
    rate_multiplicator: int = 1
    directory_name: str | None = None
    channels: tuple[str, ...] = ()
    cameras: tuple[str, ...] = ()
    pvs: tuple[str, ...] = ()
    detectors: dict[str, DetectorOptions] = field(default_factory=dict)
    scan_info: dict[str, Any] | None = None
    run_number: int | None = None
    record: dict[str, Any] = field(default_factory=dict)
    #: user_tag / append_user_tag_to_data_dir / run_log_level (run_options.py)
    run_options: RunOptions = field(default_factory=RunOptions)

    @property
    def scan_name(self) -> str | None:
        if self.scan_info is None:
            return None
        name = self.scan_info.get("scan_name")
        return name if isinstance(name, str) else None

    def channel_range(self) -> tuple[int, int]:
        """Pulse range of the channel, camera and PV jobs, widened to keep the edge beam pulses."""
        rate = self.rate_multiplicator
        start = self.start_pulseid - 1 if self.start_pulseid % rate == 0 else self.start_pulseid
        stop = self.stop_pulseid + 1 if self.stop_pulseid % rate == 0 else self.stop_pulseid
        return max(start, 0), stop

    def detector_range(self) -> tuple[int, int] | None:
        """First and last beam pulse (multiple of the rate) inside the range; None if none."""
        return beam_pulse_bounds(self.start_pulseid, self.stop_pulseid, self.rate_multiplicator)


def beam_pulse_bounds(start: int, stop: int, rate: int) -> tuple[int, int] | None:
    first = -(-start // rate) * rate
    last = stop // rate * rate
    return (first, last) if first <= last else None


def parse_integer(value: Any, key: str) -> int:
    """An integer, or a string or float holding one; bools, null and fractions are refused."""
    if isinstance(value, bool) or value is None:
        raise BadRequest(f"{key} must be an integer, got {_show(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER_STRING.match(value):
        return int(value)
    raise BadRequest(f"{key} must be an integer, got {_show(value)}")


def _show(value: Any) -> str:
    """A value as the client wrote it in JSON, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _parse_name_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{key} must be a list of strings, got {_show(value)}")
    names: dict[str, None] = {}
    for index, entry in enumerate(value):
        if not isinstance(entry, str) or not entry.strip():
            raise BadRequest(f"{key}[{index}] must be a non-empty string, got {_show(entry)}")
        if key == "channels_list" and entry.endswith(CAMERA_SUFFIX):
            raise BadRequest(
                f"channels_list[{index}] {entry!r} is a camera image: put it in camera_list"
            )
        if key == "camera_list" and not entry.endswith(CAMERA_SUFFIX):
            raise BadRequest(
                f"camera_list[{index}] {entry!r} is not a camera image (camera names end with "
                f"{CAMERA_SUFFIX}): put it in channels_list"
            )
        names.setdefault(entry, None)  # keeps the first occurrence, in order
    return list(names)


def module_count(detector: str) -> int:
    """Number of modules, from the name JFxxTyyVzz (yy)."""
    match = DETECTOR_NAME.match(detector)
    if match is None:
        raise ValueError(f"{detector!r} is not a Jungfrau detector name")
    return int(match.group(2))


def parse_detector_options(detector: str, value: Any) -> DetectorOptions:
    key = f"detectors.{detector}"
    if value is None:
        return DetectorOptions()
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be an object of options, got {_show(value)}")
    unknown = [name for name in value if name not in _KNOWN_OPTIONS]
    if unknown:
        raise BadRequest(
            f"{key}: unknown option {unknown[0]!r} (known options: {', '.join(_KNOWN_OPTIONS)})"
        )
    options: dict[str, Any] = {}
    for name in _BOOL_OPTIONS:
        if name in value:
            if not isinstance(value[name], bool):
                raise BadRequest(f"{key}.{name} must be true or false, got {_show(value[name])}")
            options[name] = value[name]
    if value.get("factor") is not None:
        factor = value["factor"]
        if (
            isinstance(factor, bool)
            or not isinstance(factor, int | float)
            or not math.isfinite(factor)
            or factor <= 0
        ):
            raise BadRequest(f"{key}.factor must be a positive number or null, got {_show(factor)}")
        options["factor"] = float(factor)
    if value.get("disabled_modules") is not None:
        options["disabled_modules"] = _parse_disabled_modules(
            detector, value["disabled_modules"], f"{key}.disabled_modules"
        )
    return DetectorOptions(**options)


def _parse_disabled_modules(detector: str, value: Any, key: str) -> tuple[int, ...]:
    n_modules = module_count(detector)
    if not isinstance(value, list):
        raise BadRequest(f"{key} must be a list of module indices, got {_show(value)}")
    modules: list[int] = []
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise BadRequest(f"{key} must hold integers, got {_show(entry)}")
        if not 0 <= entry < n_modules:
            raise BadRequest(
                f"{key}: module {entry} does not exist ({detector} has modules 0..{n_modules - 1})"
            )
        if entry not in modules:
            modules.append(entry)
    if len(modules) == n_modules:
        raise BadRequest(f"{key} disables every module of {detector}: nothing would be written")
    return tuple(sorted(modules))


def _parse_detectors(
    body: dict[str, Any], allowed_detectors: list[str], beamline: str
) -> dict[str, DetectorOptions]:
    value = body.get("detectors")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(
            f"detectors must be an object mapping detector names to options, got {_show(value)}"
        )
    detectors: dict[str, DetectorOptions] = {}
    for name, options in value.items():
        if not DETECTOR_NAME.match(name):
            raise BadRequest(
                f"detectors: {name!r} is not a Jungfrau detector name (JFxxTyyVzz, e.g. JF07T32V01)"
            )
        if name not in allowed_detectors:
            raise Forbidden(
                f"detectors: {name} is not allowed for beamline {beamline} "
                f"(allowed: {', '.join(allowed_detectors) or 'none'})"
            )
        detectors[name] = parse_detector_options(name, options)
    return detectors


def parse_retrieve_request(
    body: Any,
    *,
    beamline: str,
    allowed_detectors: list[str],
    max_pulse_range: int,
) -> RetrieveRequest:
    """Check a ``/retrieve_from_buffers`` body against every rule that needs no file system.

    Path keys (``directory_name``, ``scan_info.scan_name``) are only type-checked here; they
    are resolved against the pgroup's raw directory by the bookkeeping.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key in ("pgroup", "start_pulseid", "stop_pulseid"):
        if key not in body:
            raise BadRequest(
                f"{key} is missing (pgroup, start_pulseid and stop_pulseid are mandatory)"
            )
    pgroup = check_pgroup_name(body["pgroup"])
    start = parse_integer(body["start_pulseid"], "start_pulseid")
    stop = parse_integer(body["stop_pulseid"], "stop_pulseid")
    if start < 0:
        raise BadRequest(f"start_pulseid must not be negative, got {start}")
    if stop < start:
        raise BadRequest(f"stop_pulseid {stop} is before start_pulseid {start}")
    if stop - start > max_pulse_range:
        raise BadRequest(
            f"the range stop_pulseid - start_pulseid = {stop - start} pulses is longer than "
            f"the limit of {max_pulse_range} pulses"
        )

    rate = 1
    if body.get("rate_multiplicator") is not None:
        rate = parse_integer(body["rate_multiplicator"], "rate_multiplicator")
        if rate not in RATE_MULTIPLICATORS:
            raise BadRequest(
                f"rate_multiplicator must be one of {', '.join(map(str, RATE_MULTIPLICATORS))}, "
                f"got {rate}"
            )

    lists = {key: _parse_name_list(body, key) for key in LIST_KEYS}
    detectors = _parse_detectors(body, allowed_detectors, beamline)
    if not any(lists.values()) and not detectors:
        raise BadRequest(
            "nothing to retrieve: channels_list, camera_list, pv_list and detectors are all empty"
        )
    if detectors and beam_pulse_bounds(start, stop, rate) is None:
        raise BadRequest(
            f"no beam pulse in [{start}, {stop}] at rate_multiplicator {rate}: detectors need "
            f"at least one pulse id that is a multiple of {rate}"
        )

    directory_name = body.get("directory_name")
    if directory_name == "":
        directory_name = None
    if directory_name is not None and not isinstance(directory_name, str):
        raise BadRequest(f"directory_name must be a string, got {_show(directory_name)}")

    scan_info = body.get("scan_info")
    if scan_info is not None:
        if not isinstance(scan_info, dict):
            raise BadRequest(f"scan_info must be an object, got {_show(scan_info)}")
        if "scan_name" in scan_info and not isinstance(scan_info["scan_name"], str):
            raise BadRequest(
                f"scan_info.scan_name must be a string, got {_show(scan_info['scan_name'])}"
            )

    run_options = parse_run_options(body)

    run_number = None
    if body.get("run_number") is not None:
        run_number = parse_integer(body["run_number"], "run_number")
        if run_number < 1:
            raise BadRequest(f"run_number must be a positive integer, got {run_number}")

    record = dict(body)
    record.update(start_pulseid=start, stop_pulseid=stop)
    if "rate_multiplicator" in body:
        record["rate_multiplicator"] = rate
    for key, names in lists.items():
        if key in body:
            record[key] = names
    if run_number is not None:
        record["run_number"] = run_number
    return RetrieveRequest(
        pgroup=pgroup,
        start_pulseid=start,
        stop_pulseid=stop,
        rate_multiplicator=rate,
        directory_name=directory_name,
        channels=tuple(lists["channels_list"]),
        cameras=tuple(lists["camera_list"]),
        pvs=tuple(lists["pv_list"]),
        detectors=detectors,
        scan_info=scan_info,
        run_number=run_number,
        record=record,
        run_options=run_options,
    )
