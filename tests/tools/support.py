"""Helpers of the tool tests: the broker's address, a fake worker's announcements, streams."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from sf_daq_broker.jobs import Action, Job, SourceKind, StatusEvent
from sf_daq_broker.transport import Transport
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses
from tests.support import PATIENCE

REPO = Path(__file__).resolve().parents[2]
SEED_START, SEED_STOP = 11884948775, 11884949774


@dataclass
class LiveBroker:
    url: str
    transport: Transport
    server: TestServer


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@dataclass
class PulseServer:
    """``GET /current_pulse_id`` of a machine making 100 pulses a second from ``first``."""

    url: str
    first: int
    started: float = field(default_factory=time.monotonic)
    served: list[int] = field(default_factory=list)

    def now(self) -> int:
        return self.first + int((time.monotonic() - self.started) * 100)


async def take_job(transport: Transport, kind: SourceKind) -> Job:
    """The next job of a kind, acknowledged at once: the test plays the worker."""
    consumer = transport.consume_jobs(kind)
    delivery = await asyncio.wait_for(consumer.__anext__(), PATIENCE)
    await delivery.ack()
    await consumer.aclose()
    return delivery.job


def complete_report(job: Job) -> dict[str, Any]:
    """The completeness report a worker sends when every beam pulse was found."""
    expected = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
    names = [NameReport.judge(name, expected, expected) for name in job.names]
    return CompletenessReport(names).to_json()


async def write_job(transport: Transport, job: Job, fail: str | None = None) -> None:
    """Announce what a worker announces for a job: start, progress, then finished or rejected."""
    total = int(beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator).size)
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_START, job, "started", total=total)
    )
    await transport.publish_status(
        StatusEvent.for_job(
            Action.WRITE_PROGRESS, job, f"{total // 2} of {total}", done=total // 2, total=total
        )
    )
    if fail is not None:
        await transport.publish_status(StatusEvent.for_job(Action.WRITE_REJECTED, job, fail))
        return
    report = complete_report(job)
    finished = StatusEvent.for_job(
        Action.WRITE_FINISHED, job, report["summary"], total=total, report=report
    )
    await transport.publish_status(finished)


async def read_until(stream: asyncio.StreamReader, text: str, timeout: float = PATIENCE) -> str:
    """Everything read from ``stream`` up to and including ``text`` (which may lack a newline)."""
    seen = ""

    async def collect() -> str:
        nonlocal seen
        while text not in seen:
            chunk = await stream.read(4096)
            if not chunk:
                raise AssertionError(f"stream ended before {text!r}; got {seen!r}")
            seen += chunk.decode()
        return seen

    try:
        return await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        raise AssertionError(f"no {text!r} within {timeout} s; got {seen!r}") from None
