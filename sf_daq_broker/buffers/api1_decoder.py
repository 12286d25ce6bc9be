"""Incremental decoder of an api/1 reply body: bytes in, channel headers and event batches out.

It does no I/O, so it is tested byte by byte without a server, and the HTTP client only feeds
it whatever chunks arrive. Events of fixed size (uncompressed numbers, waveforms, bools) are
decoded many at a time through a packed numpy dtype of the whole frame, with every frame's two
length fields and mtype checked in the same vectorised step; anything else (headers, strings,
compressed values, a frame that does not fit) goes through the frame-by-frame path, which is
also the one that reports corruption precisely.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sf_daq_broker.buffers.api1_format import (
    EVENT_PREFIX,
    MAX_FRAME_BYTES,
    MTYPE_EVENT,
    MTYPE_HEADER,
    ChannelHeader,
    decompress_value,
    fixed_event_dtype,
)
from sf_daq_broker.buffers.errors import CorruptStream, StreamCut

_EVENT_HEAD = struct.Struct(">qq")


@dataclass
class EventBatch:
    """Consecutive events of one channel.

    ``values`` holds decoded values, shape ``(N, *header.shape)``, native byte order (an
    object array of ``str`` for strings). When the decoder was asked not to decompress,
    compressed values are in ``blobs`` instead, exactly as received (12-byte header included:
    an HDF5 bitshuffle chunk) and ``values`` is None.
    """

    header: ChannelHeader
    pulse_id: np.ndarray
    timestamp: np.ndarray
    values: np.ndarray | None
    blobs: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.pulse_id)


@dataclass
class _Pending:
    """Events decoded one by one, waiting to become an EventBatch."""

    pulse_ids: list[int] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)


class FrameDecoder:
    """Feed it the reply body in chunks; it returns what became complete."""

    def __init__(self, *, decompress: bool = True, source: str = "api/1 buffer") -> None:
        self._decompress = decompress
        self._source = source
        self._buffer = bytearray()
        self._header: ChannelHeader | None = None
        self._pending = _Pending()
        self._fixed_dtype: np.dtype[Any] | None = None
        self.bytes_received = 0

    @property
    def current_header(self) -> ChannelHeader | None:
        return self._header

    def feed(self, data: bytes) -> list[ChannelHeader | EventBatch]:
        """Decode every frame completed by ``data``; keep the incomplete rest for later."""
        self.bytes_received += len(data)
        self._buffer += data
        out: list[ChannelHeader | EventBatch] = []
        position = 0
        while True:
            if self._fixed_dtype is not None:
                position = self._decode_fixed(position, out)
            step = self._decode_one(position, out)
            if step == 0:
                break
            position += step
        self._flush(out)
        del self._buffer[:position]
        return out

    def finish(self) -> list[ChannelHeader | EventBatch]:
        """The body has ended: a partial frame left over means the stream was cut."""
        if self._buffer:
            raise StreamCut(
                f"{self._source}: reply ended inside a frame ({len(self._buffer)} bytes of an "
                f"incomplete frame after {self.bytes_received} bytes"
                + (f", channel {self._header.name})" if self._header else ")")
            )
        return []

    def _decode_fixed(self, position: int, out: list[ChannelHeader | EventBatch]) -> int:
        """Vectorised path for a run of fixed-size event frames; returns the new position."""
        assert self._fixed_dtype is not None and self._header is not None
        frame_size = self._fixed_dtype.itemsize
        count = (len(self._buffer) - position) // frame_size
        if count == 0:
            return position
        frames = np.frombuffer(self._buffer, dtype=self._fixed_dtype, count=count, offset=position)
        length = frame_size - 8
        good = (
            (frames["length"] == length)
            & (frames["mtype"] == MTYPE_EVENT)
            & (frames["trailer"] == length)
        )
        usable = count if bool(good.all()) else int(np.argmin(good))
        if usable:
            self._flush(out)
            out.append(self._fixed_batch(frames[:usable]))
        del frames  # release the view before the bytearray is resized
        return position + usable * frame_size

    def _fixed_batch(self, frames: np.ndarray) -> EventBatch:
        """Copy a run of fixed-size frames out of the receive buffer."""
        assert self._header is not None
        return EventBatch(
            self._header,
            frames["pulse_id"].astype(np.int64),
            frames["timestamp"].astype(np.int64),
            frames["value"].astype(self._header.native_dtype),
        )

    def _decode_one(self, position: int, out: list[ChannelHeader | EventBatch]) -> int:
        """Decode the frame at ``position``; 0 when it is not complete yet."""
        available = len(self._buffer) - position
        if available < 4:
            return 0
        (length,) = struct.unpack_from(">i", self._buffer, position)
        if length < 1 or length > MAX_FRAME_BYTES:
            raise CorruptStream(
                f"{self._source}: impossible frame length {length} at byte "
                f"{self.bytes_received - len(self._buffer) + position}"
            )
        if available < length + 8:
            return 0
        (trailer,) = struct.unpack_from(">i", self._buffer, position + 4 + length)
        if trailer != length:
            raise CorruptStream(
                f"{self._source}: frame length mismatch ({length} before, {trailer} after)"
                + (f" in channel {self._header.name}" if self._header else "")
            )
        mtype = self._buffer[position + 4]
        payload = bytes(self._buffer[position + 5 : position + 4 + length])
        if mtype == MTYPE_HEADER:
            self._start_channel(payload, out)
        elif mtype == MTYPE_EVENT:
            self._add_event(payload)
        else:
            raise CorruptStream(f"{self._source}: unknown frame type {mtype}")
        return length + 8

    def _start_channel(self, payload: bytes, out: list[ChannelHeader | EventBatch]) -> None:
        self._flush(out)
        try:
            document = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptStream(f"{self._source}: channel header is not JSON: {exc}") from exc
        header = ChannelHeader.from_json(document)
        self._header = header
        self._fixed_dtype = (
            fixed_event_dtype(header)
            if header.has_data and header.value_nbytes is not None
            else None
        )
        out.append(header)

    def _add_event(self, payload: bytes) -> None:
        header = self._header
        if header is None or not header.has_data:
            raise CorruptStream(f"{self._source}: event without a channel header before it")
        if len(payload) < EVENT_PREFIX:
            raise CorruptStream(f"{self._source}: channel {header.name}: event too short")
        timestamp, pulse_id = _EVENT_HEAD.unpack_from(payload)
        raw = payload[EVENT_PREFIX:]
        value: Any
        if header.compressed:
            value = decompress_value(raw, header) if self._decompress else raw
        elif header.type == "string":
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorruptStream(
                    f"{self._source}: channel {header.name}: pulse {pulse_id}: not UTF-8"
                ) from exc
        else:
            if len(raw) != header.value_nbytes:
                raise CorruptStream(
                    f"{self._source}: channel {header.name}: pulse {pulse_id}: value of "
                    f"{len(raw)} bytes, {header.type} shape {list(header.shape)} needs "
                    f"{header.value_nbytes}"
                )
            value = np.frombuffer(raw, dtype=header.dtype).reshape(header.shape)
        self._pending.pulse_ids.append(pulse_id)
        self._pending.timestamps.append(timestamp)
        self._pending.values.append(value)

    def _flush(self, out: list[ChannelHeader | EventBatch]) -> None:
        pending = self._pending
        if not pending.pulse_ids:
            return
        header = self._header
        assert header is not None
        pulse_id = np.array(pending.pulse_ids, dtype=np.int64)
        timestamp = np.array(pending.timestamps, dtype=np.int64)
        if header.compressed and not self._decompress:
            out.append(EventBatch(header, pulse_id, timestamp, None, list(pending.values)))
        elif header.type == "string":
            values = np.empty(len(pending.values), dtype=object)
            values[:] = pending.values
            out.append(EventBatch(header, pulse_id, timestamp, values))
        else:
            stacked = np.stack(pending.values).astype(header.native_dtype, copy=False)
            out.append(EventBatch(header, pulse_id, timestamp, stacked))
        self._pending = _Pending()
