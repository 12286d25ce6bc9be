"""Simulated beam-synchronous channels and camera images: what each one holds at each pulse.

A channel has an event at every pulse with ``pid % rate_divisor == 0``. Its value at pulse
``pid`` is a pure function of (channel, pid), so a test anywhere can compute what a file must
contain without talking to the simulator. With ``seed = name_seed(name)`` and
``h(i) = hash_grid(seed, pid, n)[i]`` for element ``i`` of the flattened value
(see ``noise.hash_grid``):

- integers: the low bits of ``h(i)`` (two's complement for signed types) — every byte varies,
  so a byte-order mistake cannot go unnoticed;
- floats: ``((h(i) >> 40) - 2**23) / 256``, exact in float32 and float64;
- bool: ``h(i) & 1``;
- string: ``f"{name} #{pid} Δ{pid % 7}"`` followed by ``pid % 4`` middle dots (non-ASCII, varying
  length);
- 2-D integer images (cameras): ``image[y, x] = base[y, (x - pid) % W] + pid % 64`` where
  ``base[y, x] = (mix64(seed + (y*W + x)*ELEMENT_STEP) >> 58) + A*max(0, R² - d²) // R²``: noise
  of 0..63 plus a cone-shaped spot of height ``A = min(4000, max(type) - 127)`` and radius
  ``R = max(2, min(H, W)//6)`` around ``(H//2, W//3)`` (``d²`` the squared distance) — cheap to
  make, compresses like a real camera frame, and moves with the pulse id.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sf_daq_broker.buffers.api1_format import TYPES, ByteOrder, ChannelHeader
from sf_daq_broker.simulation.noise import ELEMENT_STEP, float_grid, hash_grid, mix64, name_seed


class ChannelSpec(BaseModel):
    """One simulated channel. ``shape`` is the numpy shape of a value: ``[]`` scalar, ``[n]``
    waveform, ``[height, width]`` image (the wire header lists images width first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: str = "float64"
    shape: tuple[int, ...] = ()
    byte_order: ByteOrder = "BIG_ENDIAN"
    rate_divisor: int = Field(default=1, ge=1)
    compression: Literal["none", "bitshuffle_lz4"] = "none"

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in TYPES:
            raise ValueError(f"unknown type {value!r}; known: {', '.join(TYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _sane_shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) > 2 or any(n < 1 for n in value):
            raise ValueError(f"shape {list(value)}: up to 2 positive dimensions")
        return value

    @model_validator(mode="after")
    def _strings_are_scalars(self) -> ChannelSpec:
        if self.type == "string" and (self.shape or self.compression != "none"):
            raise ValueError(f"{self.name}: strings are scalar and uncompressed")
        return self

    @property
    def compressed(self) -> bool:
        return self.compression == "bitshuffle_lz4"

    @property
    def header(self) -> ChannelHeader:
        return ChannelHeader(self.name, self.type, self.byte_order, self.shape, self.compressed)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 2 and TYPES[self.type].kind in "ui"


def channel_pulse_ids(spec: ChannelSpec, first: int, last: int) -> np.ndarray:
    """Pulse ids of the channel's events in ``[first, last]`` (int64, increasing)."""
    k = spec.rate_divisor
    start = -(-first // k) * k
    return np.arange(start, last + 1, k, dtype=np.int64)


def expected_values(spec: ChannelSpec, pids: ArrayLike) -> np.ndarray:
    """Values of the channel at ``pids``: shape ``(N, *spec.shape)``, native byte order
    (an object array of ``str`` for strings)."""
    pid_array = np.atleast_1d(np.asarray(pids, dtype=np.int64))
    if spec.type == "string":
        out = np.empty(len(pid_array), dtype=object)
        out[:] = [_string_value(spec.name, int(pid)) for pid in pid_array]
        return out
    if spec.is_image:
        return np.stack([_image(spec, int(pid)) for pid in pid_array])
    dtype = TYPES[spec.type]
    size = int(np.prod(spec.shape, dtype=np.int64))
    seed = name_seed(spec.name)
    values: np.ndarray
    if dtype.kind == "f":
        values = np.empty((len(pid_array), size), dtype=dtype)
        float_grid(seed, pid_array, values)
    else:
        h = hash_grid(seed, pid_array, size)
        if dtype.kind == "b":
            values = (h & np.uint64(1)).astype(bool)
        else:
            values = h.astype(np.dtype(f"u{dtype.itemsize}")).view(dtype)
    return values.reshape((len(pid_array), *spec.shape))


def expected_value(spec: ChannelSpec, pid: int) -> Any:
    """The value at one pulse: a numpy scalar, an array of ``spec.shape``, or a ``str``."""
    return expected_values(spec, [pid])[0]


def _string_value(name: str, pid: int) -> str:
    return f"{name} #{pid} Δ{pid % 7}" + "·" * (pid % 4)


def _image(spec: ChannelSpec, pid: int) -> np.ndarray:
    base = _image_base(spec.name, spec.shape, spec.type)
    image: np.ndarray = np.roll(base, pid % spec.shape[1], axis=1) + base.dtype.type(pid % 64)
    return image


@lru_cache(maxsize=16)
def _image_base(name: str, shape: tuple[int, ...], type_name: str) -> np.ndarray:
    height, width = shape
    dtype = TYPES[type_name]
    index = np.arange(height * width, dtype=np.uint64).reshape(height, width)
    noise = mix64(np.uint64(name_seed(name)) + index * np.uint64(ELEMENT_STEP)) >> np.uint64(58)
    y, x = np.ogrid[:height, :width]
    radius2 = max(2, min(height, width) // 6) ** 2
    distance2 = (y - height // 2) ** 2 + (x - width // 3) ** 2
    amplitude = max(0, min(4000, int(np.iinfo(dtype).max) - 127))
    spot = amplitude * np.maximum(0, radius2 - distance2) // radius2
    base: np.ndarray = (noise.astype(np.int64) + spot).astype(dtype)
    base.setflags(write=False)
    return base
