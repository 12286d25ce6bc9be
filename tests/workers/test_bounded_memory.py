"""A long data-buffer job runs in memory that does not grow with the run's length.

In a fresh process (peak RSS is per process): a simulated data buffer serving a float32 x 2048
waveform (8 KiB per pulse), and the data-buffer source's own job for a short run, then for a
run of 30 000 pulses (246 MB of values). The long job must raise the process's peak by far
less than its data: a job holding the run (as the workers did before they streamed: the
fetch, its concatenation and the sorted copy, each the size of the run) raises it by several
times the data. The bound, 100 MB for 246 MB of values, is generous for any machine and
allocator, and the file must hold every value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from aiohttp import web

from sf_daq_broker.jobs import Job, SourceKind, job_id_for
from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.channels import ChannelSpec, expected_values
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.api1_source import DataBufferSource
from sf_daq_broker.workers.loop import Progress

REPO = Path(__file__).resolve().parents[2]
P0 = 15_000_000_000
WAVE = ChannelSpec(name="SAR:BIG-WAVE", type="float32", shape=(2048,))
SHORT, LONG = 1_000, 30_000
GROWTH_LIMIT_MB = 100

pytestmark = pytest.mark.slow


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def job_for(directory: Path, pulses: int) -> Job:
    return Job(
        job_id=job_id_for("p12345", pulses, "BSDATA"),
        request_id="memory",
        kind=SourceKind.DATABUFFER,
        source="BSDATA",
        names=(WAVE.name,),
        start_pulse_id=P0 + 1,
        stop_pulse_id=P0 + pulses,
        requested_start=P0 + 1,
        requested_stop=P0 + pulses,
        rate_multiplicator=1,
        pgroup="p12345",
        beamline="bernina",
        run_number=pulses,
        output_file=str(directory / f"run_{pulses}.BSDATA.h5"),
        log_file=str(directory / "job.log"),
        run_info_file=str(directory / "run.json"),
        request_time="2026-11-21 00:00:00.000000",
    )


async def measure(directory: Path) -> dict[str, float]:
    """The child's work: both jobs against an in-process simulated buffer."""
    clock = ManualClock(start_pulse_id=P0, t0_ms=time.time_ns() // 1_000_000 - 3_600_000)
    clock.advance_to(P0 + LONG + 10)
    runner = web.AppRunner(create_api1_app(SimulatedApi1Buffer([WAVE], clock)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    source = DataBufferSource(url, url, retention_pulses=10**7, ingestion_window=0.0)
    peaks: dict[str, float] = {}
    for label, pulses in (("short", SHORT), ("long", LONG)):
        job = job_for(directory, pulses)
        progress = Progress(EmbeddedTransport(), job, pulses)
        report = await source.retrieve(
            job, Path(job.output_file), progress, logging.getLogger("memory")
        )
        assert report.complete, report.lines()
        peaks[label] = peak_mb()
    await runner.cleanup()
    return peaks


def test_a_long_job_does_not_hold_the_run_in_memory(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    data_mb = LONG * WAVE.header.value_nbytes / 2**20  # type: ignore[operator]
    assert data_mb > 230
    assert peaks["long"] - peaks["short"] < GROWTH_LIMIT_MB, (peaks, data_mb)
    with h5py.File(tmp_path / f"run_{LONG}.BSDATA.h5") as file:
        group = file[WAVE.name]
        assert group["pulse_id"].shape == (LONG,)
        assert group["pulse_id"][-3:].tolist() == [P0 + LONG - 2, P0 + LONG - 1, P0 + LONG]
        picks = np.array([P0 + 1, P0 + 12_345, P0 + LONG])
        np.testing.assert_array_equal(
            group["data"][[0, 12_344, LONG - 1]], expected_values(WAVE, picks)
        )


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(Path(sys.argv[1])))))
