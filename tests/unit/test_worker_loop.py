"""The shared worker loop on both transports, with a small scripted source.

The source here stands in for a buffer (which the source tests exercise for real); what is
under test is the loop: ack only after the file is in place, retries, dead-lettering, status
events, job logs and the return of an interrupted job to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aio_pika.exceptions import ChannelInvalidStateError

from sf_daq_broker.bookkeeping.atomic import partial_files
from sf_daq_broker.buffers.errors import BufferServerError, DataAgedOut, StreamCut
from sf_daq_broker.jobs import Action, Job, SourceKind, StatusEvent, job_id_for
from sf_daq_broker.jungfrau.errors import CalibrationError
from sf_daq_broker.transport import JobDelivery, StatusSubscription, Transport
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.lease import JobLease, LeasePolicy, LeaseState, lease_path
from sf_daq_broker.workers.loop import Progress, RetryPolicy, Source, Worker
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses
from tests.private_rabbitmq import PrivateRabbitMQ, private_rabbitmq  # noqa: F401
from tests.support import PATIENCE, async_wait_until, dead_letters

FAST = RetryPolicy(attempts=3, first_delay=0.01, factor=2, max_delay=0.05)


class ScriptedSource(Source):
    """Fails as told, then writes a small file; ``hold`` keeps it busy until released."""

    kind = SourceKind.DATABUFFER

    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = list(failures or [])
        self.calls = 0
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        self.calls += 1
        target.write_bytes(b"partial")
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.failures:
            raise self.failures.pop(0)
        await progress.update(5)
        target.write_bytes(b"complete file")
        pulses = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        return CompletenessReport(
            names=[NameReport.judge("A:B", pulses, pulses[:-2])], absent=["C:D"]
        )


def make_job(raw: Path, run: int = 1) -> Job:
    (raw / "run_info" / "000000").mkdir(parents=True, exist_ok=True)
    return Job(
        job_id=job_id_for("p12345", run, "BSDATA"),
        request_id="req",
        kind=SourceKind.DATABUFFER,
        source="BSDATA",
        names=("A:B", "C:D"),
        start_pulse_id=99,
        stop_pulse_id=111,
        requested_start=100,
        requested_stop=110,
        rate_multiplicator=2,
        pgroup="p12345",
        beamline="bernina",
        run_number=run,
        output_file=str(raw / f"run_{run:06d}.BSDATA.h5"),
        log_file=str(raw / "run_info" / "000000" / f"run_{run:06d}.BSDATA.log"),
        run_info_file=str(raw / "run_info" / "000000" / f"run_{run:06d}.json"),
        request_time="2026-11-21 00:00:00.000000",
    )


@pytest.fixture(params=["embedded", "rabbitmq"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    if request.param == "rabbitmq":
        instance: Transport = AmqpTransport(
            request.getfixturevalue("amqp_url"), prefix=request.getfixturevalue("amqp_prefix")
        )
    else:
        instance = EmbeddedTransport()
    await instance.connect()
    yield instance
    await instance.close()


async def collect_until(
    events: StatusSubscription, action: Action, timeout: float = 60
) -> list[StatusEvent]:
    seen: list[StatusEvent] = []
    async with asyncio.timeout(timeout):
        while not seen or seen[-1].action is not action:
            seen.append(await events.__anext__())
    return seen


async def settled(job: Job) -> None:
    """Wait until the delivery is settled: its lease goes only after the ack or reject, which
    follow the status event (a worker stopped in between leaves the job to its next delivery)."""
    await async_wait_until(
        lambda: not lease_path(job).exists(), timeout=60, what="the delivery settled"
    )


async def run_worker(
    transport: Transport, source: Source, *jobs: Job
) -> tuple[asyncio.Task[Any], StatusSubscription]:
    events = await transport.subscribe_status()
    await transport.publish_jobs(list(jobs))
    task = asyncio.create_task(Worker(transport, [source], retry=FAST).run())
    return task, events


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_success_publishes_file_then_acks(transport: Transport, raw_dir: Path) -> None:
    job = make_job(raw_dir)
    source = ScriptedSource()
    task, events = await run_worker(transport, source, job)
    seen = await collect_until(events, Action.WRITE_FINISHED)
    await settled(job)  # acknowledged or rejected, not only announced
    await stop(task)
    assert [e.action for e in seen] == [
        Action.WRITE_START,
        Action.WRITE_PROGRESS,
        Action.WRITE_FINISHED,
    ]
    assert seen[0].details == {"total": 6}  # beam pulses 100, 102, …, 110
    finished = seen[-1]
    assert finished.message == (
        "incomplete: 1 of 2 names with missing pulses; C:D: no data at all (unknown to the buffer?)"
    )
    assert finished.details["report"]["names"][0] == {
        "name": "A:B",
        "expected": 6,
        "found": 4,
        "missing": 2,
        "missing_pulse_ids": [108, 110],
        "duplicates_removed": 0,
        "extra": {},
        "unit": "beam pulses",
    }
    assert finished.details["report"]["absent"] == ["C:D"]
    assert Path(job.output_file).read_bytes() == b"complete file"
    assert partial_files(Path(job.output_file)) == []
    log_text = Path(job.log_file).read_text()
    assert (
        "BSDATA of run 1 (p12345): 2 names, pulses 99-111 (requested 100-110, rate 1/2)" in log_text
    )
    assert "A:B: 4 of 6 beam pulses, 2 missing (108, 110)" in log_text
    assert "C:D: no data at all (unknown to the buffer?)" in log_text
    # Acknowledged: a new worker gets nothing, and nothing was dead-lettered.
    await settled_and_queue_empty(transport, job)
    await events.close()


async def test_transient_errors_are_retried(transport: Transport, raw_dir: Path) -> None:
    job = make_job(raw_dir)
    source = ScriptedSource([BufferServerError("data buffer: HTTP 503", 503), StreamCut("cut")])
    task, events = await run_worker(transport, source, job)
    await collect_until(events, Action.WRITE_FINISHED)
    await settled(job)  # acknowledged or rejected, not only announced
    await stop(task)
    assert source.calls == 3
    assert Path(job.output_file).read_bytes() == b"complete file"
    log_text = Path(job.log_file).read_text()
    assert "try 1 failed: data buffer: HTTP 503; next try in 0.0 s" in log_text
    assert "try 2 failed: cut; next try in 0.0 s" in log_text
    await events.close()


@pytest.mark.parametrize(
    ("failures", "reason", "calls"),
    [
        (
            [BufferServerError("data buffer at http://x: HTTP 500", 500)] * 3,
            "pulses 100-110: data buffer at http://x: HTTP 500 (gave up after 3 tries)",
            3,
        ),
        (
            [DataAgedOut("data buffer: aged out")],
            "pulses 100-110: data buffer: aged out",
            1,
        ),
        (
            [CalibrationError("JF07T32V01: gain file /g.h5 has shape (4, 512, 1024)")],
            "pulses 100-110: JF07T32V01: gain file /g.h5 has shape (4, 512, 1024)",
            1,
        ),
        ([ValueError("boom")], "pulses 100-110: unexpected error: ValueError('boom')", 1),
    ],
)
async def test_failures_dead_letter_and_leave_no_file(
    transport: Transport, raw_dir: Path, failures: list[Exception], reason: str, calls: int
) -> None:
    job = make_job(raw_dir)
    source = ScriptedSource(failures)
    task, events = await run_worker(transport, source, job)
    seen = await collect_until(events, Action.WRITE_REJECTED)
    await settled(job)  # acknowledged or rejected, not only announced
    await stop(task)
    assert seen[-1].message == reason
    assert source.calls == calls
    assert not Path(job.output_file).exists()
    assert partial_files(Path(job.output_file)) == []
    assert f"failed, no file written: {reason}" in Path(job.log_file).read_text()
    dead = await dead_letters(transport)
    assert [d.job for d in dead] == [job]
    await events.close()


FULL = "no space left on device"
QUOTA = "disk quota exceeded"
TO_DO = (
    "send the request again while the buffers still hold the data (they keep it for a limited "
    "time only)"
)


def _wrapped_enospc() -> Exception:
    """A library's own exception raised from the OSError of its write."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as exc:
        try:
            raise RuntimeError("Can't write data") from exc
        except RuntimeError as wrapped:
            return wrapped


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            f"{FULL} while writing run_000001.BSDATA.h5 in {{raw}}: the file was not kept; "
            f"free space there and {TO_DO}",
        ),
        (
            OSError(errno.EDQUOT, "Disk quota exceeded"),
            f"{QUOTA} while writing run_000001.BSDATA.h5 in {{raw}}: the file was not kept; "
            f"free space in the pgroup or have its quota raised, and {TO_DO}",
        ),
        (
            _wrapped_enospc(),
            f"{FULL} while writing run_000001.BSDATA.h5 in {{raw}}: the file was not kept; "
            f"free space there and {TO_DO}",
        ),
    ],
    ids=["ENOSPC", "EDQUOT", "wrapped"],
)
async def test_a_full_disk_fails_the_job_at_once_saying_what_to_do(
    transport: Transport, raw_dir: Path, error: Exception, reason: str
) -> None:
    """Not retried (``workers.full_disk`` says why): the reason names the cause, the file and
    its directory, and what to do — never an exception's repr."""
    job = make_job(raw_dir)
    source = ScriptedSource([error])
    task, events = await run_worker(transport, source, job)
    seen = await collect_until(events, Action.WRITE_REJECTED)
    await settled(job)
    await stop(task)
    expected = f"pulses 100-110: {reason.format(raw=raw_dir)}"
    assert (seen[-1].message, source.calls) == (expected, 1)
    assert partial_files(Path(job.output_file)) == []
    log_text = Path(job.log_file).read_text()
    assert f"failed, no file written: {expected}\n" in log_text
    assert "try 1 failed" not in log_text
    dead = await dead_letters(transport)
    assert [d.job for d in dead] == [job]
    await events.close()


async def test_a_disk_still_full_when_the_failure_is_recorded_still_ends_the_job(
    transport: Transport, raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure's record in the lease cannot be written either (the disk is still full,
    filled by someone else): the job is rejected all the same and its lease removed, instead
    of staying ``running`` with a lease left in raw/."""
    job = make_job(raw_dir)
    settle = JobLease.settle

    def settle_on_a_full_disk(lease: JobLease, state: LeaseState, reason: str = "") -> None:
        if state is LeaseState.FAILED:
            raise OSError(errno.ENOSPC, "No space left on device", str(lease.path))
        settle(lease, state, reason)

    monkeypatch.setattr(JobLease, "settle", settle_on_a_full_disk)
    source = ScriptedSource([OSError(errno.ENOSPC, "No space left on device")])
    task, events = await run_worker(transport, source, job)
    seen = await collect_until(events, Action.WRITE_REJECTED)
    await settled(job)
    await stop(task)
    expected = (
        f"pulses 100-110: {FULL} while writing run_000001.BSDATA.h5 in {raw_dir}: the file "
        f"was not kept; free space there and {TO_DO}"
    )
    assert seen[-1].message == expected
    assert sorted(p.name for p in raw_dir.iterdir()) == ["run_info"]
    log_text = Path(job.log_file).read_text()
    assert (
        f"the failure could not be recorded in the lease {lease_path(job)} ([Errno 28] No "
        f"space left on device: '{lease_path(job)}'); the job is rejected all the same\n"
    ) in log_text
    dead = await dead_letters(transport)
    assert [d.job for d in dead] == [job]
    await events.close()


async def test_a_disk_full_before_the_job_starts_says_what_to_do_too(
    transport: Transport, raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk filled up while the job waited in the queue: not even its lease can be
    created. The job is rejected with the same reason as one that filled the disk itself."""
    job = make_job(raw_dir)

    def no_room(lease: JobLease) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device", str(lease.path))

    monkeypatch.setattr(JobLease, "try_create", no_room)
    source = ScriptedSource()
    task, events = await run_worker(transport, source, job)
    seen = await collect_until(events, Action.WRITE_REJECTED)
    dead = await dead_letters(transport)
    await stop(task)
    assert seen[-1].message == (
        f"pulses 100-110: {FULL} while writing run_000001.BSDATA.h5 in {raw_dir}: the file "
        f"was not kept; free space there and {TO_DO}"
    )
    assert (source.calls, [d.job for d in dead]) == (0, [job])
    assert sorted(p.name for p in raw_dir.iterdir()) == ["run_info"]
    await events.close()


async def test_a_job_that_cannot_be_started_is_rejected_and_the_worker_goes_on(
    transport: Transport, raw_dir: Path
) -> None:
    """Its output directory is gone (the lease cannot be created): the job is dead-lettered
    with the reason and the next job is done, instead of the worker dying."""
    broken = replace(make_job(raw_dir), output_file=str(raw_dir / "gone" / "run_000001.BSDATA.h5"))
    good = make_job(raw_dir, run=2)
    source = ScriptedSource()
    task, events = await run_worker(transport, source, broken, good)
    seen = await collect_until(events, Action.WRITE_FINISHED)
    while not any(e.action is Action.WRITE_REJECTED for e in seen):  # the jobs run side by side
        seen += await collect_until(events, Action.WRITE_REJECTED)
    await settled(good)  # acknowledged or rejected, not only announced
    await stop(task)
    rejected = [e for e in seen if e.action is Action.WRITE_REJECTED]
    assert [e.run_number for e in rejected] == [1]
    assert rejected[0].message.startswith("pulses 100-110: cannot work on it: [Errno 2] ")
    assert str(raw_dir / "gone") in rejected[0].message
    assert [e.run_number for e in seen if e.action is Action.WRITE_FINISHED] == [2]
    assert Path(good.output_file).read_bytes() == b"complete file"
    assert source.calls == 1
    dead = await dead_letters(transport, "the broken job in the dead-letter queue")
    assert [d.job for d in dead] == [broken]
    await events.close()


async def test_a_delivery_that_lost_its_lease_leaves_the_new_owners_file_alone(
    raw_dir: Path,
) -> None:
    """The lease was taken over while the first delivery still wrote: the first one neither
    publishes, nor deletes the new owner's temporary file, nor records an outcome."""
    transport = EmbeddedTransport()
    job = make_job(raw_dir)
    source = ScriptedSource([BufferServerError("data buffer: HTTP 503", 503)])
    source.hold = asyncio.Event()
    task, events = await run_worker(transport, source, job)
    await asyncio.wait_for(source.started.wait(), 60)
    # Another delivery takes the job over: its lease and its own temporary file.
    other_partial = Path(job.output_file).with_name(f".{Path(job.output_file).name}.other.partial")
    other_partial.write_bytes(b"the new owner's half file")
    taken = {"job_id": job.job_id, "owner": "elsewhere:1:1:other", "state": "running"}
    lease_path(job).write_text(json.dumps(taken))
    source.hold.set()  # the first delivery wakes up, fails transiently, then finds out
    await async_wait_until(
        lambda: "the other delivery writes the file" in Path(job.log_file).read_text(),
        what="the first delivery to give up the job",
    )
    await stop(task)
    assert other_partial.read_bytes() == b"the new owner's half file"
    assert json.loads(lease_path(job).read_bytes()) == taken
    assert not Path(job.output_file).exists()
    assert partial_files(Path(job.output_file)) == [other_partial]
    await events.close()


async def test_interrupted_job_returns_to_queue_and_is_rewritten(
    transport: Transport, raw_dir: Path
) -> None:
    job = make_job(raw_dir)
    Path(job.output_file).write_bytes(b"old file from an earlier delivery")
    first = ScriptedSource()
    first.hold = asyncio.Event()  # never released: the worker is stopped mid-job
    task, events = await run_worker(transport, first, job)
    await asyncio.wait_for(first.started.wait(), 60)
    (partial,) = partial_files(Path(job.output_file))  # the worker's own temporary name
    assert partial.read_bytes() == b"partial"
    await stop(task)
    assert partial_files(Path(job.output_file)) == []
    assert Path(job.output_file).read_bytes() == b"old file from an earlier delivery"

    second = ScriptedSource()
    task = asyncio.create_task(Worker(transport, [second], retry=FAST).run())
    seen = await collect_until(events, Action.WRITE_FINISHED)
    await settled(job)  # acknowledged or rejected, not only announced
    await stop(task)
    assert second.calls == 1
    assert Path(job.output_file).read_bytes() == b"complete file"
    assert "delivered again" in Path(job.log_file).read_text()
    assert [e.action for e in seen][-1] is Action.WRITE_FINISHED
    await events.close()


class ReadySource(ScriptedSource):
    """A source that waits for its data (outside the work slot), says it is ready, then works
    (while ``hold`` is unset); it counts the jobs at work at once."""

    waits_for_data = True

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[int] = []
        self.at_work = 0
        self.most_at_work = 0

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        await progress.ready()
        self.runs.append(job.run_number)
        self.at_work += 1
        self.most_at_work = max(self.most_at_work, self.at_work)
        try:
            return await super().retrieve(job, target, progress, job_log)
        finally:
            self.at_work -= 1


async def test_jobs_whose_data_is_ready_take_turns_at_work(
    transport: Transport, raw_dir: Path
) -> None:
    """Two jobs of one kind, both delivered at once, their data there: one works, the other
    says it waits for it, then works when the first is done — never both at once."""
    source = ReadySource()
    source.hold = asyncio.Event()
    task, events = await run_worker(transport, source, make_job(raw_dir, 1), make_job(raw_dir, 2))
    waiting = "data ready; waiting for another databuffer job to finish writing"
    seen: list[StatusEvent] = []
    async with asyncio.timeout(60):
        while not seen or seen[-1].message != waiting:
            seen.append(await events.__anext__())
    assert seen[-1].action is Action.WRITE_PROGRESS
    assert source.runs == [3 - seen[-1].run_number]  # the other one is at work
    source.hold.set()
    seen += await collect_until(events, Action.WRITE_FINISHED)
    seen += await collect_until(events, Action.WRITE_FINISHED)
    for run in (1, 2):
        await settled(make_job(raw_dir, run))
    await stop(task)
    assert sorted(source.runs) == [1, 2]
    assert source.most_at_work == 1
    # (the second may be published first: the first one's event follows its work slot)
    finished = [e.run_number for e in seen if e.action is Action.WRITE_FINISHED]
    assert sorted(finished) == [1, 2]
    for run in (1, 2):
        assert Path(make_job(raw_dir, run).output_file).read_bytes() == b"complete file"
    await events.close()


def assert_written_once(source: ScriptedSource, seen: list[StatusEvent], job: Job) -> None:
    """The source ran once, its events came once each, and the file is the complete one."""
    assert source.calls == 1
    assert [e.action for e in seen] == [
        Action.WRITE_START,
        Action.WRITE_PROGRESS,
        Action.WRITE_FINISHED,
    ]
    assert Path(job.output_file).read_bytes() == b"complete file"


def failing_consumers(
    transport: Transport, monkeypatch: pytest.MonkeyPatch, failures: int, after: int = 0
) -> None:
    """The transport's first ``failures`` consumers raise what an RPC timeout of RabbitMQ's
    raises (seen while it recovers from an outage), each after ``after`` real deliveries."""
    real = transport.consume_jobs
    left = [failures]

    async def consume_jobs(kind: SourceKind, prefetch: int = 1) -> AsyncIterator[JobDelivery]:
        consumer = real(kind, prefetch)
        try:
            if left[0] > 0:
                left[0] -= 1
                for _ in range(after):
                    yield await anext(consumer)
                raise ChannelInvalidStateError("Channel closed by RPC timeout")
            async for delivery in consumer:
                yield delivery
        finally:
            await consumer.aclose()

    monkeypatch.setattr(transport, "consume_jobs", consume_jobs)


async def test_a_consumer_that_fails_is_started_again_backing_off(
    transport: Transport,
    raw_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The consumer fails three times before the job comes: the worker does not die (the CI
    run of stop 18 saw a worker end this way mid-outage, and 15 runs stayed queued), it
    consumes again after 0.05, 0.1 and 0.2 s, and the job is done once."""
    caplog.set_level(logging.WARNING, logger="sf_daq_broker.workers.loop")
    failing_consumers(transport, monkeypatch, failures=3)
    job = make_job(raw_dir)
    source = ScriptedSource()
    events = await transport.subscribe_status()
    await transport.publish_jobs([job])
    task = asyncio.create_task(Worker(transport, [source], retry=FAST, lease=LEASES).run())
    seen = await collect_until(events, Action.WRITE_FINISHED)
    await settled(job)
    await stop(task)
    assert_written_once(source, seen, job)
    kind = SourceKind.DATABUFFER
    assert [r.getMessage() for r in caplog.records if "consumer" in r.getMessage()] == [
        f"the {kind} consumer failed (connection closed); consuming again in {pause} s"
        for pause in ("0.05", "0.1", "0.2")
    ]
    await events.close()


async def test_jobs_in_hand_go_on_when_their_consumer_fails(
    transport: Transport, raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer fails while its one delivery runs: the job is not cancelled, its file is
    written once, and the job is settled (by this delivery or, if its channel went with the
    consumer, by the next one, which finds the lease finished)."""
    failing_consumers(transport, monkeypatch, failures=1, after=1)
    job = make_job(raw_dir)
    source = ScriptedSource()
    source.hold = asyncio.Event()
    events = await transport.subscribe_status()
    await transport.publish_jobs([job])
    task = asyncio.create_task(Worker(transport, [source], retry=FAST, lease=LEASES).run())
    await asyncio.wait_for(source.started.wait(), PATIENCE)
    source.hold.set()
    seen = await collect_until(events, Action.WRITE_FINISHED)
    await settled_and_queue_empty(transport, job)
    await stop(task)
    assert_written_once(source, seen, job)
    await events.close()


async def test_a_worker_whose_consumer_keeps_failing_stops_when_asked(
    raw_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop reaches a worker that is pausing between two failed consumers."""
    transport = EmbeddedTransport()
    await transport.connect()
    failing_consumers(transport, monkeypatch, failures=1000)
    # a pause far longer than the test may take: only a stop that cuts it short passes
    slow = replace(LEASES, reconsume_delay=10 * PATIENCE)
    task = asyncio.create_task(Worker(transport, [ScriptedSource()], lease=slow).run())
    await async_wait_until(
        lambda: any("consumer failed" in r.getMessage() for r in caplog.records),
        timeout=PATIENCE,
        what="the first failure",
    )
    await asyncio.wait_for(stop(task), PATIENCE)
    await transport.close()


def test_beam_pulses_are_the_multiples_of_the_rate() -> None:
    assert beam_pulses(100, 110, 2).tolist() == [100, 102, 104, 106, 108, 110]
    assert beam_pulses(101, 109, 4).tolist() == [104, 108]
    assert beam_pulses(101, 103, 4).tolist() == []


# --- Job leases: a job delivered again while it runs is not run twice (see lease.py) ---------

LEASES = LeasePolicy(heartbeat=0.05, stale_after=5, poll=0.02, reconsume_delay=0.05)


async def log_says(job: Job, *texts: str) -> None:
    """Wait until the job log holds one of ``texts``."""

    def found() -> bool:
        log_file = Path(job.log_file)
        return log_file.is_file() and any(text in log_file.read_text() for text in texts)

    await async_wait_until(found, timeout=60, what=f"one of {texts} in the job log")


#: What the waiting delivery logs when it acknowledges itself: the lease says finished (the
#: other's ack failed or is still to come) or is gone (the other's ack went through).
DUPLICATE_ACKED = (
    "already written by an earlier delivery: acknowledged",
    "written and acknowledged by the other delivery: acknowledged",
)


async def settled_and_queue_empty(transport: Transport, job: Job) -> None:
    """The lease is gone (a delivery was settled), nothing waits in the queue or the DLQ."""
    await async_wait_until(lambda: not lease_path(job).exists(), timeout=60, what="lease gone")
    assert await transport.take_dead_letters() == []
    consumer = transport.consume_jobs(SourceKind.DATABUFFER)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await consumer.__anext__()
    await consumer.aclose()


async def stop_all_and_check_ran_once(
    workers: list[asyncio.Task[Any]], source: ScriptedSource, seen: list[StatusEvent]
) -> None:
    """Stop the workers; the source ran once and the job's status events were sent once."""
    for task in workers:
        await stop(task)
    assert source.calls == 1
    assert [e.action for e in seen] == [
        Action.WRITE_START,
        Action.WRITE_PROGRESS,
        Action.WRITE_FINISHED,
    ]


async def test_a_second_delivery_waits_for_the_running_one(
    transport: Transport, raw_dir: Path
) -> None:
    """Two deliveries of one job at once (what a delivery timeout produces): one runs, the
    other waits for it and is acknowledged without touching the file or sending status —
    except a ``write_finished`` said again if it saw the lease finished before it was removed
    (in case the first delivery's event was lost): which of the two it did, its log says."""
    job = make_job(raw_dir)
    source = ScriptedSource()
    source.hold = asyncio.Event()
    events = await transport.subscribe_status()
    await transport.publish_jobs([job, job])
    deliveries: list[WatchedDelivery] = []
    workers = [
        asyncio.create_task(
            watching(deliveries)(transport, [source], retry=FAST, lease=LEASES).run()
        )
        for _ in range(2)
    ]
    await asyncio.wait_for(source.started.wait(), 60)
    await log_says(job, "running in another delivery")
    assert json.loads(lease_path(job).read_bytes())["state"] == "running"
    source.hold.set()
    await async_wait_until(
        lambda: len(deliveries) == 2 and all(d.outcome for d in deliveries),
        timeout=60,
        what="both deliveries to be settled",
    )
    assert [d.outcome for d in deliveries] == ["ack", "ack"]
    await settled_and_queue_empty(transport, job)
    for task in workers:
        await stop(task)
    assert source.calls == 1
    sent = await events_sent_so_far(transport, events, job)
    again = [e.action for e in sent if e.message == "written by an earlier delivery"]
    assert [e.action for e in sent if e.message != "written by an earlier delivery"] == [
        Action.WRITE_START,
        Action.WRITE_PROGRESS,
        Action.WRITE_FINISHED,
    ]
    log_text = Path(job.log_file).read_text()
    said_again, acknowledged = (text in log_text for text in DUPLICATE_ACKED)
    assert said_again != acknowledged  # the waiting delivery took one of the two ways
    assert again == ([Action.WRITE_FINISHED] if said_again else [])
    assert Path(job.output_file).read_bytes() == b"complete file"
    await events.close()


class WatchedDelivery(JobDelivery):
    """A delivery that records how it was settled; its ack waits for ``gate`` (open unless
    the test closes it), so that a test can stop the worker in between."""

    def __init__(self, inner: JobDelivery) -> None:
        self.job = inner.job
        self.redelivered = inner.redelivered
        self._inner = inner
        self.acking = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.outcome: str | None = None

    async def ack(self) -> None:
        self.acking.set()
        await self.gate.wait()
        await self._inner.ack()
        self.outcome = "ack"

    async def reject(self) -> None:
        await self._inner.reject()
        self.outcome = "reject"


def watching(deliveries: list[WatchedDelivery]) -> type[Worker]:
    """A worker class whose deliveries are watched (appended to ``deliveries``)."""

    class WatchingWorker(Worker):
        async def handle(self, source: Source, delivery: JobDelivery) -> None:
            deliveries.append(WatchedDelivery(delivery))
            await super().handle(source, deliveries[-1])

    return WatchingWorker


async def events_sent_so_far(
    transport: Transport, events: StatusSubscription, job: Job
) -> list[StatusEvent]:
    """Every event published before now, without waiting for silence: a marker event is
    published and the events are read up to it (one transport keeps the order)."""
    await transport.publish_status(StatusEvent.for_job(Action.WRITE_PROGRESS, job, "marker"))
    seen = await collect_until(events, Action.WRITE_PROGRESS)
    while seen[-1].message != "marker":
        seen += await collect_until(events, Action.WRITE_PROGRESS)
    return seen[:-1]


async def test_a_stale_lease_is_taken_over(raw_dir: Path) -> None:
    """The worker that held the job died (its lease is no longer touched): the job runs."""
    transport = EmbeddedTransport()
    job = make_job(raw_dir)
    dead = {"job_id": job.job_id, "owner": "gone:1:dead", "state": "running", "reason": ""}
    lease_path(job).write_text(json.dumps(dead))
    os.utime(lease_path(job), (time.time() - 60, time.time() - 60))
    source = ScriptedSource()
    task, events = await run_worker_with(transport, source, job)
    await collect_until(events, Action.WRITE_FINISHED)
    await async_wait_until(lambda: not lease_path(job).exists(), what="lease gone")
    await stop(task)
    assert source.calls == 1
    assert (
        "taking over the job from gone:1:dead (lease running, 60 s old)"
        in Path(job.log_file).read_text()
    )
    await events.close()


async def test_a_job_that_failed_before_is_dead_lettered_again(raw_dir: Path) -> None:
    """The first delivery failed but could not reject (its channel was gone): the next one
    rejects it from the lease, without trying again."""
    transport = EmbeddedTransport()
    job = make_job(raw_dir)
    failed = {"job_id": job.job_id, "owner": "a:1:b", "state": "failed", "reason": "aged out"}
    lease_path(job).write_text(json.dumps(failed))
    source = ScriptedSource()
    task, events = await run_worker_with(transport, source, job)
    await async_wait_until(lambda: not lease_path(job).exists(), what="lease gone")
    await stop(task)
    assert source.calls == 0
    assert [d.job for d in await transport.take_dead_letters()] == [job]
    assert "failed in an earlier delivery (aged out): rejected" in Path(job.log_file).read_text()
    (event,) = await collect_until(events, Action.WRITE_REJECTED)  # said again, for the status
    assert (event.job_id, event.message) == (job.job_id, "aged out")
    await events.close()


async def run_worker_with(
    transport: Transport, source: Source, job: Job
) -> tuple[asyncio.Task[Any], StatusSubscription]:
    events = await transport.subscribe_status()
    await transport.publish_jobs([job])
    task = asyncio.create_task(Worker(transport, [source], retry=FAST, lease=LEASES).run())
    return task, events


@contextlib.contextmanager
def short_delivery_timeout(node: PrivateRabbitMQ, timeout_ms: int) -> Iterator[None]:
    """RabbitMQ's server-wide ``consumer_timeout`` set to ``timeout_ms`` for the block, on the
    test session's private node (never the shared server, which other tests use meanwhile).

    RabbitMQ 3.10 has no per-queue or per-consumer timeout (3.12+), so the test changes the
    node's setting at run time and restores it in any case (other tests use the private node
    after this one). The timeout is checked on each channel's tick (60 s by default), so the
    tick is shortened too; channels read it when they open, so only channels opened inside the
    block see it.
    """
    keys = ("consumer_timeout", "channel_tick_interval")
    previous = node.ctl(
        "eval", "{" + ", ".join(f"application:get_env(rabbit, {key})" for key in keys) + "}."
    )
    values = dict(zip(keys, re.findall(r"\{ok,(\d+)\}|undefined", previous), strict=True))
    restore = ", ".join(
        f"application:set_env(rabbit, {key}, {value})"
        if value
        else f"application:unset_env(rabbit, {key})"
        for key, value in values.items()
    )
    try:
        node.ctl(
            "eval",
            f"application:set_env(rabbit, consumer_timeout, {timeout_ms}), "
            f"application:set_env(rabbit, channel_tick_interval, {timeout_ms // 2}).",
        )
        yield
    finally:
        node.ctl("eval", restore + ".")


def delivery_channel_closed(delivery: JobDelivery) -> bool:
    """Whether RabbitMQ closed the channel of this delivery (aio-pika internals: a test-only
    probe, the loop itself only learns it when its ack fails)."""
    message = getattr(delivery, "_message")  # noqa: B009 - private by design
    try:
        channel = message.channel  # raises once the channel is closed
    except ChannelInvalidStateError:
        return True
    return bool(channel.is_closed)


async def test_a_job_longer_than_the_delivery_timeout_runs_once(
    private_rabbitmq: PrivateRabbitMQ,  # noqa: F811
    raw_dir: Path,
) -> None:
    """Real RabbitMQ, real timeout: the job outlives its delivery; the first worker still
    writes the file and sends its status, the job's next delivery is acknowledged from the
    lease, and the job is neither run twice nor lost."""
    job = make_job(raw_dir)
    source = ScriptedSource()
    source.hold = asyncio.Event()
    deliveries: list[JobDelivery] = []

    class RecordingWorker(Worker):
        async def handle(self, source: Source, delivery: JobDelivery) -> None:
            deliveries.append(delivery)
            await super().handle(source, delivery)

    node = private_rabbitmq
    prefix = f"timeout-{uuid.uuid4().hex[:10]}"
    transports = [AmqpTransport(node.url, prefix=prefix) for _ in range(3)]
    publisher, first, second = transports
    with short_delivery_timeout(node, timeout_ms=1000):
        events = await publisher.subscribe_status()
        await publisher.publish_jobs([job])
        workers = [
            asyncio.create_task(RecordingWorker(t, [source], retry=FAST, lease=LEASES).run())
            for t in (first, second)
        ]
        await asyncio.wait_for(source.started.wait(), 60)
        await async_wait_until(
            lambda: delivery_channel_closed(deliveries[0]),
            timeout=PATIENCE,
            what="RabbitMQ to close the channel of the delivery (consumer_timeout)",
        )
        source.hold.set()  # the job ends after its delivery timed out
        seen = await collect_until(events, Action.WRITE_FINISHED, timeout=PATIENCE)
        await async_wait_until(lambda: not lease_path(job).exists(), timeout=PATIENCE, what="ack")
    await stop_all_and_check_ran_once(workers, source, seen)
    assert Path(job.output_file).read_bytes() == b"complete file"
    log_text = Path(job.log_file).read_text()
    assert "this delivery can no longer be settled" in log_text
    assert "delivered again" in log_text
    assert any(text in log_text for text in DUPLICATE_ACKED)
    assert len(deliveries) >= 2 and deliveries[1].redelivered
    await settled_and_queue_empty(publisher, job)
    await events.close()
    for transport in transports:
        await transport.close()


async def test_a_fresh_lease_of_a_killed_process_is_taken_over_at_once(raw_dir: Path) -> None:
    """A worker of this host killed with SIGKILL left a fresh ``running`` lease: its process
    is gone, so the next delivery does not wait for the lease to go stale."""
    transport = EmbeddedTransport()
    job = make_job(raw_dir)
    child = subprocess.Popen(["true"])
    child.wait()  # a pid that no longer runs
    owner = f"{socket.gethostname()}:{child.pid}:12345:dead"
    killed = {"job_id": job.job_id, "owner": owner, "state": "running", "reason": ""}
    lease_path(job).write_text(json.dumps(killed))
    source = ScriptedSource()
    patient = LeasePolicy(heartbeat=0.05, stale_after=3600, poll=0.02)
    events = await transport.subscribe_status()
    await transport.publish_jobs([job])
    task = asyncio.create_task(Worker(transport, [source], retry=FAST, lease=patient).run())
    await collect_until(events, Action.WRITE_FINISHED)
    await async_wait_until(lambda: not lease_path(job).exists(), what="lease gone")
    await stop(task)
    assert source.calls == 1
    assert (
        f"taking over the job from {owner} (lease running, 0 s old)"
        in Path(job.log_file).read_text()
    )
    await events.close()


async def test_a_stop_while_the_job_is_settled_lets_the_settling_finish(
    transport: Transport, raw_dir: Path
) -> None:
    """The worker is stopped right after write_finished, while the ack is on its way: the
    ack and the removal of the lease still happen, through the job directory's handle, which
    stays open until then (it used to be closed under them: EBADF, the lease left behind),
    and before the consumer gives its unsettled deliveries back to the queue."""
    job = make_job(raw_dir)
    deliveries: list[WatchedDelivery] = []

    class GatingWorker(Worker):
        async def handle(self, source: Source, delivery: JobDelivery) -> None:
            deliveries.append(WatchedDelivery(delivery))
            deliveries[-1].gate.clear()
            await super().handle(source, deliveries[-1])

    events = await transport.subscribe_status()
    await transport.publish_jobs([job])
    task = asyncio.create_task(
        GatingWorker(transport, [ScriptedSource()], retry=FAST, lease=LEASES).run()
    )
    await collect_until(events, Action.WRITE_FINISHED)
    await async_wait_until(lambda: deliveries and deliveries[0].acking.is_set(), timeout=60)
    task.cancel()
    stopping = "stopped while the job was being settled: settling it first"
    await async_wait_until(
        lambda: task.done() or stopping in Path(job.log_file).read_text(),
        timeout=60,
        what="the stop to reach the job",
    )
    deliveries[0].gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deliveries[0].outcome == "ack"
    assert not lease_path(job).exists()
    assert Path(job.output_file).read_bytes() == b"complete file"
    assert stopping in Path(job.log_file).read_text()
    await settled_and_queue_empty(transport, job)
    await events.close()
