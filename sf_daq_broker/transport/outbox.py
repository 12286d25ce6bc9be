"""A durable first-in first-out list of messages not yet taken by RabbitMQ: an outbox.

Why: RabbitMQ goes away now and then (a restart, ``stop_app``, a network cut). A message that
must not be lost — a job the broker accepted, a worker's status event — is written here first
when it cannot be sent, and removed only once RabbitMQ has confirmed it, so it outlives the
outage and a crash or restart of the process that wrote it.

SQLite (standard library, no server, one transaction per change) in WAL mode with
``synchronous=NORMAL``: a committed row survives the process being killed at any instant; only
a crash of the whole machine may lose the last commits. Entries come out in the order they were
put in (``seq``); ``key`` is the message's identity (a job id) so that a sender can be told
what is waiting.

Several processes must never drain one outbox (messages would go out twice and out of order),
so a file-backed outbox is held under an exclusive ``flock`` for the life of its process:
``claim`` takes the first free file of a directory, and adopts the entries of any other file
there whose process is gone (a killed worker's events go out with the next process's).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    body BLOB NOT NULL,
    added_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Entry:
    seq: int
    key: str
    body: bytes
    added_at: float


@dataclass(frozen=True)
class Backlog:
    """What waits: how many entries, and since when the oldest (None when empty)."""

    count: int
    oldest_added_at: float | None

    def oldest_age(self, now: float | None = None) -> float | None:
        if self.oldest_added_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.oldest_added_at)


class Outbox:
    """Thread-safe (callers use ``asyncio.to_thread``); ``path=None`` keeps it in memory, which
    outlives an outage but not the process."""

    def __init__(self, path: Path | None = None, lock_fd: int | None = None) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False)
        self._guard = threading.Lock()
        with self._guard, self._db:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self.count = self._count()  # kept in memory: asked on every send

    @classmethod
    def claim(cls, directory: Path, stem: str) -> Outbox:
        """The first outbox file ``{stem}.N.sqlite`` of ``directory`` no live process holds,
        held (flock) until ``close``, with the entries of every other abandoned one adopted."""
        directory.mkdir(parents=True, exist_ok=True)
        mine: Outbox | None = None
        number = 0
        while mine is None:
            path = directory / f"{stem}.{number}.sqlite"
            lock = _try_lock(path)
            if lock is not None:
                mine = cls(path, lock)
            number += 1
        for other in sorted(directory.glob(f"{stem}.*.sqlite")):
            if other != mine.path:
                mine._adopt(other)
        return mine

    def _adopt(self, path: Path) -> None:
        lock = _try_lock(path)
        if lock is None:
            return  # a live process drains it
        try:
            orphan = Outbox(path, None)
            entries = orphan.head(None)
            self.put((entry.key, entry.body) for entry in entries)
            orphan.close()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{path}{suffix}")
        finally:
            os.close(lock)

    def close(self) -> None:
        with self._guard:
            self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _count(self) -> int:
        with self._guard:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def put(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Append ``(key, body)`` entries, committed together."""
        now = time.time()
        rows = [(key, body, now) for key, body in items]
        with self._guard, self._db:
            self._db.executemany("INSERT INTO outbox (key, body, added_at) VALUES (?, ?, ?)", rows)
            self.count += len(rows)

    def head(self, limit: int | None = 100) -> list[Entry]:
        """The oldest entries, oldest first (all with ``limit=None``)."""
        with self._guard:
            rows = self._db.execute(
                "SELECT seq, key, body, added_at FROM outbox ORDER BY seq LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        return [Entry(int(seq), str(key), bytes(body), float(at)) for seq, key, body, at in rows]

    def remove(self, seqs: Sequence[int]) -> None:
        """Drop entries RabbitMQ has confirmed."""
        with self._guard, self._db:
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs])
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            self.count = int(count)

    def keys(self) -> set[str]:
        with self._guard:
            return {str(key) for (key,) in self._db.execute("SELECT key FROM outbox")}

    def backlog(self) -> Backlog:
        with self._guard:
            count, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(added_at) FROM outbox"
            ).fetchone()
        return Backlog(int(count), None if oldest is None else float(oldest))


def _try_lock(path: Path) -> int | None:
    """An exclusive flock on ``path`` (created if missing), None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
