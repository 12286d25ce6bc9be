"""Pedestal files from a pedestal run (UPSTREAM_HEAD §4), bit-identical to the facility's.

A pedestal run records the dark detector in each gain stage in turn (G0, then forced G1, then
forced G2; bits 12-13 of ``daq_rec`` say which, bit 0 says high-gain G0). Per stage and pixel
the result holds the mean ADC value (``/gains``, the pedestal the conversion subtracts) and its
RMS (``/gainsRMS``), and ``/pixel_mask`` flags pixels that cannot be trusted:

- bit ``1 + g + 4*hg`` (G0 1, G1 2, G2 4, HG0 5): the pixel was in another gain than the stage
  in an accepted frame (it did not switch, or switched on its own);
- bit ``9 + g`` (9, 10, 12): its RMS is zero (numpy ``isclose``): a dead pixel, or a stage
  without a single accepted frame, which flags every pixel;
- bit 0: flagged in the site's own mask (``pixel_mask_file``).

A frame is used only if it is good, all ``daq_rec`` columns agree, and at least
``n_modules - 0.5 - number_bad_modules`` modules' worth of pixels are in the expected gain
(frames taken while the detector was still switching are dropped; ``number_bad_modules`` lets
a detector with broken modules through). Each stage keeps a moving average over the last
``frames_average`` frames (1000 upstream): once a stage has more, its sums first lose
1/``frames_average`` of themselves. High-gain G0 frames go into the G0 stage.

Like the reference, the file is written even when no pixel is good, and *then* the computation
fails (``NoGoodPixel``): the file shows what went wrong (typically a stage without frames).
Frames are streamed in bounded batches; memory is the per-pixel state, 56 bytes per pixel
(three stages' sums and squares as float64, the mask as int64: 470 MB for 16 modules) plus one
batch, whatever the run's length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from sf_daq_broker.h5.atomic import atomic_output
from sf_daq_broker.h5.closing import written
from sf_daq_broker.h5.detector import RawDetectorFile
from sf_daq_broker.jungfrau.detectors import FRAMES_AVERAGE, MODULE_COLUMNS, MODULE_ROWS
from sf_daq_broker.jungfrau.errors import CalibrationError, ConversionError, NoGoodPixel
from sf_daq_broker.jungfrau.pedestal_kernel import CHUNK, accumulate, count_in_gain

log = logging.getLogger(__name__)

#: Raw bytes read per batch.
BATCH_BYTES = 64 * 1024 * 1024
#: Gain code of each stage of the result, in the order of its planes: G0, G1, G2.
STAGE_CODES = (0, 1, 3)
STAGE_NAMES = ("G0", "G1", "G2")
SITE_MASK_BIT = 0
ZERO_RMS_BIT = 9  # + gain code
ZERO_RMS_ATOL = 1e-8  # numpy.isclose's default, as the reference

ProgressCallback = Callable[[int, int], None]

__all__ = ["NoGoodPixel", "PedestalSummary", "compute_pedestal"]


@dataclass(frozen=True)
class PedestalSummary:
    """What a pedestal computation used and produced (for logs and replies)."""

    detector: str
    result_file: Path
    frames: int  # rows of the raw file
    good_frames: int  # is_good_frame != 0
    #: Accepted frames per stage of the result (HG0 frames count under G0).
    stage_frames: dict[str, int] = field(default_factory=dict)
    highgain_frames: int = 0  # accepted frames in high-gain G0
    bad_pixels: int = 0
    pixels: int = 0

    @property
    def good_pixels(self) -> int:
        return self.pixels - self.bad_pixels


@dataclass
class _State:
    """The running sums and the mask, updated batch after batch."""

    n_modules: int
    number_bad_modules: int
    frames_average: int
    sums: npt.NDArray[np.float64]  # (3, pixels): stages G0, G1, G2
    squares: npt.NDArray[np.float64]
    mask: npt.NDArray[np.int64]  # (pixels,)
    counts: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0, 2: 0, 3: 0})
    good_frames: int = 0
    highgain_frames: int = 0

    @classmethod
    def empty(cls, n_pixels: int, n_modules: int, bad_modules: int, average: int) -> _State:
        return cls(
            n_modules=n_modules,
            number_bad_modules=bad_modules,
            frames_average=average,
            sums=np.zeros((len(STAGE_CODES), n_pixels)),
            squares=np.zeros((len(STAGE_CODES), n_pixels)),
            mask=np.zeros(n_pixels, dtype=np.int64),
        )

    @property
    def min_pixels_in_gain(self) -> float:
        return (self.n_modules - 0.5 - self.number_bad_modules) * MODULE_ROWS * MODULE_COLUMNS


def compute_pedestal(
    raw_file: Path,
    result_file: Path,
    *,
    number_bad_modules: int = 0,
    frames_average: int = FRAMES_AVERAGE,
    pixel_mask_file: Path | None = None,
    batch_bytes: int = BATCH_BYTES,
    progress: ProgressCallback | None = None,
) -> PedestalSummary:
    """Compute the pedestal file of ``raw_file`` (a raw pedestal run) into ``result_file``.

    The result appears complete or not at all (temporary name, rename). Raises
    ``NoGoodPixel`` after writing it if no pixel is good; ``ConversionError`` (or
    ``DetectorFileError`` for an unreadable raw file) before writing anything for bad input.
    ``progress(frames_done, frames_total)`` is called after each batch.
    """
    if frames_average < 1:
        raise ConversionError(f"frames_average must be at least 1, not {frames_average}")
    if number_bad_modules < 0:
        raise ConversionError(f"number_bad_modules must not be negative, not {number_bad_modules}")
    with RawDetectorFile(raw_file) as raw:
        height, width = raw.frame_shape
        if width != MODULE_COLUMNS or height == 0 or height % MODULE_ROWS:
            raise ConversionError(
                f"{raw_file}: frames are {raw.frame_shape}, not (512*n_modules, 1024)"
            )
        site_mask = _site_mask(pixel_mask_file, raw.frame_shape)
        state = _State.empty(
            height * width, height // MODULE_ROWS, number_bad_modules, frames_average
        )
        _stream(raw, state, batch_bytes, progress)
        detector, n_frames = raw.detector, raw.n_frames
    if site_mask is not None:
        state.mask[site_mask.reshape(-1)] |= 1 << SITE_MASK_BIT
    gains, rms = _finish(state)
    mask = state.mask.reshape(height, width)
    with atomic_output(result_file) as temporary, written(temporary) as file:
        file.create_dataset("gains", data=gains.reshape(-1, height, width))
        file.create_dataset("gainsRMS", data=rms.reshape(-1, height, width))
        file.create_dataset("pixel_mask", data=mask)
    summary = PedestalSummary(
        detector=detector,
        result_file=Path(result_file),
        frames=n_frames,
        good_frames=state.good_frames,
        stage_frames={
            name: state.counts[code] for name, code in zip(STAGE_NAMES, STAGE_CODES, strict=True)
        },
        highgain_frames=state.highgain_frames,
        bad_pixels=int(np.count_nonzero(mask)),
        pixels=mask.size,
    )
    stages = ", ".join(f"{name} {count}" for name, count in summary.stage_frames.items())
    log.info(
        "%s: pedestal of %s from %d frames (%d good; accepted per stage: %s; %d high-gain): "
        "%d of %d pixels bad",
        result_file,
        detector,
        n_frames,
        summary.good_frames,
        stages,
        summary.highgain_frames,
        summary.bad_pixels,
        summary.pixels,
    )
    if summary.good_pixels == 0:
        raise NoGoodPixel(
            f"pedestal file {result_file} contains no good pixel (frames accepted per gain "
            f"stage: {stages}; a stage without frames flags every pixel)"
        )
    return summary


def _stream(
    raw: RawDetectorFile, state: _State, batch_bytes: int, progress: ProgressCallback | None
) -> None:
    frame_pixels = state.mask.size
    batch = max(1, min(raw.n_frames, batch_bytes // (2 * frame_pixels)))
    buffer = np.empty((batch, *raw.frame_shape), dtype=np.uint16)
    n_chunks = -(-frame_pixels // CHUNK)
    counts = np.empty((batch, n_chunks), dtype=np.int64)
    for start in range(0, raw.n_frames, batch):
        stop = min(start + batch, raw.n_frames)
        n = stop - start
        raw.read_frames(start, stop, buffer)
        frames = buffer[:n].reshape(n, frame_pixels)
        daq_rec = raw.column_rows("daq_rec", start, stop).astype(np.int64)
        good = raw.column_rows("is_good_frame", start, stop)[:, 0] != 0
        expected = (daq_rec[:, 0] >> 12) & 3
        count_in_gain(frames, expected, counts[:n])
        _accept_and_add(state, frames, daq_rec, good, counts[:n].sum(axis=1))
        if progress is not None:
            progress(stop, raw.n_frames)


def _accept_and_add(
    state: _State,
    frames: npt.NDArray[np.uint16],
    daq_rec: npt.NDArray[np.int64],
    good: npt.NDArray[np.bool_],
    in_gain: npt.NDArray[np.int64],
) -> None:
    """Decide, frame by frame in order, which frames count; then add them in one pass."""
    accepted: list[int] = []
    codes: list[int] = []
    slots: list[int] = []
    decay: list[bool] = []
    bits: list[int] = []
    for f in range(frames.shape[0]):
        if not good[f]:
            continue
        state.good_frames += 1
        code = int(daq_rec[f, 0] >> 12) & 3
        highgain = int(daq_rec[f, 0]) & 1
        settings = daq_rec[f] & 0x3001
        if (settings != settings[0]).any() or in_gain[f] < state.min_pixels_in_gain:
            continue
        state.counts[code] += 1
        state.highgain_frames += highgain
        accepted.append(f)
        codes.append(code)
        slots.append(STAGE_CODES.index(code) if code in STAGE_CODES else -1)
        decay.append(state.counts[code] > state.frames_average)
        bits.append(1 << (1 + code + 4 * highgain))
    if not accepted:
        return
    accumulate(
        frames[accepted] if len(accepted) < frames.shape[0] else frames,
        np.asarray(codes, dtype=np.int64),
        np.asarray(slots, dtype=np.int64),
        np.asarray(decay, dtype=np.bool_),
        np.asarray(bits, dtype=np.int64),
        state.sums,
        state.squares,
        state.mask,
        state.frames_average,
    )


def _finish(state: _State) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Means and RMS per stage, in place of the sums (the reference's numpy operations, so the
    same rounding); flags zero-RMS pixels. A negative variance gives NaN, as upstream."""
    gains, rms = state.sums, state.squares
    for plane, code in enumerate(STAGE_CODES):
        n = float(max(1, min(state.frames_average, state.counts[code])))
        np.divide(gains[plane], n, out=gains[plane])
        np.divide(rms[plane], n, out=rms[plane])
        rms[plane] -= np.float_power(gains[plane], 2)
        with np.errstate(invalid="ignore"):
            np.sqrt(rms[plane], out=rms[plane])
        state.mask[np.isclose(rms[plane], 0, atol=ZERO_RMS_ATOL)] |= 1 << (ZERO_RMS_BIT + code)
    return gains, rms


def _site_mask(path: Path | None, frame_shape: tuple[int, int]) -> npt.NDArray[np.bool_] | None:
    """The site's own mask (``/pixel_mask``, non-zero = bad) as a bool image, or None."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise CalibrationError(f"pixel mask file {path} does not exist")
    try:
        with h5py.File(path, "r") as file:
            dataset: Any = file.get("pixel_mask")
            if not isinstance(dataset, h5py.Dataset):
                raise CalibrationError(f"pixel mask file {path}: no dataset /pixel_mask")
            values: npt.NDArray[Any] = dataset[()]
    except OSError as exc:
        raise CalibrationError(f"pixel mask file {path} cannot be read as HDF5: {exc}") from exc
    if values.shape != frame_shape or values.dtype.kind not in "biuf":
        raise CalibrationError(
            f"pixel mask file {path}: /pixel_mask is {values.dtype} {values.shape}; a numeric "
            f"{frame_shape} image is needed"
        )
    mask: npt.NDArray[np.bool_] = values != 0
    return mask
