"""Jobs (one per source of a run) and status events: the records that travel through the queue.

A job carries everything a worker needs, so that a worker never has to read the broker's
configuration or bookkeeping to do it: the names, the pulse range, the output and log files.
Its ``job_id`` depends only on (pgroup, run, source), so a job delivered twice (a worker died
mid-way) rewrites the same file rather than producing another.

Both are pydantic dataclasses: one model each, validated wherever a message enters a process
(``from_json``, strictly: no number from a string) and wherever one is made or changed
(constructor, ``dataclasses.replace``). A message carries ``format_version``; one without it is
of the first format (version 1, as the first messages were written). A message this program
cannot read (not JSON, keys missing or unknown, wrong types, another format version) raises
``UndecodableMessage`` with one line naming the problem, which the transport keeps beside the
message in the dead-letter queue. Unknown keys are refused rather than ignored: a key this
program does not know may change what the job means, and a format that adds one is a new
version (upgrade the readers, the workers and the broker, before the writers).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import field
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticSerializationError

from sf_daq_broker.bookkeeping.paths import PgroupDirs
from sf_daq_broker.retrieval import RetrieveRequest

_JOB_NAMESPACE = uuid.UUID("4f3c2a5e-8d1b-4c7e-9a60-5b2f7e1d0c93")


class SourceKind(StrEnum):
    """The kinds of source; each has its own queue and worker."""

    DATABUFFER = "databuffer"
    IMAGEBUFFER = "imagebuffer"
    ARCHIVER = "archiver"
    DETECTOR = "detector"
    #: /take_pedestal: drive the detectors' gain stages, retrieve, compute, install.
    PEDESTAL = "pedestal"


#: The kinds a retrieval request makes jobs of (a pedestal is requested otherwise).
RETRIEVAL_KINDS = (
    SourceKind.DATABUFFER,
    SourceKind.IMAGEBUFFER,
    SourceKind.ARCHIVER,
    SourceKind.DETECTOR,
)


#: File suffix of the non-detector sources; a detector's suffix is its name.
FILE_SUFFIX = {
    SourceKind.DATABUFFER: "BSDATA",
    SourceKind.IMAGEBUFFER: "CAMERAS",
    SourceKind.ARCHIVER: "PVCHANNELS",
}


class Action(StrEnum):
    """Status event actions (SPEC §6)."""

    WRITE_REQUEST = "write_request"
    WRITE_START = "write_start"
    WRITE_PROGRESS = "write_progress"
    WRITE_FINISHED = "write_finished"
    WRITE_REJECTED = "write_rejected"


#: The format of the job messages this program writes, and the newest it reads.
JOB_FORMAT_VERSION = 1
#: The format of the status messages this program writes, and the newest it reads.
STATUS_FORMAT_VERSION = 1
#: The oldest format this program reads (the first, whose messages had no version).
FIRST_FORMAT_VERSION = 1

_VERSION_ERROR = "format_version"
#: Extra keys refused: see the module's docstring. NaN and infinities travel as the JSON
#: extensions NaN and Infinity, as they always did (a report may hold one; null would lie).
_MESSAGE_CONFIG = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class UndecodableMessage(ValueError):
    """A job or status message this program cannot read; the text says why, on one line."""


def job_id_for(pgroup: str, run_number: int, source: str) -> str:
    """Stable id of the job that retrieves ``source`` for a run."""
    return str(uuid.uuid5(_JOB_NAMESPACE, f"{pgroup}/{run_number}/{source}"))


@dataclass(frozen=True, config=_MESSAGE_CONFIG)
class Job:
    """One source of one run, to be written into one file."""

    job_id: str
    request_id: str
    kind: SourceKind
    source: str  # BSDATA, CAMERAS, PVCHANNELS or the detector name: also the file suffix
    names: tuple[str, ...]
    start_pulse_id: int  # the range to retrieve (widened at reduced rate, see SPEC §3)
    stop_pulse_id: int
    requested_start: int  # the range the user asked for: completeness is judged on it
    requested_stop: int
    rate_multiplicator: int
    pgroup: str
    beamline: str
    run_number: int
    output_file: str
    log_file: str
    run_info_file: str
    request_time: str
    options: dict[str, Any] = field(default_factory=dict)
    #: Level of the job's log (the request's run_log_level).
    log_level: str = "INFO"
    #: A detector job that converts: the pedestal file to use, as recorded in the run JSON.
    pedestal_file: str | None = None
    format_version: int = JOB_FORMAT_VERSION

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        return _known_version(version, JOB_FORMAT_VERSION)

    def to_json(self) -> bytes:
        return _JOB_MODEL.dump_json(self)

    @classmethod
    def from_json(cls, payload: bytes | str) -> Job:
        """The job a message carries; UndecodableMessage if it is none."""
        return _decode(_JOB_MODEL, payload, "job")


@dataclass(frozen=True, config=_MESSAGE_CONFIG)
class StatusEvent:
    """A status event of the fanout exchange: headers for filters, a JSON body for the rest."""

    action: Action
    request_id: str
    job_id: str
    pgroup: str
    run_number: int
    source: str
    file: str
    message: str = ""
    timestamp: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)
    format_version: int = STATUS_FORMAT_VERSION

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        return _known_version(version, STATUS_FORMAT_VERSION)

    @classmethod
    def for_job(cls, action: Action, job: Job, message: str = "", **details: Any) -> StatusEvent:
        return cls(
            action=action,
            request_id=job.request_id,
            job_id=job.job_id,
            pgroup=job.pgroup,
            run_number=job.run_number,
            source=job.source,
            file=job.output_file,
            message=message,
            details=details,
        )

    def headers(self) -> dict[str, str]:
        return {
            "action": self.action.value,
            "source": self.source,
            "file": self.file,
            "message": self.message,
        }

    def to_json(self) -> bytes:
        try:
            return _STATUS_MODEL.dump_json(self)
        except PydanticSerializationError:
            # Text that is not Unicode (a lone surrogate: an undecodable file name in an error
            # message) cannot be JSON; the event must still go out, with "?" in its place.
            document = json.dumps(dataclasses.asdict(self), ensure_ascii=False)
            return document.encode("utf-8", "replace")

    @classmethod
    def from_json(cls, payload: bytes | str) -> StatusEvent:
        """The event a message carries; UndecodableMessage if it is none."""
        return _decode(_STATUS_MODEL, payload, "status")


_JOB_MODEL = TypeAdapter(Job)
_STATUS_MODEL = TypeAdapter(StatusEvent)
_Message = TypeVar("_Message", Job, StatusEvent)
#: How much of a wrong value a reason shows.
_SHOWN_VALUE = 60


def _known_version(version: int, newest: int) -> int:
    if not FIRST_FORMAT_VERSION <= version <= newest:
        raise PydanticCustomError(
            _VERSION_ERROR,
            "format version {version} is unknown here (this sf-daq-broker reads format versions"
            " {first} to {newest})",
            {"version": version, "first": FIRST_FORMAT_VERSION, "newest": newest},
        )
    return version


def _decode(model: TypeAdapter[_Message], payload: bytes | str, what: str) -> _Message:
    try:
        return model.validate_json(payload, strict=True)
    except ValidationError as exc:
        raise UndecodableMessage(f"undecodable {what} message: {_describe(exc)}") from None


def _describe(error: ValidationError) -> str:
    """One line for a person: the format version if that is wrong (a newer format may differ
    in anything else), else the missing keys, then every other problem with its key."""
    problems = error.errors(include_url=False)
    for problem in problems:
        if problem["type"] == _VERSION_ERROR:
            return problem["msg"]
    parts = []
    missing = [_key(p) for p in problems if p["type"] == "missing"]
    if missing:
        parts.append("missing " + ", ".join(missing))
    for problem in problems:
        if problem["type"] == "missing":
            continue
        if problem["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parts.append(f"unknown key {_key(problem)}")
        elif not problem["loc"] or problem["type"] == "json_invalid":
            parts.append(problem["msg"])
        else:
            parts.append(f"{_key(problem)}: {problem['msg']}, got {_shown(problem['input'])}")
    return "; ".join(parts)


def _key(problem: ErrorDetails) -> str:
    return ".".join(str(part) for part in problem["loc"])


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE else text[: _SHOWN_VALUE - 1] + "…"


def build_jobs(
    request: RetrieveRequest,
    dirs: PgroupDirs,
    run_number: int,
    request_id: str,
    request_time: str,
    directory_name: str | None,
    pedestal_files: dict[str, str] | None = None,
) -> list[Job]:
    """One job per source of the request, in a fixed order (channels, cameras, PVs, detectors).

    ``directory_name`` is the cleaned output directory (the bookkeeping's checked version of
    the request's), relative to ``raw/``; ``pedestal_files`` the pedestal each converting
    detector uses.
    """
    pedestal_files = pedestal_files or {}
    tag = request.run_options.file_tag
    channel_start, channel_stop = request.channel_range()
    sources: list[tuple[SourceKind, str, tuple[str, ...], tuple[int, int], dict[str, Any]]] = []
    by_kind = {
        SourceKind.DATABUFFER: request.channels,
        SourceKind.IMAGEBUFFER: request.cameras,
        SourceKind.ARCHIVER: request.pvs,
    }
    for kind, names in by_kind.items():
        if names:
            sources.append((kind, FILE_SUFFIX[kind], names, (channel_start, channel_stop), {}))
    detector_range = request.detector_range()
    for detector, options in request.detectors.items():
        assert detector_range is not None  # validation refuses detectors without a beam pulse
        sources.append(
            (SourceKind.DETECTOR, detector, (detector,), detector_range, options.to_json())
        )

    return [
        Job(
            job_id=job_id_for(dirs.pgroup, run_number, source),
            request_id=request_id,
            kind=kind,
            source=source,
            names=names,
            start_pulse_id=pulse_range[0],
            stop_pulse_id=pulse_range[1],
            requested_start=request.start_pulseid,
            requested_stop=request.stop_pulseid,
            rate_multiplicator=request.rate_multiplicator,
            pgroup=dirs.pgroup,
            beamline=dirs.beamline,
            run_number=run_number,
            output_file=str(dirs.data_file(directory_name, run_number, source, tag)),
            log_file=str(dirs.run_log(run_number, source)),
            run_info_file=str(dirs.run_json(run_number)),
            request_time=request_time,
            options=options,
            log_level=request.run_options.log_level,
            pedestal_file=pedestal_files.get(source) if kind is SourceKind.DETECTOR else None,
        )
        for kind, source, names, pulse_range, options in sources
    ]
