"""Writes that cannot leave a pgroup's ``raw/`` directory, whatever symlinks are planted in it.

Checking a path with ``realpath`` and then opening it by name leaves a window: a directory
swapped for a symlink in between (a job waits in the queue for minutes) redirects the write.
So every writer holds a *handle on a verified directory* instead: a file descriptor reached
from ``raw/`` one component at a time with ``O_NOFOLLOW | O_DIRECTORY``, and it creates,
renames and removes files only relative to it (``dir_fd=``, never following a symlink at a
file's name). A symlink planted later at a directory's name cannot redirect a handle already
held; one planted at a file's name is never followed.

Symlinks that stay inside ``raw/`` keep working (SPEC §3: the resolved path must stay inside
``raw/``): the walk reads such a link and follows it itself, component by component, and
refuses one that leads out (an absolute target elsewhere, ``..`` above ``raw/``).

A library that opens files by name (h5py) gets ``/proc/self/fd/N`` of a file created here:
the kernel reopens exactly that inode, no name is looked up, so its writes land in the file
this module created, at full speed through the library's own descriptor.

Use::

    with open_below(raw, "some/dir", create=True) as directory:
        directory.write_atomic("run_000001.json", data)
        with directory.new_file(".x.partial") as temp:   # h5py.File(temp.path, "w") ...
            temp.publish("x.h5")                          # verified again, fsynced, renamed
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
import uuid
from contextlib import AbstractContextManager, suppress
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
#: Symlinks followed in one walk before giving up (the kernel's own limit is 40).
MAX_SYMLINKS = 40


class OutsideRaw(Exception):
    """A path leads outside ``raw/`` (by a symlink) or was moved out of it: never written."""


class _Walk:
    """One walk from ``root`` down ``relative``: symlinks inside ``root`` are followed here,
    by reading them, never by the kernel."""

    def __init__(self, root: Path, root_fd: int, create: bool) -> None:
        self.root = root
        self.root_fd = root_fd
        self.create = create
        self.hops = 0

    def run(self, relative: PurePosixPath) -> tuple[int, PurePosixPath]:
        """The open directory and its path below ``root`` with every symlink resolved."""
        pending = list(relative.parts)
        resolved: list[str] = []
        fd = os.dup(self.root_fd)
        try:
            while pending:
                name = pending.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    if not resolved:
                        raise OutsideRaw(f"{self._show(resolved)}/.. is above {self.root}")
                    resolved.pop()
                    os.close(fd)
                    fd = -1
                    fd = self._reopen(resolved)
                    continue
                step = self._step(fd, name, resolved)
                if isinstance(step, int):
                    os.close(fd)
                    fd = step
                    resolved.append(name)
                    continue
                # A symlink: walk its target instead (from the root if it is absolute).
                self.hops += 1
                if self.hops > MAX_SYMLINKS:
                    raise OutsideRaw(f"too many symlinks below {self.root}")
                target = PurePosixPath(step)
                link = f"{self._show(resolved)}/{name}"
                if target.is_absolute():
                    inside = self._below_root(target)
                    if inside is None:
                        raise OutsideRaw(f"{link} is a symlink to {target}, outside {self.root}")
                    resolved = []
                    os.close(fd)
                    fd = -1
                    fd = os.dup(self.root_fd)
                    pending[:0] = list(inside.parts)
                else:
                    pending[:0] = list(target.parts)
            return fd, PurePosixPath(*resolved) if resolved else PurePosixPath()
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _step(self, dir_fd: int, name: str, resolved: list[str]) -> int | str:
        """Open ``name`` below ``dir_fd`` as a directory; a symlink's target instead."""
        shown = str(self.root.joinpath(*resolved, name))
        for _ in range(2):
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                if not self.create:
                    raise FileNotFoundError(
                        errno.ENOENT, os.strerror(errno.ENOENT), shown
                    ) from None
                # Created here (never through a symlink: mkdirat does not follow one).
                try:
                    os.mkdir(name, dir_fd=dir_fd)
                except FileExistsError:
                    pass  # created meanwhile, maybe as a symlink: look again
                except OSError as exc:  # e.g. a full disk: name the whole path
                    raise OSError(exc.errno, exc.strerror, shown) from None
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                try:
                    return os.readlink(name, dir_fd=dir_fd)
                except OSError:
                    raise NotADirectoryError(
                        errno.ENOTDIR, os.strerror(errno.ENOTDIR), shown
                    ) from None
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)

    def _reopen(self, resolved: list[str]) -> int:
        fd = os.dup(self.root_fd)
        try:
            for name in resolved:
                step = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = step
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _below_root(self, target: PurePosixPath) -> PurePosixPath | None:
        """``target`` relative to the root, under the root's name or its real path."""
        for root in {str(self.root), os.path.realpath(self.root)}:
            try:
                return PurePosixPath(os.path.normpath(target)).relative_to(root)
            except ValueError:
                continue
        return None

    def _show(self, resolved: list[str]) -> str:
        return str(self.root.joinpath(*resolved))


class ConfinedDir:
    """An open directory below a root (a pgroup's ``raw/``); files only relative to it.

    ``path`` is where the directory was found (for messages). Names given to the methods are
    single path components; a symlink at such a name is never followed.
    """

    def __init__(self, root: Path, root_fd: int, relative: PurePosixPath, fd: int) -> None:
        self.root = root
        self._root_fd = root_fd
        self.relative = relative
        self.fd = fd

    @property
    def path(self) -> Path:
        return self.root / self.relative

    def __repr__(self) -> str:
        return f"ConfinedDir({str(self.path)!r})"

    # --- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        for fd in (self.fd, self._root_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._root_fd = -1

    def __enter__(self) -> ConfinedDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def subdir(self, relative: str | PurePosixPath, *, create: bool = False) -> ConfinedDir:
        """A directory below this one (same root, same rules); the caller closes it."""
        return _open(self.root, os.dup(self._root_fd), self.relative / relative, create=create)

    def verify(self) -> None:
        """Check that this directory still is the one its path below the root leads to.

        A directory renamed away, or swapped for a symlink, since it was opened fails here, so
        a file is never published into a directory that left ``raw/``.
        """
        try:
            fd, _ = _Walk(self.root, self._root_fd, create=False).run(self.relative)
        except (OutsideRaw, OSError) as exc:
            raise OutsideRaw(f"{self.path} was replaced since the job started ({exc})") from exc
        try:
            now, held = os.fstat(fd), os.fstat(self.fd)
        finally:
            os.close(fd)
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise OutsideRaw(f"{self.path} was moved or replaced since the job started")

    # --- reading --------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry ``name`` itself (a symlink is not followed); None if there is none."""
        try:
            return os.stat(_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def read_bytes(self, name: str) -> bytes:
        """The content of the file ``name``; a symlink there is refused (ELOOP)."""
        fd = self.open_fd(name, os.O_RDONLY)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def names(self, pattern: str = "*") -> list[str]:
        """Entries of the directory matching a shell ``pattern``, sorted."""
        return sorted(fnmatch.filter(os.listdir(self.fd), pattern))

    # --- writing --------------------------------------------------------------------------

    def open_fd(self, name: str, flags: int, mode: int = 0o644) -> int:
        """``os.open`` of ``name`` in this directory, never following a symlink."""
        try:
            return os.open(_name(name), flags | _FILE_FLAGS, mode, dir_fd=self.fd)
        except OSError as exc:  # name the whole path, for messages
            raise type(exc)(exc.errno, exc.strerror, str(self.path / name)) from None

    def open_append(self, name: str) -> IO[str]:
        """A text file opened for appending (a job's log), created if missing."""
        fd = self.open_fd(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fdopen(fd, "a", encoding="utf-8")

    def new_file(self, name: str) -> ConfinedFile:
        """Create ``name`` exclusively (an existing entry, also a symlink, is removed first
        when ``name`` is one of ours: a temporary name of this writer)."""
        with _ignore_missing():
            os.unlink(_name(name), dir_fd=self.fd)
        fd = self.open_fd(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        return ConfinedFile(self, name, fd)

    def write_atomic(self, name: str, data: bytes, temp_name: str | None = None) -> None:
        """Replace ``name`` with ``data``: temporary file, fsync, rename, fsync of the directory.

        ``temp_name`` lets a caller that holds a lock reuse one fixed temporary name, so that
        a crash never leaves a growing litter of temporary files behind.
        """
        temp = temp_name or _temporary(name)
        try:
            self._write_new(temp, data)
            os.replace(temp, _name(name), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(temp)
            raise
        os.fsync(self.fd)

    def create_atomic(self, name: str, data: bytes) -> None:
        """Create ``name`` with ``data`` atomically; FileExistsError if it exists already.

        A hard link, unlike a rename, refuses to replace an existing entry, so two writers
        racing for the same name cannot both believe they created it.
        """
        temp = _temporary(name)
        try:
            self._write_new(temp, data)
            os.link(
                temp, _name(name), src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False
            )
        finally:
            self.unlink(temp)
        os.fsync(self.fd)

    def _write_new(self, name: str, data: bytes) -> None:
        fd = self.write_unsynced(name, data)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_unsynced(self, name: str, data: bytes) -> int:
        """Create ``name`` (one of our temporary names: a leftover is removed first) holding
        ``data``, not yet fsynced; returns its open descriptor, which the caller fsyncs (with
        other files at once, see ``atomic.fsync_all``) and closes."""
        with _ignore_missing():
            os.unlink(_name(name), dir_fd=self.fd)
        fd = self.open_fd(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            self.unlink(name)
            raise
        return fd

    def unlink(self, name: str) -> None:
        """Remove ``name`` (a symlink itself, never its target); nothing if it is gone."""
        with _ignore_missing():
            os.unlink(_name(name), dir_fd=self.fd)

    def rename(self, source: str, target: str) -> None:
        """Rename within this directory (replacing ``target``; a symlink there is replaced,
        not followed)."""
        os.replace(_name(source), _name(target), src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def link(self, source: str, target: str) -> None:
        """Hard-link ``source`` (never through a symlink) as ``target``; FileExistsError if
        ``target`` exists."""
        os.link(
            _name(source),
            _name(target),
            src_dir_fd=self.fd,
            dst_dir_fd=self.fd,
            follow_symlinks=False,
        )

    def touch(self, name: str) -> None:
        """Set the mtime of ``name`` to now (a symlink's own, never its target's)."""
        os.utime(_name(name), dir_fd=self.fd, follow_symlinks=False)

    def fsync(self) -> None:
        """Make renames and links in this directory durable."""
        os.fsync(self.fd)


class ConfinedFile:
    """A file this process created exclusively in a ``ConfinedDir``, held open.

    ``path`` (``/proc/self/fd/N``) lets libraries that open by name (h5py) write exactly this
    inode. ``publish`` gives it its final name; leaving the ``with`` block without publishing
    removes it.
    """

    def __init__(self, directory: ConfinedDir, name: str, fd: int) -> None:
        self.directory = directory
        self.name = name
        self.fd = fd
        self.published = False
        # publish may run in a thread while a cancelled task discards the file.
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return Path(f"/proc/self/fd/{self.fd}")

    @property
    def shown_path(self) -> Path:
        """Where the file is (for messages)."""
        return self.directory.path / self.name

    def _still_ours(self) -> bool:
        entry = self.directory.lstat(self.name)
        held = os.fstat(self.fd)
        return entry is not None and (entry.st_dev, entry.st_ino) == (held.st_dev, held.st_ino)

    def check(self) -> None:
        """``OutsideRaw`` if the temporary name no longer is this file (replaced, e.g. by a
        symlink): explains why a library could not open or write it."""
        if not self._still_ours():
            raise OutsideRaw(f"{self.shown_path} was replaced by something else while written")

    def publish(self, final_name: str) -> None:
        """fsync the file, check its directory still lies where it was found and that the
        temporary name still is this file, rename it to ``final_name``, fsync the directory."""
        with self._lock:
            if self.fd < 0:
                raise ValueError(f"{self.shown_path} was discarded")
            os.fsync(self.fd)
            self.directory.verify()
            self.check()
            self.directory.rename(self.name, final_name)
            self.directory.fsync()
            self.published = True
            self._close()

    def discard(self) -> None:
        """Remove the temporary file's name (this writer's own name, whatever it holds now:
        also a symlink planted there, never its target)."""
        with self._lock:
            if not self.published and self.fd >= 0:
                self.directory.unlink(self.name)
            self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ConfinedFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()


def _name(name: str) -> str:
    """A single path component (a bug, not an attack, if it is not: names are built here)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a file name")
    return name


def _temporary(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"


def _ignore_missing() -> AbstractContextManager[None]:
    return suppress(FileNotFoundError)


def _open(root: Path, root_fd: int, relative: PurePosixPath, *, create: bool) -> ConfinedDir:
    try:
        fd, resolved = _Walk(root, root_fd, create).run(relative)
    except BaseException:
        os.close(root_fd)
        raise
    return ConfinedDir(root, root_fd, resolved, fd)


def open_root(root: Path) -> int:
    """The root itself is trusted (the facility's layout may use symlinks above ``raw/``)."""
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_below(
    root: Path | str, relative: str | PurePosixPath = "", *, create: bool = False
) -> ConfinedDir:
    """The directory ``relative`` below ``root``, created (``create``) as needed.

    ``OutsideRaw`` if the way there leaves ``root``; ``FileNotFoundError`` if a component
    is missing and ``create`` is false; ``NotADirectoryError`` if one is a file.
    """
    root = Path(root)
    relative = PurePosixPath(relative)
    if relative.is_absolute():
        raise ValueError(f"{relative} must be relative to {root}")
    return _open(root, open_root(root), relative, create=create)


def reach_below(root: Path | str, relative: str | PurePosixPath) -> None:
    """Check that ``relative`` stays inside ``root`` as far as it exists (nothing is created);
    ``OutsideRaw`` if a symlink on the way leads out."""
    parts = PurePosixPath(relative).parts
    for depth in range(len(parts), -1, -1):
        try:
            open_below(root, PurePosixPath(*parts[:depth])).close()
            return
        except (FileNotFoundError, NotADirectoryError):
            continue


def replace_file(path: Path | str, data: bytes) -> None:
    """``path`` replaced atomically through a handle on its directory, never following a
    symlink at its name: for files outside a pgroup (a service's configuration, a converted
    file's lists), whose directory is trusted as it is."""
    path = Path(path)
    with open_below(path.parent) as directory:
        directory.write_atomic(path.name, data)
