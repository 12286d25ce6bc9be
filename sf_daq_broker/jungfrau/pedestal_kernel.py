"""The numba kernels of the pedestal computation (UPSTREAM_HEAD §4), one pass each per batch.

A pedestal run is ~3 000 frames of up to 32 modules, far more than memory, so frames come in
bounded batches and the per-pixel state (running sums per gain stage, the mask) is updated in
place. Two passes per batch:

- ``count_in_gain`` counts, per frame, the pixels whose gain code is the one the detector was
  set to: the frame's acceptance depends on it, and the moving average depends on which frames
  were accepted before, so acceptance is decided (in order, in Python, per frame) between the
  passes.
- ``accumulate`` adds the accepted frames, in file order, to the sums of their stage. The
  pixels are cut into chunks run in parallel; a chunk goes through every frame of the batch
  while its sums stay in cache. Each pixel sees the frames in order, so the float64 sums are
  the reference's to the bit: ``S -= S / frames_average`` (once the stage has more frames than
  that), then ``S += adc`` and ``Q += adc * adc`` (exact: adc < 2**14).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

_JIT: dict[str, Any] = {"cache": True, "error_model": "numpy", "boundscheck": False, "nogil": True}

#: Pixels per parallel chunk: the state of a chunk (2 x 8 B sums + 8 B mask per pixel, 192 KiB)
#: stays in L2 cache across the frames of a batch.
CHUNK = 8192


@njit(parallel=True, **_JIT)
def count_in_gain(frames: Any, expected: Any, counts: Any) -> None:
    """counts[f, c] = pixels of chunk c of frame f whose gain code (top 2 bits) is expected[f]."""
    n_frames, n_pixels = frames.shape
    n_chunks = counts.shape[1]
    for task in prange(n_frames * n_chunks):
        f = task // n_chunks
        c = task % n_chunks
        row = frames[f]
        code = expected[f]
        total = 0
        for i in range(c * CHUNK, min(n_pixels, (c + 1) * CHUNK)):
            total += (row[i] >> 14) == code
        counts[f, c] = total


@njit(parallel=True, **_JIT)
def accumulate(
    frames: Any,
    expected: Any,
    slot: Any,
    decay: Any,
    bit: Any,
    sums: Any,
    squares: Any,
    mask: Any,
    frames_average: int,
) -> None:
    """Add accepted frames (in order) to their stage's sums; flag pixels not in that gain.

    Per frame f: ``expected[f]`` gain code, ``slot[f]`` index into ``sums``/``squares`` (-1: the
    frame only flags pixels, its stage is not part of the result), ``decay[f]`` whether the
    stage already holds more than ``frames_average`` frames, ``bit[f]`` the mask bit for pixels
    in another gain.
    """
    n_frames, n_pixels = frames.shape
    divisor = np.float64(frames_average)
    for c in prange((n_pixels + CHUNK - 1) // CHUNK):
        start = c * CHUNK
        stop = min(n_pixels, start + CHUNK)
        for f in range(n_frames):
            row = frames[f]
            code = expected[f]
            flag = bit[f]
            for i in range(start, stop):  # branch-free, so that it vectorises
                mask[i] |= flag * ((row[i] >> 14) != code)
            s = slot[f]
            if s < 0:
                continue
            total = sums[s]
            total2 = squares[s]
            if decay[f]:
                for i in range(start, stop):
                    total[i] -= total[i] / divisor
                    total2[i] -= total2[i] / divisor
            for i in range(start, stop):
                adc = np.float64(row[i] & 0x3FFF)
                total[i] += adc
                total2[i] += adc * adc
