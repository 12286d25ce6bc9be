"""Publish an output file atomically: it appears under its final name complete, or not at all.

``with atomic_output(final) as temp:`` gives a temporary name in the same directory (so the
final rename never crosses a file system); the caller writes and closes the file there. On a
normal exit the file is fsynced, renamed over ``final`` and the directory fsynced; on an
exception the temporary file is removed and ``final`` is left untouched. The name follows
``bookkeeping.atomic.partial_path``, as the worker loop's own temporary files do.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sf_daq_broker.bookkeeping.atomic import partial_path, publish_file


def temporary_name(final: Path) -> Path:
    """A hidden, unique name beside ``final``; never matched by ``run_*.h5`` globs."""
    return partial_path(final, uuid.uuid4().hex[:12])


@contextmanager
def atomic_output(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path; publish it as ``final`` if the block succeeds, else delete it."""
    final = Path(final)
    temp = temporary_name(final)
    try:
        yield temp
        publish_file(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
