"""``copy_user_files``: put a user's files next to a run's data, safely.

Where: ``{run's directory}/run_NNNNNN.aux/`` (``run_NNNNNN-<tag>.aux/`` for a tagged run) —
upstream copies into ``runNNNN*/aux/``; our run's files share the ``run_NNNNNN`` prefix in
its ``directory_name``, so its auxiliary files sit beside them under that prefix.

What: only files the caller may read. The broker runs under a service account and knows the
caller only by its beamline, so, as upstream, a file may be copied when it belongs to the
pgroup's group (the group of its ``raw/`` directory) and that group may read it; it must be
a regular file (a FIFO or a device is refused without being read). The checks are made on
the opened file, so a path swapped after the check cannot slip another file in.

Never outside the pgroup: the destination directory is reached through a confined handle
(``bookkeeping.confined``: a symlink that leads out of ``raw/`` refuses the request), each file
is written under a temporary name created exclusively in it, then renamed over the destination
name (a symlink planted there is replaced, never followed). A copy that fails leaves nothing
behind.

Each file gets its own outcome: ``destination_files`` {source: destination} and
``error_files`` {source: reason}.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.atomic import partial_name
from sf_daq_broker.bookkeeping.confined import ConfinedDir, OutsideRaw
from sf_daq_broker.bookkeeping.paths import PgroupDirs, run_prefix
from sf_daq_broker.bookkeeping.runs import check_open
from sf_daq_broker.errors import BadRequest

MAX_FILES = 1000
AUX_SUFFIX = "aux"


@dataclass
class CopyOutcome:
    destination_files: dict[str, str] = field(default_factory=dict)
    error_files: dict[str, str] = field(default_factory=dict)


def parse_file_list(value: Any) -> list[str]:
    """The ``files`` of a request: absolute paths, each once, sorted (as upstream)."""
    if not isinstance(value, list):
        raise BadRequest(f"files must be a list of absolute paths, got {value!r}")
    if len(value) > MAX_FILES:
        raise BadRequest(f"files lists {len(value)} files; at most {MAX_FILES} per request")
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise BadRequest(f"files[{index}] must be a non-empty string, got {name!r}")
    return sorted(set(value))


def aux_directory(dirs: PgroupDirs, directory_name: str | None, run: int, tag: str | None) -> Path:
    return dirs.output_dir(directory_name) / f"{run_prefix(run, tag)}.{AUX_SUFFIX}"


def check_pgroup_open(dirs: PgroupDirs) -> None:
    """Refuse (409) copying into a closed pgroup (a pgroup without run_info has no run)."""
    try:
        with dirs.open_dir(dirs.run_info, "run_info") as run_info:
            check_open(dirs, run_info)
    except FileNotFoundError:
        return


def copy_user_files(dirs: PgroupDirs, target: Path, files: list[str]) -> CopyOutcome:
    """Copy each of ``files`` into ``target`` (a directory below ``raw/``, created here)."""
    outcome = CopyOutcome()
    group = os.stat(dirs.raw).st_gid
    names: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        directory: ConfinedDir | None = None
        for source in files:
            problem = _check_name(source, names)
            if problem is None:
                if directory is None:
                    directory = stack.enter_context(
                        dirs.open_dir(target, "the run's aux directory", create=True)
                    )
                problem = _copy_one(Path(source), directory, group, outcome)
            if problem is not None:
                outcome.error_files[source] = problem
            else:
                names[Path(source).name] = source
    return outcome


def _check_name(source: str, names: dict[str, str]) -> str | None:
    if "\0" in source or not source.startswith("/"):
        return f"{source!r} is not an absolute path"
    other = names.get(Path(source).name)
    if other is not None:
        return f"{other} of the same name is copied already"
    return None


def _copy_one(source: Path, target: ConfinedDir, group: int, outcome: CopyOutcome) -> str | None:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot be opened: {exc.strerror}"
    info = os.fstat(fd)
    problem = _may_copy(info, group)
    if problem is not None:
        os.close(fd)
        return problem
    with os.fdopen(fd, "rb") as reader:
        try:
            with target.new_file(partial_name(source.name, uuid.uuid4().hex[:12])) as temp:
                with open(temp.path, "wb") as writer:
                    shutil.copyfileobj(reader, writer, 1024 * 1024)
                os.utime(temp.path, ns=(info.st_atime_ns, info.st_mtime_ns))
                os.chmod(temp.path, stat.S_IMODE(info.st_mode) & 0o777)  # no set-id bits
                temp.publish(source.name)  # a symlink planted at the name is replaced
        except (OSError, OutsideRaw) as exc:
            return f"cannot be copied: {getattr(exc, 'strerror', None) or exc}"
    outcome.destination_files[str(source)] = str(target.path / source.name)
    return None


def _may_copy(info: os.stat_result, group: int) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_gid != group:
        return f"belongs to group {info.st_gid}, not to the pgroup's group {group}"
    if not info.st_mode & stat.S_IRGRP:
        return "is not readable by the pgroup's group"
    return None
