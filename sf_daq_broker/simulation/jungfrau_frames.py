"""What a simulated Jungfrau module sees: calibration constants and raw frames.

Everything is a pure function of (detector, module, pid), so a test computes the exact frame
a buffer file must hold and the exact calibration its gain/pedestal files hold. Per pixel,
``u = mix64(name_seed(f"{detector}/M{module:02d}") + index*ELEMENT_STEP)`` (index = row*1024 +
column) and ``w = mix64(u)`` fix the constants:

- gain (ADU/keV, float32): G0 ``40 + ((u & 0xFFF) - 2048)/8192``, G1
  ``-1.5 + (((u>>12) & 0xFFF) - 2048)/2**17``, G2 ``-0.1 + (((u>>24) & 0xFFF) - 2048)/2**21``,
  HG0 ``120 + (((u>>36) & 0xFFF) - 2048)/4096``;
- pedestal (ADU, float32): G0 ``2968 + ((u>>48) & 0x3FF)/16``, G1 ``13968 + (w & 0xFF)/4``,
  G2 ``14468 + ((w>>8) & 0xFF)/4``; RMS G0/G1/G2 ``3, 8, 16 + ((w>>16) & 0xF)/8``;
- pixel_mask (int64, nonzero = bad): ``((w >> 20) & 0xF) | 1`` where ``(w >> 56) == 0``
  (about 0.4 % of the pixels), else 0.

A frame at ``pid`` (uint16, 512 x 1024, gain code in bits 15:14, ADC in 13:0):

1. every pixel G0 at ``rint(ped_G0) + noise``, ``noise = (mix64(u + v*GOLDEN) >> 61) - 4`` in
   -4..3 with ``v = pid % 8``;
2. ``N_HITS`` = 4000 hits, one in each stretch of ``HIT_STRIDE`` = 131 pixels:
   ``p_j = j*131 + h_j % 131`` with ``h_j = hash_grid(seed ^ HIT_SALT, pid, N_HITS)[j]``;
   a G1 hit when ``(h_j >> 50) % 16 == 0`` (energy ``300 + (h_j >> 32) % 512`` keV), a G2 hit
   when ``(h_j >> 50) % 64 == 1`` (``5000 + (h_j >> 32) % 4096`` keV), else a G0 photon of
   ``12.4 * (1 + (h_j >> 60) % 3)`` keV;
3. a bright spot around the module's fixed centre ``(cy, cx) = (64 + s % 384, 64 + (s >> 9) %
   896)`` with ``s = seed >> 20``: pixels within radius ``r = 3 + pid % 8`` are G1 at 600 keV,
   within ``r // 2`` G2 at 8000 keV (overwriting hits).

A pixel of gain g and energy E has ADC ``rint(ped_g + gain_g * E)`` (float64 arithmetic on the
float32 constants), code 0, 1 or 3 for G0, G1, G2. About 99.2 % of the pixels are G0 noise,
0.7 % G0 photons, 0.07 % G1 and 0.02 % G2.

A detector that is dark (``illuminated`` false) or forced into one gain stage (``stage`` 0, 1
or 2: pedestal mode, ``fixed_gain1``/``fixed_gain2``, see ``jungfrau_detector``) shows step 1
only, in that stage: every pixel at ``rint(ped_stage) + noise`` with the stage's gain bits — so
the mean of such frames is the stage's pedestal within the noise (-4..3, mean -0.5, RMS 2.29).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from sf_daq_broker.buffers.jungfrau_format import MODULE_COLS, MODULE_ROWS
from sf_daq_broker.simulation.noise import ELEMENT_STEP, GOLDEN, hash_grid, mix64, name_seed

N_PIXELS = MODULE_ROWS * MODULE_COLS
N_HITS = 4000
HIT_STRIDE = N_PIXELS // N_HITS
_HIT_BASE = np.arange(N_HITS, dtype=np.int64) * HIT_STRIDE
PHOTON_KEV = 12.4
N_NOISE_VARIANTS = 8
HIT_SALT = 0x5EED_0F_4175
SPOT_MAX_RADIUS = 10
GAIN_CODE = {0: 0, 1: 1, 2: 3}  # gain stage → gain bits


@dataclass(frozen=True)
class ModuleCalibration:
    """Calibration of one module: ``gain`` (4, 512, 1024) G0/G1/G2/HG0, ``pedestal`` and
    ``pedestal_rms`` (3, 512, 1024), ``pixel_mask`` (512, 1024) int64 nonzero = bad."""

    gain: np.ndarray
    pedestal: np.ndarray
    pedestal_rms: np.ndarray
    pixel_mask: np.ndarray


def module_seed(detector: str, module: int) -> int:
    return name_seed(f"{detector}/M{module:02d}")


def _pixel_hashes(detector: str, module: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(N_PIXELS, dtype=np.uint64)
    u = mix64(np.uint64(module_seed(detector, module)) + index * np.uint64(ELEMENT_STEP))
    return u, mix64(u)


def _bits(x: np.ndarray, shift: int, mask: int) -> np.ndarray:
    return ((x >> np.uint64(shift)) & np.uint64(mask)).astype(np.float64)


@lru_cache(maxsize=32)
def module_calibration(detector: str, module: int) -> ModuleCalibration:
    """The calibration constants of one module (cached; treat the arrays as read-only)."""
    u, w = _pixel_hashes(detector, module)
    shape = (MODULE_ROWS, MODULE_COLS)
    gain = np.stack(
        [
            40 + (_bits(u, 0, 0xFFF) - 2048) / 8192,
            -1.5 + (_bits(u, 12, 0xFFF) - 2048) / 2**17,
            -0.1 + (_bits(u, 24, 0xFFF) - 2048) / 2**21,
            120 + (_bits(u, 36, 0xFFF) - 2048) / 4096,
        ]
    ).astype(np.float32)
    pedestal = np.stack(
        [
            2968 + _bits(u, 48, 0x3FF) / 16,
            13968 + _bits(w, 0, 0xFF) / 4,
            14468 + _bits(w, 8, 0xFF) / 4,
        ]
    ).astype(np.float32)
    rms_extra = _bits(w, 16, 0xF) / 8
    rms = np.stack([3 + rms_extra, 8 + rms_extra, 16 + rms_extra]).astype(np.float32)
    bad = (w >> np.uint64(56)) == 0
    mask = np.where(bad, ((w >> np.uint64(20)) & np.uint64(0xF)) | np.uint64(1), 0)
    calibration = ModuleCalibration(
        gain.reshape(4, *shape),
        pedestal.reshape(3, *shape),
        rms.reshape(3, *shape),
        mask.astype(np.int64).reshape(shape),
    )
    for array in (calibration.gain, calibration.pedestal, calibration.pedestal_rms):
        array.setflags(write=False)
    calibration.pixel_mask.setflags(write=False)
    return calibration


def detector_calibration(detector: str, n_modules: int) -> ModuleCalibration:
    """The whole detector's calibration, modules stacked along y (H = 512 * n_modules)."""
    modules = [module_calibration(detector, m) for m in range(n_modules)]
    return ModuleCalibration(
        np.concatenate([c.gain for c in modules], axis=1),
        np.concatenate([c.pedestal for c in modules], axis=1),
        np.concatenate([c.pedestal_rms for c in modules], axis=1),
        np.concatenate([c.pixel_mask for c in modules], axis=0),
    )


def _adc(
    stage: int, energy: np.ndarray | float, index: np.ndarray, cal: ModuleCalibration
) -> np.ndarray:
    """Raw values (gain bits + ADC) of pixels ``index`` hit by ``energy`` keV in ``stage``."""
    gain = cal.gain[stage].reshape(-1)[index].astype(np.float64)
    pedestal = cal.pedestal[stage].reshape(-1)[index].astype(np.float64)
    adc = np.clip(np.rint(pedestal + gain * energy), 0, 0x3FFF).astype(np.uint16)
    raw: np.ndarray = adc | np.uint16(GAIN_CODE[stage] << 14)
    return raw


@lru_cache(maxsize=96)
def _noise_frames(detector: str, module: int, stage: int = 0) -> np.ndarray:
    """The ``N_NOISE_VARIANTS`` frames (pedestal + noise, with the gain bits) of one gain
    stage; G0's are what every frame of a module starts from."""
    u, _ = _pixel_hashes(detector, module)
    pedestal = np.rint(module_calibration(detector, module).pedestal[stage].reshape(-1))
    frames = np.empty((N_NOISE_VARIANTS, MODULE_ROWS, MODULE_COLS), dtype=np.uint16)
    for variant in range(N_NOISE_VARIANTS):
        salt = np.uint64(variant * GOLDEN % 2**64)
        noise = (mix64(u + salt) >> np.uint64(61)).astype(np.int64) - 4
        values = (pedestal.astype(np.int64) + noise) | (GAIN_CODE[stage] << 14)
        frames[variant] = values.reshape(MODULE_ROWS, MODULE_COLS)
    frames.setflags(write=False)
    return frames


@lru_cache(maxsize=32)
def _photon_adc(detector: str, module: int) -> np.ndarray:
    """Raw value of every pixel hit by 1, 2 or 3 G0 photons: (3, N_PIXELS) uint16."""
    cal = module_calibration(detector, module)
    index = np.arange(N_PIXELS)
    table = np.stack([_adc(0, PHOTON_KEV * m, index, cal) for m in (1, 2, 3)])
    table.setflags(write=False)
    return table


@lru_cache(maxsize=32)
def _spot(detector: str, module: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices of the spot disc (radius up to SPOT_MAX_RADIUS), their squared distance
    from the centre, and their G1 and G2 raw values."""
    s = module_seed(detector, module) >> 20
    cy, cx = 64 + s % 384, 64 + (s >> 9) % 896
    r = SPOT_MAX_RADIUS
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    index = ((cy + dy) * MODULE_COLS + cx + dx).ravel()
    cal = module_calibration(detector, module)
    g1, g2 = _adc(1, 600.0, index, cal), _adc(2, 8000.0, index, cal)
    return index, (dy * dy + dx * dx).ravel(), g1, g2


def frame_into(
    out: np.ndarray,
    detector: str,
    module: int,
    pid: int,
    *,
    stage: int | None = None,
    illuminated: bool = True,
) -> None:
    """Write the frame of (detector, module, pid) into ``out`` (512 x 1024 uint16, C-ordered;
    it may be the unaligned field of a record buffer) without a frame-sized temporary.

    ``stage`` forces every pixel into that gain stage, and ``illuminated`` false leaves out
    the photons: both give pedestal + noise only (see the module docstring)."""
    if stage is not None or not illuminated:
        np.copyto(out, _noise_frames(detector, module, stage or 0)[pid % N_NOISE_VARIANTS])
        return
    np.copyto(out, _noise_frames(detector, module)[pid % N_NOISE_VARIANTS])
    flat = out.view()
    flat.shape = (N_PIXELS,)  # raises rather than silently writing into a copy
    cal = module_calibration(detector, module)
    h = hash_grid(module_seed(detector, module) ^ HIT_SALT, [pid], N_HITS)[0]
    positions = _HIT_BASE + (h % np.uint64(HIT_STRIDE)).astype(np.int64)  # distinct
    selector = (h >> np.uint64(50)).astype(np.int64)
    g1 = selector % 16 == 0
    g2 = selector % 64 == 1
    g0 = ~(g1 | g2)
    energy = (h >> np.uint64(32)).astype(np.int64)
    multiplicity = (h[g0] >> np.uint64(60)).astype(np.int64) % 3
    flat[positions[g0]] = _photon_adc(detector, module)[multiplicity, positions[g0]]
    flat[positions[g1]] = _adc(1, 300.0 + energy[g1] % 512, positions[g1], cal)
    flat[positions[g2]] = _adc(2, 5000.0 + energy[g2] % 4096, positions[g2], cal)
    index, distance2, spot_g1, spot_g2 = _spot(detector, module)
    radius = 3 + pid % 8
    inside = distance2 <= radius * radius
    flat[index[inside]] = spot_g1[inside]
    core = distance2 <= (radius // 2) ** 2
    flat[index[core]] = spot_g2[core]


def expected_frame(
    detector: str, module: int, pid: int, *, stage: int | None = None, illuminated: bool = True
) -> np.ndarray:
    """The complete raw frame of (detector, module, pid): uint16 (512, 1024)."""
    frame = np.empty((MODULE_ROWS, MODULE_COLS), dtype=np.uint16)
    frame_into(frame, detector, module, pid, stage=stage, illuminated=illuminated)
    return frame
