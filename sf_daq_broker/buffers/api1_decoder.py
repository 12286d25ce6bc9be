"""Incremental decoder of an api/1 reply body: bytes in, channel headers and event batches out.

It does no I/O, so it is tested byte by byte without a server, and the HTTP client only feeds
it whatever chunks arrive. Events are decoded many at a time, never one by one in Python:
events of fixed size (uncompressed numbers, waveforms, bools) through a packed numpy dtype of
the whole frame, with every frame's two length fields and mtype checked in the same vectorised
step; events of variable size (compressed values, strings) by one numba pass over their frames
(``api1_bulk``), compressed values decompressed in bulk into one array. Either path stops at
the first frame it cannot take (a header, an incomplete frame, a malformed one); headers and
corruption go through the frame-by-frame path, which is also the one that reports corruption
precisely.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from sf_daq_broker.buffers.api1_bulk import ScannedEvents, decompress_values, scan_events
from sf_daq_broker.buffers.api1_format import (
    EVENT_PREFIX,
    MAX_FRAME_BYTES,
    MTYPE_EVENT,
    MTYPE_HEADER,
    ChannelHeader,
    fixed_event_dtype,
)
from sf_daq_broker.buffers.errors import CorruptStream, StreamCut


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


class FrameDecoder:
    """Feed it the reply body in chunks; it returns what became complete."""

    def __init__(self, *, decompress: bool = True, source: str = "api/1 buffer") -> None:
        self._decompress = decompress
        self._source = source
        self._buffer = bytearray()
        self._header: ChannelHeader | None = None
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
            position = self._decode_events(position, out)
            step = self._decode_one(position, out)
            if step == 0:
                break
            position += step
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

    def _decode_events(self, position: int, out: list[ChannelHeader | EventBatch]) -> int:
        """The run of events of the current channel from ``position``; the new position."""
        header = self._header
        if header is None or not header.has_data:
            return position
        if self._fixed_dtype is not None:
            return self._decode_fixed(position, out)
        buffer = np.frombuffer(self._buffer, dtype=np.uint8)
        events = scan_events(buffer, position, MAX_FRAME_BYTES)
        if events.pulse_id.size:
            out.append(self._variable_batch(header, buffer, events))
        del buffer  # release the view before the bytearray is resized
        return events.end

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

    def _variable_batch(
        self, header: ChannelHeader, buffer: np.ndarray, events: ScannedEvents
    ) -> EventBatch:
        """Decode (or copy, for blobs kept compressed) the values of a run of scanned events."""
        pulse_id, timestamp = events.pulse_id, events.timestamp
        spans = list(zip(events.value_start.tolist(), events.value_end.tolist(), strict=True))
        if header.compressed and not self._decompress:
            blobs = [buffer[start:end].tobytes() for start, end in spans]
            return EventBatch(header, pulse_id, timestamp, None, blobs)
        if header.compressed:
            values = decompress_values(
                buffer,
                events.value_start,
                events.value_end,
                header.dtype,
                header.shape,
                header.name,
                header.type,
            )
            native = values.astype(header.native_dtype, copy=False)
            return EventBatch(header, pulse_id, timestamp, native)
        texts = np.empty(pulse_id.size, dtype=object)
        try:
            texts[:] = [buffer[start:end].tobytes().decode("utf-8") for start, end in spans]
        except UnicodeDecodeError:
            bad = next(i for i, (s, e) in enumerate(spans) if not _utf8(buffer[s:e]))
            raise CorruptStream(
                f"{self._source}: channel {header.name}: pulse {pulse_id[bad]}: not UTF-8"
            ) from None
        return EventBatch(header, pulse_id, timestamp, texts)

    def _decode_one(self, position: int, out: list[ChannelHeader | EventBatch]) -> int:
        """Decode the frame at ``position``; 0 when it is not complete yet."""
        available = len(self._buffer) - position
        if available < 4:
            return 0
        length: int = struct.unpack_from(">i", self._buffer, position)[0]
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
            self._refuse_event(payload)
        else:
            raise CorruptStream(f"{self._source}: unknown frame type {mtype}")
        return length + 8

    def _start_channel(self, payload: bytes, out: list[ChannelHeader | EventBatch]) -> None:
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

    def _refuse_event(self, payload: bytes) -> NoReturn:
        """An event the bulk paths did not take: say what is wrong with it."""
        header = self._header
        if header is None or not header.has_data:
            raise CorruptStream(f"{self._source}: event without a channel header before it")
        if len(payload) < EVENT_PREFIX:
            raise CorruptStream(f"{self._source}: channel {header.name}: event too short")
        (pulse_id,) = struct.unpack_from(">q", payload, 8)
        raise CorruptStream(
            f"{self._source}: channel {header.name}: pulse {pulse_id}: value of "
            f"{len(payload) - EVENT_PREFIX} bytes, {header.type} shape {list(header.shape)} "
            f"needs {header.value_nbytes}"
        )


def _utf8(raw: np.ndarray) -> bool:
    try:
        raw.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
