"""Fixtures of the Jungfrau tests (helpers are in support.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import numpy.typing as npt
import pytest


@pytest.fixture
def write_calibration(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Write gain and pedestal files; returns (gain file, pedestal file)."""

    def write(
        gain: npt.ArrayLike,
        pedestal: npt.ArrayLike,
        mask: npt.ArrayLike,
        name: str = "cal",
    ) -> tuple[Path, Path]:
        gain_file = tmp_path / f"{name}.gain.h5"
        pedestal_file = tmp_path / f"{name}.pedestal.h5"
        with h5py.File(gain_file, "w") as file:
            file["gains"] = gain
        with h5py.File(pedestal_file, "w") as file:
            file["gains"] = pedestal
            file["gainsRMS"] = np.ones_like(np.asarray(pedestal))
            file["pixel_mask"] = mask
        return gain_file, pedestal_file

    return write
