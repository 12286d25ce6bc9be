"""The state of every job, kept in SQLite so /run_status answers after a broker restart too.

Why SQLite: it is in the standard library, needs no server, survives restarts, and its
transactions make each status event one atomic update. The store is fed from one place (the
broker's status follower) and read by /run_status and /metrics; it only ever holds small rows,
so one file per broker is plenty. Events are applied in arrival order, which is the order each
worker published them in; a job that is delivered again (a worker died) simply starts over.
A job that ended (done or failed) moves back to running only on a ``write_start`` newer than
its end: a start or progress event that waited in a worker's outbox through an outage and
arrives after the job's end (its final event, or the reconciler's verdict) is old news.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from sf_daq_broker.jobs import Action, Job, StatusEvent

log = logging.getLogger(__name__)

#: The message of a job the broker accepted while RabbitMQ was away (``api.handover``).
WAITING_FOR_QUEUE = "queued (waiting for the queue)"

#: Called with (pgroup, run_number) after a change of that run's jobs is committed.
Listener = Callable[[str, int], None]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    pgroup TEXT NOT NULL,
    run_number INTEGER NOT NULL,
    source TEXT NOT NULL,
    kind TEXT,
    state TEXT NOT NULL,
    done INTEGER,
    total INTEGER,
    file TEXT,
    message TEXT NOT NULL DEFAULT '',
    report TEXT,
    queued_at REAL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_run ON jobs (pgroup, run_number);
"""

_ACTION_STATE = {
    Action.WRITE_REQUEST: JobState.QUEUED,
    Action.WRITE_START: JobState.RUNNING,
    Action.WRITE_PROGRESS: JobState.RUNNING,
    Action.WRITE_FINISHED: JobState.DONE,
    Action.WRITE_REJECTED: JobState.FAILED,
}


class StatusStore:
    """Thread-safe: the broker calls it from worker threads (``asyncio.to_thread``)."""

    def __init__(self, path: Path | None = None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        with self._lock, self._db:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_listener(self, listener: Listener) -> None:
        """Be told of every committed change, with the run it concerns (the page's live view).

        A listener runs in the thread that changed the store, so it must only hand the news
        on (e.g. ``loop.call_soon_threadsafe``); its errors are logged, never raised.
        """
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _notify(self, runs: Iterable[tuple[str, int]]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for pgroup, run_number in dict.fromkeys(runs):
            for listener in listeners:
                try:
                    listener(pgroup, run_number)
                except Exception:
                    log.exception("a status store listener failed")

    def record_queued(self, jobs: list[Job]) -> None:
        """Jobs handed over to the queue (recorded by the broker itself, not via an event)."""
        self._insert(jobs, JobState.QUEUED, "queued", replace=False)

    def record_handover_failed(self, jobs: list[Job], reason: str, handed_over: list[str]) -> None:
        self._insert(
            [job for job in jobs if job.source in handed_over],
            JobState.QUEUED,
            "queued",
            replace=False,
        )
        self._insert(
            [job for job in jobs if job.source not in handed_over],
            JobState.FAILED,
            f"not queued: {reason}",
            replace=True,
        )

    def set_queued_message(self, job_ids: list[str], message: str) -> None:
        """Say where a queued job waits (``WAITING_FOR_QUEUE`` in the broker's outbox, then
        ``queued`` in RabbitMQ); a job that moved on meanwhile is left alone."""
        with self._lock, self._db:
            rows = self._db.execute(
                f"SELECT DISTINCT pgroup, run_number FROM jobs WHERE job_id IN"
                f" ({', '.join('?' * len(job_ids))})",
                job_ids,
            ).fetchall()
            self._db.executemany(
                "UPDATE jobs SET message = ?, updated_at = ? WHERE job_id = ? AND state = ?",
                [(message, time.time(), job_id, JobState.QUEUED.value) for job_id in job_ids],
            )
        self._notify((row["pgroup"], row["run_number"]) for row in rows)

    def unfinished(self) -> list[dict[str, Any]]:
        """Jobs queued or running: job_id, pgroup, run_number, source, kind, file, state,
        updated_at (what the reconciler judges)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, pgroup, run_number, source, kind, file, state, updated_at"
                " FROM jobs WHERE state IN (?, ?) ORDER BY rowid",
                (JobState.QUEUED.value, JobState.RUNNING.value),
            ).fetchall()
        return [dict(row) for row in rows]

    def conclude(self, job_id: str, seen_at: float, state: JobState, message: str) -> bool:
        """End a job the reconciler found abandoned, unless it changed since ``seen_at`` (its
        ``updated_at`` then): a status event that came in meanwhile wins. True if ended."""
        now = time.time()
        with self._lock, self._db:
            changed = self._db.execute(
                "UPDATE jobs SET state = ?, message = ?, finished_at = ?, updated_at = ?"
                " WHERE job_id = ? AND updated_at = ? AND state IN (?, ?)",
                (
                    state.value,
                    message,
                    now,
                    now,
                    job_id,
                    seen_at,
                    JobState.QUEUED.value,
                    JobState.RUNNING.value,
                ),
            ).rowcount
            row = self._db.execute(
                "SELECT pgroup, run_number FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        if changed and row is not None:
            self._notify([(row["pgroup"], row["run_number"])])
        return bool(changed)

    def _insert(self, jobs: list[Job], state: JobState, message: str, replace: bool) -> None:
        now = time.time()
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        finished = now if state is JobState.FAILED else None
        with self._lock, self._db:
            self._db.executemany(
                f"{verb} INTO jobs (job_id, request_id, pgroup, run_number, source, kind,"
                " state, file, message, queued_at, finished_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        job.job_id,
                        job.request_id,
                        job.pgroup,
                        job.run_number,
                        job.source,
                        job.kind.value,
                        state.value,
                        job.output_file,
                        message,
                        now,
                        finished,
                        now,
                    )
                    for job in jobs
                ],
            )
        self._notify((job.pgroup, job.run_number) for job in jobs)

    def apply(self, event: StatusEvent) -> None:
        """Fold one status event into the job's row."""
        self._fold(event)
        self._notify([(event.pgroup, event.run_number)])

    def _fold(self, event: StatusEvent) -> None:
        state = _ACTION_STATE[event.action]
        now = time.time()
        details = event.details
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, request_id, pgroup, run_number, source,"
                " state, file, message, queued_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.job_id,
                    event.request_id,
                    event.pgroup,
                    event.run_number,
                    event.source,
                    JobState.QUEUED.value,
                    event.file,
                    event.message,
                    event.timestamp,
                    now,
                ),
            )
            if event.action is Action.WRITE_REQUEST:
                return  # never moves a job back to queued
            if self._is_old_news(event):
                return
            updates: dict[str, Any] = {"state": state.value, "updated_at": now}
            if event.message:
                updates["message"] = event.message
            if event.action is Action.WRITE_START:
                updates.update(
                    started_at=event.timestamp,
                    finished_at=None,
                    report=None,
                    done=0,
                    total=details.get("total"),
                )
            elif event.action is Action.WRITE_PROGRESS:
                updates.update(done=details.get("done"), total=details.get("total"))
            else:
                updates["finished_at"] = event.timestamp
                if "report" in details:
                    updates["report"] = json.dumps(details["report"])
                if event.action is Action.WRITE_FINISHED and details.get("total") is not None:
                    updates.update(done=details["total"], total=details["total"])
            assignments = ", ".join(f"{column} = ?" for column in updates)
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE job_id = ?",
                [*updates.values(), event.job_id],
            )

    def _is_old_news(self, event: StatusEvent) -> bool:
        """A start or progress event of a job that ended after it (see the module docstring);
        called under the lock."""
        if event.action not in (Action.WRITE_START, Action.WRITE_PROGRESS):
            return False
        row = self._db.execute(
            "SELECT state, finished_at FROM jobs WHERE job_id = ?", (event.job_id,)
        ).fetchone()
        if row is None or row["state"] not in (JobState.DONE.value, JobState.FAILED.value):
            return False
        ended = row["finished_at"]
        if event.action is Action.WRITE_PROGRESS:
            return True  # a job that starts over sends its start first
        return ended is not None and event.timestamp <= ended

    def run_status(self, pgroup: str, run_number: int) -> list[dict[str, Any]]:
        """The jobs of one run, in the order they were queued."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE pgroup = ? AND run_number = ? ORDER BY queued_at, rowid",
                (pgroup, run_number),
            ).fetchall()
        return [_job_view(row) for row in rows]

    def job_status(self, job_id: str) -> dict[str, Any] | None:
        """One job by its id (a pedestal, which has no run number), None if unknown."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job_view(row) if row is not None else None

    def runs_status(self, pgroup: str, first: int, last: int) -> dict[int, list[dict[str, Any]]]:
        """The jobs of the runs ``first``..``last`` of a pgroup, by run (one query, for the
        page's run list)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE pgroup = ? AND run_number BETWEEN ? AND ?"
                " ORDER BY run_number, queued_at, rowid",
                (pgroup, first, last),
            ).fetchall()
        runs: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            runs.setdefault(row["run_number"], []).append(_job_view(row))
        return runs

    def state_counts(self) -> dict[tuple[str, str], int]:
        """Number of jobs per (source kind, state), for /metrics."""
        with self._lock:
            rows = self._db.execute(
                "SELECT COALESCE(kind, 'unknown') AS kind, state, COUNT(*) AS n FROM jobs"
                " GROUP BY kind, state"
            ).fetchall()
        return {(row["kind"], row["state"]): row["n"] for row in rows}


def _job_view(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "source": row["source"],
        "state": row["state"],
        "progress": {"done": row["done"], "total": row["total"]},
        "file": row["file"],
        "message": row["message"],
        "completeness": json.loads(row["report"]) if row["report"] else None,
        "error": row["message"] if row["state"] == JobState.FAILED else None,
        "job_id": row["job_id"],
        "request_id": row["request_id"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }


def run_state(jobs: list[dict[str, Any]]) -> str:
    """One word for the whole run: failed if any source failed, done when all are done."""
    states = {job["state"] for job in jobs}
    if JobState.FAILED in states:
        return JobState.FAILED.value
    if states == {JobState.DONE}:
        return JobState.DONE.value
    if states == {JobState.QUEUED}:
        return JobState.QUEUED.value
    return JobState.RUNNING.value
