"""The per-pixel constants of the formula (JUNGFRAU.md §3 and §4), prepared once per detector.

The conversion is ``out = (float32(adc) - P[g]) * G[g]`` with ``G`` the *stored reciprocal* of
the gain: multiplying by it, rather than dividing by the gain, is what the reference does and
the two differ in the last bit for many pixels. Gain codes 2 and 3 share the G2 constants, so at
most three planes are kept per table; a single plane means every code uses it (high-gain mode
with a 4-slice gain or pedestal). The kernel picks the plane as ``min(code, planes - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sf_daq_broker.jungfrau.calibration import Calibration
from sf_daq_broker.jungfrau.detectors import MODULE_COLUMNS, MODULE_ROWS

#: Module-local columns and rows of the double-size pixels at chip borders (JUNGFRAU.md §4).
DOUBLE_PIXEL_COLUMNS = (255, 256, 511, 512, 767, 768)
DOUBLE_PIXEL_ROWS = (255, 256)
#: The first and last row and column of every module (raw coordinates).
EDGE_COLUMNS = (0, MODULE_COLUMNS - 1)
EDGE_ROWS = (0, MODULE_ROWS - 1)
#: The reference's reserved pixel-mask bits (UPSTREAM_HEAD §3) and its gap-pixel reason.
GAP_PIXEL_BIT = np.int64(1 << 20)
DOUBLE_PIXEL_BIT = np.int64(1 << 21)
MODULE_EDGE_BIT = np.int64(1 << 22)

Planes = npt.NDArray[np.float32]


@dataclass(frozen=True)
class GainTables:
    pedestal: Planes  # (1 | 3, H, W): P for codes 0, 1, 2|3 (one plane: every code)
    inverse_gain: Planes  # (1 | 3, H, W): G likewise


def gain_tables(calibration: Calibration, *, highgain: bool, factor: float | None) -> GainTables:
    """P and G planes for normal or high-gain mode, with the optional ``factor`` folded into G."""
    gain, pedestal = calibration.gain, calibration.pedestal
    if not highgain:
        gain_planes, pedestal_planes = gain[0:3], pedestal[0:3]
    else:
        # 4-slice gain: HG0 for every code; 6-slice: HG0, HG1, HG2 like G0, G1, G2.
        gain_planes = gain[3:4] if gain.shape[0] == 4 else gain[3:6]
        # 4-slice pedestal: HG0 for every code; 3-slice: as in normal mode.
        pedestal_planes = pedestal[3:4] if pedestal.shape[0] == 4 else pedestal[0:3]
    # 1/factor in float64, rounded to float32, then a float32 division by the float32 gain.
    numerator = np.float32(1.0) if factor is None else np.float32(1.0 / factor)
    with np.errstate(divide="ignore", invalid="ignore"):  # gain 0 -> inf, NaN stays NaN
        inverse = np.divide(numerator, gain_planes, dtype=np.float32)
    return GainTables(
        pedestal=np.ascontiguousarray(pedestal_planes, dtype=np.float32), inverse_gain=inverse
    )


def reserved_reasons(pixel_mask: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """The pedestal mask with the reference's reserved bits (UPSTREAM_HEAD §3): bit 21 on
    every double pixel, bit 22 on every module-edge pixel; an int64 mask only (a bool mask
    gets no bits, as in the reference). A new array: the input is never modified."""
    reasons = pixel_mask.astype(np.int64)
    if pixel_mask.dtype == np.int64:
        modules = reasons.reshape(-1, MODULE_ROWS, MODULE_COLUMNS)
        modules[:, :, DOUBLE_PIXEL_COLUMNS] |= DOUBLE_PIXEL_BIT
        modules[:, DOUBLE_PIXEL_ROWS, :] |= DOUBLE_PIXEL_BIT
        modules[:, :, EDGE_COLUMNS] |= MODULE_EDGE_BIT
        modules[:, EDGE_ROWS, :] |= MODULE_EDGE_BIT
    return reasons


def bad_pixels(
    pixel_mask: npt.NDArray[Any], *, double_pixels: str = "mask", module_edge_pixels: str = "keep"
) -> npt.NDArray[np.bool_]:
    """Pixels to leave at 0 (True = bad), in raw coordinates; the input is never modified.

    The reserved bits count only when their option masks: bit 21 with double_pixels "mask",
    bit 22 with module_edge_pixels "mask". So a stored value made only of those bits is a
    good pixel otherwise, and with a bool mask both options have no effect (as upstream).
    """
    ignored = np.int64(0)
    if double_pixels != "mask":
        ignored |= DOUBLE_PIXEL_BIT
    if module_edge_pixels != "mask":
        ignored |= MODULE_EDGE_BIT
    reasons = reserved_reasons(pixel_mask)
    bad: npt.NDArray[np.bool_] = (reasons & ~ignored) != 0
    return bad
