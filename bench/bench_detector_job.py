"""A whole detector job: Jungfrau buffer files → conversion → bitshuffle+LZ4 file, and its memory.

(b) Throughput: ``DetectorSource.retrieve`` (the worker's job without the queue) on buffer files
of realistic frames, with default options (float32) and with ``factor`` (int32), in frames/s
and GB/s of raw input (2 bytes per pixel read from the buffer). Baselines measured in the same
run on the same frames: bitshuffle+LZ4 compression alone of the converted frames on two
threads (reused buffers, bitshuffle single-threaded in each: the job's ceiling), and
``numpy.copyto`` of the raw bytes. "cpu ratio" is compression alone's CPU seconds over the
job's (median of the repeats): unlike wall time it hardly moves with the machine's load, and
it bounds the wall ratio on a machine whose cores the job has to itself.

(c) Memory: the same job for 2000 frames of an 8-module detector (16 GB of raw frames) in a
child process, whose peak resident set (``ru_maxrss``) is reported; it must not grow with the
run (compare ``--memory-frames 500``). It runs with ``factor`` by default: the pipeline's
buffers are the same size as with float32 output (int32 is 4 bytes too, and the chunk buffers
are sized by the worst case), but the file is 2.5 GB instead of ~30 GB, which this machine's
disk would take minutes to absorb (``--memory-options '{}'`` for float32).

The buffer is written once per run of this script: ``--distinct`` realistic frames per module
(``bench_conversion.realistic``) cycle through the records of the first module's files, and
the other modules' files are symbolic links to them, so 2000 frames of 8 modules need 2 GB of
disk, not 16. Reading is therefore from the page cache, as for a run retrieved right after it
was taken. Every figure is the best of ``--repeat`` runs: the machine is shared.

    .venv/bin/python bench/bench_detector_job.py [--frames 200] [--detector JF06T08V01]
    .venv/bin/python bench/bench_detector_job.py --memory-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_conversion import realistic

from sf_daq_broker import openmp
from sf_daq_broker.bookkeeping.confined import open_below
from sf_daq_broker.buffers import jungfrau_format as fmt
from sf_daq_broker.h5 import bslz4
from sf_daq_broker.jobs import Job, SourceKind, job_id_for
from sf_daq_broker.jungfrau import ConversionOptions, Converter
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.detector_source import CalibrationFiles, DetectorSource
from sf_daq_broker.workers.loop import Progress

START = 20_000_000_000  # a file boundary
PHOTON_KEV = 12.4


def write_buffer(root: Path, detector: str, n_frames: int, distinct: int) -> tuple[Path, Path]:
    """Buffer files for pulses START.. (module 0 written, the others linked) and calibration."""
    n_modules = fmt.n_modules(detector)
    calibration, frames = realistic(n_modules, distinct)
    root.mkdir(parents=True, exist_ok=True)
    gain_file, pedestal_file = root / "gains.h5", root / "pedestal.h5"
    with h5py.File(gain_file, "w") as file:
        file["gains"] = calibration.gain
    with h5py.File(pedestal_file, "w") as file:
        file["gains"] = calibration.pedestal
        file["gainsRMS"] = np.ones_like(calibration.pedestal)
        file["pixel_mask"] = calibration.pixel_mask
    record = np.zeros(1, dtype=fmt.RECORD_DTYPE)
    n_files = -(-n_frames // fmt.PULSES_PER_FILE)
    for index in range(n_files):
        first = START + index * fmt.PULSES_PER_FILE
        path = fmt.data_file(root, detector, 0, first)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.truncate(fmt.FILE_BYTES)
            for slot in range(min(fmt.PULSES_PER_FILE, n_frames - index * fmt.PULSES_PER_FILE)):
                pid = first + slot
                record["marker"] = fmt.MARKER_WRITTEN
                record["pulse_id"] = pid
                record["frame_index"] = pid - START + 1
                record["n_recv_packets"] = fmt.PACKETS_PER_FRAME
                # Every module sees module 0's part of the realistic frame: one file, linked.
                record["data"] = frames[pid % distinct, : fmt.MODULE_ROWS]
                handle.seek(fmt.record_offset(pid))
                handle.write(record.tobytes())
        for module in range(1, n_modules):
            link = fmt.data_file(root, detector, module, first)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    last = START + (n_files - 1) * fmt.PULSES_PER_FILE
    for module in range(n_modules):
        latest = fmt.latest_file(root, detector, module)
        latest.write_text(f"{fmt.data_file(root, detector, module, last)}\n")
    return gain_file, pedestal_file


def make_job(directory: Path, detector: str, n_frames: int, options: dict[str, Any]) -> Job:
    run_info = directory / "run_info" / "000000"
    run_info.mkdir(parents=True, exist_ok=True)
    return Job(
        job_id=job_id_for("p12345", 1, detector),
        request_id="bench",
        kind=SourceKind.DETECTOR,
        source=detector,
        names=(detector,),
        start_pulse_id=START,
        stop_pulse_id=START + n_frames - 1,
        requested_start=START,
        requested_stop=START + n_frames - 1,
        rate_multiplicator=1,
        pgroup="p12345",
        beamline="bernina",
        run_number=1,
        output_file=str(directory / f"run_000001.{detector}.h5"),
        log_file=str(run_info / f"run_000001.{detector}.log"),
        run_info_file=str(run_info / "run_000001.json"),
        request_time="2026-11-21 00:00:00.000000",
        options={"factor": None, "compression": True, **options},
    )


def run_job(
    root: Path,
    out_dir: Path,
    detector: str,
    n_frames: int,
    options: dict[str, Any],
    confined: bool = True,
) -> float:
    """One job, in seconds (the output file is removed afterwards).

    ``confined``: as the worker loop writes, into a file created through a confined handle on
    its directory (h5py opens ``/proc/self/fd/N``); otherwise into a file opened by name."""
    source = DetectorSource(
        root,
        {detector: CalibrationFiles(root / "gains.h5", root / "pedestal.h5")},
        ingestion_window=0.0,
    )
    job = make_job(out_dir, detector, n_frames, options)
    target = out_dir / "bench.partial"
    job_log = logging.getLogger("bench")

    async def go(path: Path) -> float:
        progress = Progress(EmbeddedTransport(), job, n_frames)
        started = time.perf_counter()
        await source.retrieve(job, path, progress, job_log)
        return time.perf_counter() - started

    if not confined:
        elapsed = asyncio.run(go(target))
        target.unlink()
        return elapsed
    with open_below(out_dir) as directory, directory.new_file(target.name) as temp:
        return asyncio.run(go(temp.path))  # the file is discarded on leaving the block


def compression_alone(
    root: Path, detector: str, options: dict[str, Any], frames: int
) -> tuple[float, float]:
    """Seconds to compress ``frames`` converted frames on two threads (no file): reused chunk
    buffers and bitshuffle single-threaded in each thread, the fastest way this machine
    compresses (the job's ceiling)."""
    n_modules = fmt.n_modules(detector)
    calibration, raw = realistic(n_modules, 16)
    conversion = ConversionOptions(**{k: v for k, v in options.items() if k == "factor"})
    converted = Converter(detector, calibration, conversion).convert(raw)
    buffers = [np.empty(bslz4.chunk_bound(converted[0]), np.uint8) for _ in converted]

    def compress(frame: np.ndarray, buffer: np.ndarray) -> None:
        with openmp.single_threaded():
            bslz4.compress_chunk_into(frame, buffer)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(compress, converted, buffers))  # warm up
        started, cpu = time.perf_counter(), time.process_time()
        done = 0
        while done < frames:
            n = min(16, frames - done)
            list(pool.map(compress, converted[:n], buffers[:n]))
            done += n
        return time.perf_counter() - started, time.process_time() - cpu


def copy_alone(detector: str, frames: int) -> float:
    n_modules = fmt.n_modules(detector)
    raw = np.ones((16, 512 * n_modules, 1024), np.uint16)
    copy = np.empty_like(raw)
    started = time.perf_counter()
    for _ in range(-(-frames // 16)):
        np.copyto(copy, raw)
    return time.perf_counter() - started


def memory_child(root: str, out_dir: str, detector: str, frames: int, options: str) -> None:
    """In the child: run one job, print the peak RSS in MB as JSON."""
    elapsed = run_job(Path(root), Path(out_dir), detector, frames, json.loads(options))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"peak_mb": peak, "seconds": elapsed}))


def measure_memory(
    root: Path, out_dir: Path, detector: str, frames: int, options: str
) -> dict[str, float]:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(root),
            str(out_dir),
            detector,
            str(frames),
            options,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        memory_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", default="JF06T08V01")
    parser.add_argument("--frames", type=int, default=200, help="frames per job (default 200)")
    parser.add_argument("--distinct", type=int, default=16, help="distinct frames cycled")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-frames", type=int, default=2000)
    parser.add_argument(
        "--memory-options", default=json.dumps({"factor": PHOTON_KEV}), help="JSON options"
    )
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (2-core machine)")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_detector_job_") as tmp:
        root, out_dir = Path(tmp) / "buffer", Path(tmp) / "out"
        out_dir.mkdir()
        n_buffer = max(args.frames, 0 if args.no_memory else args.memory_frames)
        started = time.perf_counter()
        write_buffer(root, args.detector, n_buffer, args.distinct)
        raw_frame = fmt.n_modules(args.detector) * fmt.MODULE_ROWS * fmt.MODULE_COLS * 2
        print(f"buffer of {n_buffer} frames written in {time.perf_counter() - started:.1f} s")
        if not args.memory_only:
            raw_bytes = args.frames * raw_frame
            print(
                f"{args.detector}, {args.frames} frames ({raw_bytes / 1e9:.2f} GB raw), "
                f"best of {args.repeat}"
            )
            print(
                f"{'job':<22} {'frames/s':>9} {'GB/s raw':>9} "
                f"{'compress alone':>15} {'ratio':>6} {'copyto GB/s':>12} "
                f"{'by name GB/s':>13} {'confined/by name':>17} {'same, CPU s':>13} "
                f"{'cpu ratio':>10}"
            )
            for label, options in [
                ("default (float32)", {}),
                (f"factor={PHOTON_KEV}", {"factor": PHOTON_KEV}),
            ]:
                run_job(root, out_dir, args.detector, min(args.frames, 16), options)  # warm up
                # Interleaved, best of each: the worker's confined file against one by name.
                # Alternating which goes first, so that neither always follows the other's
                # writeback.
                # CPU seconds of the whole process too: unlike wall time, hardly moved by the
                # other work on the machine.
                by_name, confined = [], []
                cpu: dict[bool, list[float]] = {False: [], True: []}
                for repeat in range(args.repeat):
                    for way in (False, True) if repeat % 2 else (True, False):
                        cpu_start = time.process_time()
                        seconds = run_job(root, out_dir, args.detector, args.frames, options, way)
                        cpu[way].append(time.process_time() - cpu_start)
                        (confined if way else by_name).append(seconds)
                job, named = min(confined), min(by_name)
                cpu_ratio = statistics.median(cpu[False]) / statistics.median(cpu[True])
                alones = [
                    compression_alone(root, args.detector, options, args.frames)
                    for _ in range(args.repeat)
                ]
                alone = min(wall for wall, _ in alones)
                cpu_alone = statistics.median(cpu for _, cpu in alones)
                copy = min(copy_alone(args.detector, args.frames) for _ in range(args.repeat))
                print(
                    f"{label:<22} {args.frames / job:9.0f} {raw_bytes / job / 1e9:9.2f} "
                    f"{raw_bytes / alone / 1e9:11.2f} GB/s {alone / job:6.2f} "
                    f"{raw_bytes / copy / 1e9:12.2f} {raw_bytes / named / 1e9:13.2f} "
                    f"{named / job:17.2f} {cpu_ratio:13.2f} "
                    f"{cpu_alone / statistics.median(cpu[True]):10.2f}"
                )
            print(f"load average {os.getloadavg()[0]:.2f}")
        if not args.no_memory:
            result = measure_memory(
                root, out_dir, args.detector, args.memory_frames, args.memory_options
            )
            print(
                f"peak memory of a {args.memory_frames}-frame {args.detector} job (options "
                f"{args.memory_options}, child process): {result['peak_mb']:.0f} MB "
                f"(job {result['seconds']:.1f} s, "
                f"{args.memory_frames * raw_frame / result['seconds'] / 1e9:.2f} GB/s raw)"
            )


if __name__ == "__main__":
    main()
