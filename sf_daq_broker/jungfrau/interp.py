"""Double-pixel interpolation (UPSTREAM_HEAD §2, ``double_pixels_action: "interp"``).

The pixels at chip borders are twice as large as the others, and the two gap pixels between
them have no sensor of their own: the reference spreads each double pixel's value over itself
and its neighbouring gap pixel, weighted by the ordinary pixels beside them, and splits each
chip-corner pixel (four times as large) evenly over its 2 x 2 block. Per module, in its
514 x 1030 gapped frame, before placement; with values ``o1 d1 | gap gap | d2 o2`` across a
border:

    d1' = d1 * (4*o1 + d2) / (6*o1 + 3*d2)     gap1 = d1 - d1'
    d2' = d2 * (4*o2 + d1) / (6*o2 + 3*d1)     gap2 = d2 - d2'

in float64 from the float32 values, each result stored as float32 (gap1 from the stored d1');
a zero divisor splits the value in halves. Masked pixels take part as the zeros they are.

The groups are found once per converter, as flat output indices (``layout.module_positions``),
so the kernel works on the placed image whatever the geometry: every double pixel belongs to
exactly one group and ordinary pixels are only read, so groups are independent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit, prange

from sf_daq_broker.jungfrau.layout import GAP, Placement, module_positions

_JIT: dict[str, Any] = {"cache": True, "error_model": "numpy", "boundscheck": False, "nogil": True}

#: First double pixel of each chip border in the gapped module frame: columns 255 | 258,
#: 513 | 516, 771 | 774, row 255 | 258.
BORDER_COLUMNS = (255, 513, 771)
BORDER_ROW = 255
#: Pairs per parallel task.
CHUNK = 1024

Groups = npt.NDArray[np.int64]


def interpolation_groups(
    shape: tuple[int, int], placements: list[Placement]
) -> tuple[Groups, Groups]:
    """(pairs, corners): pairs (K, 6) = o1, d1, gap1, gap2, d2, o2; corners (C, 5) = the
    corner pixel and the four pixels of its block; flat indices into an output frame."""
    pairs: list[npt.NDArray[np.int64]] = []
    corners: list[npt.NDArray[np.int64]] = []
    corner_rows = np.arange(BORDER_ROW, BORDER_ROW + 2 * GAP)
    corner_columns = np.concatenate([np.arange(c, c + 2 * GAP) for c in BORDER_COLUMNS])
    for place in placements:
        where = module_positions(shape, place)
        height, width = where.shape
        rows = np.setdiff1d(np.arange(height), corner_rows)
        columns = np.setdiff1d(np.arange(width), corner_columns)
        for border in BORDER_COLUMNS:
            pairs.append(where[rows][:, border - 1 : border + 5])
        pairs.append(where[BORDER_ROW - 1 : BORDER_ROW + 5, columns].T)
        for top in (BORDER_ROW, BORDER_ROW + GAP):
            for left in (c + d for c in BORDER_COLUMNS for d in (0, GAP)):
                block = where[top : top + 2, left : left + 2].ravel()
                # the block's one real pixel: the one next to the chip it belongs to
                corner = where[
                    BORDER_ROW if top == BORDER_ROW else top + 1,
                    left if left in BORDER_COLUMNS else left + 1,
                ]
                corners.append(np.concatenate([[corner], block]))
    return (
        np.ascontiguousarray(np.concatenate(pairs), dtype=np.int64),
        np.asarray(corners, dtype=np.int64).reshape(-1, 5),
    )


@njit(inline="always", **_JIT)
def _split(d: Any, o: Any, other: Any) -> tuple[Any, Any]:
    """(d', gap) for double pixel ``d`` next to ordinary pixel ``o``, ``other`` across."""
    divisor = 6.0 * o + 3.0 * other
    if divisor == 0.0:
        half = np.float32(d / 2.0)
        return half, half
    kept = np.float32(d * (4.0 * o + other) / divisor)
    return kept, np.float32(d - np.float64(kept))


@njit(parallel=True, **_JIT)
def interpolate(out: Any, pairs: Any, corners: Any) -> None:
    """Apply the interpolation in place to ``out`` (N, output pixels) float32."""
    n_frames = out.shape[0]
    n_chunks = (pairs.shape[0] + CHUNK - 1) // CHUNK
    for task in prange(n_frames * n_chunks):
        row = out[task // n_chunks]
        first = (task % n_chunks) * CHUNK
        for k in range(first, min(pairs.shape[0], first + CHUNK)):
            group = pairs[k]
            o1 = np.float64(row[group[0]])
            d1 = np.float64(row[group[1]])
            d2 = np.float64(row[group[4]])
            o2 = np.float64(row[group[5]])
            kept1, gap1 = _split(d1, o1, d2)
            kept2, gap2 = _split(d2, o2, d1)
            row[group[1]] = kept1
            row[group[2]] = gap1
            row[group[3]] = gap2
            row[group[4]] = kept2
    for f in prange(n_frames):
        row = out[f]
        for k in range(corners.shape[0]):
            quarter = np.float32(np.float64(row[corners[k, 0]]) / 4.0)
            for j in range(1, 5):
                row[corners[k, j]] = quarter
