"""Job leases: a job longer than RabbitMQ's delivery timeout is run once, and never lost.

RabbitMQ closes a consumer's channel when a delivery stays unacknowledged longer than the
server's ``consumer_timeout`` (30 min by default; per queue only from RabbitMQ 3.12 on, and
this installation runs 3.10), and gives the job to a consumer again — possibly the same
process, whose robust channel re-opens at once. A large detector job can take longer than
that. Raising the server-wide timeout would also hide workers that really hang, so instead the
loop keeps the job's state in a *lease* file beside the output, on the file system every worker
shares: ``.{output name}.lease``, JSON ``{job_id, owner, state, reason}``.

- The worker that starts a job creates the lease (atomically, refusing to replace one:
  ``create_atomic``) with state ``running`` and touches its mtime every ``heartbeat`` seconds
  while the job runs (a task on the event loop; the heavy work runs in threads).
- A delivery that finds a fresh ``running`` lease of another owner is the same job delivered
  again while its first worker still runs: it neither writes status events nor touches the
  file, it waits (polling) for the lease to change.
- When the first worker finishes it publishes the file, writes state ``finished`` (or
  ``failed`` with the reason), publishes its status event on its own status channel (the
  consumer channel that the timeout closed is not needed for that) and then tries to settle
  its delivery. If that succeeds the lease is removed — so a lease disappears only once its
  job is acknowledged, and a delivery that was waiting and sees it gone is a duplicate and
  acknowledges itself. If the timeout closed the channel the ack fails; the lease stays, and
  whichever delivery holds the job now sees ``finished`` and acknowledges it (or ``failed``
  and dead-letters it), then removes the lease.
- A ``running`` lease whose mtime is older than ``stale_after`` belongs to a worker that died
  (a killed process cannot clean up): the waiting delivery takes it over (rename the stale
  file away, check it was the stale one, create a new lease) and runs the job. The owner is
  ``host:pid:process start:token``, so a lease of a process of the same host that is gone
  (SIGKILL, a crash) is taken over at once, without waiting for it to go stale.
- A worker stopped in the middle (SIGTERM) marks its lease ``released``, so the job's next
  delivery takes it over at once instead of waiting for it to go stale.
- A worker that finds its lease taken over (its heartbeat could not run for ``stale_after``)
  stops the job without writing or settling anything: the new owner rewrites the file.

So a job is run once, a waiting duplicate costs a poll every ``poll`` seconds, and nothing is
lost: until a delivery is settled the job stays in RabbitMQ. The consumer loop also starts
consuming again if its queue iterator ends because the channel was closed.

The lease is read and written only through the confined handle on the output directory that
the delivery holds (``bookkeeping.confined``): a symlink planted at the lease's name is never
followed (it reads as a foreign lease and is removed once stale).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.confined import ConfinedDir
from sf_daq_broker.jobs import Job


@dataclass(frozen=True)
class LeasePolicy:
    """Timing of job leases (see the module docstring).

    ``stale_after`` must cover the longest time a live worker may fail to touch its lease (an
    overloaded file system), many heartbeats; ``poll`` is how often a waiting delivery looks.
    """

    heartbeat: float = 5.0
    stale_after: float = 30.0
    poll: float = 1.0
    #: Pause before consuming again when a queue's consumer ended (its channel was closed).
    reconsume_delay: float = 1.0


def lease_path(job: Job) -> Path:
    """The job's lease, beside its output (hidden, never matched by ``run_*.h5``)."""
    output = Path(job.output_file)
    return output.with_name(f".{output.name}.lease")


class LeaseState(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    RELEASED = "released"  # its worker was stopped: the next delivery runs the job at once


@dataclass(frozen=True)
class LeaseRecord:
    job_id: str
    owner: str
    state: LeaseState
    reason: str = ""
    age: float = 0.0  # seconds since the owner last touched it

    def encode(self) -> bytes:
        document = {
            "job_id": self.job_id,
            "owner": self.owner,
            "state": self.state.value,
            "reason": self.reason,
        }
        return json.dumps(document).encode()


class LeaseLost(Exception):
    """Another delivery of the job took the lease over: this one must stop."""


class JobLease:
    """The lease file of one job held, or awaited, by one delivery (see the module docstring)."""

    def __init__(self, job: Job, policy: LeasePolicy, directory: ConfinedDir) -> None:
        self.job = job
        self.policy = policy
        self.path = lease_path(job)  # for messages; files only through ``directory``
        self.directory = directory
        self.name = self.path.name
        pid = os.getpid()
        self.token = uuid.uuid4().hex[:8]
        self.owner = f"{socket.gethostname()}:{pid}:{_process_start(pid)}:{self.token}"

    def read(self) -> LeaseRecord | None:
        """The lease as it is on disk, None if there is none (or it is being replaced)."""
        entry = self.directory.lstat(self.name)
        if entry is None:
            return None
        age = time.time() - entry.st_mtime
        try:
            data = self.directory.read_bytes(self.name)
        except FileNotFoundError:
            return None
        except OSError:  # not a file (a symlink planted there): a foreign lease, judged by age
            data = b""
        try:
            document: dict[str, Any] = json.loads(data)
            return LeaseRecord(
                job_id=str(document["job_id"]),
                owner=str(document["owner"]),
                state=LeaseState(document["state"]),
                reason=str(document.get("reason", "")),
                age=age,
            )
        except (ValueError, KeyError, TypeError):
            # Unreadable (a foreign or torn file): only its age can tell whether it is alive.
            return LeaseRecord(self.job.job_id, "?", LeaseState.RUNNING, age=age)

    @staticmethod
    def owner_is_gone(owner: str) -> bool:
        """True if the owner is a process of this host that no longer runs (killed: it could
        not release its lease). Owners on other hosts are judged by the lease's age only."""
        parts = owner.split(":")
        if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit():
            return False
        # The start time guards against a new process that got the same pid.
        started = _process_start(int(parts[1]))
        return not started or started != parts[2]

    def _record(self, state: LeaseState, reason: str = "") -> LeaseRecord:
        return LeaseRecord(self.job.job_id, self.owner, state, reason)

    def try_create(self) -> bool:
        """Take a free lease; False if one exists already."""
        try:
            self.directory.create_atomic(self.name, self._record(LeaseState.RUNNING).encode())
        except FileExistsError:
            return False
        return True

    def try_take_over(self, stale: LeaseRecord) -> bool:
        """Replace the ``stale`` lease with ours; False if another delivery was quicker."""
        tomb = f"{self.name}.{self.token}.stale"
        try:
            self.directory.rename(self.name, tomb)  # only one delivery can move it away
        except FileNotFoundError:
            return False
        moved = None
        with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
            moved = json.loads(self.directory.read_bytes(tomb)).get("owner")
        if moved is not None and moved != stale.owner:
            # We moved a lease that someone created since we read the stale one: put it back.
            with contextlib.suppress(FileExistsError):
                self.directory.link(tomb, self.name)
            self.directory.unlink(tomb)
            return False
        self.directory.unlink(tomb)
        return self.try_create()

    def owned(self) -> bool:
        record = self.read()
        return record is not None and record.owner == self.owner

    def touch(self) -> None:
        """Heartbeat; ``LeaseLost`` if the lease is no longer ours."""
        if not self.owned():
            raise LeaseLost(f"the lease {self.path} was taken over by another delivery")
        with contextlib.suppress(FileNotFoundError):
            self.directory.touch(self.name)

    def settle(self, state: LeaseState, reason: str = "") -> None:
        """Record the outcome for a later delivery of the same job (in a directory that still
        lies inside ``raw/``: ``OutsideRaw`` otherwise)."""
        self.directory.verify()
        self.directory.write_atomic(self.name, self._record(state, reason).encode())

    def remove_settled(self) -> None:
        """Drop a settled lease, whoever wrote it (its job is acknowledged now)."""
        self.directory.unlink(self.name)


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc), "" if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]
