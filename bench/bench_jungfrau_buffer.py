"""Jungfrau buffer: simulated writer and JungfrauBufferReader, frames/s.

    .venv/bin/python bench/bench_jungfrau_buffer.py                       # disk, under /tmp
    .venv/bin/python bench/bench_jungfrau_buffer.py --root /dev/shm/jfbench  # tmpfs
    .venv/bin/python bench/bench_jungfrau_buffer.py --realtime 20         # 100 Hz wall clock

Detectors JF13T01V01 + JF07T03V01 (4 modules, the simulate default). A "module frame" is one
1 MB record. Phases:

1. frame generation alone (``frame_into`` into a reused buffer);
2. eager writing as fast as possible (backfill of ``--pulses`` pulses): module frames/s and
   the CPU it cost (user/sys seconds per second);
3. reading everything back in batches of ``--batch`` pulses into one reused output array,
   twice: "first" right after writing (page cache, but fresh mappings and a fresh output
   array), "again" a second pass;
4. with ``--realtime S``: an eager writer following a 100 Hz wall clock for S seconds — does
   it keep up (pulses behind at the end)?

Everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sf_daq_broker.buffers.jungfrau_buffer import JungfrauBufferReader
from sf_daq_broker.simulation.clock import ManualClock, WallClock
from sf_daq_broker.simulation.jungfrau_frames import frame_into
from sf_daq_broker.simulation.jungfrau_writer import JungfrauBufferWriter

DETECTORS = ["JF13T01V01", "JF07T03V01"]
MODULES = 4
P0 = 15_000_000_000


def cpu() -> tuple[float, float]:
    times = os.times()
    return times.user, times.system


def generation(frames: int) -> None:
    out = np.empty((512, 1024), dtype=np.uint16)
    frame_into(out, DETECTORS[0], 0, P0)  # warm the per-module caches
    begin = time.perf_counter()
    for i in range(frames):
        frame_into(out, DETECTORS[0], 0, P0 + i)
    seconds = time.perf_counter() - begin
    print(
        f"generation   {frames / seconds:8.0f} module frames/s "
        f"({seconds / frames * 1e3:.2f} ms each)"
    )


def write(root: Path, pulses: int) -> None:
    clock = ManualClock(P0, 0)
    writer = JungfrauBufferWriter(root, DETECTORS, clock, retention_pulses=10**9)
    writer.catch_up()  # first pulse: computes calibration and noise caches
    clock.advance_to(P0 + pulses)
    user, system = cpu()
    begin = time.perf_counter()
    writer.catch_up()
    seconds = time.perf_counter() - begin
    user2, system2 = cpu()
    writer.close()
    frames = pulses * MODULES
    print(
        f"write        {frames / seconds:8.0f} module frames/s, "
        f"{frames * 1.048617 / seconds:6.0f} MB/s "
        f"({frames} frames in {seconds:.1f} s; cpu user {(user2 - user) / seconds:.2f} "
        f"sys {(system2 - system) / seconds:.2f} per s)"
    )


def read(root: Path, pulses: int, batch: int) -> None:
    for detector in DETECTORS:
        reader = JungfrauBufferReader(root, detector)
        out = np.empty((batch, reader.n_modules * 512, 1024), dtype=np.uint16)
        for label in ("first", "again"):
            begin = time.perf_counter()
            good = 0
            for first in range(P0 + 1, P0 + pulses + 1, batch):
                pids = np.arange(first, min(first + batch, P0 + pulses + 1))
                frames = reader.read(pids, out=out, missing="zeros")
                good += int(frames.is_good_frame().sum())
            seconds = time.perf_counter() - begin
            frames_read = pulses * reader.n_modules
            print(
                f"read {detector} ({label}) {pulses / seconds:6.0f} detector frames/s = "
                f"{frames_read / seconds:6.0f} module frames/s, "
                f"{frames_read * 1.048576 / seconds:6.0f} MB/s ({good}/{pulses} good)"
            )


async def realtime(root: Path, seconds: float) -> None:
    clock = WallClock(P0)
    writer = JungfrauBufferWriter(root, DETECTORS, clock, retention_pulses=3000)
    user, system = cpu()
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(seconds)
    behind = clock.current_pulse_id() - writer.next_pulse_id + 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    user2, system2 = cpu()
    print(
        f"realtime     100 Hz x {MODULES} modules for {seconds:.0f} s: {writer.frames_written} "
        f"module frames written, {behind} pulses behind at the end; cpu user "
        f"{(user2 - user) / seconds:.2f} sys {(system2 - system) / seconds:.2f} per s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, help="buffer root (default: a new dir in /tmp)")
    parser.add_argument("--pulses", type=int, default=500, help="pulses to write (x4 modules)")
    parser.add_argument("--batch", type=int, default=100, help="pulses per read batch")
    parser.add_argument("--realtime", type=float, default=0.0, metavar="S")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="jfbench-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"buffer root {root}")
    try:
        generation(500)
        write(root / "backfill", args.pulses)
        read(root / "backfill", args.pulses, args.batch)
        shutil.rmtree(root / "backfill")
        if args.realtime:
            asyncio.run(realtime(root / "realtime", args.realtime))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
