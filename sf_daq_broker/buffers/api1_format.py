"""The api/1 binary frame format (BUFFERS.md §2), shared by the client and the simulator.

A reply body is a sequence of frames ``>i4 L | i1 mtype | payload (L-1 bytes) | >i4 L``.
mtype 0 carries a channel header (UTF-8 JSON), mtype 1 an event
``>i8 timestamp_ns | >i8 pulse_id | value``. A value is raw bytes in the channel's byte order
or, when compressed, ``>u8 uncompressed_nbytes | >u4 block_size_bytes | bitshuffle-LZ4 stream``
— the chunk format of the HDF5 bitshuffle filter, so image blobs can be written to HDF5 as they
arrive.

This module knows the wire format only; it does no I/O.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Literal

import bitshuffle
import numpy as np

from sf_daq_broker.buffers.api1_bulk import decompress_values
from sf_daq_broker.buffers.errors import CorruptStream, UnsupportedFormat

MTYPE_HEADER = 0
MTYPE_EVENT = 1
#: Bytes of one frame around its payload: leading length, mtype, trailing length.
FRAME_OVERHEAD = 4 + 1 + 4
#: Bytes of an event payload before its value: timestamp and pulse id.
EVENT_PREFIX = 16
#: Bytes before the bitshuffle-LZ4 stream of a compressed value.
BLOB_HEADER = struct.Struct(">QI")
#: Block size of compressed values in real data (bytes, not elements).
BLOCK_SIZE_BYTES = 8192
#: A frame longer than this is taken as corruption rather than allocated.
MAX_FRAME_BYTES = 1 << 30

ByteOrder = Literal["BIG_ENDIAN", "LITTLE_ENDIAN"]
BYTE_ORDERS: dict[str, Literal[">", "<"]] = {"BIG_ENDIAN": ">", "LITTLE_ENDIAN": "<"}

#: api/1 type name → numpy dtype (byte order applied separately). ``string`` is UTF-8 text.
TYPES: dict[str, np.dtype[Any]] = {
    "uint8": np.dtype("u1"),
    "int8": np.dtype("i1"),
    "uint16": np.dtype("u2"),
    "int16": np.dtype("i2"),
    "uint32": np.dtype("u4"),
    "int32": np.dtype("i4"),
    "uint64": np.dtype("u8"),
    "int64": np.dtype("i8"),
    "float32": np.dtype("f4"),
    "float64": np.dtype("f8"),
    "bool": np.dtype("?"),
    "string": np.dtype(object),
}


@dataclass(frozen=True)
class ChannelHeader:
    """One channel's header frame, decoded.

    ``shape`` is the numpy shape of one value: ``()`` scalar, ``(n,)`` waveform, ``(H, W)``
    image (the wire lists images width first). ``has_data`` is false for a header that only
    names the channel (older servers' way of saying "no data").
    """

    name: str
    type: str = "float64"
    byte_order: ByteOrder = "BIG_ENDIAN"
    shape: tuple[int, ...] = ()
    compressed: bool = False
    has_data: bool = True

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of a value on the wire (with its byte order; object for strings)."""
        base = TYPES[self.type]
        if self.type == "string":
            return base
        return base.newbyteorder(BYTE_ORDERS[self.byte_order])

    @property
    def native_dtype(self) -> np.dtype[Any]:
        """The dtype decoded values are returned in (native byte order)."""
        return TYPES[self.type]

    @property
    def value_nbytes(self) -> int | None:
        """Bytes of one uncompressed value, or None when values vary in size."""
        if self.compressed or self.type == "string":
            return None
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        """The header object as servers send it (images width first)."""
        if not self.has_data:
            return {"name": self.name}
        wire_shape = list(self.shape[::-1]) if len(self.shape) == 2 else list(self.shape)
        return {
            "name": self.name,
            "type": self.type,
            "byteOrder": self.byte_order,
            "shape": wire_shape,
            "compression": 1 if self.compressed else 0,
        }

    @classmethod
    def from_json(cls, document: Any) -> ChannelHeader:
        """Decode a header object; raises CorruptStream/UnsupportedFormat naming the problem."""
        if not isinstance(document, dict) or not isinstance(document.get("name"), str):
            raise CorruptStream(f"channel header without a name: {document!r}")
        name: str = document["name"]
        if "type" not in document:
            return cls(name=name, has_data=False)
        type_name = document["type"]
        if type_name not in TYPES:
            raise UnsupportedFormat(f"channel {name}: unknown type {type_name!r}")
        byte_order = document.get("byteOrder", "BIG_ENDIAN")
        if byte_order not in BYTE_ORDERS:
            raise UnsupportedFormat(f"channel {name}: unknown byteOrder {byte_order!r}")
        compressed = _decode_compression(name, document.get("compression"))
        shape = _decode_shape(name, document.get("shape"), compressed)
        if type_name == "string" and (compressed or shape):
            raise UnsupportedFormat(f"channel {name}: only scalar uncompressed strings are known")
        return cls(name, type_name, byte_order, shape, compressed)


def _decode_compression(name: str, value: Any) -> bool:
    if value in (None, 0, "0", "none"):
        return False
    if value in (1, "1", "bitshuffle_lz4"):
        return True
    raise UnsupportedFormat(f"channel {name}: unknown compression {value!r}")


def _decode_shape(name: str, value: Any, compressed: bool) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
    ):
        raise CorruptStream(f"channel {name}: bad shape {value!r}")
    if value == [1] and not compressed:
        return ()  # legacy scalar
    if len(value) > 2:
        raise UnsupportedFormat(f"channel {name}: shape {value!r} has more than 2 dimensions")
    return tuple(value[::-1])  # images arrive width first


def header_frame(header: ChannelHeader) -> bytes:
    """A complete mtype-0 frame for ``header``."""
    payload = json.dumps(header.to_json(), separators=(",", ":")).encode()
    length = 1 + len(payload)
    return struct.pack(">ib", length, MTYPE_HEADER) + payload + struct.pack(">i", length)


def event_frame(timestamp_ns: int, pulse_id: int, value: bytes) -> bytes:
    """A complete mtype-1 frame carrying already encoded value bytes."""
    length = 1 + EVENT_PREFIX + len(value)
    return (
        struct.pack(">ibqq", length, MTYPE_EVENT, timestamp_ns, pulse_id)
        + value
        + struct.pack(">i", length)
    )


def fixed_event_dtype(header: ChannelHeader) -> np.dtype[Any]:
    """Packed numpy dtype of one whole event frame of a fixed-size channel.

    Lets both sides encode or decode thousands of scalar or waveform events in one numpy
    operation instead of a Python loop per event.
    """
    if header.value_nbytes is None:
        raise ValueError(f"channel {header.name}: events have no fixed size")
    return np.dtype(
        [
            ("length", ">i4"),
            ("mtype", "i1"),
            ("timestamp", ">i8"),
            ("pulse_id", ">i8"),
            ("value", header.dtype, header.shape),
            ("trailer", ">i4"),
        ]
    )


def compress_value(array: np.ndarray, block_size_bytes: int = BLOCK_SIZE_BYTES) -> bytes:
    """The compressed value bytes: 12-byte header then ``bitshuffle.compress_lz4``.

    ``array`` must already be in the wire byte order; bitshuffle only sees bytes and item size.
    """
    array = np.ascontiguousarray(array).reshape(-1)  # bitshuffle sees a flat run of items
    block = block_size_bytes // array.dtype.itemsize
    stream = bitshuffle.compress_lz4(array, block)
    return BLOB_HEADER.pack(array.nbytes, block_size_bytes) + bytes(stream.tobytes())


def decompress_value(blob: bytes | memoryview, header: ChannelHeader) -> np.ndarray:
    """Decode a compressed value into a native-byte-order array of the header's shape.

    One value through the decoder's bulk path (``api1_bulk.decompress_values``), so a single
    value and a stream of them are checked and decoded by the same code.
    """
    buffer = np.frombuffer(blob, dtype=np.uint8)
    values = decompress_values(
        buffer,
        np.zeros(1, dtype=np.int64),
        np.full(1, buffer.size, dtype=np.int64),
        header.dtype,
        header.shape,
        header.name,
        header.type,
    )
    value: np.ndarray = values[0].astype(header.native_dtype, copy=False)
    return value
