"""The embedded queue's jobs on disk: one SQLite file in the broker's state directory.

Why: the single-machine setup (``serve --workers all``, the demo) has no RabbitMQ to keep its
jobs, yet an accepted request must survive a kill -9 or a SIGTERM of that one process. SQLite
is in the standard library, needs no server, and its transactions make each step (publish,
deliver, settle) one atomic, durable change: WAL journal with ``synchronous=FULL``, so a
committed publish survives a power cut, not only a killed process.

A row is a job in one of three states, exactly RabbitMQ's life of a message:

- ``ready``: waiting in its kind's queue (first in, first out by ``seq``);
- ``delivered``: handed to a consumer under a fresh ``tag``; ack deletes it, reject makes it
  ``dead``, a consumer that goes away gives it back (``ready``, ``redelivered``). Opening the
  file gives back every job still ``delivered``: its consumer died with the last process;
- ``dead``: rejected, kept for a person to look at until ``take_dead`` removes it.

Settling needs the delivery's tag, so a delivery of a previous process (or one given back
meanwhile) can no longer settle a job that is delivered again.

One process at a time: the file is locked (``flock`` on ``queue.lock`` beside it) for as long as
it is open, because opening gives back every delivered job and a second broker on the same state
directory would run the first one's jobs again. The lock dies with its process, also on kill -9.

The class is synchronous and thread-safe; the transport calls it from one dedicated thread.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The file in the state directory (beside the status store's ``status.sqlite``).
QUEUE_FILE = "queue.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('ready', 'delivered', 'dead')),
    redelivered INTEGER NOT NULL DEFAULT 0,
    tag TEXT,
    reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, kind, seq);
"""


class QueueInUse(Exception):
    """Another process has the queue file open."""


@dataclass(frozen=True)
class Claimed:
    """A job handed to a consumer: settle it with its ``seq`` and ``tag``."""

    seq: int
    tag: str
    body: bytes
    redelivered: bool


@dataclass(frozen=True, order=True)
class DeadRow:
    """A dead-lettered job as it is stored: its queue's kind, its body, why it is there."""

    seq: int
    kind: str
    body: bytes
    reason: str


@dataclass(frozen=True)
class Opened:
    """What opening found: jobs waiting, and how many of them were delivered before (to a
    consumer of an earlier process that was killed, or stopped and gave them back)."""

    waiting: int
    redelivered: int


class JobStore:
    """The jobs of the embedded queue, in ``path`` (or in memory when ``path`` is None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock_beside(path)
        try:
            self._db = sqlite3.connect(
                str(path) if path is not None else ":memory:", check_same_thread=False
            )
            with self._db:
                if path is not None:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
            self.opened = self._give_back_all()
        except BaseException:
            self._release_lock()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _give_back_all(self) -> Opened:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE jobs SET state = 'ready', redelivered = 1, tag = NULL, updated_at = ? "
                "WHERE state = 'delivered'",
                (time.time(),),
            )
            waiting, redelivered = self._db.execute(
                "SELECT count(*), coalesce(sum(redelivered), 0) FROM jobs WHERE state = 'ready'"
            ).fetchone()
        return Opened(waiting=int(waiting), redelivered=int(redelivered))

    def publish(self, jobs: Sequence[tuple[str, bytes]]) -> None:
        """Queue ``(kind, body)`` pairs in one transaction: all of them, durably, or none."""
        now = time.time()
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO jobs (kind, body, state, updated_at) VALUES (?, ?, 'ready', ?)",
                [(kind, body, now) for kind, body in jobs],
            )

    def claim(self, kind: str, tag: str) -> Claimed | None:
        """Deliver the oldest ready job of ``kind`` under ``tag``; None if there is none."""
        with self._lock, self._db:
            rows = self._db.execute(
                "UPDATE jobs SET state = 'delivered', tag = ?, updated_at = ? WHERE seq = "
                "(SELECT seq FROM jobs WHERE state = 'ready' AND kind = ? ORDER BY seq LIMIT 1) "
                "RETURNING seq, body, redelivered",
                (tag, time.time(), kind),
            ).fetchall()  # to the end: the statement must be done before the commit
        if not rows:
            return None
        (row,) = rows
        return Claimed(seq=row[0], tag=tag, body=bytes(row[1]), redelivered=bool(row[2]))

    def ack(self, seq: int, tag: str) -> bool:
        """Remove a delivered job for good; False if this delivery no longer holds it."""
        with self._lock, self._db:
            return (
                self._db.execute(
                    "DELETE FROM jobs WHERE seq = ? AND tag = ? AND state = 'delivered'",
                    (seq, tag),
                ).rowcount
                == 1
            )

    def reject(self, seq: int, tag: str, reason: str = "") -> bool:
        """Dead-letter a delivered job; False if this delivery no longer holds it."""
        with self._lock, self._db:
            return (
                self._db.execute(
                    "UPDATE jobs SET state = 'dead', tag = NULL, reason = ?, updated_at = ? "
                    "WHERE seq = ? AND tag = ? AND state = 'delivered'",
                    (reason, time.time(), seq, tag),
                ).rowcount
                == 1
            )

    def give_back(self, deliveries: Sequence[tuple[int, str]]) -> int:
        """Put jobs whose consumer went away without a verdict back, flagged redelivered."""
        with self._lock, self._db:
            return sum(
                self._db.execute(
                    "UPDATE jobs SET state = 'ready', redelivered = 1, tag = NULL, "
                    "updated_at = ? WHERE seq = ? AND tag = ? AND state = 'delivered'",
                    (time.time(), seq, tag),
                ).rowcount
                for seq, tag in deliveries
            )

    def dead(self) -> list[DeadRow]:
        """The dead-lettered jobs, oldest first (left there)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, body, reason FROM jobs WHERE state = 'dead' ORDER BY seq"
            ).fetchall()
        return [
            DeadRow(int(seq), str(kind), bytes(body), str(reason))
            for seq, kind, body, reason in rows
        ]

    def take_dead(self) -> list[DeadRow]:
        """Remove and return the dead-lettered jobs, oldest first, in one transaction."""
        with self._lock, self._db:
            rows = self._db.execute(
                "DELETE FROM jobs WHERE state = 'dead' RETURNING seq, kind, body, reason"
            ).fetchall()
        return sorted(DeadRow(int(q), str(k), bytes(b), str(r)) for q, k, b, r in rows)

    def count(self, kind: str, state: str = "ready") -> int:
        with self._lock:
            (number,) = self._db.execute(
                "SELECT count(*) FROM jobs WHERE state = ? AND kind = ?", (state, kind)
            ).fetchone()
        return int(number)


def _lock_beside(path: Path) -> int:
    """Lock ``queue.lock`` beside the queue (writing our pid into it), or raise QueueInUse."""
    lock_path = path.with_suffix(".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise QueueInUse(
            f"the embedded queue {path} is in use by another broker process (pid {holder}); "
            "run one broker per state directory"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
