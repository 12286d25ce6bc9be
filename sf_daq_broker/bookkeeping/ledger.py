"""Accepting a run: run number, bookkeeping JSON, scan step and output directory, in that order.

Everything that can refuse a request is checked before a run number is spent (also that the
file system has room for the run's bookkeeping); the number, the run JSON and the scan step are
then written under one hold of the pgroup lock, so concurrent requests get consecutive numbers
and their scan steps appear in run-number order. Concurrent requests of one pgroup are
committed together (``group_commit``): one lock hold, one ``LAST_RUN`` write and one round of
fsyncs for the whole batch instead of four fsyncs each (see ``_Batch`` for the order of the
writes that keeps every crash safe). Every file is written through a confined handle on its
directory (``confined``): a symlink planted in ``raw/`` is never written through.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.atomic import dump_json, fsync_all
from sf_daq_broker.bookkeeping.confined import ConfinedDir
from sf_daq_broker.bookkeeping.group_commit import GroupCommit, Pending
from sf_daq_broker.bookkeeping.paths import (
    PgroupDirs,
    check_directory_name,
    clean_relative_path,
    run_prefix,
)
from sf_daq_broker.bookkeeping.runs import check_open, pgroup_lock, read_last_run
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


@dataclass(frozen=True)
class _Checked:
    """A request checked outside the lock, waiting for its batch (``group_commit``)."""

    request: RetrieveRequest
    dirs: PgroupDirs
    directory_name: str | None
    scan_file: Path | None
    what_scan: str
    pedestal_files: dict[str, str] | None


def accept_request(
    request: RetrieveRequest,
    dirs: PgroupDirs,
    min_free_bytes: int = 1,
    pedestal_files: dict[str, str] | None = None,
) -> AcceptedRun:
    """Give the request its run, write its bookkeeping and create its output directory.

    ``pedestal_files`` (detector → file) are the pedestals the converting detectors use: they
    go into the run JSON (``pedestal_files``) and the detector jobs.

    Concurrent calls for one pgroup are committed together (``_commit_batch``): one hold of
    the lock, one ``LAST_RUN`` write and the batch's fsyncs issued at once.
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
    checked = _Checked(request, dirs, directory_name, scan_file, what_scan, pedestal_files)
    return _committer(dirs).submit(checked)


_committers: dict[str, GroupCommit[_Checked, AcceptedRun]] = {}
_committers_guard = threading.Lock()


def _committer(dirs: PgroupDirs) -> GroupCommit[_Checked, AcceptedRun]:
    """The pgroup's committer, by the path of its ``run_info/`` (two paths to one pgroup get
    two committers: still correct, since every batch takes the pgroup lock)."""
    key = str(dirs.run_info)
    with _committers_guard:
        committer = _committers.get(key)
        if committer is None:
            committer = _committers[key] = GroupCommit(_commit_batch)
        return committer


@dataclass
class _Staged:
    """A request with its run: its run JSON written under a temporary name, not yet linked."""

    entry: Pending[_Checked, AcceptedRun]
    accepted: AcceptedRun
    directory: ConfinedDir
    temp: str
    fd: int


class _Batch:
    """The requests of one lock hold: runs given out in arrival order, written together.

    Order of the writes (a crash at any instant is safe): every run JSON is written under a
    temporary name and ``LAST_RUN``'s replacement beside them, all fsynced at once; then
    ``LAST_RUN`` is renamed (a number is spent only now) and its directory fsynced; then the
    run JSONs are linked to their names and their directories fsynced; then each scan touched
    gets its steps, in run-number order, in one atomic rewrite. A crash before the rename
    spends nothing; after it, the numbers are spent (never given twice), as when a single
    request's run JSON could not be written.
    """

    def __init__(self, dirs: PgroupDirs, run_info: ConfinedDir, handles: ExitStack) -> None:
        self.dirs = dirs
        self.run_info = run_info
        self._handles = handles
        self._opened: dict[tuple[Path, bool], ConfinedDir] = {}
        self.first_last = self.last = read_last_run(dirs, run_info)
        self.staged: list[_Staged] = []
        self._claimed: set[int] = set()
        self._scans: dict[Path, dict[str, Any]] = {}

    def open_dir(self, path: Path, what: str, *, create: bool = False) -> ConfinedDir:
        """A confined handle on ``path``, opened once per batch."""
        key = (path, create)
        if key not in self._opened:
            self._opened[key] = self._handles.enter_context(
                self.dirs.open_dir(path, what, create=create)
            )
        return self._opened[key]

    def stage(self, entry: Pending[_Checked, AcceptedRun]) -> None:
        """Give ``entry`` its run and write its run JSON (temporary name); raises, spending
        no number, if the request is refused."""
        checked = entry.item
        request, dirs = checked.request, checked.dirs
        if checked.scan_file is not None and checked.scan_file not in self._scans:
            self._scans[checked.scan_file] = _read_scan(checked.scan_file, dirs, checked.what_scan)
        run_number = _choose_run_number(request, dirs, self.last)
        tag = request.run_options.file_tag
        _check_run_tag(dirs.output_dir(checked.directory_name), run_number, tag)
        request_id = str(uuid.uuid4())
        request_time = request_time_now()
        jobs = build_jobs(
            request,
            dirs,
            run_number,
            request_id,
            request_time,
            checked.directory_name,
            checked.pedestal_files,
        )
        record = dict(request.record)
        if checked.directory_name is not None:
            record["directory_name"] = checked.directory_name
        if tag is not None:
            record["appended_directory_suffix"] = tag
        if checked.pedestal_files:
            record["pedestal_files"] = dict(checked.pedestal_files)
        record.update(
            beamline=dirs.beamline,
            run_number=run_number,
            request_id=request_id,
            request_time=request_time,
        )
        run_json = dirs.run_json(run_number)
        # The directories are opened (created) before the number is spent: one that a symlink
        # leads out of raw/, or a file blocks, refuses the request with its number unspent.
        info_dir = self.open_dir(run_json.parent, "run_info", create=True)
        self.open_dir(dirs.output_dir(checked.directory_name), "directory_name", create=True)
        if run_number in self._claimed or info_dir.exists(run_json.name):
            if request.run_number is None:  # spent, so the next request does not meet it again
                self.last = run_number
            raise Conflict(
                f"run_number {run_number} of {dirs.pgroup} already holds a retrieval ({run_json})"
            )
        temp = f".{run_json.name}.{request_id}.tmp"
        fd = info_dir.write_unsynced(temp, dump_json(record))  # a full disk spends nothing
        if request.run_number is None:
            self.last = run_number
        self._claimed.add(run_number)
        accepted = AcceptedRun(run_number, request_id, request_time, jobs, record)
        self.staged.append(_Staged(entry, accepted, info_dir, temp, fd))

    def commit(self) -> None:
        """Make the staged runs durable and give each request its outcome."""
        last_run_fd = -1
        name = self.dirs.last_run_file.name
        temp = f".{name}.tmp"
        try:
            if self.last > self.first_last:
                last_run_fd = self.run_info.write_unsynced(temp, f"{self.last}\n".encode())
            fsync_all([s.fd for s in self.staged] + ([last_run_fd] if last_run_fd >= 0 else []))
            if last_run_fd >= 0:
                self.run_info.rename(temp, name)
                self.run_info.fsync()
        except BaseException:
            self.run_info.unlink(temp)
            self.discard()
            raise
        finally:
            if last_run_fd >= 0:
                os.close(last_run_fd)
            self._close_staged()
        linked = self._link()
        fsync_all(list({s.directory.fd for s in linked}))
        self._write_scans(linked)
        for staged in linked:
            if not staged.entry.done:
                staged.entry.succeed(staged.accepted)

    def discard(self) -> None:
        """Remove the staged files (the batch failed before they were linked)."""
        self._close_staged()
        for staged in self.staged:
            staged.directory.unlink(staged.temp)

    def _close_staged(self) -> None:
        for staged in self.staged:
            if staged.fd >= 0:
                os.close(staged.fd)
                staged.fd = -1

    def _link(self) -> list[_Staged]:
        linked = []
        for staged in self.staged:
            name = self.dirs.run_json(staged.accepted.run_number).name
            try:
                staged.directory.link(staged.temp, name)
            except FileExistsError:
                staged.entry.fail(
                    Conflict(
                        f"run_number {staged.accepted.run_number} of {self.dirs.pgroup} already "
                        f"holds a retrieval ({staged.directory.path / name})"
                    )
                )
            except OSError as exc:
                staged.entry.fail(exc)
            else:
                linked.append(staged)
            finally:
                staged.directory.unlink(staged.temp)
        return linked

    def _write_scans(self, linked: list[_Staged]) -> None:
        """Append the steps of the linked runs to their scans, one rewrite per scan file."""
        steps: dict[Path, list[_Staged]] = {}
        for staged in linked:
            scan_file = staged.entry.item.scan_file
            if scan_file is not None:
                steps.setdefault(scan_file, []).append(staged)
        for scan_file, members in steps.items():
            document = self._scans[scan_file]
            for staged in members:
                _add_scan_step(document, staged.entry.item.request, staged.accepted.jobs)
            try:
                scan_dir = self.open_dir(
                    scan_file.parent, members[0].entry.item.what_scan, create=True
                )
                scan_dir.write_atomic(scan_file.name, dump_json(document))
            except Exception as exc:
                for staged in members:
                    staged.entry.fail(exc)


def _commit_batch(entries: list[Pending[_Checked, AcceptedRun]]) -> None:
    """Accept the requests of ``entries`` (one pgroup) under one hold of the pgroup lock."""
    dirs = entries[0].item.dirs
    with pgroup_lock(dirs) as run_info, ExitStack() as handles:
        check_open(dirs, run_info)
        batch = _Batch(dirs, run_info, handles)
        try:
            for entry in entries:
                try:
                    batch.stage(entry)
                except Exception as exc:  # this request is refused; the others go on
                    entry.fail(exc)
        except BaseException:
            batch.discard()
            raise
        batch.commit()


def _choose_run_number(request: RetrieveRequest, dirs: PgroupDirs, last: int) -> int:
    """The request's run number: the next one, or the one it reserved before."""
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
