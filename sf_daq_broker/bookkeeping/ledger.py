"""Accepting a run: run number, bookkeeping JSON, scan step and output directory, in that order.

Everything that can refuse a request is checked before a run number is spent (also that the
file system has room for the run's bookkeeping); the number, the run JSON and the scan step are
then written under one hold of the pgroup lock, so concurrent requests get consecutive numbers
and their scan steps appear in run-number order. Every file is written through a confined
handle on its directory (``confined``): a symlink planted in ``raw/`` is never written through.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.atomic import dump_json
from sf_daq_broker.bookkeeping.confined import ConfinedDir
from sf_daq_broker.bookkeeping.paths import (
    PgroupDirs,
    check_directory_name,
    clean_relative_path,
    run_prefix,
)
from sf_daq_broker.bookkeeping.runs import check_open, pgroup_lock, read_last_run, write_last_run
from sf_daq_broker.errors import BadRequest, Conflict, InsufficientStorage
from sf_daq_broker.jobs import Job, build_jobs
from sf_daq_broker.retrieval import RetrieveRequest

#: Where ``keep_raw`` detector files go, below raw/ (SPEC §5.4).
RAW_DATA = "RAW_DATA"
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


def check_free_space(dirs: PgroupDirs, needed: int) -> None:
    """Refuse (507) before a run number is spent when ``raw/`` has not ``needed`` bytes free."""
    stats = os.statvfs(dirs.raw)
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise InsufficientStorage(
            f"the file system of {dirs.raw} is full ({free} bytes free, at least {needed} "
            f"needed): no run number was given out; free space and send the request again"
        )


def accept_request(
    request: RetrieveRequest,
    dirs: PgroupDirs,
    min_free_bytes: int = 1,
    pedestal_files: dict[str, str] | None = None,
) -> AcceptedRun:
    """Give the request its run, write its bookkeeping and create its output directory.

    ``pedestal_files`` (detector → file) are the pedestals the converting detectors use: they
    go into the run JSON (``pedestal_files``) and the detector jobs.
    """
    directory_name = None
    if request.directory_name is not None:
        directory_name = check_directory_name(dirs, request.directory_name, "directory_name")
    scan_file = None
    what_scan = f"scan_info.scan_name {request.scan_name!r}"
    if request.scan_name is not None:
        scan_name = clean_relative_path(request.scan_name, "scan_info.scan_name")
        scan_file = dirs.scan_json(scan_name)
        dirs.check_reachable(scan_file.parent, what_scan)
    keep_raw = [
        name for name, opts in request.detectors.items() if opts.keep_raw and opts.adc_to_energy
    ]
    if keep_raw:
        dirs.check_reachable(
            dirs.raw / RAW_DATA / (directory_name or ""), f"detectors.{keep_raw[0]}.keep_raw"
        )
    # Room for the run JSON and the scan step (each about the size of the request), with margin.
    check_free_space(dirs, min_free_bytes + 4 * len(dump_json(request.record)))

    with pgroup_lock(dirs) as run_info:
        check_open(dirs, run_info)
        scan_document = _read_scan(scan_file, dirs, what_scan) if scan_file else None
        run_number = _choose_run_number(request, dirs, run_info)
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
        # The directories are opened (created) before the number is spent: one that a symlink
        # leads out of raw/, or a file blocks, refuses the request with its number unspent.
        with (
            dirs.open_dir(run_json.parent, "run_info", create=True) as info_dir,
            dirs.open_dir(dirs.output_dir(directory_name), "directory_name", create=True),
        ):
            if request.run_number is None:
                write_last_run(dirs, run_info, run_number)
            try:
                info_dir.create_atomic(run_json.name, dump_json(record))
            except FileExistsError:
                raise Conflict(
                    f"run_number {run_number} of {dirs.pgroup} already holds a retrieval "
                    f"({run_json})"
                ) from None
        if scan_file is not None and scan_document is not None:
            assert request.scan_info is not None
            _add_scan_step(scan_document, request, jobs)
            with dirs.open_dir(scan_file.parent, what_scan, create=True) as scan_dir:
                scan_dir.write_atomic(scan_file.name, dump_json(scan_document))
    return AcceptedRun(run_number, request_id, request_time, jobs, record)


def _choose_run_number(request: RetrieveRequest, dirs: PgroupDirs, run_info: ConfinedDir) -> int:
    """The request's run number; a new one is only written to LAST_RUN by the caller."""
    last = read_last_run(dirs, run_info)
    if request.run_number is None:
        return last + 1
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
    except OSError:  # not there yet (or not a directory: opening it refuses the request)
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


def _read_scan(scan_file: Path, dirs: PgroupDirs, what: str) -> dict[str, Any]:
    try:
        with dirs.open_dir(scan_file.parent, what) as scan_dir:
            data = scan_dir.read_bytes(scan_file.name)
    except FileNotFoundError:
        return {}
    except OSError as exc:  # a symlink planted at the scan file (ELOOP): never read through
        raise Conflict(
            f"scan file {scan_file} cannot be read ({exc.strerror}); fix or move it"
        ) from None
    try:
        document = json.loads(data)
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
    run_json = dirs.run_json(accepted.run_number)
    with dirs.open_dir(run_json.parent, "run_info") as info_dir:
        info_dir.write_atomic(run_json.name, dump_json(record))


def close_pgroup(dirs: PgroupDirs) -> None:
    with pgroup_lock(dirs) as run_info:
        try:
            run_info.create_atomic(dirs.closed_marker.name, b"")
        except FileExistsError:
            raise Conflict(f"pgroup {dirs.pgroup} is already closed for writing") from None
