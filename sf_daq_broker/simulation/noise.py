"""Deterministic integer noise: the source of every simulated value.

Values must be reproducible by anyone from (name, pulse id, element index) alone — in another
process, another test, a later release — so they come from a fixed integer hash, never from a
random generator whose stream could change between numpy versions. The hash is the splitmix64
finaliser (Steele, Lea, Flood 2014), applied to uint64 arrays; uint64 array arithmetic wraps
modulo 2**64 in numpy, which is exactly what the hash needs.

``hash_grid`` computes the same values in one numba pass (no temporary arrays): a simulated
buffer hashes every element of every waveform it serves, and numpy's nine passes over
uint64 temporaries made the simulator, not the system under test, the bottleneck of a long
run's benchmark. ``mix64`` is the reference formula (tests check the two agree).
"""

from __future__ import annotations

import hashlib

import numpy as np
from numba import njit
from numpy.typing import ArrayLike

GOLDEN = 0x9E3779B97F4A7C15
ELEMENT_STEP = 0xD1B54A32D192ED03
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def name_seed(name: str) -> int:
    """A 64-bit seed for a name (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of a uint64 array (a bijection that scrambles all bits)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    mixed: np.ndarray = x ^ (x >> np.uint64(31))
    return mixed


def hash_grid(seed: int, pids: ArrayLike, n_elements: int) -> np.ndarray:
    """``mix64(seed + pid*GOLDEN + i*ELEMENT_STEP) mod 2**64``, shape ``(len(pids), n_elements)``.

    The value behind element ``i`` of a channel at pulse ``pid``.
    """
    pid = np.atleast_1d(np.asarray(pids, dtype=np.int64)).astype(np.uint64)
    out = np.empty((pid.size, n_elements), dtype=np.uint64)
    _grid(np.uint64(seed % 2**64), pid, out, False)
    return out


def float_grid(seed: int, pids: ArrayLike, out: np.ndarray) -> None:
    """``((hash_grid(seed, pids, n) >> 40) - 2**23) / 256`` into the float array ``out``
    (``(len(pids), n)``), without the uint64 grid in between; exact in float32 and float64."""
    pid = np.atleast_1d(np.asarray(pids, dtype=np.int64)).astype(np.uint64)
    _grid(np.uint64(seed % 2**64), pid, out, True)


@njit(cache=True, inline="always")
def _mix(x: np.uint64) -> np.uint64:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def _grid(seed: np.uint64, pids: np.ndarray, out: np.ndarray, to_float: bool) -> None:
    golden, step = np.uint64(GOLDEN), np.uint64(ELEMENT_STEP)
    for row in range(pids.size):
        x0 = seed + pids[row] * golden
        for i in range(out.shape[1]):
            h = _mix(x0 + np.uint64(i) * step)
            if to_float:
                out[row, i] = (np.int64(h >> np.uint64(40)) - 8388608) / 256.0
            else:
                out[row, i] = h
