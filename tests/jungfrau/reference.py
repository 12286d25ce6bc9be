"""A slow, obvious numpy implementation of JUNGFRAU.md, to check the kernel beyond the vectors.

Written from the text, step by step, with no shared code with the package (geometry tables are
passed in as plain tuples), so a mistake in the package's layout or plan shows up as a mismatch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Geometry = tuple[int, list[int], list[int], list[int]]  # det_rot90, origin_y, origin_x, mod_rot90


def reference_convert(
    raw: npt.NDArray[np.uint16],
    gain: npt.NDArray[Any],
    pedestal: npt.NDArray[Any],
    pixel_mask: npt.NDArray[Any],
    *,
    adc_to_energy: bool = True,
    mask: bool = True,
    mask_double_pixels: bool = True,
    mask_module_edges: bool = False,
    gap_pixels: bool = True,
    geometry: Geometry | None = None,
    factor: float | None = None,
    disabled_modules: tuple[int, ...] = (),
    highgain: bool = False,
) -> npt.NDArray[Any]:
    n_frames, height, _ = raw.shape
    n_modules = height // 512
    gain32 = gain.astype(np.float32)
    ped32 = pedestal.astype(np.float32)
    numerator = np.float32(1) if factor is None else np.float32(1 / factor)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = numerator / gain32
    if not highgain:
        g_table = [inv[0], inv[1], inv[2], inv[2]]
    elif gain.shape[0] == 4:
        g_table = [inv[3]] * 4
    else:
        g_table = [inv[3], inv[4], inv[5], inv[5]]
    if highgain and pedestal.shape[0] == 4:
        p_table = [ped32[3]] * 4
    else:
        p_table = [ped32[0], ped32[1], ped32[2], ped32[2]]
    g_stack, p_stack = np.stack(g_table), np.stack(p_table)

    bad = reference_bad_pixels(
        pixel_mask, mask_double_pixels=mask_double_pixels, mask_module_edges=mask_module_edges
    )

    if adc_to_energy:
        code = (raw >> 14).astype(np.intp)
        adc = (raw & 0x3FFF).astype(np.float32)
        yy, xx = np.indices(raw.shape[1:])
        with np.errstate(invalid="ignore"):
            values = (adc - p_stack[code, yy, xx]) * g_stack[code, yy, xx]
            if factor is not None:
                values = np.rint(values).astype(np.int64).astype(np.int32)
    else:
        values = raw.copy()
    if mask:
        values[:, bad] = 0

    modules = [values[:, 512 * m : 512 * m + 512] for m in range(n_modules)]
    if gap_pixels:
        gapped = []
        for module in modules:
            image = np.zeros((n_frames, 514, 1030), values.dtype)
            for cy in range(2):
                for cx in range(4):
                    image[:, cy * 258 : cy * 258 + 256, cx * 258 : cx * 258 + 256] = module[
                        :, cy * 256 : cy * 256 + 256, cx * 256 : cx * 256 + 256
                    ]
            gapped.append(image)
        modules = gapped
    msy, msx = modules[0].shape[1:]
    active = [m for m in range(n_modules) if m not in disabled_modules]
    if geometry is None:
        return np.concatenate([modules[m] for m in active], axis=1)

    det_rot, origin_y, origin_x, mod_rot = geometry

    def shift(oy: int, ox: int, r: int) -> tuple[int, int]:
        if r == 1:
            return oy - msx, ox
        if r == 2:
            return oy - msy, ox - msx
        if r == 3:
            return oy, ox - msy
        return oy, ox

    sy = sx = 0
    for oy, ox, r in zip(origin_y, origin_x, mod_rot, strict=True):
        oy, ox = shift(oy, ox, r)
        far = (oy + msy, ox + msx) if r % 2 == 0 else (oy + msx, ox + msy)
        sy, sx = max(sy, far[0]), max(sx, far[1])
    shape = (sx, sy) if det_rot % 2 else (sy, sx)
    out = np.zeros((n_frames, *shape), values.dtype)
    for m in active:
        oy, ox = origin_y[m], origin_x[m]
        if det_rot == 1:
            ox, oy = oy, sx - ox
        elif det_rot == 2:
            ox, oy = sx - ox, sy - oy
        elif det_rot == 3:
            ox, oy = sy - oy, ox
        r = (mod_rot[m] + det_rot) % 4
        oy, ox = shift(oy, ox, r)
        h, w = (msy, msx) if r % 2 == 0 else (msx, msy)
        out[:, oy : oy + h, ox : ox + w] = np.rot90(modules[m], k=r, axes=(1, 2))
    return out


def reference_places(
    shape: tuple[int, ...],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(double pixels, module-edge pixels) of stacked modules in raw coordinates (UPSTREAM_HEAD
    §3): module columns 255, 256, 511, 512, 767, 768 and rows 255, 256; the first and last row
    and column of each module."""
    y, x = np.indices(shape)
    y %= 512  # module rows: modules are stacked 512 rows apart
    double_pixel = np.isin(x, (255, 256, 511, 512, 767, 768)) | np.isin(y, (255, 256))
    return double_pixel, (y == 0) | (y == 511) | (x == 0) | (x == 1023)


def reference_bad_pixels(
    pixel_mask: npt.NDArray[Any], *, mask_double_pixels: bool, mask_module_edges: bool
) -> npt.NDArray[np.bool_]:
    """UPSTREAM_HEAD §3 as its text says, in raw coordinates (True = bad): loading an int64
    mask ORs bit 21 onto every double pixel (module columns 255, 256, 511, 512, 767, 768; rows
    255, 256) and bit 22 onto every module-edge pixel (first and last row and column of each
    module); at use bit 21 is cleared unless double pixels are masked and bit 22 unless module
    edges are; then non-zero is bad. A bool mask gets no bits: non-zero (True) is bad."""
    if pixel_mask.dtype != np.int64:
        return np.asarray(pixel_mask != 0)
    double_pixel, module_edge = reference_places(pixel_mask.shape)
    loaded = pixel_mask | np.where(double_pixel, 1 << 21, 0) | np.where(module_edge, 1 << 22, 0)
    cleared = (0 if mask_double_pixels else 1 << 21) | (0 if mask_module_edges else 1 << 22)
    return np.asarray(loaded & ~cleared != 0)


def reference_interp(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """UPSTREAM_HEAD §2's double-pixel interpolation of stacked gapped modules (N, 514*n, 1030),
    written from the text with numpy, one border at a time (a copy is returned)."""
    out = image.copy()
    n_modules = out.shape[1] // 514
    corner_rows = list(range(255, 259))
    corner_cols = [c + d for c in (255, 513, 771) for d in range(4)]

    def split(d: Any, o: Any, other: Any) -> tuple[Any, Any]:
        d, o, other = (np.asarray(v, dtype=np.float64) for v in (d, o, other))
        with np.errstate(all="ignore"):
            divisor = 6 * o + 3 * other
            kept = np.where(divisor == 0, d / 2, d * (4 * o + other) / divisor).astype(np.float32)
            gap = np.where(divisor == 0, d / 2, d - kept.astype(np.float64)).astype(np.float32)
        return kept, gap

    for m in range(n_modules):
        module = out[:, 514 * m : 514 * (m + 1)]
        rows = [y for y in range(514) if y not in corner_rows]
        cols = [x for x in range(1030) if x not in corner_cols]
        for b in (255, 513, 771):
            o1, d1, d2, o2 = (module[:, rows, b + k].copy() for k in (-1, 0, 3, 4))
            (k1, g1), (k2, g2) = split(d1, o1, d2), split(d2, o2, d1)
            module[:, rows, b], module[:, rows, b + 1] = k1, g1
            module[:, rows, b + 2], module[:, rows, b + 3] = g2, k2
        o1, d1, d2, o2 = (module[:, 255 + k][:, cols].copy() for k in (-1, 0, 3, 4))
        (k1, g1), (k2, g2) = split(d1, o1, d2), split(d2, o2, d1)
        for row, values in ((255, k1), (256, g1), (257, g2), (258, k2)):
            module[:, row, cols] = values
        for top in (255, 257):
            for left in (255, 257, 513, 515, 771, 773):
                y = top if top == 255 else top + 1
                x = left if left in (255, 513, 771) else left + 1
                quarter = (module[:, y, x].astype(np.float64) / 4).astype(np.float32)
                module[:, top : top + 2, left : left + 2] = quarter[:, None, None]
    return out


def reference_downsample(
    image: npt.NDArray[np.float32],
    good: npt.NDArray[np.bool_],
    n: int,
    m: int,
    factor: float | None = None,
) -> npt.NDArray[Any]:
    """UPSTREAM_HEAD §2's downsampling, block by block with Python loops (slow, obvious)."""
    frames, height, width = image.shape
    rows, cols = -(-height // n), -(-width // m)
    out = np.zeros((frames, rows, cols), np.float32 if factor is None else np.int32)
    for by in range(rows):
        for bx in range(cols):
            block = image[:, by * n : (by + 1) * n, bx * m : (bx + 1) * m]
            fraction = good[by * n : (by + 1) * n, bx * m : (bx + 1) * m].sum() / (n * m)
            total = np.zeros(frames, np.float32)
            for y in range(block.shape[1]):
                for x in range(block.shape[2]):
                    total = (total + block[:, y, x]).astype(np.float32)
            with np.errstate(all="ignore"):
                value = np.zeros(frames) if fraction == 0 else total.astype(np.float64) / fraction
                if factor is None:
                    out[:, by, bx] = value.astype(np.float32)
                else:
                    out[:, by, bx] = np.rint(value / factor).astype(np.int64).astype(np.int32)
    return out
