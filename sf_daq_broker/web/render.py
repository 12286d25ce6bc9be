"""Previews drawn from the written files: bounded reads, drawn as PNG with matplotlib's Agg.

These functions run in the preview process (``previews.py``), never in the broker's process:
reading HDF5 and drawing hold the GIL for long stretches, which would delay the API. Whatever a
file's size, the work is bounded: a detector preview reads at most ``DETECTOR_FRAMES`` frames
(one chunk each) and keeps one block-reduced image per statistic; a camera preview reads one
frame; a channel plot reads at most ``PLOT_POINTS`` strided values; the PV table at most
``PV_VALUES`` values of at most ``PVS_SHOWN`` PVs. Figures have a fixed size in pixels, so the
page can lay them out before they arrive.

A file that does not have the expected layout gives a picture that says why (the reason is what
a user needs), not an exception.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading)
import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1 import make_axes_locatable

#: Frames averaged for a detector preview (the first good ones).
DETECTOR_FRAMES = 16
#: A preview image has at most this many pixels along its longer side (block-reduced).
IMAGE_SIDE = 512
#: Values of a channel plotted at most (strided reads).
PLOT_POINTS = 4000
#: Waveform values read at most for a waveform channel's mean.
WAVEFORM_VALUES = 400_000
PV_VALUES = 10
PVS_SHOWN = 100
#: Percentiles the colour scale is clipped to: a few hot pixels must not wash out the image.
CLIP_PERCENTILES = (1.0, 99.5)
#: Raw Jungfrau pixels carry the gain in their two top bits.
ADC_BITS = 0x3FFF
DPI = 100


class PreviewKind(StrEnum):
    DETECTOR = "detector"
    CAMERA = "camera"
    CHANNEL = "channel"


#: Width and height in pixels of each kind's PNG.
SIZES: dict[PreviewKind, tuple[int, int]] = {
    PreviewKind.DETECTOR: (960, 420),
    PreviewKind.CAMERA: (640, 420),
    PreviewKind.CHANNEL: (480, 240),
}


@dataclass(frozen=True)
class PreviewSpec:
    """What to draw (picklable: it travels to the preview process)."""

    kind: PreviewKind
    path: str
    name: str  # the detector, camera or channel
    note: str = ""  # shown under the title, e.g. "geometry-corrected"


@dataclass
class PvValues:
    name: str
    count: int
    rows: list[tuple[int, str, bool]] = field(default_factory=list)  # pulse id, value, changed
    problem: str = ""


def init_preview_process() -> None:
    """The preview process gives way to everything else and leaves Ctrl-C to the broker.

    The lowest CPU priority (nice 19), in a session of its own: with Linux's autogroups
    (``man 7 sched``) a process's CPU time is charged to its session's group, so in the
    broker's session the previews would lower the broker's own share on a busy machine; in its
    own group, niced too, they take only what nobody else wants.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.setsid()
        Path("/proc/self/autogroup").write_text("19")
    os.nice(19)


def draw(spec: PreviewSpec) -> bytes:
    """The PNG of one preview; a file in an unexpected layout gives a picture of the reason."""
    try:
        if spec.kind is PreviewKind.DETECTOR:
            return _draw_detector(spec)
        if spec.kind is PreviewKind.CAMERA:
            return _draw_camera(spec)
        return _draw_channel(spec)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return text_png(f"no preview of {spec.name}:\n{exc}", SIZES[spec.kind])


# --- images ---------------------------------------------------------------------------------


def block_factor(shape: tuple[int, ...], side: int = IMAGE_SIDE) -> int:
    """The smallest integer factor that brings the longer side to at most ``side`` pixels."""
    return max(1, math.ceil(max(shape) / side))


def block_reduce(image: npt.NDArray[np.floating[Any]], factor: int) -> tuple[Any, Any]:
    """(mean, max) of ``factor`` x ``factor`` blocks, ignoring NaN (masked) pixels.

    Edges are padded with NaN; a block without a valid pixel is NaN in both.
    """
    height, width = image.shape
    padded_h, padded_w = -(-height // factor) * factor, -(-width // factor) * factor
    if (padded_h, padded_w) != (height, width):
        padded = np.full((padded_h, padded_w), np.nan, dtype=np.float32)
        padded[:height, :width] = image
        image = padded
    blocks = image.reshape(padded_h // factor, factor, padded_w // factor, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmean(blocks, axis=(1, 3)), np.nanmax(blocks, axis=(1, 3))


@dataclass
class DetectorImages:
    mean: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    frames: list[int]  # the rows used
    factor: int
    unit: str
    good_frames: bool  # False: no good frame among the rows, the first rows were used


def detector_images(path: str, detector: str, frames: int = DETECTOR_FRAMES) -> DetectorImages:
    """Mean and max of the first ``frames`` good frames, block-reduced, masked pixels NaN.

    Reads one frame (one chunk) at a time into two running images (sum and max), so memory is
    three frames whatever the run's length; the pixel mask and the block reduction are applied
    once at the end.
    """
    with h5py.File(path, "r") as file:
        group = file[f"data/{detector}"]
        data = group["data"]
        if data.ndim != 3:
            raise ValueError(f"/data/{detector}/data is {data.shape}, not (frames, y, x)")
        count = data.shape[0]
        good = np.ones(count, dtype=bool)
        if "is_good_frame" in group:
            good = np.asarray(group["is_good_frame"][:]).reshape(-1).astype(bool)
        rows = np.flatnonzero(good)[:frames].tolist()
        good_frames = bool(rows)
        if not rows:
            rows = list(range(min(frames, count)))
        if not rows:
            raise ValueError(f"{detector}: the file holds no frame")
        mask = np.asarray(group["pixel_mask"][:], dtype=bool) if "pixel_mask" in group else None
        converted = "conversion_factor" in group
        total = np.zeros(data.shape[1:], dtype=np.float32)
        highest = np.full(data.shape[1:], -np.inf, dtype=np.float32)
        for row in rows:
            frame = np.asarray(data[row])
            if not converted and frame.dtype == np.uint16:
                frame &= ADC_BITS
            np.add(total, frame, out=total, casting="unsafe")
            np.maximum(highest, frame, out=highest, casting="unsafe")
    total /= len(rows)
    if mask is not None:
        total[~mask] = np.nan
        highest[~mask] = np.nan
    factor = block_factor(total.shape)
    mean, _ = block_reduce(total, factor)
    _, peak = block_reduce(highest, factor)
    unit = "keV" if converted else "ADC counts (gain bits removed)"
    return DetectorImages(
        mean.astype(np.float64), peak.astype(np.float64), rows, factor, unit, good_frames
    )


def clip_range(image: npt.NDArray[np.floating[Any]]) -> tuple[float, float]:
    """The colour scale: percentiles of the finite pixels, never an empty range."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, CLIP_PERCENTILES))
    if high <= low:
        high = low + 1.0
    return low, high


def _figure(size: tuple[int, int]) -> Figure:
    """A figure of exactly ``size`` pixels; axes are placed by hand (a layout engine costs
    more than the drawing)."""
    width, height = size
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)  # the figure draws on Agg, without pyplot's global state
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _image_panel(
    figure: Figure, box: tuple[float, float, float, float], image: Any, title: str, unit: str
) -> None:
    """An image with its colour bar in ``box`` (left, bottom, width, height; figure fractions)."""
    axes = figure.add_axes(box)
    low, high = clip_range(image)
    shown = axes.imshow(image, vmin=low, vmax=high, cmap="viridis", interpolation="nearest")
    shown.cmap.set_bad("#d0d0d0")  # masked pixels and gaps
    axes.set_title(title, fontsize=9)
    axes.tick_params(labelsize=7)
    # The bar follows the image's drawn height (its aspect ratio is kept).
    colour_axes = make_axes_locatable(axes).append_axes("right", size="4%", pad=0.08)
    bar = figure.colorbar(shown, cax=colour_axes)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(unit, fontsize=8)


def _draw_detector(spec: PreviewSpec) -> bytes:
    images = detector_images(spec.path, spec.name)
    figure = _figure(SIZES[PreviewKind.DETECTOR])
    n = len(images.frames)
    which = "good frames" if images.good_frames else "frames (none is good)"
    title = f"of the first {n} {which}"
    _image_panel(figure, (0.05, 0.07, 0.38, 0.8), images.mean, "mean " + title, images.unit)
    _image_panel(figure, (0.55, 0.07, 0.38, 0.8), images.max, "max " + title, images.unit)
    notes = [spec.note] if spec.note else []
    if images.factor > 1:
        notes.append(f"{images.factor}x{images.factor} pixel blocks")
    notes.append("colour scale clipped to percentiles 1-99.5")
    figure.suptitle(f"{spec.name}: " + ", ".join(notes), fontsize=9)
    return _png(figure)


def _draw_camera(spec: PreviewSpec) -> bytes:
    with h5py.File(spec.path, "r") as file:
        data = file[spec.name]["data"]
        if data.ndim != 3 or data.shape[0] == 0:
            raise ValueError(f"/{spec.name}/data is {data.shape}, not (images, y, x)")
        frame = np.asarray(data[0]).astype(np.float32)
        count = data.shape[0]
    factor = block_factor(frame.shape)
    mean, _ = block_reduce(frame, factor)
    figure = _figure(SIZES[PreviewKind.CAMERA])
    blocks = f", {factor}x{factor} pixel blocks" if factor > 1 else ""
    title = f"{spec.name}: first of {count} images{blocks}"
    _image_panel(figure, (0.07, 0.07, 0.8, 0.85), mean, title, "counts")
    return _png(figure)


# --- channels -------------------------------------------------------------------------------


def channel_series(path: str, channel: str) -> tuple[Any, Any, int, str]:
    """(x, y, count, what) of a channel's plot: a scalar over pulse ids (strided), or the mean
    of up to ``WAVEFORM_VALUES`` values of a waveform over its samples."""
    with h5py.File(path, "r") as file:
        group = file[channel]
        data = group["data"]
        count = data.shape[0] if data.ndim else 0
        if count == 0:
            raise ValueError(f"{channel} holds no value")
        if data.dtype.kind not in "biuf":
            kind = "strings" if data.dtype.kind in "OSU" else str(data.dtype)
            raise ValueError(f"{channel} holds {kind}, which are not plotted")
        if data.ndim == 1:
            step = max(1, math.ceil(count / PLOT_POINTS))
            pulse_ids = np.asarray(group["pulse_id"][::step], dtype=np.int64)
            values = np.asarray(data[::step]).astype(np.float64)
            what = "every value" if step == 1 else f"every {step}th value"
            return pulse_ids, values, count, what
        if data.ndim == 2:
            length = data.shape[1]
            rows = max(1, min(count, WAVEFORM_VALUES // max(1, length)))
            step = max(1, math.ceil(count / rows))
            waveforms = np.asarray(data[::step]).astype(np.float64)
            what = f"mean of {waveforms.shape[0]} of {count} waveforms"
            return np.arange(length), waveforms.mean(axis=0), count, what
        raise ValueError(f"{channel} holds {data.shape[1:]} arrays, which are not plotted")


def _draw_channel(spec: PreviewSpec) -> bytes:
    x, y, count, what = channel_series(spec.path, spec.name)
    figure = _figure(SIZES[PreviewKind.CHANNEL])
    axes = figure.add_axes((0.13, 0.18, 0.83, 0.66))
    scalar = what.startswith("every")
    if scalar:
        first = int(x[0])
        axes.plot(x - first, y, linewidth=0.8, marker="." if len(x) <= 200 else None)
        axes.set_xlabel(f"pulse id - {first}", fontsize=8)
    else:
        axes.plot(x, y, linewidth=0.8)
        axes.set_xlabel("sample", fontsize=8)
    axes.set_title(f"{spec.name}\n{count} values, {what}", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    return _png(figure)


def pv_values(path: str, names: list[str]) -> list[PvValues]:
    """The first values of each PV (what the page shows as a table)."""
    result = []
    with h5py.File(path, "r") as file:
        for name in names[:PVS_SHOWN]:
            group = file.get(name)
            if not isinstance(group, h5py.Group) or "data" not in group:
                result.append(PvValues(name, 0, problem="not in the file"))
                continue
            data = group["data"]
            count = data.shape[0] if data.ndim else 0
            values = data[:PV_VALUES]
            pulse_ids = group["pulse_id"][:PV_VALUES] if "pulse_id" in group else [0] * count
            changed = (
                group["changed_in_interval"][:PV_VALUES]
                if "changed_in_interval" in group
                else [True] * count
            )
            rows = [
                (int(pid), _value_text(value), bool(flag))
                for pid, value, flag in zip(pulse_ids, values, changed, strict=False)
            ]
            result.append(PvValues(name, count, rows))
    return result


def _value_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return np.array2string(value, threshold=8, precision=6)
    if isinstance(value, np.floating):
        return f"{float(value):.6g}"
    return str(value)


def text_png(message: str, size: tuple[int, int]) -> bytes:
    """A picture of a message, where a preview cannot be drawn."""
    figure = _figure(size)
    figure.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10)
    return _png(figure)
