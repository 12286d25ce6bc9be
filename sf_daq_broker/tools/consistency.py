"""Is a run's output complete and sane? The checks behind ``check.py``.

Everything is judged from the run's bookkeeping JSON and the files, never from the broker, so a
user can check any run, old or new, from any machine that sees the file system. The expected
pulses are the beam pulses of the requested range (``pid % rate == 0``); rows outside them —
the channel files' widened edges, a 100 Hz channel at a reduced beam rate — do not count.

Problems are worded as the facility's original check.py worded them (users grep for them);
``found`` counts the expected beam pulses that are present, so "998 vs 1000" means two missing.

A detector file follows the run's options (UPSTREAM_HEAD §1-§2): with ``roi`` (and
``adc_to_energy``) it has one group ``data/<DET>:ROI_<label>`` per region and no full frame,
each checked on its own and its frames shaped by its region; with ``selected_pulse_ids`` it
holds only the selected pulses, so it is judged against those of the range, not the range;
with ``save_ppicker_events_only`` it holds only pulse-picker events, a number nobody can know
beforehand: every frame must carry the event, none is counted missing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - registers the bitshuffle filter camera and detector data need
import numpy as np
import numpy.typing as npt

from sf_daq_broker.bookkeeping.atomic import partial_files
from sf_daq_broker.bookkeeping.paths import PgroupDirs
from sf_daq_broker.errors import BadRequest
from sf_daq_broker.jobs import FILE_SUFFIX, SourceKind
from sf_daq_broker.jungfrau.events import PPICKER_BIT, has_bit
from sf_daq_broker.jungfrau.options import Roi, roi_items
from sf_daq_broker.retrieval import parse_selected_pulse_ids
from sf_daq_broker.workers.report import NameReport, beam_pulses

#: Timestamps are ns since the epoch; anything before SwissFEL's first beam is not one.
EARLIEST_TIMESTAMP_NS = 1_420_070_400 * 10**9  # 2015-01-01
#: Slack for clocks of other machines when judging "not in the future".
FUTURE_SLACK_NS = 86_400 * 10**9
DETECTOR_DATASETS = ("pulse_id", "data", "is_good_frame", "frame_index", "daq_rec")
PV_DATASETS = ("data", "pulse_id", "timestamp", "changed_in_interval")
CHANNEL_DATASETS = ("data", "pulse_id", "timestamp")


#: Where the pgroups are, for a run file that does not lie in its pgroup's ``run_info``.
DATA_ROOT_ENVIRONMENT = "SF_DAQ_DATA_ROOT"


class RunFileError(Exception):
    """The run JSON cannot be used; nothing else can be checked."""


@dataclass
class CheckResult:
    run_file: str
    problems: list[str] = field(default_factory=list)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    rate_multiplicator: int | None = None
    expected_pulses: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.ok,
            "run_file": self.run_file,
            "rate_multiplicator": self.rate_multiplicator,
            "expected_pulses": self.expected_pulses,
            "problems": self.problems,
            "sources": self.sources,
        }


@dataclass(frozen=True)
class Expected:
    """What a per-pulse source should hold."""

    start: int
    stop: int
    rate: int
    pulses: npt.NDArray[np.int64]


def read_run_record(run_file: Path) -> dict[str, Any]:
    """The run's bookkeeping JSON, or RunFileError saying why it cannot be one (the detectors'
    options are read by ``detector_layouts``)."""
    record = _load_json_object(run_file)
    _check_run_keys(run_file, record)
    return record


def _not_a_run_file(run_file: Path, why: str) -> RunFileError:
    return RunFileError(f"{run_file} is not a run file: {why}")


def _load_json_object(run_file: Path) -> dict[str, Any]:
    if not run_file.exists():
        raise RunFileError(f"{run_file} does not exist")
    if not run_file.is_file():
        raise RunFileError(f"{run_file} is not a file")
    try:
        record = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        message = f"Can't read provided run file {run_file}, may be not json? ({exc})"
        raise RunFileError(message) from None
    if not isinstance(record, dict):
        raise _not_a_run_file(run_file, "it holds no JSON object")
    return record


def _check_run_keys(run_file: Path, record: dict[str, Any]) -> None:
    """The keys the check relies on, with values of the right kind."""
    for key in ("pgroup", "run_number", "start_pulseid", "stop_pulseid"):
        if key not in record:
            raise _not_a_run_file(run_file, f"{key} is missing")
    for key, least in (
        ("run_number", 0),
        ("start_pulseid", 0),
        ("stop_pulseid", record["start_pulseid"]),
        ("rate_multiplicator", 1),
    ):
        value = record.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise _not_a_run_file(run_file, f"{key} is {value!r}")
    for key in ("pgroup", "beamline", "directory_name"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise _not_a_run_file(run_file, f"{key} is {record[key]!r}")
    for key in ("channels_list", "camera_list", "pv_list"):
        names = record.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise _not_a_run_file(run_file, f"{key} is not a list of names")


@dataclass(frozen=True)
class DetectorLayout:
    """What a detector's file holds, by the run's options (UPSTREAM_HEAD §1-§2)."""

    #: Regions of interest: one group each, ``<DET>:ROI_<label>``, and no full frame.
    rois: tuple[Roi, ...] = ()
    #: The request's selection: the file holds the good frames of these pulses only.
    selected_pulse_ids: tuple[int, ...] = ()
    #: Only frames with the pulse-picker event (``daq_rec`` bit 19).
    ppicker_only: bool = False

    def groups(self, detector: str) -> list[tuple[str, tuple[int, int, int, int] | None]]:
        """``data/`` groups of the file, each with its region (None: the whole image)."""
        if not self.rois:
            return [(detector, None)]
        return [(f"{detector}:ROI_{label}", box) for label, box in self.rois]

    def expected(self, expected: Expected) -> Expected:
        """The run's beam pulses, narrowed to the selection (ids outside the range are ignored,
        as the worker ignores them)."""
        if not self.selected_pulse_ids:
            return expected
        selected = np.asarray(self.selected_pulse_ids, dtype=np.int64)
        return dataclasses.replace(
            expected, pulses=expected.pulses[np.isin(expected.pulses, selected)]
        )


def detector_layouts(run_file: Path, record: dict[str, Any]) -> dict[str, DetectorLayout]:
    """Each detector's layout; RunFileError for options no broker would have written.

    Only the options that change the layout are read: a run file of another broker version
    (or the facility's, with options of its own) is checked as long as those make sense.
    """
    detectors = record.get("detectors") or {}
    if not isinstance(detectors, dict):
        raise _not_a_run_file(run_file, "detectors is not an object")
    try:
        selected = parse_selected_pulse_ids(record)
    except BadRequest as exc:
        raise _not_a_run_file(run_file, str(exc)) from None
    return {
        name: _detector_layout(run_file, name, options, selected)
        for name, options in detectors.items()
    }


def _detector_layout(
    run_file: Path, name: str, options: Any, selected: tuple[int, ...]
) -> DetectorLayout:
    """The layout one detector's options make; the options no broker accepts are refused."""
    key = f"detectors.{name}"
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise _not_a_run_file(run_file, f"{key} is not an object of options")
    flags: dict[str, Any] = {}
    for flag, default in (("adc_to_energy", True), ("save_ppicker_events_only", False)):
        flags[flag] = options.get(flag, default)
        if not isinstance(flags[flag], bool):
            raise _not_a_run_file(run_file, f"{key}.{flag} is {flags[flag]!r}")
    try:
        # Without conversion every conversion option is ignored: the file is the raw layout.
        rois = roi_items(options.get("roi") or {}) if flags["adc_to_energy"] else ()
    except (TypeError, ValueError):
        raise _not_a_run_file(
            run_file,
            f"{key}.roi is {options['roi']!r}, not {{label: [y1, y2, x1, x2]}} nor a list of "
            "[y1, y2, x1, x2]",
        ) from None
    return DetectorLayout(rois, selected, flags["save_ppicker_events_only"])


def raw_directory(run_file: Path, record: dict[str, Any]) -> Path:
    """The pgroup's raw directory: where the run file lies (``raw/run_info/000000/``), so any
    copy of the data tree can be checked; for a run file kept elsewhere, the facility's place
    ``{data_root}/{beamline}/data/{pgroup}/raw`` (``$SF_DAQ_DATA_ROOT``, else ``/sf``)."""
    folder = run_file.absolute().parent  # also for ``-r run_000001.json`` inside the folder
    if folder.parent.name == "run_info":
        return folder.parent.parent
    data_root = Path(os.environ.get(DATA_ROOT_ENVIRONMENT) or "/sf")
    return data_root / str(record.get("beamline", "")) / "data" / str(record["pgroup"]) / "raw"


def is_being_written(path: Path) -> bool:
    """A worker's temporary file beside ``path``."""
    return bool(partial_files(path))


def check_run(run_file: Path, rate_multiplicator: int = 0) -> CheckResult:
    """Check every source of the run; ``rate_multiplicator`` 0 takes the run's own."""
    result = CheckResult(str(run_file))
    try:
        record = read_run_record(run_file)
        layouts = detector_layouts(run_file, record)
    except RunFileError as exc:
        result.problems.append(str(exc))
        return result
    rate = rate_multiplicator or int(record.get("rate_multiplicator", 1))
    start, stop = int(record["start_pulseid"]), int(record["stop_pulseid"])
    expected = Expected(start, stop, rate, beam_pulses(start, stop, rate))
    result.rate_multiplicator, result.expected_pulses = rate, int(expected.pulses.size)

    handover = record.get("handover")
    if isinstance(handover, dict) and handover.get("status") == "failed":
        result.problems.append(
            f"jobs of run {record['run_number']} were not all queued: {handover.get('message', '')}"
        )
    dirs = PgroupDirs(
        str(record.get("beamline", "")), str(record["pgroup"]), raw_directory(run_file, record)
    )
    run_number = int(record["run_number"])

    tag = record.get("appended_directory_suffix")  # a tagged run's files: run_NNNNNN-<tag>.*
    for suffix, names, check in _sources(record, layouts):
        path = dirs.data_file(
            record.get("directory_name"), run_number, suffix, tag if isinstance(tag, str) else None
        )
        details: dict[str, Any] = {}
        problems = _check_file(path, suffix, run_number, check, names, expected, details)
        result.sources[suffix] = {"file": str(path), "problems": problems, "names": details}
        result.problems.extend(problems)
    return result


Checker = Callable[[h5py.File, list[str], Expected, dict[str, Any]], list[str]]


def _sources(
    record: dict[str, Any], layouts: dict[str, DetectorLayout]
) -> list[tuple[str, list[str], Checker]]:
    """(file suffix, names, checker) of each source the run asked for."""
    sources: list[tuple[str, list[str], Checker]] = []
    for key, kind, checker in (
        ("channels_list", SourceKind.DATABUFFER, _check_channels),
        ("camera_list", SourceKind.IMAGEBUFFER, _check_cameras),
        ("pv_list", SourceKind.ARCHIVER, _check_pvs),
    ):
        if record.get(key):
            sources.append((FILE_SUFFIX[kind], list(record[key]), checker))
    for detector, layout in layouts.items():
        sources.append((detector, [detector], functools.partial(_check_detector, layout)))
    return sources


def _check_file(
    path: Path,
    suffix: str,
    run_number: int,
    check: Checker,
    names: list[str],
    expected: Expected,
    details: dict[str, Any],
) -> list[str]:
    """Open the file (or say why not) and run the source's checks on it."""
    what = "detector" if suffix not in FILE_SUFFIX.values() else suffix
    being_written = is_being_written(path)
    if not path.exists():
        if being_written:
            return [f"{what} file {path} is still being written"]
        return [f"{what} file {path} does not exist"]
    try:
        with h5py.File(path, "r", locking=False) as file:
            problems = []
            written_for = file.attrs.get("run_number")
            if written_for is not None and int(written_for) != run_number:
                problems.append(f"{what} file {path} belongs to run {int(written_for)}")
            return problems + check(file, names, expected, details)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        if being_written:
            return [f"{what} file {path} is still being written"]
        return [f"Can not read from {what} file {path} : {exc}"]


def _missing_datasets(group: h5py.Group, name: str, datasets: tuple[str, ...]) -> list[str]:
    absent = [ds for ds in datasets if not isinstance(group.get(ds), h5py.Dataset)]
    return [f"{name} has no dataset {ds}" for ds in absent]


def _lengths(group: h5py.Group, name: str, datasets: tuple[str, ...]) -> list[str]:
    lengths = {ds: len(group[ds]) for ds in datasets}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{ds} {n}" for ds, n in lengths.items())
        return [f"{name} datasets differ in length : {shown}"]
    return []


def _column(group: h5py.Group, dataset: str) -> npt.NDArray[np.int64]:
    return np.asarray(group[dataset][()], dtype=np.int64).ravel()


def _order(name: str, pulse_ids: npt.NDArray[np.int64], unique: bool = True) -> list[str]:
    steps = np.diff(pulse_ids)
    problems = []
    if np.any(steps < 0):
        problems.append(f"{name} pulse_id are not monotonic")
    if unique and np.any(steps == 0):
        problems.append(f"{name} has {int(np.count_nonzero(steps == 0))} repeated pulse_id")
    return problems


def _timestamps(name: str, timestamps: npt.NDArray[np.int64], strict: bool = True) -> list[str]:
    if timestamps.size == 0:
        return []
    problems = []
    latest = time.time_ns() + FUTURE_SLACK_NS
    if timestamps.min() < EARLIEST_TIMESTAMP_NS or timestamps.max() > latest:
        shown = f"{timestamps.min()} .. {timestamps.max()}"
        problems.append(f"{name} timestamps are not ns since the epoch : {shown}")
    steps = np.diff(timestamps)
    if np.any(steps <= 0 if strict else steps < 0):
        problems.append(f"{name} timestamps are not increasing")
    return problems


def _count(
    name: str, pulse_ids: npt.NDArray[np.int64], expected: Expected, details: dict[str, Any]
) -> list[str]:
    """The seed's count line; ``details`` gets which pulses are missing, for --json."""
    report = NameReport.judge(name, expected.pulses, np.unique(pulse_ids))
    details[name] = {
        "expected": report.expected,
        "found": report.found,
        "missing": report.missing,
        "missing_pulse_ids": report.missing_pulse_ids,
    }
    if report.found != report.expected:
        counts = f"{report.found} vs {report.expected}"
        return [f"{name} number of pulse_id is different from expected : {counts}"]
    return []


def _check_per_pulse(
    file: h5py.File, name: str, word: str, suffix: str, expected: Expected, details: dict[str, Any]
) -> list[str]:
    """A channel or camera: present, complete datasets, sorted unique pulses, sane timestamps."""
    group = file.get(name)
    if not isinstance(group, h5py.Group):
        return [f"{word} {name} requested but not present in {suffix} file"]
    problems = _missing_datasets(group, name, CHANNEL_DATASETS)
    if problems:
        return problems
    problems = _lengths(group, name, CHANNEL_DATASETS)
    if problems:
        return problems
    pulse_ids = _column(group, "pulse_id")
    problems += _order(name, pulse_ids)
    problems += _timestamps(name, _column(group, "timestamp"))
    problems += _count(name, pulse_ids, expected, details)
    return problems


def _check_channels(
    file: h5py.File, names: list[str], expected: Expected, details: dict[str, Any]
) -> list[str]:
    problems: list[str] = []
    for name in names:
        problems += _check_per_pulse(file, name, "channel", "BSDATA", expected, details)
    return problems


def _check_cameras(
    file: h5py.File, names: list[str], expected: Expected, details: dict[str, Any]
) -> list[str]:
    problems: list[str] = []
    for name in names:
        found = _check_per_pulse(file, name, "camera", "CAMERAS", expected, details)
        problems += found
        if name not in details:
            continue  # not there or not usable: said already
        data = file[name]["data"]
        corrupted = 0
        for index in range(len(data)):  # one image at a time: memory stays one image
            try:
                data[index]
            except (OSError, ValueError):
                corrupted += 1
        details[name]["corrupted_images"] = corrupted
        if corrupted:
            problems.append(
                f"{name} {corrupted} images (from {len(data)}) corrupted, can not read them"
            )
    return problems


def _check_pvs(
    file: h5py.File, names: list[str], expected: Expected, details: dict[str, Any]
) -> list[str]:
    """PVs change when they change: present, readable, and changed_in_interval consistent."""
    problems: list[str] = []
    for name in names:
        group = file.get(name)
        if not isinstance(group, h5py.Group):
            problems.append(f"PV {name} requested but not present in PVCHANNELS file")
            continue
        found = _missing_datasets(group, name, PV_DATASETS) or _lengths(group, name, PV_DATASETS)
        if found:
            problems += found
            continue
        pulse_ids = _column(group, "pulse_id")
        changed = np.asarray(group["changed_in_interval"][()], dtype=bool).ravel()
        group["data"][()]  # readable at all (strings, arrays)
        details[name] = {"values": int(pulse_ids.size), "changed_in_interval": int(changed.sum())}
        if pulse_ids.size == 0:
            problems.append(f"PV {name} has no value")
            continue
        problems += _order(name, pulse_ids, unique=False)
        problems += _timestamps(name, _column(group, "timestamp"), strict=False)
        problems += _changed_in_interval(name, pulse_ids, changed, expected)
    return problems


def _changed_in_interval(
    name: str, pulse_ids: npt.NDArray[np.int64], changed: npt.NDArray[np.bool_], expected: Expected
) -> list[str]:
    """Only the first value may be the one from before the interval; the others are inside it.

    Bounds allow for the job's range being widened by one pulse at each edge (SPEC §3).
    """
    problems = []
    before = np.flatnonzero(~changed)
    if before.size > 1 or (before.size == 1 and before[0] != 0):
        problems.append(f"{name} changed_in_interval is false for a value that is not the first")
    elif before.size == 1 and pulse_ids[0] > expected.start:
        problems.append(
            f"{name} value from before the interval has pulse_id {pulse_ids[0]}, "
            f"after the start {expected.start}"
        )
    inside = pulse_ids[changed]
    outside = inside[(inside < expected.start - 1) | (inside > expected.stop + 1)]
    if outside.size:
        problems.append(
            f"{name} {outside.size} values marked changed_in_interval are outside the interval "
            f"{expected.start}-{expected.stop}"
        )
    return problems


def _check_detector(
    layout: DetectorLayout,
    file: h5py.File,
    names: list[str],
    expected: Expected,
    details: dict[str, Any],
) -> list[str]:
    """A Jungfrau file (SPEC §5.4): its data groups (one, or one per region of interest)."""
    (detector,) = names
    expected = layout.expected(expected)
    problems: list[str] = []
    for name, roi in layout.groups(detector):
        group = file.get(f"data/{name}")
        if not isinstance(group, h5py.Group):
            problems.append(f"{detector} has no group /data/{name}")
            continue
        problems += _check_detector_group(group, name, roi, layout, expected, details)
    return problems


def _check_detector_group(
    group: h5py.Group,
    name: str,
    roi: tuple[int, int, int, int] | None,
    layout: DetectorLayout,
    expected: Expected,
    details: dict[str, Any],
) -> list[str]:
    """One data group: one row per beam pulse of the range (or of the selection), bad frames
    flagged.

    As in the facility's check, the pulse ids in the file are counted against the beam pulses
    and the rows not flagged good are counted apart. A row whose frame never came whole keeps
    its place with ``pulse_id`` 0 (the detector worker writes ``requested_pulse_id`` beside it):
    it is a bad frame *and* a pulse without data, as the worker's own report says; order and
    range are judged on the pulse ids that are there.
    """
    problems = _missing_datasets(group, name, DETECTOR_DATASETS)
    if problems:
        return problems
    requested = "requested_pulse_id" in group
    columns = [*DETECTOR_DATASETS[1:], *(["requested_pulse_id"] if requested else [])]
    pulse_ids = _column(group, "pulse_id")
    lengths = [ds for ds in columns if len(group[ds]) != pulse_ids.size]
    if lengths:
        return [f"{name} length of {','.join(lengths)} is not consistent with pulse_id"]
    if roi is not None:
        problems += _region(group, name, roi)
    present = pulse_ids != 0
    problems += _order(name, pulse_ids[present])
    problems += _frames_of_pulses(group, name, present, layout, expected, details)
    if requested:
        other = int(np.count_nonzero(present & (pulse_ids != _column(group, "requested_pulse_id"))))
        if other:
            problems.append(f"{name} {other} frames are not of the pulse their row is for")
    good = np.asarray(group["is_good_frame"][()]).ravel() == 1
    bad = int(np.count_nonzero(~good))
    details[name].update(
        frames=int(pulse_ids.size), bad_frames=bad, frames_without_pulse_id=int((~present).sum())
    )
    if bad:
        problems.append(f"{name} there are bad frames : {bad} out of {pulse_ids.size}")
    return problems + _readable(group, name)


def _frames_of_pulses(
    group: h5py.Group,
    name: str,
    present: npt.NDArray[np.bool_],
    layout: DetectorLayout,
    expected: Expected,
    details: dict[str, Any],
) -> list[str]:
    """The pulses the frames are of: every expected one (unless only pulse-picker events are
    kept: then each frame must be one) and none other."""
    found = _column(group, "pulse_id")[present]
    if layout.ppicker_only:
        details[name] = {"pulse_picker_events": int(found.size)}
        events = has_bit(_column(group, "daq_rec")[present], PPICKER_BIT)
        others = int(np.count_nonzero(~events))
        problems = (
            []
            if not others
            else [f"{name} {others} frames are not pulse-picker events (daq_rec bit {PPICKER_BIT})"]
        )
    else:
        problems = _count(name, found, expected, details)
    if layout.selected_pulse_ids:
        details[name]["selected_pulse_ids"] = int(expected.pulses.size)
    foreign = int(np.count_nonzero(~np.isin(found, expected.pulses)))
    if foreign:
        outside = "selected pulse ids" if layout.selected_pulse_ids else "requested beam pulses"
        problems.append(f"{name} has {foreign} frames outside the {outside}")
    return problems


def _region(group: h5py.Group, name: str, roi: tuple[int, int, int, int]) -> list[str]:
    """A region's frames are the region's size, and its ``meta/roi`` (when written) is it."""
    y1, y2, x1, x2 = roi
    problems = []
    shape = tuple(group["data"].shape[1:])
    if shape != (y2 - y1, x2 - x1):
        shown = " x ".join(map(str, shape))
        problems.append(
            f"{name} frames are {shown}, the roi [{y1}, {y2}, {x1}, {x2}] makes "
            f"{y2 - y1} x {x2 - x1}"
        )
    stored = group.get("meta/roi")
    if isinstance(stored, h5py.Dataset):
        written = np.asarray(stored[()]).tolist()
        if written != [[y1, y2], [x1, x2]]:
            problems.append(
                f"{name} meta/roi is {written}, the run asked for [[{y1}, {y2}], [{x1}, {x2}]]"
            )
    return problems


def _readable(group: h5py.Group, name: str) -> list[str]:
    """The first and last frame decode (filters, chunks)."""
    data = group["data"]
    try:
        if len(data):
            data[0], data[len(data) - 1]
    except (OSError, ValueError) as exc:
        return [f"{name} data cannot be read : {exc}"]
    return []
