"""What the page shows of a run: the status store's jobs joined with the run's bookkeeping.

The status store says how each source is doing (the same rows /run_status answers from); the
run JSON says what was asked (pulse range, rate, directory, names, request time). Runs are
listed from the pgroup's ``LAST_RUN`` downwards, so runs this broker never saw (reserved
numbers, runs of an earlier broker) appear too, and the list needs no index of its own.

Every function here does blocking file and SQLite work: the handlers call them in a thread.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.paths import PGROUP_PATTERN, PgroupDirs
from sf_daq_broker.bookkeeping.runs import read_last_run
from sf_daq_broker.demo.report import human_size
from sf_daq_broker.jobs import FILE_SUFFIX, SourceKind
from sf_daq_broker.retrieval import DetectorOptions
from sf_daq_broker.status.store import JobState, StatusStore, run_state
from sf_daq_broker.workers.report import beam_pulses

PULSES_PER_SECOND = 100
#: Runs looked at, at most, to fill one page of a filtered list.
SCAN_LIMIT = 500
LOG_TAIL_BYTES = 16 * 1024
LOG_TAIL_LINES = 40
#: The filters of the run list: a run state, or "incomplete" (done, but data is missing).
FILTERS = ("queued", "running", "done", "failed", "incomplete")
FINAL_STATES = frozenset({JobState.DONE.value, JobState.FAILED.value})

_KIND_OF_SUFFIX = {suffix: kind for kind, suffix in FILE_SUFFIX.items()}
_NAMES_KEY = {
    SourceKind.DATABUFFER: "channels_list",
    SourceKind.IMAGEBUFFER: "camera_list",
    SourceKind.ARCHIVER: "pv_list",
}


def source_kind(source: str) -> SourceKind:
    """BSDATA, CAMERAS, PVCHANNELS, or a detector (its file suffix is its name)."""
    return _KIND_OF_SUFFIX.get(source, SourceKind.DETECTOR)


def source_names(record: dict[str, Any], source: str) -> list[str]:
    """The names a source was asked for, from the run JSON."""
    kind = source_kind(source)
    if kind is SourceKind.DETECTOR:
        return [source] if source in (record.get("detectors") or {}) else []
    names = record.get(_NAMES_KEY[kind]) or []
    return [str(name) for name in names]


def detector_layout(record: dict[str, Any], detector: str) -> str:
    """How the detector's frames are laid out in its file, from the options it was asked with."""
    options = (record.get("detectors") or {}).get(detector) or {}
    try:
        parsed = DetectorOptions.from_json(options)
    except TypeError:
        return "options not understood"
    if not parsed.adc_to_energy:
        return "raw file: modules stacked"
    if parsed.geometry:
        return "geometry-corrected"
    return "converted, modules stacked (no geometry)"


@dataclass
class SourceView:
    name: str
    kind: SourceKind
    state: str
    done: int | None
    total: int | None
    message: str
    error: str | None
    file: str | None
    file_size: int | None
    completeness: dict[str, Any] | None

    @property
    def state_class(self) -> str:
        """The CSS class of the state (a state with extra words is styled by its first)."""
        return re.sub(r"[^a-z]", "", self.state.split(maxsplit=1)[0].lower()) if self.state else ""

    @property
    def percent(self) -> int:
        if self.state == JobState.DONE:
            return 100
        if not self.total or self.done is None:
            return 0
        return max(0, min(100, round(100 * self.done / self.total)))

    @property
    def progress_text(self) -> str:
        if self.total and self.done is not None:
            return f"{self.done} of {self.total}"
        return ""

    @property
    def complete(self) -> bool | None:
        return None if self.completeness is None else bool(self.completeness.get("complete"))

    @property
    def missing_names(self) -> int:
        """Names with missing pulses or without data at all."""
        if self.completeness is None:
            return 0
        names = self.completeness.get("names") or []
        return sum(1 for n in names if n.get("missing")) + len(
            self.completeness.get("absent") or []
        )

    @property
    def glance(self) -> tuple[str, str]:
        """(text, class) of the completeness at a glance."""
        if self.state == JobState.FAILED:
            return f"failed: {self.error or self.message}", "bad"
        if self.completeness is None:
            return (self.message or self.state, "")
        if self.complete:
            return "complete", "good"
        missing = self.missing_names
        return f"{missing} name{'s' if missing != 1 else ''} missing", "warn"

    @property
    def size_text(self) -> str:
        return human_size(self.file_size) if self.file_size is not None else ""


@dataclass
class RunView:
    pgroup: str
    number: int
    record: dict[str, Any] | None
    sources: list[SourceView] = field(default_factory=list)
    problem: str = ""  # the run JSON cannot be read
    #: Changes whenever anything shown of the run changes (its rendered row can be reused).
    fingerprint: str = ""

    @property
    def state(self) -> str:
        if self.sources:
            return run_state([{"state": s.state} for s in self.sources])
        return "reserved" if self.record is None else "unknown"

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES or not self.sources

    @property
    def incomplete(self) -> bool:
        return any(s.complete is False for s in self.sources)

    @property
    def filter_tags(self) -> list[str]:
        return [self.state, *(["incomplete"] if self.incomplete else [])]

    def _field(self, key: str) -> Any:
        return (self.record or {}).get(key)

    @property
    def request_time(self) -> str:
        value = self._field("request_time")
        return str(value)[:19] if value else ""

    @property
    def start(self) -> int | None:
        value = self._field("start_pulseid")
        return value if isinstance(value, int) else None

    @property
    def stop(self) -> int | None:
        value = self._field("stop_pulseid")
        return value if isinstance(value, int) else None

    @property
    def rate_multiplicator(self) -> int:
        value = self._field("rate_multiplicator")
        return value if isinstance(value, int) and value > 0 else 1

    @property
    def pulses(self) -> int:
        if self.start is None or self.stop is None:
            return 0
        return self.stop - self.start + 1

    @property
    def beam_pulses(self) -> int:
        if self.start is None or self.stop is None:
            return 0
        return int(beam_pulses(self.start, self.stop, self.rate_multiplicator).size)

    @property
    def duration_text(self) -> str:
        return f"{self.pulses / PULSES_PER_SECOND:.2f} s"

    @property
    def rate_text(self) -> str:
        return f"{PULSES_PER_SECOND / self.rate_multiplicator:g} Hz"

    @property
    def directory(self) -> str:
        return str(self._field("directory_name") or "")

    @property
    def total_size(self) -> str:
        sizes = [s.file_size for s in self.sources if s.file_size is not None]
        return human_size(sum(sizes)) if sizes else ""

    @property
    def handover_problem(self) -> str:
        handover = self._field("handover")
        if isinstance(handover, dict) and handover.get("status") == "failed":
            return f"jobs not queued: {handover.get('reason', '')}"
        return ""


def read_record(dirs: PgroupDirs, number: int) -> tuple[dict[str, Any] | None, str, str]:
    """The run JSON, why it cannot be used if so, and its version (mtime and size)."""
    path = dirs.run_json(number)
    try:
        stat = path.stat()
        version = f"{stat.st_mtime_ns}:{stat.st_size}"
        document = _parsed_json(str(path), version)
    except FileNotFoundError:
        return None, "", ""
    except (OSError, ValueError) as exc:
        return None, f"run_info JSON unreadable: {exc}", ""
    if not isinstance(document, dict):
        return None, "run_info JSON is not an object", version
    return document, "", version


@functools.lru_cache(maxsize=4096)
def _parsed_json(path: str, version: str) -> Any:
    """A run JSON parsed once per version (a run list reads the same files again and again);
    the result is shared: callers never change it."""
    with open(path, "rb") as handle:
        return json.loads(handle.read())


def _file_size(dirs: PgroupDirs, file: str | None, state: str) -> int | None:
    if not file or state != JobState.DONE:
        return None
    path = Path(file)
    if not path.is_relative_to(dirs.raw):
        return None
    try:
        return path.stat().st_size
    except OSError:
        return None


def load_run(
    dirs: PgroupDirs, store: StatusStore, number: int, jobs: list[dict[str, Any]] | None = None
) -> RunView:
    """One run; ``jobs`` are its rows of the status store when the caller has them already."""
    record, problem, version = read_record(dirs, number)
    if jobs is None:
        jobs = store.run_status(dirs.pgroup, number)
    sources = [
        SourceView(
            name=job["source"],
            kind=source_kind(job["source"]),
            state=job["state"],
            done=job["progress"]["done"],
            total=job["progress"]["total"],
            message=job["message"],
            error=job["error"],
            file=job["file"],
            file_size=_file_size(dirs, job["file"], job["state"]),
            completeness=job["completeness"],
        )
        for job in jobs
    ]
    fingerprint = repr((version, problem, jobs, [source.file_size for source in sources]))
    return RunView(dirs.pgroup, number, record, sources, problem, fingerprint)


@dataclass
class RunList:
    runs: list[RunView]
    last_run: int
    older: int | None  # where the next page starts (exclusive), None if no older run


def list_runs(
    dirs: PgroupDirs, store: StatusStore, *, before: int | None, limit: int, state: str | None
) -> RunList:
    """The newest runs (below ``before``), at most ``limit``, optionally of one filter."""
    last = read_last_run(dirs)
    number = last if before is None else min(last, before - 1)
    runs: list[RunView] = []
    scanned = 0
    while number >= 1 and len(runs) < limit and scanned < SCAN_LIMIT:
        first = max(1, number - limit + 1)
        jobs = store.runs_status(dirs.pgroup, first, number)
        for candidate in range(number, first - 1, -1):
            run = load_run(dirs, store, candidate, jobs.get(candidate, []))
            number, scanned = candidate - 1, scanned + 1
            if state is None or state in run.filter_tags:
                runs.append(run)
                if len(runs) == limit:
                    break
    return RunList(runs, last, number + 1 if number >= 1 else None)


def list_pgroups(data_root: Path, beamline: str) -> list[str]:
    """The beamline's pgroups (those with a ``raw/`` directory), by name."""
    base = data_root / beamline / "data"
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    return sorted(
        entry.name
        for entry in entries
        if PGROUP_PATTERN.match(entry.name) and (entry / "raw").is_dir()
    )


def most_recent_pgroup(data_root: Path, beamline: str, pgroups: list[str]) -> str | None:
    """The pgroup whose last run number was given out most recently (else the last by name)."""
    best: tuple[float, str] | None = None
    for name in pgroups:
        last_run = data_root / beamline / "data" / name / "raw" / "run_info" / "LAST_RUN"
        try:
            mtime = last_run.stat().st_mtime
        except OSError:
            continue
        if best is None or mtime > best[0]:
            best = (mtime, name)
    if best is not None:
        return best[1]
    return pgroups[-1] if pgroups else None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a job log (at most ``LOG_TAIL_BYTES`` are read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = tail.splitlines()
    if size > LOG_TAIL_BYTES:
        kept = kept[1:]  # the first line read is cut
    return "\n".join(kept[-lines:])
