"""Output files that survive a full disk: every write error raised where it happens, and no
file closed in a way that crashes the process.

HDF5 defers writes: a dataset's chunk cache and a contiguous dataset's sieve buffer are
written when the dataset's last handle closes, the file's metadata when the file is flushed or
closed. If such a deferred write fails (no space left on the device, a quota exceeded), HDF5
has already freed part of the object's state but leaves its identifier valid, and h5py's next
touch of it (closing it again, the deallocation of a handle) is a use after free: the process
dies with a segmentation fault (h5py issues 914 and 2160; h5py 3.16 with HDF5 2.0 still does
it). The deallocation of a handle cannot even raise: h5py prints "Exception ignored" and the
data is silently lost. For a worker that is every job in hand lost, over a disk an operator
can clean up in minutes. So:

- ``create`` opens a new file without the raw-data caches (chunk cache and sieve buffer of
  0 bytes): a write goes to the disk in the call that makes it, which raises the ``OSError``
  itself, and closing a handle has nothing left to write. The files are written in large
  batches (whole chunks; a direct chunk write per image or frame), so the caches saved
  little; the few partial chunks at a batch's edges are written in place.
- ``close_flushed`` first allocates the disk blocks of the whole file up to HDF5's end of
  allocation (``fallocate``): the metadata that closing writes lies at addresses HDF5 handed
  out but never wrote, and with its blocks allocated the flush cannot run out of space. If
  they cannot be had the file is abandoned (below) and the ``OSError`` raised. A failed flush
  is not repaired by anything: HDF5 leaves its metadata cache half way through (a later
  flush or close fails with "slist already enabled"), so the file could never be closed.
- ``abandon`` closes a file that is thrown away (its job failed; the worker loop removes the
  temporary file). Its descriptor is first pointed at an anonymous file in memory
  (``memfd_create``), so whatever closing still writes lands there and succeeds, and the file
  on the full disk is released at once (an open descriptor would keep its blocks in use after
  the loop removed its name).
- Should the flush fail all the same (a file system without ``fallocate``, or one that
  allocates anew on every write), the file cannot be closed at all: its descriptor is pointed
  into memory as above and the file is kept open, unused, for the rest of the process
  (``_unclosable``), which costs its metadata cache but never a crash.

h5py reports a failed flush as a ``RuntimeError`` whose errno HDF5 put only in the message
("errno = 28"); ``close_flushed`` raises it as the ``OSError`` it is, so that the worker loop
sees the cause, as it does for a failed write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import h5py

log = logging.getLogger(__name__)

_HDF5_ERRNO = re.compile(r"\berrno = (\d+)")
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
#: ``fallocate`` errors that mean "not here" (the file system cannot), not "no room".
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS})
#: Files whose flush failed and that can therefore never be closed (see the module docstring).
_unclosable: list[h5py.File] = []


def create(path: Path | str) -> h5py.File:
    """A new file at ``path`` (truncated if it exists), as ``h5py.File(path, "w")`` opens it
    (sec2 driver, earliest file format, no object times) but without raw-data caches."""
    access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    access.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    metadata_entries, chunk_slots, _, preemption = access.get_cache()
    access.set_cache(metadata_entries, chunk_slots, 0, preemption)
    access.set_sieve_buf_size(0)
    creation = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    creation.set_obj_track_times(False)
    name = os.fsencode(path)
    return h5py.File(h5py.h5f.create(name, h5py.h5f.ACC_TRUNC, fapl=access, fcpl=creation))


def close_flushed(file: h5py.File) -> None:
    """Close a file that is complete: reserve its blocks, flush, close. ``OSError`` if the disk
    is full, and the file is then given up (see the module docstring)."""
    if not file.id.valid:
        return
    try:
        _reserve(file)
    except OSError:
        abandon(file)
        raise
    try:
        file.flush()
    except Exception as exc:
        _keep_unclosed(file, exc)
        error = os_error(exc)
        if error is exc:
            raise
        raise error from exc
    file.close()


def abandon(file: h5py.File) -> None:
    """Close a file that is thrown away, writing nothing more to its disk."""
    if not file.id.valid:
        return
    _into_memory(file)
    file.close()


@contextlib.contextmanager
def written(path: Path | str) -> Iterator[h5py.File]:
    """A new file (``create``) closed with ``close_flushed``, or abandoned if the block
    raises."""
    file = create(path)
    try:
        yield file
    except BaseException:
        abandon(file)
        raise
    close_flushed(file)


def os_error(exc: Exception) -> Exception:
    """``exc`` as an ``OSError`` with the errno HDF5 wrote into h5py's message, if it did not
    come as one already; otherwise ``exc`` itself."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    found = _HDF5_ERRNO.search(str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, f"{os.strerror(code)} ({exc})")


def _reserve(file: h5py.File) -> None:
    """Allocate the blocks of bytes 0 to HDF5's end of allocation (those written already are
    skipped by the file system); nothing on a file system without ``fallocate``."""
    size = int(file.id.get_filesize())  # the end of allocation, beyond the data written
    if file.driver != "sec2" or size <= 0:
        return
    if _fallocate(int(file.id.get_vfd_handle()), 0, 0, size) == 0:
        return
    code = ctypes.get_errno()
    if code not in _NO_FALLOCATE:
        raise OSError(code, os.strerror(code))


def _into_memory(file: h5py.File) -> None:
    """Point the file's descriptor at an anonymous file in memory."""
    if file.driver != "sec2":  # every file written here has a descriptor of its own
        return
    memory = os.memfd_create("abandoned.h5", os.MFD_CLOEXEC)
    try:
        os.dup2(memory, int(file.id.get_vfd_handle()), inheritable=False)
    finally:
        os.close(memory)


def _keep_unclosed(file: h5py.File, exc: Exception) -> None:
    """The flush failed: the file can be neither closed nor written; release its disk."""
    _into_memory(file)
    _unclosable.append(file)
    log.error(
        "%s could not be flushed (%s): kept open, unused, until the process ends (%d such)",
        file.filename,
        exc,
        len(_unclosable),
    )
