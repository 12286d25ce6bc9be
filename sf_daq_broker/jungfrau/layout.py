"""Where each raw pixel lands in the output frame: gap pixels, geometry, disabled modules.

The result is one index image, ``source``: for every output pixel the flat index of the raw
pixel it shows (within one raw frame), or -1 for gap pixels and empty space. It is built once per
detector with plain numpy that follows JUNGFRAU.md §5-§7 line by line (``np.rot90`` included), so
it is easy to check; the fast kernel only ever follows this map (see ``plan.py``), and the
calibration tables and the output pixel mask are laid out through the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sf_daq_broker.jungfrau.detectors import MODULE_COLUMNS, MODULE_ROWS
from sf_daq_broker.jungfrau.errors import DetectorError
from sf_daq_broker.jungfrau.geometry import DetectorGeometry

CHIP = 256
GAP = 2
GAPPED_MODULE = (MODULE_ROWS + GAP, MODULE_COLUMNS + 3 * GAP)  # 514 x 1030

IndexImage = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, int]
    source: IndexImage  # (SY, SX): raw flat index per output pixel, -1 = gap / empty


def module_image(module: int, gap_pixels: bool) -> IndexImage:
    """Raw flat indices of one module as it appears before placement (with its chip gaps)."""
    rows = np.arange(MODULE_ROWS, dtype=np.int64)[:, None]
    cols = np.arange(MODULE_COLUMNS, dtype=np.int64)[None, :]
    index = (module * MODULE_ROWS + rows) * MODULE_COLUMNS + cols
    if not gap_pixels:
        return index
    image = np.full(GAPPED_MODULE, -1, dtype=np.int64)
    # module-local (y, x) -> (y + 2*(y // 256), x + 2*(x // 256))
    target_y = (rows + GAP * (rows // CHIP)).ravel()
    target_x = (cols + GAP * (cols // CHIP)).ravel()
    image[np.ix_(target_y, target_x)] = index
    return image


@dataclass(frozen=True)
class Placement:
    """Where one module goes: its (rotated) region of the output and its quarter turns."""

    module: int
    oy: int
    ox: int
    height: int
    width: int
    turns: int  # counter-clockwise quarter turns of the module image (np.rot90's k)


def plan_placements(
    n_modules: int,
    active: list[int],
    *,
    gap_pixels: bool,
    geometry: DetectorGeometry | None,
) -> tuple[tuple[int, int], list[Placement]]:
    """Output shape and each active module's placement (JUNGFRAU.md §6), without pixels.

    Cheap (no image is built), so the request validation can check regions of interest
    against the output shape before anything is converted.
    """
    msy, msx = GAPPED_MODULE if gap_pixels else (MODULE_ROWS, MODULE_COLUMNS)
    if geometry is None:
        stacked = [Placement(m, i * msy, 0, msy, msx, 0) for i, m in enumerate(active)]
        return (len(active) * msy, msx), stacked
    if len(geometry.origin_y) != n_modules:
        raise DetectorError(
            f"the geometry has {len(geometry.origin_y)} modules, the detector {n_modules}"
        )
    sy, sx = _output_size(geometry, msy, msx)
    d = geometry.det_rot90
    shape = (sx, sy) if d % 2 else (sy, sx)
    placements = []
    for module in active:
        oy, ox = geometry.origin_y[module], geometry.origin_x[module]
        if d == 1:
            ox, oy = oy, sx - ox
        elif d == 2:
            ox, oy = sx - ox, sy - oy
        elif d == 3:
            ox, oy = sy - oy, ox
        r = (geometry.mod_rot90[module] + d) % 4
        oy, ox = _shift(oy, ox, r, msy, msx)
        h, w = (msy, msx) if r % 2 == 0 else (msx, msy)
        if oy < 0 or ox < 0 or oy + h > shape[0] or ox + w > shape[1]:
            raise DetectorError(f"the geometry places module {module} outside the image")
        placements.append(Placement(module, oy, ox, h, w, r))
    return shape, placements


def build_layout(
    n_modules: int,
    active: list[int],
    *,
    gap_pixels: bool,
    geometry: DetectorGeometry | None,
) -> Layout:
    """The output placement; ``geometry`` None stacks the active modules along y."""
    shape, placements = plan_placements(n_modules, active, gap_pixels=gap_pixels, geometry=geometry)
    source = np.full(shape, -1, dtype=np.int64)
    for place in placements:
        region = source[place.oy : place.oy + place.height, place.ox : place.ox + place.width]
        if (region >= 0).any():
            raise DetectorError(f"the geometry places module {place.module} over another module")
        region[...] = np.rot90(module_image(place.module, gap_pixels), k=place.turns)
    return Layout(shape=shape, source=source)


def module_positions(shape: tuple[int, int], place: Placement) -> IndexImage:
    """Flat output index of every pixel of the module as it was before placement (in its own
    gapped 514 x 1030, or 512 x 1024, frame): what module-level processing needs to find
    its pixels in the placed image."""
    rows = np.arange(place.oy, place.oy + place.height, dtype=np.int64)[:, None]
    cols = np.arange(place.ox, place.ox + place.width, dtype=np.int64)[None, :]
    region = rows * shape[1] + cols
    return np.ascontiguousarray(np.rot90(region, k=-place.turns))


def _shift(oy: int, ox: int, r: int, msy: int, msx: int) -> tuple[int, int]:
    """Move a module's origin by its rotation r (JUNGFRAU.md §6, step 2)."""
    if r == 1:
        oy -= msx
    elif r == 2:
        oy -= msy
        ox -= msx
    elif r == 3:
        ox -= msy
    return oy, ox


def _output_size(geometry: DetectorGeometry, msy: int, msx: int) -> tuple[int, int]:
    """(SY, SX) before the detector rotation: the far corner of every module of the table."""
    sy = sx = 0
    for oy, ox, r in zip(geometry.origin_y, geometry.origin_x, geometry.mod_rot90, strict=True):
        oy, ox = _shift(oy, ox, r, msy, msx)
        far_y, far_x = (oy + msy, ox + msx) if r % 2 == 0 else (oy + msx, ox + msy)
        sy, sx = max(sy, far_y), max(sx, far_x)
    return sy, sx
