"""Kernels of the upstream options (issue 14): throughput in GB/s of raw input.

For one detector (default JF06T08V01, 8 modules) and a batch of realistic raw frames
(``bench_conversion.realistic``): the conversion with default options (the reference path),
then the same batch through the new paths, each as the detector worker runs it
(``Export.process``: conversion plus the option's own kernel):

- ``interp``: double-pixel interpolation after the conversion (numba, in output coordinates);
- ``downsample 2x2`` and ``downsample 4x4 factor``: block sums after the conversion (numba);
- ``roi x2``: two regions of interest cut from the converted image;
- ``pedestal``: one batch of a pedestal run through the pedestal kernels (gain-code count and
  moving-average accumulation, float64 state);

each next to ``numpy.copyto`` of the same raw bytes measured right after it (the memory
bandwidth of this machine at this moment). The "vs default" column is the new path's speed
relative to the default conversion measured in the same run. Best of ``--repeat`` runs: the
machine is shared.

    .venv/bin/python bench/bench_upstream_options.py [--frames 32] [--repeat 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_conversion import PHOTON_KEV, best, realistic

from sf_daq_broker.jungfrau import Calibration, ConversionOptions, Converter
from sf_daq_broker.jungfrau.export import Export
from sf_daq_broker.jungfrau.pedestal import _accept_and_add, _State
from sf_daq_broker.jungfrau.pedestal_kernel import CHUNK, count_in_gain

Row = tuple[str, float, float]


def export_action(
    detector: str, calibration: Calibration, raw: np.ndarray, options: ConversionOptions
) -> Callable[[], Any]:
    export = Export(detector, raw.shape[1:], Converter(detector, calibration, options))
    buffers = export.buffers(len(raw))
    return lambda: export.process(raw, buffers)


def pedestal_action(raw: np.ndarray) -> Callable[[], Any]:
    """One batch of G0 frames (daq_rec 0) through both pedestal kernels, as ``_stream`` does."""
    n, height, width = raw.shape
    frames = raw.reshape(n, -1)
    state = _State.empty(height * width, height // 512, 0, 1000)
    daq_rec = np.zeros((n, 1), dtype=np.int64)
    good = np.ones(n, dtype=bool)
    counts = np.empty((n, -(-frames.shape[1] // CHUNK)), dtype=np.int64)
    expected = np.zeros(n, dtype=np.int64)

    def run() -> None:
        count_in_gain(frames, expected, counts)
        _accept_and_add(state, frames, daq_rec, good, counts.sum(axis=1))

    return run


def bench(detector: str, frames: int, repeat: int) -> list[Row]:
    calibration, raw = realistic(int(detector[5:7]), frames)
    copy = np.empty_like(raw)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("default (reference)", export_action(detector, calibration, raw, ConversionOptions())),
        (
            "interp",
            export_action(detector, calibration, raw, ConversionOptions(double_pixels="interp")),
        ),
        (
            "downsample 2x2",
            export_action(detector, calibration, raw, ConversionOptions(downsample=(2, 2))),
        ),
        (
            f"downsample 4x4 factor={PHOTON_KEV}",
            export_action(
                detector,
                calibration,
                raw,
                ConversionOptions(downsample=(4, 4), factor=PHOTON_KEV),
            ),
        ),
        (
            "roi x2",
            export_action(
                detector,
                calibration,
                raw,
                ConversionOptions(roi=(("a", (0, 500, 0, 1000)), ("b", (600, 1500, 100, 900)))),
            ),
        ),
        ("pedestal", pedestal_action(raw)),
    ]
    rows = []
    for label, action in cases:
        elapsed = best(action, repeat)
        copied = best(lambda: np.copyto(copy, raw), repeat)
        rows.append((label, raw.nbytes / elapsed / 1e9, raw.nbytes / copied / 1e9))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=32, help="frames per batch (default 32)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure, best kept")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--detector", default="JF06T08V01")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    print(
        f"{args.detector}, numba threads {args.threads}, batch {args.frames} frames, "
        f"best of {args.repeat}"
    )
    print(f"{'path':<30} {'GB/s raw':>9} {'copyto GB/s':>12} {'ratio':>6} {'vs default':>11}")
    rows = bench(args.detector, args.frames, args.repeat)
    reference = rows[0][1]
    for label, speed, copy in rows:
        print(
            f"{label:<30} {speed:9.2f} {copy:12.2f} {speed / copy:6.2f} {speed / reference:11.2f}"
        )


if __name__ == "__main__":
    main()
