"""OpenMP threads and the api/1 decoding of compressed values: why bitshuffle runs single-threaded.

    .venv/bin/python bench/bench_openmp.py
    .venv/bin/python bench/bench_openmp.py --values 60000 --elements 512 --repeat 5

Decodes ``--values`` compressed uint16 waveforms of ``--elements`` (a 60 000-pulse run of the
benchmarks' compressed waveform by default) four ways, each alone and again while another
thread keeps a core busy (the other pipeline stage: ``numpy.copyto`` of 64 MiB in a loop,
which releases the GIL as HDF5 writing does):

- ``wrapper``: ``bitshuffle.decompress_lz4`` per value, the decoder before streaming;
- ``bulk``: ``api1_bulk.decompress_values``, one numba pass calling bitshuffle's C function;

each with bitshuffle's OpenMP runtime at its default (one thread per core) and single-threaded
(``sf_daq_broker.openmp.single_threaded``, the workers' policy). Prints µs per value (wall) and
CPU seconds per wall second (how many cores the decoding kept busy), best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import bitshuffle
import numpy as np

from sf_daq_broker import openmp
from sf_daq_broker.buffers import api1_bulk
from sf_daq_broker.buffers.api1_format import BLOCK_SIZE_BYTES, compress_value


def waveforms(count: int, elements: int) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.integers(0, 3, (count, elements)), axis=1).astype(">u2")
    blobs = [compress_value(value) for value in values]
    buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return blobs, buffer, starts, ends


@contextlib.contextmanager
def busy_core() -> Iterator[Callable[[], float]]:
    """Another stage working on the other core meanwhile; yields its CPU seconds so far."""
    stop = threading.Event()
    source = np.ones(16 << 20, dtype=np.uint8)
    target = np.empty_like(source)
    used = [0.0]

    def work() -> None:
        while not stop.is_set():
            np.copyto(target, source)
            used[0] = time.thread_time()

    thread = threading.Thread(target=work)
    thread.start()
    try:
        yield lambda: used[0]
    finally:
        stop.set()
        thread.join()


def timed(
    run: Callable[[], object], repeat: int, other: Callable[[], float] = lambda: 0.0
) -> tuple[float, float]:
    """Best wall seconds, and the CPU seconds the decoding used per wall second (the
    process's, less ``other``'s: how many cores the decoding kept busy)."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        cpu, other_cpu, wall = time.process_time(), other(), time.perf_counter()
        run()
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu - (other() - other_cpu)
        best = min(best, (wall, cpu / wall))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=60_000)
    parser.add_argument("--elements", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    blobs, buffer, starts, ends = waveforms(args.values, args.elements)
    dtype, shape = np.dtype(">u2"), (args.elements,)
    block = BLOCK_SIZE_BYTES // 2

    def wrapper() -> None:
        for blob in blobs:
            stream = np.frombuffer(blob, dtype=np.uint8, offset=12)
            bitshuffle.decompress_lz4(stream, shape, dtype, block)

    def bulk() -> None:
        api1_bulk.decompress_values(buffer, starts, ends, dtype, shape, "W", "uint16")

    def bulk_default_threads() -> None:
        with contextlib.ExitStack():
            original = openmp.single_threaded
            openmp.single_threaded = contextlib.nullcontext  # type: ignore[assignment]
            try:
                bulk()
            finally:
                openmp.single_threaded = original

    def single(run: Callable[[], None]) -> Callable[[], None]:
        def limited() -> None:
            with openmp.single_threaded():
                run()

        return limited

    bulk()  # compile or load the kernel
    cases = [
        ("wrapper, default threads", wrapper),
        ("wrapper, single-threaded", single(wrapper)),
        ("bulk, default threads", bulk_default_threads),
        ("bulk, single-threaded (policy)", bulk),
    ]
    print(
        f"{args.values} compressed uint16 x {args.elements} waveforms, "
        f"{buffer.size / 1e6:.1f} MB; load average {os.getloadavg()[0]:.2f}, "
        f"{os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"{'':32} {'alone µs/value':>15} {'cores':>6} {'busy core µs/value':>19} {'cores':>6}")
    for label, run in cases:
        alone, alone_cores = timed(run, args.repeat)
        with busy_core() as other:
            busy, busy_cores = timed(run, args.repeat, other)
        print(
            f"{label:32} {alone / args.values * 1e6:15.2f} {alone_cores:6.2f} "
            f"{busy / args.values * 1e6:19.2f} {busy_cores:6.2f}"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
