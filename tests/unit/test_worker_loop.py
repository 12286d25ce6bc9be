"""The shared worker loop on both transports, with a small scripted source.

The source here stands in for a buffer (which the source tests exercise for real); what is
under test is the loop: ack only after the file is in place, retries, dead-lettering, status
events, job logs and the return of an interrupted job to the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sf_daq_broker.buffers.errors import BufferServerError, DataAgedOut, StreamCut
from sf_daq_broker.jobs import Action, Job, SourceKind, StatusEvent, job_id_for
from sf_daq_broker.jungfrau.errors import CalibrationError
from sf_daq_broker.transport import StatusSubscription, Transport
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.loop import Progress, RetryPolicy, Source, Worker, temporary_path
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses
from tests.support import async_wait_until

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
    events: StatusSubscription, action: Action, timeout: float = 10
) -> list[StatusEvent]:
    seen: list[StatusEvent] = []
    async with asyncio.timeout(timeout):
        while not seen or seen[-1].action is not action:
            seen.append(await events.__anext__())
    return seen


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
    await stop(task)
    assert [e.action for e in seen] == [
        Action.WRITE_START,
        Action.WRITE_PROGRESS,
        Action.WRITE_FINISHED,
    ]
    assert seen[0].details == {"total": 6}  # beam pulses 100, 102, …, 110
    finished = seen[-1]
    assert finished.message == "incomplete: 1 names with missing pulses, 1 names without data"
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
    assert not temporary_path(job).exists()
    log_text = Path(job.log_file).read_text()
    assert (
        "BSDATA of run 1 (p12345): 2 names, pulses 99-111 (requested 100-110, rate 1/2)" in log_text
    )
    assert "A:B: 4 of 6 beam pulses, 2 missing (108, 110)" in log_text
    assert "C:D: no data at all" in log_text
    # Acknowledged: a new worker gets nothing, and nothing was dead-lettered.
    assert await transport.take_dead_letters() == []
    consumer = transport.consume_jobs(SourceKind.DATABUFFER)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await consumer.__anext__()
    await consumer.aclose()
    await events.close()


async def test_transient_errors_are_retried(transport: Transport, raw_dir: Path) -> None:
    job = make_job(raw_dir)
    source = ScriptedSource([BufferServerError("data buffer: HTTP 503", 503), StreamCut("cut")])
    task, events = await run_worker(transport, source, job)
    await collect_until(events, Action.WRITE_FINISHED)
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
            "pulses 99-111: data buffer at http://x: HTTP 500 (gave up after 3 tries)",
            3,
        ),
        (
            [DataAgedOut("data buffer: aged out")],
            "pulses 99-111: data buffer: aged out",
            1,
        ),
        (
            [CalibrationError("JF07T32V01: gain file /g.h5 has shape (4, 512, 1024)")],
            "pulses 99-111: JF07T32V01: gain file /g.h5 has shape (4, 512, 1024)",
            1,
        ),
        ([ValueError("boom")], "pulses 99-111: unexpected error: ValueError('boom')", 1),
    ],
)
async def test_failures_dead_letter_and_leave_no_file(
    transport: Transport, raw_dir: Path, failures: list[Exception], reason: str, calls: int
) -> None:
    job = make_job(raw_dir)
    source = ScriptedSource(failures)
    task, events = await run_worker(transport, source, job)
    seen = await collect_until(events, Action.WRITE_REJECTED)
    await stop(task)
    assert seen[-1].message == reason
    assert source.calls == calls
    assert not Path(job.output_file).exists()
    assert not temporary_path(job).exists()
    assert f"failed, no file written: {reason}" in Path(job.log_file).read_text()
    dead: list[Job] = []

    async def dead_lettered() -> bool:
        dead.extend(await transport.take_dead_letters())
        return bool(dead)

    await async_wait_until(dead_lettered, what="the job in the dead-letter queue")
    assert dead == [job]
    await events.close()


async def test_interrupted_job_returns_to_queue_and_is_rewritten(
    transport: Transport, raw_dir: Path
) -> None:
    job = make_job(raw_dir)
    Path(job.output_file).write_bytes(b"old file from an earlier delivery")
    first = ScriptedSource()
    first.hold = asyncio.Event()  # never released: the worker is stopped mid-job
    task, events = await run_worker(transport, first, job)
    await asyncio.wait_for(first.started.wait(), 10)
    assert temporary_path(job).read_bytes() == b"partial"
    await stop(task)
    assert not temporary_path(job).exists()
    assert Path(job.output_file).read_bytes() == b"old file from an earlier delivery"

    second = ScriptedSource()
    task = asyncio.create_task(Worker(transport, [second], retry=FAST).run())
    seen = await collect_until(events, Action.WRITE_FINISHED)
    await stop(task)
    assert second.calls == 1
    assert Path(job.output_file).read_bytes() == b"complete file"
    assert "delivered again" in Path(job.log_file).read_text()
    assert [e.action for e in seen][-1] is Action.WRITE_FINISHED
    await events.close()


def test_beam_pulses_are_the_multiples_of_the_rate() -> None:
    assert beam_pulses(100, 110, 2).tolist() == [100, 102, 104, 106, 108, 110]
    assert beam_pulses(101, 109, 4).tolist() == [104, 108]
    assert beam_pulses(101, 103, 4).tolist() == []
