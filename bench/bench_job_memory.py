"""Peak memory and time of one data-buffer, image-buffer or archiver job, per run length.

    .venv/bin/python bench/bench_job_memory.py                      # the table of issue 12
    .venv/bin/python bench/bench_job_memory.py --case BSDATA:60000 --case CAMERAS:6000
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_job_memory.py --case BSDATA:60000
    .venv/bin/python bench/bench_job_memory.py --case BSDATA:60000 --no-openmp-policy

The sources of ``bench_retrieval.py`` (10 channels of several types, rates and shapes, one
uint16 camera of ``--camera-shape``, 5 PVs) are simulated in one child process with the clock
past the longest run. Each case runs in a fresh worker process: the worker's own job
(``Source.retrieve``: readiness, the api/1 or archiver fetch, the HDF5 file) for pulses
``P0+1 .. P0+N``; that process reports its peak resident set (``ru_maxrss``), its resident
set before the job (imports done: the constant every worker pays) and the job's seconds. The
reference measured in the same run, also in a fresh process: the bare fetch of the same
channels with the same client, each batch dropped as it arrives (no file); the ratio
job / fetch is what decoding-to-file adds to streaming. Memory must not grow with ``N``.
``--no-openmp-policy`` lets bitshuffle run its default OpenMP threads in the job (the policy
of ``sf_daq_broker.openmp`` switched off), to measure what the policy is worth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_retrieval import P0, channel_specs

SOURCES = ("BSDATA", "CAMERAS", "PVCHANNELS")
NO_POLICY = "BENCH_NO_OPENMP_POLICY"
DEFAULT_CASES = [
    *(f"BSDATA:{n}" for n in (1000, 6000, 30000, 60000)),
    *(f"CAMERAS:{n}" for n in (1000, 6000, 12000)),
    *(f"PVCHANNELS:{n}" for n in (1000, 60000)),
]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def names_of(spec: dict[str, Any], source: str) -> list[str]:
    key = {"BSDATA": "channels", "CAMERAS": "cameras", "PVCHANNELS": "pvs"}[source]
    return [entry["name"] for entry in spec[key]]


def job_child(source_name: str, pulses: int, urls: list[str], out_dir: str, names: str) -> None:
    """In a fresh process: one job of ``source_name``; prints JSON figures."""
    from sf_daq_broker.jobs import Job, SourceKind, job_id_for
    from sf_daq_broker.transport.embedded import EmbeddedTransport
    from sf_daq_broker.workers.api1_source import DataBufferSource, ImageBufferSource
    from sf_daq_broker.workers.archiver_source import ArchiverSource
    from sf_daq_broker.workers.loop import Progress, Source

    before = peak_mb()
    if os.environ.get(NO_POLICY):
        import contextlib

        from sf_daq_broker import openmp

        openmp.single_threaded = contextlib.nullcontext  # type: ignore[assignment]
    source: Source
    kind: SourceKind
    if source_name == "BSDATA":
        source, kind = DataBufferSource(urls[0], urls[0], 10**7), SourceKind.DATABUFFER
    elif source_name == "CAMERAS":
        source, kind = ImageBufferSource(urls[1], urls[0], 10**7), SourceKind.IMAGEBUFFER
    else:
        source, kind = ArchiverSource(urls[2], urls[0]), SourceKind.ARCHIVER
    directory = Path(out_dir)
    output = directory / f"run_000001.{source_name}.h5"
    job = Job(
        job_id=job_id_for("p12345", 1, source_name),
        request_id="bench",
        kind=kind,
        source=source_name,
        names=tuple(json.loads(names)),
        start_pulse_id=P0 + 1,
        stop_pulse_id=P0 + pulses,
        requested_start=P0 + 1,
        requested_stop=P0 + pulses,
        rate_multiplicator=1,
        pgroup="p12345",
        beamline="bernina",
        run_number=1,
        output_file=str(output),
        log_file=str(directory / "bench.log"),
        run_info_file=str(directory / "run_000001.json"),
        request_time="2026-11-21 00:00:00.000000",
    )
    target = directory / f".{output.name}.bench.partial"

    async def go() -> tuple[float, str]:
        progress = Progress(EmbeddedTransport(), job, pulses)
        started = time.perf_counter()
        report = await source.retrieve(job, target, progress, logging.getLogger("bench"))
        return time.perf_counter() - started, report.summary()

    seconds, summary = asyncio.run(go())
    size = target.stat().st_size
    target.unlink()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mb": peak_mb(),
                "before_mb": before,
                "file_mb": size / 1e6,
                "cpu_s": cpu.ru_utime + cpu.ru_stime,
                "summary": summary,
            }
        )
    )


def fetch_child(source_name: str, pulses: int, urls: list[str], names: str) -> None:
    """In a fresh process: the bare streamed api/1 fetch (batches dropped); prints seconds."""
    from sf_daq_broker.buffers.api1 import Api1Client
    from sf_daq_broker.buffers.pulse_map import PulseMapClient

    url = urls[0] if source_name == "BSDATA" else urls[1]

    async def go() -> float:
        started = time.perf_counter()
        async with PulseMapClient(urls[0]) as pulse_map, Api1Client(url) as client:
            start_ns, end_ns = await pulse_map.range_ns(P0 + 1, P0 + pulses)
            decompress = source_name == "BSDATA"
            query = client.query(json.loads(names), start_ns, end_ns, decompress=decompress)
            async with query as reply:
                async for _ in reply:
                    pass
        return time.perf_counter() - started

    seconds = asyncio.run(go())
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "cpu_s": cpu.ru_utime + cpu.ru_stime}))


def in_child(*argv: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"child {argv[:2]} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        job_child(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5], sys.argv[6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--fetch":
        fetch_child(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--case", action="append", help="SOURCE:PULSES (repeatable; default: the issue's table)"
    )
    parser.add_argument("--camera-shape", default="512x512", help="HEIGHTxWIDTH (uint16)")
    parser.add_argument("--no-reference", action="store_true", help="skip the bare fetches")
    parser.add_argument(
        "--no-openmp-policy", action="store_true", help="bitshuffle's default threads in the job"
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    cases = [(s, int(n)) for s, n in (c.split(":") for c in args.case or DEFAULT_CASES)]
    if bad := [s for s, _ in cases if s not in SOURCES]:
        parser.error(f"unknown source {bad[0]!r}: one of {', '.join(SOURCES)}")
    height, width = (int(n) for n in args.camera_shape.lower().split("x"))
    spec = channel_specs((height, width))
    longest = max(n for _, n in cases)
    server = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("bench_retrieval.py")),
            "--serve",
            json.dumps(spec),
            "--pulses",
            str(longest),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    if args.no_openmp_policy:
        os.environ[NO_POLICY] = "1"
    names = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", NO_POLICY)
    env = {k: os.environ[k] for k in names if k in os.environ}
    print(f"load average {os.getloadavg()[0]:.2f} (2-core machine); environment {env or '{}'}")
    print(
        f"{'source':10} {'pulses':>7} {'peak MB':>8} {'before':>7} {'job s':>7} {'cpu s':>6} "
        f"{'fetch s':>8} {'ratio':>6} {'file MB':>8}  load"
    )
    try:
        assert server.stdout is not None
        urls = server.stdout.readline()
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_job_memory_") as out_dir:
            for source, pulses in cases:
                names = json.dumps(names_of(spec, source))
                job = in_child("--job", source, str(pulses), urls, out_dir, names)
                fetch = None
                if source != "PVCHANNELS" and not args.no_reference:
                    fetch = in_child("--fetch", source, str(pulses), urls, names)["seconds"]
                print(
                    f"{source:10} {pulses:7d} {job['peak_mb']:8.0f} {job['before_mb']:7.0f} "
                    f"{job['seconds']:7.2f} {job['cpu_s']:6.1f} "
                    + (f"{fetch:8.2f} {job['seconds'] / fetch:6.2f}" if fetch else f"{'':15}")
                    + f" {job['file_mb']:8.1f}  {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
