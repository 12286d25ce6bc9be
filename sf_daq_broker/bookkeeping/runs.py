"""Run numbers: strictly increasing, never given twice, across threads, processes and hosts.

``LAST_RUN`` holds the last number given out. It is only changed under an exclusive lock on
``run_info/.lock`` — a POSIX record lock (``fcntl.lockf``), which also works between hosts on
NFS — and is replaced atomically (fixed temporary name, fsync, rename, fsync of the directory),
so after a crash at any instant it holds either the old or the new number, never garbage, and
never less than a number already returned (the number is returned only after the rename is
durable). POSIX locks belong to a process, so threads of one process are serialised in addition
by an in-process lock per pgroup. Every file here is opened relative to a confined handle on
``run_info/`` (see ``confined``), so a symlink planted in ``run_info/`` is never written through.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sf_daq_broker.bookkeeping.confined import ConfinedDir
from sf_daq_broker.bookkeeping.paths import PgroupDirs
from sf_daq_broker.errors import Conflict

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


class CorruptBookkeeping(RuntimeError):
    """LAST_RUN exists but is not a number: never guess, a person must look at it."""


def _thread_lock(dirs: PgroupDirs) -> threading.Lock:
    key = os.path.realpath(dirs.run_info)
    with _thread_locks_guard:
        return _thread_locks.setdefault(key, threading.Lock())


@contextmanager
def pgroup_lock(dirs: PgroupDirs) -> Iterator[ConfinedDir]:
    """Hold the pgroup's bookkeeping lock (threads of this process and other processes);
    yields the confined handle on ``run_info/`` that every bookkeeping write goes through."""
    with dirs.open_dir(dirs.run_info, "run_info", create=True) as run_info, _thread_lock(dirs):
        try:
            fd = run_info.open_fd(dirs.lock_file.name, os.O_RDWR | os.O_CREAT)
        except OSError as exc:  # a symlink planted at .lock (ELOOP): never locked through
            raise Conflict(
                f"the lock file {dirs.lock_file} cannot be opened ({exc.strerror}): "
                "a person must look at it"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                yield run_info
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def read_last_run(dirs: PgroupDirs, run_info: ConfinedDir | None = None) -> int:
    """The last run number given out; 0 when LAST_RUN does not exist yet."""
    try:
        if run_info is not None:
            data = run_info.read_bytes(dirs.last_run_file.name)
        else:
            with dirs.open_dir(dirs.run_info, "run_info") as opened:
                data = opened.read_bytes(dirs.last_run_file.name)
    except FileNotFoundError:
        return 0
    except OSError as exc:  # a symlink at LAST_RUN (ELOOP): never read through it
        raise Conflict(
            f"{dirs.last_run_file} cannot be read ({exc.strerror}): a person must look at it"
        ) from None
    text = data.decode("utf-8", "replace")
    try:
        value = int(text.strip())
    except ValueError:
        raise CorruptBookkeeping(
            f"{dirs.last_run_file} does not hold a run number: {text!r}"
        ) from None
    if value < 0:
        raise CorruptBookkeeping(f"{dirs.last_run_file} holds a negative run number: {value}")
    return value


def next_run_number(dirs: PgroupDirs, run_info: ConfinedDir) -> int:
    """Give out the next run number. The caller must hold :func:`pgroup_lock` (``run_info``)."""
    run_number = read_last_run(dirs, run_info) + 1
    write_last_run(dirs, run_info, run_number)
    return run_number


def write_last_run(dirs: PgroupDirs, run_info: ConfinedDir, run_number: int) -> None:
    """Record ``run_number`` as given out (durably). The caller holds :func:`pgroup_lock`."""
    name = dirs.last_run_file.name
    run_info.write_atomic(name, f"{run_number}\n".encode(), temp_name=f".{name}.tmp")


def check_open(dirs: PgroupDirs, run_info: ConfinedDir) -> None:
    """Refuse writing into a closed pgroup. The caller should hold :func:`pgroup_lock`."""
    if run_info.exists(dirs.closed_marker.name):
        raise Conflict(f"pgroup {dirs.pgroup} is closed for writing")


def allocate_run_number(dirs: PgroupDirs) -> int:
    """Reserve the next run number on its own (``/advance_run_number``)."""
    with pgroup_lock(dirs) as run_info:
        check_open(dirs, run_info)
        return next_run_number(dirs, run_info)
