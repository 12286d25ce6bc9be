"""The 8 x 8 vector transpose and the quarter-turn tiles built on it, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from sf_daq_broker.jungfrau.geometry import default_geometry_table
from sf_daq_broker.jungfrau.layout import build_layout
from sf_daq_broker.jungfrau.plan import COUNT, PAD, SRC, build_plan
from sf_daq_broker.jungfrau.transpose import transpose8


@njit(cache=False)
def _call(src, first, row_step, dst, at, dst_step):  # type: ignore[no-untyped-def]
    # numba's intrinsic: mypy sees the typing function, whose first argument numba supplies
    transpose8(src, first, row_step, dst, at, dst_step)  # type: ignore[call-arg]


@pytest.mark.parametrize(("row_step", "dst_step"), [(1024, 40), (-1024, 40), (1024, -40), (-9, -8)])
def test_transpose8_moves_every_value_once(row_step: int, dst_step: int) -> None:
    rng = np.random.default_rng(3)
    src = rng.integers(0, 2**16, 20_000, dtype=np.uint16)
    dst = np.zeros(1_000, dtype=np.uint16)
    first = 5 if row_step > 0 else 5 - 7 * row_step
    at = 3 if dst_step > 0 else 3 - 7 * dst_step
    _call(src, first, row_step, dst, at, dst_step)
    rows = np.array([src[first + i * row_step : first + i * row_step + 8] for i in range(8)])
    written = np.array([dst[at + j * dst_step : at + j * dst_step + 8] for j in range(8)])
    assert np.array_equal(written, rows.T)
    assert np.count_nonzero(dst) == np.count_nonzero(rows)  # nothing written elsewhere


def test_a_quarter_turn_is_planned_as_tiles_of_the_vector_transpose() -> None:
    geometry = default_geometry_table().lookup("JF06T04")
    assert geometry is not None and geometry.det_rot90 == 1
    layout = build_layout(4, [0, 1, 2, 3], gap_pixels=True, geometry=geometry)
    plan = build_plan(layout.source)
    tiles = plan.records[plan.records[:, COUNT] > 1]
    assert len(tiles) == 4 * 16 * 2  # 4 modules x 16 blocks of 64 raw columns x 2 chip rows
    assert (tiles[:, COUNT] % 8 == 0).all()
    # Most tile rows are followed by a chip gap or the space between modules, which the tile's
    # task writes: of the ~8000 empty runs, fewer than 1000 are left to band tasks.
    assert (tiles[:, PAD] > 0).mean() > 0.8
    assert (plan.records[:, SRC] < 0).sum() < 1000
