"""The numba kernels of ``api1_bulk``, in a module of their own: imported on first use, so a
process that never decodes a variable-size api/1 event (a worker starting, ``--help``) does
not load numba. Compiled once and cached on disk (``cache=True``); bitshuffle's C functions
come in as arguments (a ctypes function given as a global could not be cached).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from sf_daq_broker.buffers.api1_bulk import (
    BLOB_HEADER,
    BLOCK_MULTIPLE,
    BLOCK_REFUSED,
    EVENT_HEAD,
    SHORT_REFUSED,
    SIZE_REFUSED,
    STREAM_REFUSED,
)


@njit(cache=True, inline="always")
def _unsigned_be(buffer: Any, at: int, size: int) -> Any:
    value = np.uint64(0)
    for i in range(size):
        value = (value << np.uint64(8)) | np.uint64(buffer[at + i])
    return value


@njit(cache=True, inline="always")
def _int32_be(buffer: Any, at: int) -> Any:
    value = np.int64(_unsigned_be(buffer, at, 4))
    return value - (np.int64(1) << 32) if value >= (np.int64(1) << 31) else value


@njit(cache=True, inline="always")
def _put_be(buffer: Any, at: int, value: Any, size: int) -> None:
    value = np.uint64(value)
    for i in range(size - 1, -1, -1):
        buffer[at + i] = np.uint8(value & np.uint64(0xFF))
        value >>= np.uint64(8)


@njit(cache=True, nogil=True)
def scan(
    buffer: Any,
    position: int,
    max_frame: int,
    value_start: Any,
    value_end: Any,
    pulse_id: Any,
    timestamp: Any,
) -> tuple[int, int]:
    size = buffer.size
    count = 0
    while count < value_start.size and position + 4 <= size:
        length = _int32_be(buffer, position)
        if length < EVENT_HEAD - 4 or length > max_frame:
            break
        end = position + 4 + length
        if end + 4 > size or buffer[position + 4] != 1 or _int32_be(buffer, end) != length:
            break
        timestamp[count] = np.int64(_unsigned_be(buffer, position + 5, 8))
        pulse_id[count] = np.int64(_unsigned_be(buffer, position + 13, 8))
        value_start[count] = position + EVENT_HEAD
        value_end[count] = end
        count += 1
        position = end + 4
    return count, position


@njit(cache=True, nogil=True)
def decompress(
    function: Any,
    buffer: Any,
    value_start: Any,
    value_end: Any,
    out: Any,
    itemsize: int,
) -> tuple[int, int]:
    expected = out.shape[1]
    elements = expected // itemsize
    for i in range(value_start.size):
        start, end = value_start[i], value_end[i]
        if end - start < BLOB_HEADER:
            return i, SHORT_REFUSED
        if _unsigned_be(buffer, start, 8) != np.uint64(expected):
            return i, SIZE_REFUSED
        block_bytes = np.int64(_unsigned_be(buffer, start + 8, 4))
        block = block_bytes // itemsize
        if block_bytes <= 0 or block_bytes % itemsize or block % BLOCK_MULTIPLE:
            return i, BLOCK_REFUSED
        last = elements % block
        blocks = elements // block + (1 if last >= BLOCK_MULTIPLE else 0)
        at = start + BLOB_HEADER
        for _ in range(blocks):
            if at + 4 > end:
                return i, STREAM_REFUSED
            at += 4 + np.int64(_unsigned_be(buffer, at, 4))
        if at + (elements % BLOCK_MULTIPLE) * itemsize != end:
            return i, STREAM_REFUSED
        if elements:
            source = buffer[start + BLOB_HEADER :].ctypes.data
            read = function(source, out[i].ctypes.data, elements, itemsize, block)
            if read != end - start - BLOB_HEADER:
                return i, STREAM_REFUSED
    return -1, 0


@njit(cache=True, nogil=True)
def encode(
    function: Any,
    values: Any,
    itemsize: int,
    block: int,
    timestamp: Any,
    pulse_id: Any,
    out: Any,
) -> int:
    nbytes = values.shape[1]
    at = 0
    for i in range(values.shape[0]):
        stream = at + EVENT_HEAD + BLOB_HEADER
        written = 0
        if nbytes:
            written = function(
                values[i].ctypes.data, out[stream:].ctypes.data, nbytes // itemsize, itemsize, block
            )
            if written < 0:
                return -1
        length = EVENT_HEAD - 4 + BLOB_HEADER + written
        _put_be(out, at, length, 4)
        out[at + 4] = 1
        _put_be(out, at + 5, timestamp[i], 8)
        _put_be(out, at + 13, pulse_id[i], 8)
        _put_be(out, at + EVENT_HEAD, nbytes, 8)
        _put_be(out, at + EVENT_HEAD + 8, block * itemsize, 4)
        _put_be(out, at + 4 + length, length, 4)
        at += length + 8
    return at
