"""Symlinks planted inside raw/ never carry a write outside it (issue 11, item 1).

The broker, a real worker loop with a source that writes real HDF5 files, and the embedded
queue: a request is accepted, then the file system is tampered with (as a user with write
access to raw/ could), then the worker runs. Every test checks the outside directory is left
exactly as it was and /run_status tells the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.loop import Progress, RetryPolicy, Source, Worker
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses
from tests.support import PATIENCE, async_wait_until, ended_run_status

FAST = RetryPolicy(attempts=2, first_delay=0.01, factor=2, max_delay=0.05)
REQUEST: dict[str, Any] = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 1009,
    "channels_list": ["A:B"],
}


class H5Source(Source):
    """Writes a small real HDF5 file at the target; ``before_write`` / ``after_write`` run
    before it opens the file and after it closed it."""

    kind = SourceKind.DATABUFFER

    def __init__(
        self,
        before_write: Callable[[], None] | None = None,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self.before_write = before_write
        self.after_write = after_write

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        if self.before_write is not None:
            self.before_write()
        with h5py.File(target, "w") as file:
            file["A:B/data"] = np.arange(10)
        if self.after_write is not None:
            self.after_write()
        pulses = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        return CompletenessReport(names=[NameReport.judge("A:B", pulses, pulses)])


@dataclass
class Broker:
    client: TestClient
    transport: EmbeddedTransport
    raw_dir: Path
    outside: Path

    async def request(self, **fields: Any) -> int:
        response = await self.client.post("/retrieve_from_buffers", json={**REQUEST, **fields})
        document = await response.json()
        assert response.status == 200, document
        return int(document["run_number"])

    async def work(self, source: Source, run: int = 1) -> dict[str, Any]:
        """Run a worker until the run has ended; its /run_status reply."""
        worker = asyncio.create_task(Worker(self.transport, [source], retry=FAST).run())
        try:
            return await async_wait_until(
                lambda: self.ended(run), timeout=PATIENCE, what="run ended"
            )
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def ended(self, run: int) -> dict[str, Any] | None:
        return await ended_run_status(self.client, run)

    def outside_files(self) -> dict[str, bytes]:
        return {
            str(path.relative_to(self.outside)): path.read_bytes()
            for path in sorted(self.outside.rglob("*"))
            if path.is_file() and not path.is_symlink()
        }


@pytest.fixture
async def broker(
    aiohttp_client: Any, settings: Any, raw_dir: Path, tmp_path: Path
) -> AsyncIterator[Broker]:
    transport = EmbeddedTransport()
    client = await aiohttp_client(create_app(settings, transport))
    outside = tmp_path / "outside"
    outside.mkdir()
    yield Broker(client, transport, raw_dir, outside)


async def test_a_directory_replaced_by_a_symlink_after_acceptance_fails_the_job(
    broker: Broker,
) -> None:
    run = await broker.request(directory_name="d/e")
    # While the job waits in the queue, raw/d becomes a symlink to a directory outside that
    # has the same layout (e/): following it would put the file there.
    shutil.rmtree(broker.raw_dir / "d")
    (broker.outside / "e").mkdir()
    os.symlink(broker.outside, broker.raw_dir / "d")
    status = await broker.work(H5Source(), run)
    assert status["run_state"] == "failed"
    source = status["sources"]["BSDATA"]
    assert source["state"] == "failed"
    assert source["message"] == (
        f"pulses 1000-1009: cannot work on it: refusing to write below {broker.raw_dir}/d/e: "
        f"{broker.raw_dir}/d is a symlink to {broker.outside}, outside {broker.raw_dir}"
    )
    assert sorted(p.name for p in broker.outside.rglob("*")) == ["e"]  # nothing written there


async def test_a_symlink_at_the_job_log_is_not_followed(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    run = await broker.request()
    victim = broker.outside / "victim.log"
    victim.write_bytes(b"not yours\n")
    log_file = broker.raw_dir / "run_info" / "000000" / "run_000001.BSDATA.log"
    os.symlink(victim, log_file)
    status = await broker.work(H5Source(), run)
    assert status["run_state"] == "done"
    assert broker.outside_files() == {"victim.log": b"not yours\n"}
    assert log_file.is_symlink()
    assert (
        f"job log {log_file} cannot be written: [Errno 40] Too many levels of symbolic links"
        in (caplog.text)
    )
    with h5py.File(broker.raw_dir / "run_000001.BSDATA.h5") as file:
        assert file["A:B/data"][:].tolist() == list(range(10))


@pytest.mark.parametrize("moment", ["before_write", "after_write"])
async def test_a_symlink_swapped_in_at_the_temporary_name_is_not_written_through(
    broker: Broker, moment: str
) -> None:
    """The temporary name becomes a symlink the moment the source opens its file, or after it
    wrote it (before the loop publishes it): never written through, never published."""
    run = await broker.request()
    victim = broker.outside / "victim.h5"
    victim.write_bytes(b"precious")

    def swap() -> None:
        (partial,) = broker.raw_dir.glob(".run_000001.BSDATA.h5.*.partial")
        partial.unlink()
        os.symlink(victim, partial)

    status = await broker.work(H5Source(**{moment: swap}), run)
    assert broker.outside_files() == {"victim.h5": b"precious"}
    assert status["run_state"] == "failed"
    message = status["sources"]["BSDATA"]["message"]
    assert message.startswith(f"pulses 1000-1009: {broker.raw_dir}/.run_000001.BSDATA.h5.")
    assert message.endswith(".partial was replaced by something else while written")
    assert not (broker.raw_dir / "run_000001.BSDATA.h5").exists()
    assert list(broker.raw_dir.glob(".run_000001*")) == []  # the planted symlink is gone too


async def test_a_symlink_at_the_lease_is_neither_read_nor_followed(broker: Broker) -> None:
    """A symlink at the lease's name to a FIFO outside: reading through it would block the
    worker for ever. It counts as a foreign lease (judged by the symlink's own age) and is
    removed when it is stale."""
    run = await broker.request()
    fifo = broker.outside / "fifo"
    os.mkfifo(fifo)
    lease = broker.raw_dir / ".run_000001.BSDATA.h5.lease"
    os.symlink(fifo, lease)
    old = time.time() - 3600
    os.utime(lease, (old, old), follow_symlinks=False)
    try:
        status = await broker.work(H5Source(), run)
    finally:
        # Release a reader that would be blocked on the FIFO (the behaviour before the fix).
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert status["run_state"] == "done"
    assert not lease.exists() and not lease.is_symlink()
    assert fifo.exists() and sorted(p.name for p in broker.outside.iterdir()) == ["fifo"]


@pytest.mark.parametrize(
    "planted",
    ["run_info/.LAST_RUN.tmp", "run_info/LAST_RUN", "run_info/000000", "scan_info/scan1.json"],
)
async def test_bookkeeping_files_are_never_written_through_symlinks(
    broker: Broker, planted: str
) -> None:
    """A symlink at a bookkeeping name (the fixed temporary name of LAST_RUN, LAST_RUN, the
    run JSON's directory, the scan JSON) is refused or replaced, never written through, and
    a refused request spends no run number."""
    victim = broker.outside / "victim"
    if planted == "run_info/000000":
        victim.mkdir()
    else:
        victim.write_bytes(b"41\n" if planted.endswith("LAST_RUN") else b"{}\n")
    before = broker.outside_files()
    link = broker.raw_dir / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, link)
    response = await broker.client.post(
        "/retrieve_from_buffers", json={**REQUEST, "scan_info": {"scan_name": "scan1"}}
    )
    reply = await response.json()
    assert broker.outside_files() == before
    last_run = broker.raw_dir / "run_info" / "LAST_RUN"
    expected: dict[str, tuple[int, str]] = {
        "run_info/.LAST_RUN.tmp": (200, "1"),
        "run_info/LAST_RUN": (
            409,
            f"{last_run} cannot be read (Too many levels of symbolic links): "
            "a person must look at it",
        ),
        "run_info/000000": (400, "run_info leads outside the raw directory of p12345"),
        "scan_info/scan1.json": (
            409,
            f"scan file {link} cannot be read (Too many levels of symbolic links); fix or move it",
        ),
    }
    assert (response.status, reply["message"]) == expected[planted]
    if response.status == 200:
        assert last_run.read_text() == "1\n"
        assert not link.is_symlink() and not link.exists()
    elif planted != "run_info/LAST_RUN":
        assert not last_run.exists()  # no run number spent


async def test_keep_raw_into_a_symlinked_raw_data_is_refused_at_the_door(
    broker: Broker, make_settings: Any, aiohttp_client: Any
) -> None:
    settings = make_settings(detectors={"JF07T32V01": {"beamline": "bernina"}})
    client = await aiohttp_client(create_app(settings, EmbeddedTransport()))
    os.symlink(broker.outside, broker.raw_dir / "RAW_DATA")
    body = {**REQUEST, "detectors": {"JF07T32V01": {"keep_raw": True}}, "directory_name": "x"}
    response = await client.post("/retrieve_from_buffers", json=body)
    assert (response.status, (await response.json())["message"]) == (
        400,
        "detectors.JF07T32V01.keep_raw leads outside the raw directory of p12345",
    )
    assert not (broker.raw_dir / "run_info" / "LAST_RUN").exists()
    assert list(broker.outside.iterdir()) == []
