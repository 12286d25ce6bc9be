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
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sf_daq_broker.bookkeeping.paths import check_pgroup_name
from sf_daq_broker.config import DETECTOR_NAME, PULSE_ID_LIMIT
from sf_daq_broker.errors import BadRequest, Forbidden
from sf_daq_broker.jungfrau.errors import ConversionError
from sf_daq_broker.jungfrau.options import (
    DOUBLE_PIXELS_ACTIONS,
    MODULE_EDGE_ACTIONS,
    ConversionOptions,
    Roi,
    check_options,
    roi_items,
)
from sf_daq_broker.run_options import RUN_OPTION_KEYS, RunOptions, parse_run_options
from sf_daq_broker.spelling import meant

RATE_MULTIPLICATORS = (1, 2, 4, 8, 10, 20, 40, 50, 100)
CAMERA_SUFFIX = ":FPICTURE"
LIST_KEYS = ("channels_list", "camera_list", "pv_list")
#: Every top-level key the broker interprets: THE list (add a new key here and a field to
#: api.models.RetrieveBody; tests/unit/test_openapi.py checks they agree). Other keys are kept
#: as the client's metadata, except one within a typo of a key here, which is refused.
REQUEST_KEYS: tuple[str, ...] = (
    "pgroup",
    "start_pulseid",
    "stop_pulseid",
    "rate_multiplicator",
    "directory_name",
    *LIST_KEYS,
    "detectors",
    "selected_pulse_ids",
    "scan_info",
    "run_number",
    *RUN_OPTION_KEYS,
)
_INTEGER_STRING = re.compile(r"^\s*[+-]?\d+\s*$")


@dataclass(frozen=True)
class DetectorOptions:
    """Per-detector options of SPEC §5.4 and of the facility's current broker (UPSTREAM_HEAD
    §2), with SPEC's defaults: the one definition the request validation and
    ``sf-daq-broker convert --options`` share. ``selected_pulse_ids`` is the request's key,
    copied into every detector's options (detectors alone honour it, as upstream)."""

    adc_to_energy: bool = True
    compression: bool = True
    mask: bool = True
    double_pixels_action: str = "mask"  # alias: mask_double_pixels (true = "mask")
    module_edge_pixels: str = "keep"
    geometry: bool = False
    gap_pixels: bool = True
    factor: float | None = None
    disabled_modules: tuple[int, ...] = ()
    roi: tuple[Roi, ...] = ()
    downsample: tuple[int, int] | None = None
    keep_raw: bool = False  # alias: remove_raw_files (true = keep_raw false)
    save_ppicker_events_only: bool = False
    crystfel_lists_laser: bool = False
    selected_pulse_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["disabled_modules"] = list(self.disabled_modules)
        document["roi"] = {label: list(box) for label, box in self.roi}
        document["downsample"] = list(self.downsample) if self.downsample else None
        document["selected_pulse_ids"] = list(self.selected_pulse_ids)
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> DetectorOptions:
        values = dict(document)
        if "mask_double_pixels" in values:  # a job queued by a broker before double_pixels
            flag = values.pop("mask_double_pixels")
            values.setdefault("double_pixels_action", "mask" if flag else "keep")
        values["disabled_modules"] = tuple(values.get("disabled_modules", ()))
        values["roi"] = roi_items(values.get("roi") or {})
        if values.get("downsample") is not None:
            values["downsample"] = tuple(values["downsample"])
        values["selected_pulse_ids"] = tuple(values.get("selected_pulse_ids", ()))
        return cls(**values)

    def conversion(self) -> ConversionOptions:
        """The options of the conversion itself (file-level choices left out)."""
        return ConversionOptions(
            adc_to_energy=self.adc_to_energy,
            mask=self.mask,
            double_pixels=self.double_pixels_action,
            module_edge_pixels=self.module_edge_pixels,
            geometry=self.geometry,
            gap_pixels=self.gap_pixels,
            factor=self.factor,
            disabled_modules=self.disabled_modules,
            roi=self.roi,
            downsample=self.downsample,
        )


#: Seed and upstream names of options, both booleans (see the fields' comments).
OPTION_ALIASES = ("mask_double_pixels", "remove_raw_files")
_BOOL_OPTIONS = (
    *(f.name for f in dataclasses.fields(DetectorOptions) if f.type in ("bool", bool)),
    *OPTION_ALIASES,
)
#: Keys of a detector's options object (``selected_pulse_ids`` belongs to the request): what
#: the parser accepts and the OpenAPI document lists.
DETECTOR_OPTION_KEYS = (
    *(f.name for f in dataclasses.fields(DetectorOptions) if f.name != "selected_pulse_ids"),
    *OPTION_ALIASES,
)
_CHOICES = {
    "double_pixels_action": DOUBLE_PIXELS_ACTIONS,
    "module_edge_pixels": MODULE_EDGE_ACTIONS,
}
_ROI_LABEL = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


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
        try:
            return int(value)
        except ValueError:  # more digits than Python converts (4300)
            pass
    raise BadRequest(f"{key} must be an integer, got {_show(value)}")


def parse_rate_multiplicator(body: dict[str, Any]) -> int:
    """The request's ``rate_multiplicator`` (default 1), one of the beam rates."""
    if body.get("rate_multiplicator") is None:
        return 1
    rate = parse_integer(body["rate_multiplicator"], "rate_multiplicator")
    if rate not in RATE_MULTIPLICATORS:
        raise BadRequest(
            f"rate_multiplicator must be one of {', '.join(map(str, RATE_MULTIPLICATORS))}, "
            f"got {rate}"
        )
    return rate


def check_pulse_id(value: int, key: str, bounds: tuple[int, int]) -> None:
    """A pulse id within the configured sanity bounds (at most what the buffers can hold)."""
    low, high = bounds
    if value > high:
        raise BadRequest(
            f"{key} must be at most {high} (the largest pulse id accepted), got {value}"
        )
    if value < low:
        raise BadRequest(
            f"{key} must be at least {low} (the smallest pulse id accepted), got {value}"
        )


def _show(value: Any) -> str:
    """A value as the client wrote it in JSON, for messages (a long one shortened)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:60]}... ({len(text)} characters)"


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
    unknown = [name for name in value if name not in DETECTOR_OPTION_KEYS]
    if unknown:
        known = ", ".join(DETECTOR_OPTION_KEYS)
        raise BadRequest(f"{key}: unknown option {unknown[0]!r} (known options: {known})")
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
    options.update(_parse_upstream_options(value, key))
    for alias in OPTION_ALIASES:
        options.pop(alias, None)
    parsed = DetectorOptions(**options)
    if parsed.adc_to_energy:  # otherwise the conversion options are ignored (SPEC §5.4)
        try:
            check_options(detector, parsed.conversion())
        except ConversionError as exc:
            raise BadRequest(f"{key}: {exc}") from None
    return parsed


def _parse_upstream_options(value: dict[str, Any], key: str) -> dict[str, Any]:
    """The options of UPSTREAM_HEAD §2 and the two aliases, each refusal naming its key."""
    options: dict[str, Any] = {}
    for name, choices in _CHOICES.items():
        if name in value:
            if value[name] not in choices:
                raise BadRequest(
                    f"{key}.{name} must be one of {', '.join(map(repr, choices))}, "
                    f"got {_show(value[name])}"
                )
            options[name] = value[name]
    if "mask_double_pixels" in value:
        masks = value["mask_double_pixels"]
        given = options.get("double_pixels_action")
        if given is not None and masks != (given == "mask"):
            raise BadRequest(
                f"{key}: mask_double_pixels {_show(masks)} contradicts "
                f"double_pixels_action {given!r} (give only one)"
            )
        options["double_pixels_action"] = given or ("mask" if masks else "keep")
    if "remove_raw_files" in value:
        if "keep_raw" in value and value["keep_raw"] == value["remove_raw_files"]:
            raise BadRequest(
                f"{key}: remove_raw_files {_show(value['remove_raw_files'])} contradicts "
                f"keep_raw {_show(value['keep_raw'])} (give only one)"
            )
        options["keep_raw"] = not value["remove_raw_files"]
    if value.get("roi") is not None:
        options["roi"] = _parse_roi(value["roi"], f"{key}.roi")
    if value.get("downsample") is not None:
        options["downsample"] = _parse_downsample(value["downsample"], f"{key}.downsample")
    return options


def _parse_roi(value: Any, key: str) -> tuple[Roi, ...]:
    """``{label: [y1, y2, x1, x2]}`` or a list of such lists (labels 0, 1, ...)."""
    if isinstance(value, list) and value and not isinstance(value[0], list):
        raise BadRequest(
            f"{key} must be an object of label: [y1, y2, x1, x2] or a list of such lists, got "
            f"{_show(value)} (one region is [[y1, y2, x1, x2]])"
        )
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [(str(index), box) for index, box in enumerate(value)]
    else:
        raise BadRequest(
            f"{key} must be an object of label: [y1, y2, x1, x2] or a list of such lists, "
            f"got {_show(value)}"
        )
    rois: list[Roi] = []
    for label, box in pairs:
        if not _ROI_LABEL.match(label):
            raise BadRequest(
                f"{key}: label {label!r} must be 1 to 64 letters, digits or _ . + - (it names "
                "an HDF5 group)"
            )
        if (
            not isinstance(box, list)
            or len(box) != 4
            or any(isinstance(v, bool) or not isinstance(v, int) for v in box)
        ):
            raise BadRequest(f"{key}.{label} must be [y1, y2, x1, x2] (4 integers), got {box!r}")
        y1, y2, x1, x2 = box
        rois.append((label, (y1, y2, x1, x2)))
    return tuple(rois)


def _parse_downsample(value: Any, key: str) -> tuple[int, int] | None:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise BadRequest(f"{key} must be [N, M] (two positive integers), got {_show(value)}")
    factors = (int(value[0]), int(value[1]))
    return None if factors == (1, 1) else factors


def parse_selected_pulse_ids(body: dict[str, Any]) -> tuple[int, ...]:
    """The request's ``selected_pulse_ids``: pulse ids whose detector frames are kept (ids
    outside the range are ignored, as upstream); empty or null = every frame."""
    value = body.get("selected_pulse_ids")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest(f"selected_pulse_ids must be a list of pulse ids, got {_show(value)}")
    ids = [parse_integer(entry, f"selected_pulse_ids[{i}]") for i, entry in enumerate(value)]
    negative = [pid for pid in ids if pid < 0]
    if negative:
        raise BadRequest(f"selected_pulse_ids must not be negative, got {negative[0]}")
    return tuple(sorted(set(ids)))


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
    body: dict[str, Any],
    allowed_detectors: list[str],
    beamline: str,
    known_detectors: Collection[str] | None = None,
) -> dict[str, DetectorOptions]:
    """The detectors' options, each with the request's ``selected_pulse_ids``."""
    selected = parse_selected_pulse_ids(body)
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
        if known_detectors is not None and name not in known_detectors:
            raise BadRequest(
                f"detectors: {name} is an unknown detector: no beamline has it "
                f"(allowed for {beamline}: {', '.join(allowed_detectors) or 'none'})"
            )
        if name not in allowed_detectors:
            raise Forbidden(
                f"detectors: {name} is not allowed for beamline {beamline} "
                f"(allowed: {', '.join(allowed_detectors) or 'none'})"
            )
        parsed = parse_detector_options(name, options)
        detectors[name] = dataclasses.replace(parsed, selected_pulse_ids=selected)
    return detectors


def _parse_scan_info(scan_info: Any) -> dict[str, Any] | None:
    """``scan_info`` needs a ``scan_name``: without one the step would be written nowhere."""
    if scan_info is None:
        return None
    if not isinstance(scan_info, dict):
        raise BadRequest(f"scan_info must be an object, got {_show(scan_info)}")
    if "scan_name" not in scan_info:
        raise BadRequest(
            "scan_info.scan_name is missing: the scan step is written to "
            "scan_info/{scan_name}.json, so a scan needs a name"
        )
    if not isinstance(scan_info["scan_name"], str):
        raise BadRequest(
            f"scan_info.scan_name must be a string, got {_show(scan_info['scan_name'])}"
        )
    return scan_info


def _refuse_misspelt_keys(body: dict[str, Any]) -> None:
    """A typo of a known key would be kept as metadata and its data silently not retrieved."""
    for key in body:
        intended = meant(str(key), REQUEST_KEYS)
        if intended is not None:
            raise BadRequest(f"unknown key {key!r}: did you mean {intended!r}?")


def _parse_range(
    body: dict[str, Any], max_pulse_range: int, pulse_id_bounds: tuple[int, int]
) -> tuple[int, int]:
    """``start_pulseid`` and ``stop_pulseid``: integers, in order, inside the bounds and the
    longest range a request may ask for."""
    start = parse_integer(body["start_pulseid"], "start_pulseid")
    stop = parse_integer(body["stop_pulseid"], "stop_pulseid")
    if start < 0:
        raise BadRequest(f"start_pulseid must not be negative, got {start}")
    check_pulse_id(start, "start_pulseid", pulse_id_bounds)
    check_pulse_id(stop, "stop_pulseid", pulse_id_bounds)
    if stop < start:
        raise BadRequest(f"stop_pulseid {stop} is before start_pulseid {start}")
    if stop - start > max_pulse_range:
        raise BadRequest(
            f"the range stop_pulseid - start_pulseid = {stop - start} pulses is longer than "
            f"the limit of {max_pulse_range} pulses"
        )
    return start, stop


def _parse_run_number(body: dict[str, Any]) -> int | None:
    """A run number the client chose (one it reserved), or None for the next one."""
    if body.get("run_number") is None:
        return None
    run_number = parse_integer(body["run_number"], "run_number")
    if run_number < 1:
        raise BadRequest(f"run_number must be a positive integer, got {run_number}")
    return run_number


def parse_retrieve_request(
    body: Any,
    *,
    beamline: str,
    allowed_detectors: list[str],
    max_pulse_range: int,
    pulse_id_bounds: tuple[int, int] = (0, PULSE_ID_LIMIT),
    known_detectors: Collection[str] | None = None,
) -> RetrieveRequest:
    """Check a ``/retrieve_from_buffers`` body against every rule that needs no file system.

    Path keys (``directory_name``, ``scan_info.scan_name``) are only type-checked here; they
    are resolved against the pgroup's raw directory by the bookkeeping. ``known_detectors``
    (every configured detector) tells an unknown detector from another beamline's.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _refuse_misspelt_keys(body)
    for key in ("pgroup", "start_pulseid", "stop_pulseid"):
        if key not in body:
            raise BadRequest(
                f"{key} is missing (pgroup, start_pulseid and stop_pulseid are mandatory)"
            )
    pgroup = check_pgroup_name(body["pgroup"])
    start, stop = _parse_range(body, max_pulse_range, pulse_id_bounds)

    rate = parse_rate_multiplicator(body)

    lists = {key: _parse_name_list(body, key) for key in LIST_KEYS}
    detectors = _parse_detectors(body, allowed_detectors, beamline, known_detectors)
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

    scan_info = _parse_scan_info(body.get("scan_info"))

    run_options = parse_run_options(body)

    run_number = _parse_run_number(body)

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
