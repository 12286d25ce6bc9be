"""api/1 events of variable size (compressed values, strings), many at a time, both directions.

Fixed-size events are one numpy dtype (``api1_format.fixed_event_dtype``). Compressed values
and strings differ in length from event to event, so the frames cannot be viewed through one
dtype, and a Python loop per event cost more than the data: a 60 000-pulse run of one
compressed 1 KiB waveform spent seconds in per-value calls (frame parsing, ``np.prod`` of the
shape, ``bitshuffle.decompress_lz4`` with an OpenMP fork/join each). Here each direction is one
numba pass per batch (the kernels are in ``api1_kernels``, imported on first use):

- ``scan_events`` walks the frames of a run of events, checks both length fields and the
  mtype of each, and returns where each value lies with its pulse id and timestamp; it stops,
  without consuming it, at the first frame that is incomplete, not an event, or malformed, so
  that the caller's frame-by-frame path handles headers and names the corruption;
- ``decompress_values`` checks each value's 12-byte header and the chain of its bitshuffle
  block lengths against the value's own bytes (so a corrupt length cannot make the C code read
  beyond the value), then calls bitshuffle's ``bshuf_decompress_lz4`` per value from numba
  into one output array: the same C function ``bitshuffle.decompress_lz4`` wraps, so the
  values are the same;
- ``encode_compressed_events`` (the simulator's side) compresses values with
  ``bshuf_compress_lz4`` straight into complete event frames.

Both C calls run single-threaded in OpenMP (``sf_daq_broker.openmp``): a value is one or a few
blocks, and a parallel region per value costs more than the value.
"""

from __future__ import annotations

import ctypes
import functools
from types import ModuleType
from typing import Any, NamedTuple

import bitshuffle.ext
import numpy as np
import numpy.typing as npt

from sf_daq_broker import openmp
from sf_daq_broker.buffers.errors import CorruptStream

#: Bytes of an event frame before its value: length, mtype, timestamp, pulse id.
EVENT_HEAD = 4 + 1 + 8 + 8
#: The smallest event frame: an empty value.
MIN_EVENT_FRAME = EVENT_HEAD + 4
#: Bytes of a compressed value's header: uncompressed bytes (u8 BE), block bytes (u4 BE).
BLOB_HEADER = 12
#: bitshuffle's blocks hold a multiple of this many elements (BSHUF_BLOCKED_MULT).
BLOCK_MULTIPLE = 8

# Reasons a compressed value is refused, returned by the kernel with the value's index.
SHORT_REFUSED, SIZE_REFUSED, BLOCK_REFUSED, STREAM_REFUSED = 1, 2, 3, 4


class ScannedEvents(NamedTuple):
    """A run of complete event frames: value ``i`` is ``buffer[value_start[i]:value_end[i]]``."""

    pulse_id: npt.NDArray[np.int64]
    timestamp: npt.NDArray[np.int64]
    value_start: npt.NDArray[np.int64]
    value_end: npt.NDArray[np.int64]
    end: int  # the position after the last frame scanned


def scan_events(buffer: npt.NDArray[np.uint8], position: int, max_frame: int) -> ScannedEvents:
    """The well-formed event frames from ``position`` on, up to the first one that is not."""
    capacity = (buffer.size - position) // MIN_EVENT_FRAME + 1
    columns = [np.empty(capacity, dtype=np.int64) for _ in range(4)]
    count, end = _kernels().scan(buffer, position, max_frame, *columns)
    value_start, value_end, pulse_id, timestamp = (column[:count] for column in columns)
    return ScannedEvents(pulse_id, timestamp, value_start, value_end, end)


@functools.cache
def _kernels() -> ModuleType:
    """The numba kernels, imported (and loaded from numba's cache) on first use."""
    from sf_daq_broker.buffers import api1_kernels

    return api1_kernels


@functools.cache
def _bitshuffle() -> Any:
    """bitshuffle's own C functions (those its Python wrappers call)."""
    library = ctypes.CDLL(bitshuffle.ext.__file__)
    for name in ("bshuf_decompress_lz4", "bshuf_compress_lz4"):
        function = getattr(library, name)
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_size_t] * 3
        function.restype = ctypes.c_int64
    library.bshuf_compress_lz4_bound.argtypes = [ctypes.c_size_t] * 3
    library.bshuf_compress_lz4_bound.restype = ctypes.c_size_t
    return library


def decompress_values(
    buffer: npt.NDArray[np.uint8],
    value_start: npt.NDArray[np.int64],
    value_end: npt.NDArray[np.int64],
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    name: str,
    type_name: str,
) -> npt.NDArray[Any]:
    """The compressed values at ``[value_start, value_end)`` of ``buffer``, decoded into one
    array ``(N, *shape)`` of ``dtype`` (the wire dtype); CorruptStream names the first bad one.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    out = np.empty((value_start.size, nbytes), dtype=np.uint8)
    with openmp.single_threaded():
        index, reason = _kernels().decompress(
            _bitshuffle().bshuf_decompress_lz4, buffer, value_start, value_end, out, dtype.itemsize
        )
    if index >= 0:
        raise CorruptStream(
            _refusal(buffer, int(value_start[index]), reason, nbytes, shape, name, type_name)
        )
    return out.view(dtype).reshape((value_start.size, *shape))


def _refusal(
    buffer: npt.NDArray[np.uint8],
    start: int,
    reason: int,
    expected: int,
    shape: tuple[int, ...],
    name: str,
    type_name: str,
) -> str:
    """Why the compressed value at ``start`` was refused, in words."""
    if reason == SHORT_REFUSED:
        return f"channel {name}: compressed value shorter than its header"
    header = buffer[start : start + BLOB_HEADER].tobytes()
    if reason == SIZE_REFUSED:
        holds = int.from_bytes(header[:8], "big")
        return (
            f"channel {name}: compressed value holds {holds} bytes, "
            f"shape {shape} of {type_name} needs {expected}"
        )
    if reason == BLOCK_REFUSED:
        return f"channel {name}: bad block size {int.from_bytes(header[8:], 'big')}"
    return f"channel {name}: cannot decompress a value: its bitshuffle-LZ4 stream is corrupt"


def encode_compressed_events(
    values: npt.NDArray[Any],
    timestamp: npt.NDArray[np.int64],
    pulse_id: npt.NDArray[np.int64],
    block_size_bytes: int,
) -> bytes:
    """Event frames of ``values`` (``(N, ...)`` in the wire dtype), each compressed as
    ``api1_format.compress_value`` does: the same bytes as ``event_frame(t, p, compress_value(v))``
    per event, without a Python call per value."""
    itemsize = values.dtype.itemsize
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1)
    elements = raw.shape[1] // itemsize
    block = block_size_bytes // itemsize
    library = _bitshuffle()
    bound = int(library.bshuf_compress_lz4_bound(elements, itemsize, block)) if elements else 0
    out = np.empty(len(values) * (MIN_EVENT_FRAME + BLOB_HEADER + bound), dtype=np.uint8)
    with openmp.single_threaded():
        size = _kernels().encode(
            library.bshuf_compress_lz4, raw, itemsize, block, timestamp, pulse_id, out
        )
    if size < 0:
        raise RuntimeError("bitshuffle+LZ4 compression failed")
    return out[:size].tobytes()
