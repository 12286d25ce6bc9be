"""Jobs (one per source of a run) and status events: the records that travel through the queue.

A job carries everything a worker needs, so that a worker never has to read the broker's
configuration or bookkeeping to do it: the names, the pulse range, the output and log files.
Its ``job_id`` depends only on (pgroup, run, source), so a job delivered twice (a worker died
mid-way) rewrites the same file rather than producing another.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

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


def job_id_for(pgroup: str, run_number: int, source: str) -> str:
    """Stable id of the job that retrieves ``source`` for a run."""
    return str(uuid.uuid5(_JOB_NAMESPACE, f"{pgroup}/{run_number}/{source}"))


@dataclass(frozen=True)
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

    def to_json(self) -> bytes:
        document = dataclasses.asdict(self)
        document["names"] = list(self.names)
        return json.dumps(document).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> Job:
        document = json.loads(payload)
        document["kind"] = SourceKind(document["kind"])
        document["names"] = tuple(document["names"])
        return cls(**document)


@dataclass(frozen=True)
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
        document = dataclasses.asdict(self)
        document["action"] = self.action.value
        return json.dumps(document).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> StatusEvent:
        document = json.loads(payload)
        document["action"] = Action(document["action"])
        return cls(**document)


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
