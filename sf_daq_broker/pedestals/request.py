"""A ``/take_pedestal`` request: its rules, its files and its job.

Keys (UPSTREAM_HEAD §4): ``pgroup``; ``detectors``, a list of names or an object whose keys
are the names (upstream's clients send ``{name: {}}``); ``rate_multiplicator`` (default 1,
one of the beam rates — upstream does not check it); ``pedestalmode`` (default false);
``run_log_level`` (default INFO — upstream's pedestal job crashes without it). Every failure
is a 4xx naming the key, before anything is written.

Files, in ``raw/JF_pedestals/`` of the pgroup, for a pedestal named by the time it was
requested, ``YYYYmmdd_HHMMSS``:

- ``<name>.json`` the request (with ``beamline``, ``request_id``, ``request_time``, the files);
  when the pedestal is done the same file also holds its ``result``;
- ``<name>.log`` the pedestal job's log, at ``run_log_level``;
- ``<name>.<DET>.h5`` the raw frames of the pedestal (the detector range, raw layout);
- ``<name>.<DET>.res.h5`` the pedestal file computed from them, which is also installed as
  ``{pedestal_root}/<DET>/<name>.h5`` (``pedestals.store``).

A pedestal has no run number; its status is asked for by name (``/pedestal_status``) and its
status events carry run number 0 and source ``pedestal``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.paths import PgroupDirs, check_pgroup_name
from sf_daq_broker.config import DETECTOR_NAME, Settings
from sf_daq_broker.errors import BadRequest, Forbidden
from sf_daq_broker.jobs import Job, SourceKind, job_id_for
from sf_daq_broker.retrieval import parse_rate_multiplicator
from sf_daq_broker.run_options import DEFAULT_LOG_LEVEL, parse_log_level

PEDESTAL_SOURCE = "pedestal"
NAME_FORMAT = "%Y%m%d_%H%M%S"
#: Gain stages per pedestal-mode loop, for the progress estimate only (the detector says how
#: many frames it takes when pedestal mode is switched on).
MODE_STAGES = 3


@dataclass(frozen=True)
class PedestalRequest:
    pgroup: str
    detectors: tuple[str, ...]
    rate_multiplicator: int = 1
    pedestalmode: bool = False
    log_level: str = DEFAULT_LOG_LEVEL
    record: dict[str, Any] | None = None


def parse_pedestal_request(
    body: Any, *, beamline: str, allowed_detectors: list[str]
) -> PedestalRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key in ("pgroup", "detectors"):
        if key not in body:
            raise BadRequest(f"{key} is missing (pgroup and detectors are mandatory)")
    pgroup = check_pgroup_name(body["pgroup"])
    detectors = _parse_detectors(body["detectors"], beamline, allowed_detectors)
    rate = parse_rate_multiplicator(body)
    pedestalmode = body.get("pedestalmode", False)
    if pedestalmode is None:
        pedestalmode = False
    if not isinstance(pedestalmode, bool):
        raise BadRequest(f"pedestalmode must be true or false, got {pedestalmode!r}")
    level = DEFAULT_LOG_LEVEL
    if body.get("run_log_level") is not None:
        level = parse_log_level(body["run_log_level"])
    return PedestalRequest(pgroup, detectors, rate, pedestalmode, level, dict(body))


def _parse_detectors(value: Any, beamline: str, allowed: list[str]) -> tuple[str, ...]:
    names = list(value) if isinstance(value, dict | list) else None
    if not names:
        raise BadRequest(
            f"detectors must be a non-empty list of detector names (or an object whose keys "
            f"are the names), got {value!r}"
        )
    detectors: list[str] = []
    for name in names:
        if not isinstance(name, str) or not DETECTOR_NAME.match(name):
            raise BadRequest(
                f"detectors: {name!r} is not a Jungfrau detector name (JFxxTyyVzz, e.g. JF07T32V01)"
            )
        if name not in allowed:
            raise Forbidden(
                f"detectors: {name} is not allowed for beamline {beamline} "
                f"(allowed: {', '.join(allowed) or 'none'})"
            )
        if name not in detectors:
            detectors.append(name)
    return tuple(detectors)


def read_record(path: Path) -> dict[str, Any]:
    """A pedestal's JSON (``{}`` if it cannot be read: the status still answers)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def pedestal_name_now() -> str:
    return datetime.now().strftime(NAME_FORMAT)


@dataclass(frozen=True)
class PedestalFiles:
    """Where one pedestal's files go (see the module docstring)."""

    directory: Path
    name: str

    @property
    def record(self) -> Path:
        return self.directory / f"{self.name}.json"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def raw(self, detector: str) -> Path:
        return self.directory / f"{self.name}.{detector}.h5"

    def result(self, detector: str) -> Path:
        return self.directory / f"{self.name}.{detector}.res.h5"


def expected_frames(settings: Settings, request: PedestalRequest) -> int:
    """How many frames per detector the procedure takes (at least)."""
    config = settings.pedestals
    if request.pedestalmode:
        return MODE_STAGES * config.mode_frames * config.mode_loops
    return 3 * config.frames_per_stage


def pedestal_job_id(pgroup: str, name: str) -> str:
    return job_id_for(pgroup, 0, f"{PEDESTAL_SOURCE}/{name}")


def pedestal_job(
    request: PedestalRequest,
    dirs: PgroupDirs,
    files: PedestalFiles,
    settings: Settings,
    request_id: str | None = None,
    request_time: str = "",
) -> Job:
    """The job of one pedestal: everything the pedestal worker needs."""
    config = settings.pedestals
    frames = expected_frames(settings, request)
    detectors = {
        name: {
            "raw_file": str(files.raw(name)),
            "result_file": str(files.result(name)),
            "installed_file": str(settings.pedestal_root / name / f"{files.name}.h5"),
            "number_bad_modules": settings.detectors[name].number_bad_modules,
        }
        for name in request.detectors
    }
    return Job(
        job_id=pedestal_job_id(dirs.pgroup, files.name),
        request_id=request_id or str(uuid.uuid4()),
        kind=SourceKind.PEDESTAL,
        source=PEDESTAL_SOURCE,
        names=request.detectors,
        # The range is known only once the detectors have taken the frames: 0 until then;
        # requested_stop spans the frames expected, which is what progress counts against.
        start_pulse_id=0,
        stop_pulse_id=0,
        requested_start=0,
        requested_stop=(frames - 1) * request.rate_multiplicator,
        rate_multiplicator=request.rate_multiplicator,
        pgroup=dirs.pgroup,
        beamline=dirs.beamline,
        run_number=0,
        output_file=str(files.record),
        log_file=str(files.log),
        run_info_file=str(files.record),
        request_time=request_time,
        options={
            "name": files.name,
            "pedestalmode": request.pedestalmode,
            "frames_per_stage": config.frames_per_stage,
            "mode_frames": config.mode_frames,
            "mode_loops": config.mode_loops,
            "settle_s": config.settle_s,
            "pedestal_root": str(settings.pedestal_root),
            "detectors": detectors,
        },
        log_level=request.log_level,
    )
