"""Downsampling (UPSTREAM_HEAD §2, ``downsample: [N, M]``), bit-identical to the reference.

Each N x M block of the final image (partial blocks at the bottom and right edge included)
becomes one pixel: ``s`` = the float32 sum of the block's values (masked pixels are 0), added
in row-major order; ``f`` = good pixels in the block / (N*M); the value is ``s / f`` in float64
(0 where ``f`` is 0), so a block with masked pixels is scaled up as if they had seen the
average. Stored as float32, or with ``factor`` as ``rint(value / factor)`` in int32 (the
factor comes after downsampling). The output pixel mask is "block complete and fully good".

One numba kernel: a task is one row of blocks of one frame; it walks the block row's image
rows once, contiguously, keeping one float32 sum per block, which adds each block's values in
the same order as the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit, prange

_JIT: dict[str, Any] = {"cache": True, "error_model": "numpy", "boundscheck": False, "nogil": True}

_INT32_SPAN = 2.0**31
_INT64_SPAN = 2.0**63


def downsampled_shape(shape: tuple[int, int], factors: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // factors[0]), -(-shape[1] // factors[1]))


def good_counts(good: npt.NDArray[np.bool_], factors: tuple[int, int]) -> npt.NDArray[np.int64]:
    """Good pixels per block (partial blocks count what they have)."""
    n, m = factors
    height, width = downsampled_shape(good.shape, factors)
    padded = np.zeros((height * n, width * m), dtype=np.int64)
    padded[: good.shape[0], : good.shape[1]] = good
    counts: npt.NDArray[np.int64] = padded.reshape(height, n, width, m).sum(axis=(1, 3))
    return counts


def downsampled_mask(
    good: npt.NDArray[np.bool_], factors: tuple[int, int]
) -> npt.NDArray[np.bool_]:
    """True where the block is complete (not cut by the image edge) and every pixel good."""
    n, m = factors
    counts = good_counts(good, factors)
    mask: npt.NDArray[np.bool_] = counts == n * m
    if good.shape[0] % n:
        mask[-1, :] = False
    if good.shape[1] % m:
        mask[:, -1] = False
    return mask


@njit(inline="always", **_JIT)
def _rint_int32(value: Any) -> Any:
    """``np.rint(value).astype(np.int64).astype(np.int32)`` for a float64, without UB."""
    rounded = np.rint(value)
    if -_INT32_SPAN <= rounded < _INT32_SPAN:
        return np.int32(rounded)
    if -_INT64_SPAN < rounded < _INT64_SPAN:
        return np.int32(np.int64(rounded))
    return np.int32(0)


@njit(parallel=True, **_JIT)
def downsample(image: Any, counts: Any, n: int, m: int, factor: float, out: Any) -> None:
    """image (F, H, W) float32 -> out (F, ceil(H/n), ceil(W/m)): float32, or int32 divided
    by ``factor`` (> 0; 0 = no factor, for float32 output)."""
    n_frames, height, width = image.shape
    rows_out, cols_out = out.shape[1], out.shape[2]
    block = np.float64(n * m)
    full = width // m  # blocks of the row that are not cut by the right edge
    for task in prange(n_frames * rows_out):
        f = task // rows_out
        by = task % rows_out
        sums = np.zeros(cols_out, dtype=np.float32)
        for y in range(by * n, min(height, (by + 1) * n)):
            line = image[f, y]
            # Column k of every block in turn: each block still adds its pixels in row-major
            # order, and the loop over blocks vectorises.
            for k in range(m):
                for bx in range(full):
                    sums[bx] += line[bx * m + k]
            for x in range(full * m, width):
                sums[full] += line[x]
        for bx in range(cols_out):
            fraction = counts[by, bx] / block
            value = 0.0 if fraction == 0.0 else np.float64(sums[bx]) / fraction
            if factor > 0.0:
                out[f, by, bx] = _rint_int32(value / factor)
            else:
                out[f, by, bx] = value
