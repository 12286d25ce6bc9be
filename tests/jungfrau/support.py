"""Helpers of the Jungfrau tests: where the reference vectors are, plausible random inputs.

The reference vectors live outside the repository, in ``../shared/testdata/jungfrau`` from the
repository root, or below ``$SF_DAQ_SHARED_DIR``. Without them the byte-for-byte tests are
skipped on a developer machine but fail when ``CI`` is set: a green CI must mean the kernel was
checked against the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_testdata(name: str = "jungfrau") -> Path:
    """``jungfrau`` (SPEC options) or ``jungfrau_next`` (upstream HEAD options, pedestals)."""
    shared = Path(os.environ.get("SF_DAQ_SHARED_DIR") or REPO_ROOT.parent / "shared")
    return shared / "testdata" / name


def require_testdata(name: str = "jungfrau") -> Path:
    """The reference vector directory, or skip (fail under CI) when it is missing."""
    directory = shared_testdata(name)
    if not (directory / "manifest.json").is_file():
        reason = f"Jungfrau reference vectors not found in {directory} (set SF_DAQ_SHARED_DIR)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set")
        pytest.skip(reason)
    return directory


def random_calibration(
    n_modules: int, seed: int = 0, gain_slices: int = 4, pedestal_slices: int = 3
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Plausible gains (ADU/keV), pedestals (ADU) and a sparse int64 bad-pixel mask.

    The mask also holds the reference's reserved bits 21 and 22 (UPSTREAM_HEAD §3) on ~3 % of
    the pixels, ordinary, double-pixel and module-edge ones alike: alone (bit 21, bit 22 or
    both: a good pixel unless the matching option masks it) and, where a low bit is set too,
    mixed with it (bad whatever the options).
    """
    rng = np.random.default_rng(seed)
    shape = (512 * n_modules, 1024)
    gain = rng.uniform(30, 50, (gain_slices, *shape))
    gain[1] /= -25
    gain[2] /= -300
    pedestal = rng.uniform(1000, 3000, (pedestal_slices, *shape))
    mask = (rng.random(shape) < 0.01).astype(np.int64) * rng.integers(1, 256, shape)
    reserved = np.array([0, 1 << 21, 1 << 22, (1 << 21) | (1 << 22)], dtype=np.int64)
    mask |= rng.choice(reserved, shape, p=[0.97, 0.01, 0.01, 0.01])
    return gain, pedestal, mask


def random_raw(n_frames: int, n_modules: int, seed: int = 1) -> npt.NDArray[np.uint16]:
    """Frames mostly in G0, some G1/G2 and the invalid code 2, the odd saturated pixel."""
    rng = np.random.default_rng(seed)
    shape = (n_frames, 512 * n_modules, 1024)
    adc = rng.integers(0, 0x4000, shape, dtype=np.uint16)
    code = rng.choice(np.array([0, 1, 2, 3], dtype=np.uint16), shape, p=[0.9, 0.05, 0.01, 0.04])
    raw = ((code << 14) | adc).astype(np.uint16, copy=False)
    raw.reshape(-1)[::9973] = 0xC000
    return raw
