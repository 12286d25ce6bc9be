"""Files that appear whole or not at all, even if the process dies at any instant.

The recipe is the classic one: write a temporary file in the same directory, flush and fsync
it, rename (or link) it over the final name, then fsync the directory so the rename itself is
durable. Readers therefore see either the old content or the new one, never a torn file.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_directory(directory: Path) -> None:
    """Make a rename or link inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, temp_path: Path | None = None) -> None:
    """Replace ``path`` with ``data`` atomically.

    ``temp_path`` lets a caller that holds a lock reuse one fixed temporary name, so that a
    crash never leaves a growing litter of temporary files behind.
    """
    temp = temp_path or path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_synced(temp, data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def create_atomic(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` atomically; FileExistsError if it already exists.

    A hard link, unlike a rename, refuses to replace an existing file, so two writers racing
    for the same name cannot both believe they created it.
    """
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_synced(temp, data)
        os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def partial_path(final: Path, owner: str) -> Path:
    """The temporary name ``owner`` writes ``final`` under before publishing it.

    Hidden beside ``final`` (``.{name}.{owner}.partial``) so that tools can tell a file that is
    still being written; one per owner (a job lease's token, a random token), so two writers
    of one file never write into, publish or delete each other's file.
    """
    return final.with_name(f".{final.name}.{owner}.partial")


def partial_files(final: Path) -> list[Path]:
    """Every temporary file of ``final``, whoever writes it."""
    pattern = f".{glob.escape(final.name)}*.partial"
    return sorted(final.parent.glob(pattern))


def publish_file(temp: Path, final: Path) -> None:
    """Make a completely written ``temp`` file durable and give it its ``final`` name."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, final)
    fsync_directory(final.parent)


def dump_json(document: Any) -> bytes:
    """JSON as the bookkeeping files hold it: indented, UTF-8, newline-terminated."""
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
