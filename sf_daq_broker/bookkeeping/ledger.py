"""Accepting a run: run number, bookkeeping JSON, scan step and output directory, in that order.

Everything that can refuse a request is checked before a run number is spent; the number, the
run JSON and the scan step are then written under one hold of the pgroup lock, so concurrent
requests get consecutive numbers and their scan steps appear in run-number order.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.atomic import create_atomic, dump_json, write_atomic
from sf_daq_broker.bookkeeping.paths import (
    PgroupDirs,
    check_directory_name,
    clean_relative_path,
    run_prefix,
)
from sf_daq_broker.bookkeeping.runs import check_open, next_run_number, pgroup_lock, read_last_run
from sf_daq_broker.errors import BadRequest, Conflict
from sf_daq_broker.jobs import Job, build_jobs
from sf_daq_broker.retrieval import RetrieveRequest

#: scan_info keys that change with every step; the others are the scan's fixed parameters.
SCAN_STEP_KEYS = ("scan_values", "scan_readbacks", "scan_readbacks_raw", "scan_step_info")


@dataclass(frozen=True)
class AcceptedRun:
    run_number: int
    request_id: str
    request_time: str
    jobs: list[Job]
    record: dict[str, Any]


def request_time_now() -> str:
    """Local time as the bookkeeping has always written it: ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


def accept_request(
    request: RetrieveRequest, dirs: PgroupDirs, pedestal_files: dict[str, str] | None = None
) -> AcceptedRun:
    """Give the request its run, write its bookkeeping and create its output directory.

    ``pedestal_files`` (detector → file) are the pedestals the converting detectors use: they
    go into the run JSON (``pedestal_files``) and the detector jobs.
    """
    directory_name = None
    if request.directory_name is not None:
        directory_name = check_directory_name(dirs, request.directory_name, "directory_name")
    scan_file = None
    if request.scan_name is not None:
        scan_name = clean_relative_path(request.scan_name, "scan_info.scan_name")
        scan_file = dirs.ensure_inside(
            dirs.scan_json(scan_name), f"scan_info.scan_name {request.scan_name!r}"
        )

    with pgroup_lock(dirs):
        check_open(dirs)
        scan_document = _read_scan(scan_file, dirs) if scan_file else None
        run_number = _take_run_number(request, dirs)
        tag = request.run_options.file_tag
        _check_run_tag(dirs.output_dir(directory_name), run_number, tag)
        request_id = str(uuid.uuid4())
        request_time = request_time_now()
        jobs = build_jobs(
            request, dirs, run_number, request_id, request_time, directory_name, pedestal_files
        )
        record = dict(request.record)
        if directory_name is not None:
            record["directory_name"] = directory_name
        if tag is not None:
            record["appended_directory_suffix"] = tag
        if pedestal_files:
            record["pedestal_files"] = dict(pedestal_files)
        record.update(
            beamline=dirs.beamline,
            run_number=run_number,
            request_id=request_id,
            request_time=request_time,
        )
        run_json = dirs.run_json(run_number)
        dirs.make_dir(run_json.parent, "run_info")
        try:
            create_atomic(run_json, dump_json(record))
        except FileExistsError:
            raise Conflict(
                f"run_number {run_number} of {dirs.pgroup} already holds a retrieval ({run_json})"
            ) from None
        if scan_file is not None and scan_document is not None:
            assert request.scan_info is not None
            _add_scan_step(scan_document, request, jobs)
            dirs.make_dir(scan_file.parent, "scan_info")
            write_atomic(scan_file, dump_json(scan_document))

    dirs.make_dir(dirs.output_dir(directory_name), "directory_name")
    return AcceptedRun(run_number, request_id, request_time, jobs, record)


def _take_run_number(request: RetrieveRequest, dirs: PgroupDirs) -> int:
    if request.run_number is None:
        return next_run_number(dirs)
    last = read_last_run(dirs)
    if request.run_number > last:
        raise BadRequest(
            f"run_number {request.run_number} has not been given out yet in {dirs.pgroup} "
            f"(last is {last}); reserve it with /advance_run_number first"
        )
    return request.run_number


def _check_run_tag(output_dir: Path, run_number: int, tag: str | None) -> None:
    """Refuse a run whose data files already exist under another tag (or none), as upstream
    refuses a second ``runNNNN*`` directory."""
    own = run_prefix(run_number, tag)
    plain = run_prefix(run_number)
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return
    others = sorted(
        name
        for name in names
        if (name.startswith(f"{plain}.") or name.startswith(f"{plain}-"))
        and not name.startswith(f"{own}.")
    )
    if others:
        raise Conflict(
            f"data files of run {run_number} exist already with another tag ({', '.join(others)})"
            f", not {tag!r}: use the same tag or another run"
        )


def _read_scan(scan_file: Any, dirs: PgroupDirs) -> dict[str, Any]:
    try:
        document = json.loads(scan_file.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise Conflict(f"scan file {scan_file} is not valid JSON ({exc}); fix or move it") from None
    if not isinstance(document, dict) or not isinstance(document.get("scan_files", []), list):
        raise Conflict(f"scan file {scan_file} does not hold a scan; fix or move it")
    return document


def _add_scan_step(document: dict[str, Any], request: RetrieveRequest, jobs: list[Job]) -> None:
    assert request.scan_info is not None
    if "scan_parameters" not in document:
        document["scan_parameters"] = {
            key: value for key, value in request.scan_info.items() if key not in SCAN_STEP_KEYS
        }
    document.setdefault("scan_files", []).append([job.output_file for job in jobs])
    document.setdefault("pulseIds", []).append([request.start_pulseid, request.stop_pulseid])
    for key in SCAN_STEP_KEYS:
        document.setdefault(key, []).append(request.scan_info.get(key, []))


def record_handover_failure(
    dirs: PgroupDirs, accepted: AcceptedRun, reason: str, handed_over: list[str]
) -> None:
    """Note in the run JSON that the jobs could not be queued (the run number stays spent)."""
    record = dict(accepted.record)
    record["handover"] = {
        "status": "failed",
        "reason": reason,
        "handed_over": handed_over,
        "time": request_time_now(),
    }
    write_atomic(dirs.run_json(accepted.run_number), dump_json(record))


def close_pgroup(dirs: PgroupDirs) -> None:
    with pgroup_lock(dirs):
        if dirs.closed_marker.exists():
            raise Conflict(f"pgroup {dirs.pgroup} is already closed for writing")
        create_atomic(dirs.closed_marker, b"")
