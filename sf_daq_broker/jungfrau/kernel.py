"""The numba kernel: one pass over a batch of raw frames, each pixel read once, written once.

Bit-exactness rules (JUNGFRAU.md §3): float32 arithmetic, subtract then multiply by the stored
reciprocal, no fast-math (it would allow reassociation and fused multiply-add), rounding of
``factor`` output half to even with the reference's wrap-around and NaN/inf -> 0.

Speed: the constants (pedestal, reciprocal gain, good-pixel mask) are laid out in *output*
order, so their loads are contiguous for every geometry; the gain plane is chosen with selects
over three contiguous loads rather than a gather, which lets LLVM vectorise the loop; each task
(a band of output rows, see ``plan.py``) runs through all frames of the batch while its
constants stay in cache; indices are cast to unsigned so numba adds no negative-index checks.

One driver, ``convert``, serves the three output dtypes (float32; int32 with ``factor``; uint16
copies without ``adc_to_energy``): the per-pixel function ``_pixel`` is a numba ``overload``
chosen by the output's dtype when numba compiles the driver for it, so each dtype gets its own
machine code (and cache entry) from one source, without a runtime branch per pixel. A factory
of closures would do the same, but numba never reuses cached closures, so every process would
recompile them. The ``njit`` helpers are inlined by numba (``inline="always"``): calls to
separately compiled ``njit`` functions are not inlined by LLVM, and a call per pixel is 50
times slower. The two overloads are not (numba's IR inliner trips its own scope check on the
nested inline helpers); their code is compiled into the driver's LLVM module, which inlines
it: measured the same speed as the former per-dtype drivers (bench/bench_conversion.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit, prange, types
from numba.extending import overload

from sf_daq_broker.jungfrau.plan import COUNT, LENGTH, OUT, OUT_STEP, PAD, SRC, SRC_STEP, STRIDE
from sf_daq_broker.jungfrau.transpose import transpose8

_JIT: dict[str, Any] = {
    "cache": True,
    "error_model": "numpy",
    "boundscheck": False,
    "nogil": True,
}

_INT32_SPAN = np.float32(2.0**31)
_INT64_SPAN = np.float32(2.0**63)

Table = npt.NDArray[np.float32]


@njit(inline="always", **_JIT)
def _energy(v: Any, j: Any, p0: Any, p1: Any, p2: Any, g0: Any, g1: Any, g2: Any) -> Any:
    """(float32(adc) - P[code]) * G[code]; codes 2 and 3 share plane 2.

    All six constants are loaded and then selected: conditional loads would keep LLVM from
    vectorising the loop (it cannot prove them safe to execute speculatively).
    """
    code = v >> 14
    q0, q1, q2 = p0[j], p1[j], p2[j]
    h0, h1, h2 = g0[j], g1[j], g2[j]
    p = q0 if code == 0 else (q1 if code == 1 else q2)
    g = h0 if code == 0 else (h1 if code == 1 else h2)
    return (np.float32(v & 0x3FFF) - p) * g


@njit(inline="always", **_JIT)
def _to_int32(value: Any) -> Any:
    """``np.rint(value).astype(np.int64).astype(np.int32)`` without undefined behaviour."""
    rounded = np.rint(value)
    if -_INT32_SPAN <= rounded < _INT32_SPAN:
        return np.int32(rounded)
    if -_INT64_SPAN < rounded < _INT64_SPAN:  # wraps modulo 2**32 like the reference
        return np.int32(np.int64(rounded))
    return np.int32(0)  # NaN, +-inf, beyond int64: the reference's int64 is -2**63 -> 0


@njit(inline="always", **_JIT)
def _is_plain(record: Any) -> Any:
    """A run read in place: stride 1, one row."""
    return record[STRIDE] == 1 and record[COUNT] == 1


@njit(inline="always", **_JIT)
def _gather(r: Any, record: Any, scratch: Any) -> None:
    """Copy a reversed run or a tile of raw columns into ``scratch``, row after row.

    Row k of the record lands at ``scratch[k*length : (k+1)*length]``. A tile of a
    quarter-turned module (rows and length multiples of 8, neighbouring raw columns) is
    transposed 8 x 8 values at a time in vector registers (``transpose8``); anything else
    value by value, reading the raw frame along its rows.
    """
    length = record[LENGTH]
    count = record[COUNT]
    src = record[SRC]
    stride = record[STRIDE]
    src_step = record[SRC_STEP]
    if length % 8 == 0 and count % 8 == 0 and (src_step == 1 or src_step == -1):
        for k0 in range(0, count, 8):
            for i0 in range(0, length, 8):
                if src_step == 1:  # raw columns k0..k0+7 ascending: row j -> scratch row k0+j
                    first, at, step = src + i0 * stride + k0, k0 * length + i0, length
                else:  # descending: the 8 values start at column k0+7, row j -> k0+7-j
                    first, at, step = src + i0 * stride - k0 - 7, (k0 + 7) * length + i0, -length
                transpose8(r, first, stride, scratch, at, step)  # type: ignore[call-arg]
        return
    for i in range(length):
        base = src + i * stride
        for k in range(count):
            scratch[np.uint64(k * length + i)] = r[np.uint64(base + k * src_step)]


@njit(inline="always", **_JIT)
def _zero(o: Any, record: Any) -> None:
    first = np.uint64(record[OUT])
    for i in range(np.uint64(record[LENGTH])):
        o[first + i] = 0


def _pixel(v: Any, j: Any, p0: Any, p1: Any, p2: Any, g0: Any, g1: Any, g2: Any, o: Any) -> Any:
    """The output value of raw value ``v`` at output index ``j`` for an output row ``o``.

    A stub: numba picks the implementation by ``o``'s dtype (``_pixel_for``) when it compiles
    the driver for that dtype, so the three output kinds share one driver.
    """
    raise NotImplementedError("only callable from numba-compiled code")


def _empty(o: Any) -> Any:
    """The value of a pixel that is not computed (masked, gap, empty space): 0 of o's dtype."""
    raise NotImplementedError("only callable from numba-compiled code")


# numba checks that an implementation's parameters equal the typing function's, annotations
# included: hence the annotated inner functions rather than lambdas.
@overload(_pixel)
def _pixel_for(v: Any, j: Any, p0: Any, p1: Any, p2: Any, g0: Any, g1: Any, g2: Any, o: Any) -> Any:
    if o.dtype == types.float32:

        def energy(
            v: Any, j: Any, p0: Any, p1: Any, p2: Any, g0: Any, g1: Any, g2: Any, o: Any
        ) -> Any:
            return _energy(v, j, p0, p1, p2, g0, g1, g2)

        return energy
    if o.dtype == types.int32:

        def rounded(
            v: Any, j: Any, p0: Any, p1: Any, p2: Any, g0: Any, g1: Any, g2: Any, o: Any
        ) -> Any:
            return _to_int32(_energy(v, j, p0, p1, p2, g0, g1, g2))

        return rounded
    if o.dtype == types.uint16:

        def copied(
            v: Any, j: Any, p0: Any, p1: Any, p2: Any, g0: Any, g1: Any, g2: Any, o: Any
        ) -> Any:
            return v  # adc_to_energy false: the raw value, gain bits included

        return copied
    return None


@overload(_empty)
def _empty_for(o: Any) -> Any:
    zeros = {types.float32: np.float32(0), types.int32: np.int32(0), types.uint16: np.uint16(0)}
    zero = zeros.get(o.dtype)
    if zero is None:
        return None

    def empty(o: Any) -> Any:
        return zero

    return empty


@njit(parallel=True, **_JIT)
def convert(
    raw: Any, out: Any, records: Any, task_start: Any, p: Table, g: Table, good: Any, scratch: int
) -> None:
    """raw (N, raw pixels) uint16 -> out (N, output pixels): float32 keV, int32 (keV / factor,
    rounded) or uint16 (values copied), by ``out``'s dtype (one compiled version each)."""
    last_p, last_g = p.shape[0] - 1, g.shape[0] - 1
    p0, p1, p2 = p[0], p[min(1, last_p)], p[min(2, last_p)]
    g0, g1, g2 = g[0], g[min(1, last_g)], g[min(2, last_g)]
    for task in prange(task_start.size - 1):
        buffer = np.empty(scratch, dtype=np.uint16)
        first_record = task_start[task]
        if records[first_record][COUNT] > 1:  # a tile: transposed, two frames at a time
            record = records[first_record]
            other = np.empty(scratch, dtype=np.uint16)
            last = raw.shape[0] - 1
            for frame in range(0, raw.shape[0], 2):
                second = min(frame + 1, last)  # an odd batch converts its last frame twice
                _gather(raw[frame], record, buffer)
                _gather(raw[second], record, other)
                _from_buffers(
                    buffer, other, record, out[frame], out[second], p0, p1, p2, g0, g1, g2, good
                )
            continue
        for frame in range(raw.shape[0]):
            r = raw[frame]
            o = out[frame]
            nothing = _empty(o)
            for q in range(first_record, task_start[task + 1]):
                record = records[q]
                if record[SRC] < 0:
                    _zero(o, record)
                elif _is_plain(record):
                    first = np.uint64(record[OUT])
                    base = np.uint64(record[SRC])
                    for i in range(np.uint64(record[LENGTH])):
                        j = first + i
                        value = _pixel(r[base + i], j, p0, p1, p2, g0, g1, g2, o)
                        o[j] = value if good[j] else nothing
                else:
                    _gather(r, record, buffer)
                    _from_buffer(buffer, record, o, p0, p1, p2, g0, g1, g2, good)


@njit(inline="always", **_JIT)
def _from_buffer(
    buffer: Any,
    record: Any,
    o: Any,
    p0: Any,
    p1: Any,
    p2: Any,
    g0: Any,
    g1: Any,
    g2: Any,
    good: Any,
) -> None:
    """Convert the raw values ``_gather`` put into ``buffer`` into the record's output rows.

    For a band's gathered runs, one frame at a time; tiles go through ``_from_buffers`` (two
    frames per pass, and the PAD zeros that only tiles carry, see ``plan._absorb_gaps``). The
    two stay separate on purpose: one frame through the two-frame loop would convert it twice.
    """
    nothing = _empty(o)
    length = record[LENGTH]
    for k in range(record[COUNT]):
        first = np.uint64(record[OUT] + k * record[OUT_STEP])
        at = np.uint64(k * length)
        for i in range(np.uint64(length)):
            j = first + i
            value = _pixel(buffer[at + i], j, p0, p1, p2, g0, g1, g2, o)
            o[j] = value if good[j] else nothing


@njit(inline="always", **_JIT)
def _from_buffers(
    buffer: Any,
    other: Any,
    record: Any,
    o: Any,
    o2: Any,
    p0: Any,
    p1: Any,
    p2: Any,
    g0: Any,
    g1: Any,
    g2: Any,
    good: Any,
) -> None:
    """``_from_buffer`` of two frames' tiles in one loop: each pixel's constants are loaded
    once for both frames (half the cache traffic of the constants, 25 bytes per pixel)."""
    nothing = _empty(o)
    length = record[LENGTH]
    for k in range(record[COUNT]):
        first = np.uint64(record[OUT] + k * record[OUT_STEP])
        at = np.uint64(k * length)
        for i in range(np.uint64(length)):
            j = first + i
            value = _pixel(buffer[at + i], j, p0, p1, p2, g0, g1, g2, o)
            value2 = _pixel(other[at + i], j, p0, p1, p2, g0, g1, g2, o)
            keep = good[j]
            o[j] = value if keep else nothing
            o2[j] = value2 if keep else nothing
        for i in range(np.uint64(record[PAD])):
            o[first + length + i] = nothing
            o2[first + length + i] = nothing


@njit(parallel=True, **_JIT)
def place(planes: Any, source: Any, fill: Any, out: Any) -> None:
    """out[k, j] = planes[k, source[j]], or ``fill`` where source[j] < 0 (gaps, empty space).

    Lays out the per-pixel constants like the output, once per converter. A rotated layout
    makes this a cache-hostile gather; numpy's ``take`` needs about 0.5 s per plane of a
    32-module detector, this about a tenth of that on two threads.
    """
    n = source.size
    chunk = 1 << 16
    for c in prange((n + chunk - 1) // chunk):
        for j in range(c * chunk, min(n, (c + 1) * chunk)):
            s = source[j]
            for k in range(planes.shape[0]):
                out[k, j] = planes[k, s] if s >= 0 else fill
