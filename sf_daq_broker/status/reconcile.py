"""Reconciliation: a job that no one works on any more is ended, not left ``running`` for ever.

Status events are never dropped (outboxes on both sides), but a job can still be abandoned
where no event tells of it: its worker was killed and its message is gone with it (acknowledged
just before, or never handed over because the broker died between the run number and the
queue). ``daq_client --wait`` would wait for such a run for ever. So the broker looks at its
unfinished jobs (``queued``/``running``) every ``interval`` seconds, and judges each by what can
be seen from outside — never by how long it has been running:

A job is **alive** if any of these holds:
- it waits in the broker's own outbox (``api.handover``: RabbitMQ was away);
- its lease (``workers.lease``, ``.{output}.lease`` beside its output) is ``running``, fresh
  (touched within ``stale_after``) and its owner not a process of this host that is gone;
- its queue holds ready messages (a passive declare's message count): the job may be one of
  them, waiting behind others or for a worker to start — a job waiting its turn is never ended.

A job is **abandoned** when none holds, continuously for ``grace`` seconds, with its row in the
status store unchanged all that time. The grace covers the instant between a worker receiving a
delivery (not counted as ready any more) and creating its lease, and a lease being taken over.
Nothing is judged while RabbitMQ cannot be asked, or while the broker's own status queue holds
events it has not applied yet (they may tell what happened).

An abandoned job is ended truthfully:
- its output file exists (a worker published it: only complete files get the final name) →
  ``done``, saying its worker's final status never arrived and completeness is not known (not
  for a pedestal job: its "output" is the request record the broker itself writes);
- its lease says ``failed`` → ``failed`` with that reason;
- otherwise → ``failed``: lost, with what was seen (no lease, or whose lease, and the empty
  queue), and that no file was written.
Its leftovers — the dead lease and every temporary ``.partial`` file of its output — are
removed. If a worker turns up later after all, its events still apply (a ``write_start`` newer
than the verdict moves the job back to running, a final event sets the outcome).

Both transports show their queues: RabbitMQ through passive declares, the embedded queue from
its SQLite store (there a job acknowledged just before a kill -9 may have lost its final status
event with the process's memory: after the restart it is judged like any other).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sf_daq_broker.bookkeeping.atomic import partial_pattern
from sf_daq_broker.bookkeeping.confined import ConfinedDir, OutsideRaw, open_below
from sf_daq_broker.cancellation import raise_if_cancelled
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.status.store import JobState, StatusStore
from sf_daq_broker.transport import Transport
from sf_daq_broker.workers.lease import JobLease, LeasePolicy, LeaseRecord, LeaseState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcilePolicy:
    interval: float = 15.0
    grace: float = 120.0
    #: A running lease not touched for this long belongs to a dead worker (as in the workers).
    stale_after: float = LeasePolicy().stale_after


@dataclass(frozen=True)
class _Verdict:
    state: JobState
    message: str


@dataclass
class _Suspect:
    since: float  # monotonic time it was first seen abandoned
    updated_at: float  # its row's updated_at then


class Reconciler:
    """Ends abandoned jobs (see the module docstring); ``run`` until cancelled."""

    def __init__(
        self,
        transport: Transport,
        store: StatusStore,
        waiting_job_ids: Callable[[], set[str]],
        status_queue: str,
        policy: ReconcilePolicy | None = None,
    ) -> None:
        self.transport = transport
        self.store = store
        self._waiting_job_ids = waiting_job_ids  # the job ids in the broker's outbox
        self.status_queue = status_queue
        self.policy = policy or ReconcilePolicy()
        self._suspects: dict[str, _Suspect] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciliation of unfinished jobs failed; trying again later")
            raise_if_cancelled()
            await asyncio.sleep(self.policy.interval)

    async def check(self) -> list[str]:
        """One look at every unfinished job; returns the ids of the jobs it ended."""
        depths = await self.transport.job_queue_depths()
        if depths is None:
            self._suspects.clear()  # what was seen before an outage proves nothing after it
            return []
        if await self.transport.status_queue_depth(self.status_queue) != 0:
            return []  # events not applied yet (or unknown): they may tell more
        waiting = await asyncio.to_thread(self._waiting_job_ids)
        rows = await asyncio.to_thread(self.store.unfinished)
        ended = []
        now = time.monotonic()
        seen = set()
        for row in rows:
            job_id = row["job_id"]
            seen.add(job_id)
            if job_id in waiting or _queue_holds_some(depths, row["kind"]):
                self._suspects.pop(job_id, None)
                continue
            verdict = await asyncio.to_thread(self._judge, row, now)
            if verdict is not None and await asyncio.to_thread(
                self.store.conclude, job_id, row["updated_at"], verdict.state, verdict.message
            ):
                log.warning(
                    "run %d of %s, %s: %s: %s",
                    row["run_number"],
                    row["pgroup"],
                    row["source"],
                    verdict.state,
                    verdict.message,
                )
                ended.append(job_id)
        for job_id in set(self._suspects) - seen:
            del self._suspects[job_id]
        return ended

    def _judge(self, row: dict[str, Any], now: float) -> _Verdict | None:
        """The verdict on a job its queue does not hold, None while it is (or may be) alive."""
        output = Path(row["file"]) if row["file"] else None
        directory = _output_dir(output, row["pgroup"]) if output else None
        if output is None or directory is None:
            return None  # nothing to look at: not judged
        with directory:
            lease = _read_lease(directory, f".{output.name}.lease")
            if lease is not None and self._lease_alive(lease):
                self._suspects.pop(row["job_id"], None)
                return None
            suspect = self._suspects.get(row["job_id"])
            if suspect is None or suspect.updated_at != row["updated_at"]:
                self._suspects[row["job_id"]] = _Suspect(now, row["updated_at"])
                return None
            if now - suspect.since < self.policy.grace:
                return None
            del self._suspects[row["job_id"]]
            verdict = _verdict(row, output, directory, lease)
            _remove_leftovers(directory, output.name, lease)
            return verdict

    def _lease_alive(self, lease: LeaseRecord) -> bool:
        return (
            lease.state is LeaseState.RUNNING
            and lease.age < self.policy.stale_after
            and not JobLease.owner_is_gone(lease.owner)
        )


def _queue_holds_some(depths: dict[SourceKind, tuple[int, int]], kind: str | None) -> bool:
    """Whether the job's queue holds ready messages (of an unknown kind: any queue)."""
    if kind in set(SourceKind):
        return depths[SourceKind(kind)][0] > 0
    return any(ready for ready, _ in depths.values())


def _verdict(
    row: dict[str, Any], output: Path, directory: ConfinedDir, lease: LeaseRecord | None
) -> _Verdict:
    entry = directory.lstat(output.name)
    written_by_worker = row["kind"] != SourceKind.PEDESTAL.value
    if written_by_worker and entry is not None and stat.S_ISREG(entry.st_mode):
        return _Verdict(
            JobState.DONE,
            f"written ({output}), but its worker's final status never arrived: "
            "completeness not known",
        )
    if lease is not None and lease.state is LeaseState.FAILED and lease.reason:
        return _Verdict(JobState.FAILED, lease.reason)
    if lease is None:
        holder = "no worker holds it (no lease)"
    elif lease.state is LeaseState.RUNNING:
        holder = f"its worker {lease.owner} is gone (lease {lease.age:.0f} s old)"
    else:
        holder = f"no worker holds it (lease {lease.state} by {lease.owner})"
    kind = row["kind"] or "its"
    return _Verdict(
        JobState.FAILED,
        f"lost: {holder} and the {kind} queue does not hold it; no file was written, "
        "send the request again",
    )


def _output_dir(output: Path, pgroup: str) -> ConfinedDir | None:
    """A confined handle on the output's directory below the pgroup's ``raw/``, None if it
    is gone or leads out of ``raw/``."""
    parts = output.parent.parts
    for index in range(len(parts) - 1):
        if parts[index] == pgroup and parts[index + 1] == "raw":
            raw = Path(*parts[: index + 2])
            try:
                return open_below(raw, PurePosixPath(*parts[index + 2 :]))
            except (OSError, OutsideRaw):
                return None
    return None


def _read_lease(directory: ConfinedDir, name: str) -> LeaseRecord | None:
    entry = directory.lstat(name)
    if entry is None:
        return None
    age = time.time() - entry.st_mtime
    try:
        document = json.loads(directory.read_bytes(name))
        return LeaseRecord(
            job_id=str(document["job_id"]),
            owner=str(document["owner"]),
            state=LeaseState(document["state"]),
            reason=str(document.get("reason", "")),
            age=age,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return LeaseRecord("?", "?", LeaseState.RUNNING, age=age)  # judged by its age


def _remove_leftovers(directory: ConfinedDir, final_name: str, lease: LeaseRecord | None) -> None:
    """The dead lease (if it is still the one judged) and every temporary file of the job."""
    lease_name = f".{final_name}.lease"
    if lease is not None:
        now = _read_lease(directory, lease_name)
        if now is not None and (now.owner, now.state) == (lease.owner, lease.state):
            with contextlib.suppress(FileNotFoundError):
                directory.unlink(lease_name)
    for name in directory.names(partial_pattern(final_name)):
        with contextlib.suppress(FileNotFoundError):
            directory.unlink(name)
