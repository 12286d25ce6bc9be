"""Jungfrau conversion kernel and detector file writer: throughput in GB/s of raw input.

Kernel: ``Converter.convert`` on batches of realistic raw frames (pedestal + noise, mostly
G0, a few percent G1/G2, photon hits), for 4- and 8-module detectors with default options, with
``factor``, with ``geometry``; each next to ``numpy.copyto`` of the same raw bytes measured in
the same run (the memory-bandwidth yardstick of this machine at this moment).
Writer: ``DetectorFileWriter`` compressing (bitshuffle+LZ4, on threads) and writing converted
float32 and int32 (``factor``) frames; then conversion and writing together, as the ``convert``
command and the detector worker run them. Every figure is the best of ``--repeat`` runs: the
machine is shared, and the best run is the least disturbed one.

    .venv/bin/python bench/bench_conversion.py [--frames 32] [--repeat 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np

from sf_daq_broker.h5.detector import DetectorFileWriter, FrameColumns
from sf_daq_broker.jungfrau import Calibration, ConversionOptions, Converter

PHOTON_KEV = 12.4
HIT_FRACTION = 0.005  # pixels with photons per frame


def realistic(n_modules: int, n_frames: int, seed: int = 0) -> tuple[Calibration, np.ndarray]:
    """Calibration and raw frames that look like a run.

    Most pixels: G0, pedestal plus noise. HIT_FRACTION of them see 12.4 keV photons (G0);
    2 % are bright enough for G1 (100-1000 keV) and 0.5 % for G2 (1-10 MeV), with ADC values
    consistent with the calibration, so converted values and compression ratios are plausible.
    """
    rng = np.random.default_rng(seed)
    shape = (512 * n_modules, 1024)
    gain = np.stack(
        [
            rng.normal(40, 2, shape),
            rng.normal(-1.5, 0.1, shape),
            rng.normal(-0.12, 0.01, shape),
            rng.normal(100, 5, shape),
        ]
    )
    pedestal = np.stack(
        [rng.normal(3000, 200, shape), rng.normal(14000, 300, shape), rng.normal(14500, 300, shape)]
    )
    mask = (rng.random(shape) < 0.002).astype(np.int64)
    calibration = Calibration.from_arrays(gain, pedestal, mask)
    frames = np.empty((n_frames, *shape), np.uint16)
    for index in range(n_frames):
        choice = rng.random(shape)
        code = np.where(choice < 0.005, 3, np.where(choice < 0.025, 1, 0)).astype(np.intp)
        energy = np.zeros(shape, np.float32)
        hits = (choice >= 0.025) & (choice < 0.025 + HIT_FRACTION)
        energy[hits] = PHOTON_KEV * rng.poisson(1.0, int(hits.sum())).clip(1)
        energy[code == 1] = rng.uniform(100, 1000, int((code == 1).sum()))
        energy[code == 3] = rng.uniform(1000, 10000, int((code == 3).sum()))
        plane = np.minimum(code, 2)
        p = np.take_along_axis(pedestal, plane[None], 0)[0]
        g = np.take_along_axis(gain, plane[None], 0)[0]
        adc = p + energy * g + rng.normal(0, 8, shape)
        frames[index] = (code.astype(np.uint16) << 14) | np.clip(adc, 0, 0x3FFF).astype(np.uint16)
    return calibration, frames


def best(action: Callable[[], Any], repeat: int) -> float:
    action()  # warm up (numba cache load, page faults)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_kernel(detector: str, frames: int, repeat: int) -> list[tuple[str, float, float]]:
    n_modules = int(detector[5:7])
    calibration, raw = realistic(n_modules, frames)
    copy = np.empty_like(raw)
    rows = []
    for label, options in [
        ("default", ConversionOptions()),
        (f"factor={PHOTON_KEV}", ConversionOptions(factor=PHOTON_KEV)),
        ("geometry", ConversionOptions(geometry=True)),
    ]:
        converter = Converter(detector, calibration, options)
        out = converter.empty_output(frames)
        # interleaved, so both see the same machine state
        kernel = best(lambda c=converter, o=out: c.convert(raw, o), repeat)
        copied = best(lambda: np.copyto(copy, raw), repeat)
        rows.append((label, raw.nbytes / kernel / 1e9, raw.nbytes / copied / 1e9))
    return rows


def bench_writer(
    detector: str, frames: int, repeat: int, directory: Path
) -> list[tuple[str, float, float, float]]:
    n_modules = int(detector[5:7])
    calibration, raw = realistic(n_modules, frames)
    columns = FrameColumns.from_arrays(
        pulse_id=np.arange(frames),
        frame_index=np.arange(frames),
        daq_rec=np.zeros(frames),
        is_good_frame=np.ones(frames),
        requested_pulse_id=np.arange(frames),
    )
    rows = []
    for label, options in [
        ("float32", ConversionOptions()),
        (f"int32 factor={PHOTON_KEV}", ConversionOptions(factor=PHOTON_KEV)),
    ]:
        converter = Converter(detector, calibration, options)
        out = converter.convert(raw)
        path = directory / "bench_writer.h5"

        def write(c: Converter = converter, o: np.ndarray = out, p: Path = path) -> None:
            with DetectorFileWriter(p, detector, frames, c.frame_shape, c.dtype) as writer:
                writer.write(o, columns)

        elapsed = best(write, repeat)
        ratio = out.nbytes / path.stat().st_size

        def pipeline(c: Converter = converter, o: np.ndarray = out, p: Path = path) -> None:
            with DetectorFileWriter(p, detector, frames, c.frame_shape, c.dtype) as writer:
                writer.write(c.convert(raw, o), columns)

        end_to_end = best(pipeline, repeat)
        path.unlink()
        rows.append((label, frames / elapsed, raw.nbytes / elapsed / 1e9, ratio))
        rows.append(
            (label + " convert+write", frames / end_to_end, raw.nbytes / end_to_end / 1e9, ratio)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=32, help="frames per batch (default 32)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure, best kept")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument(
        "--detectors", nargs="+", default=["JF06T04V01", "JF06T08V01", "JF15T08V01"]
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    print(f"numba threads {args.threads}, batch {args.frames} frames, best of {args.repeat}")
    print(f"{'kernel':<34} {'GB/s raw':>9} {'copyto GB/s':>12} {'ratio':>6}")
    for detector in args.detectors:
        for label, speed, copy in bench_kernel(detector, args.frames, args.repeat):
            print(f"{detector + ' ' + label:<34} {speed:9.2f} {copy:12.2f} {speed / copy:6.2f}")
    print(
        f"{'writer (bitshuffle+LZ4, 2 threads)':<34} {'frames/s':>9} {'GB/s raw':>12} {'compr.':>6}"
    )
    for detector in args.detectors[:1]:
        for label, rate, speed, ratio in bench_writer(
            detector, args.frames, max(2, args.repeat // 2), args.dir
        ):
            print(f"{detector + ' ' + label:<34} {rate:9.0f} {speed:12.2f} {ratio:6.1f}")


if __name__ == "__main__":
    main()
