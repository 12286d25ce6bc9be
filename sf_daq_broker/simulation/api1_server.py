"""Simulated data buffer and image buffer: the api/1 HTTP protocol of BUFFERS.md §2.

One class, two instances: the data buffer serves beam-synchronous channels, the image buffer
camera channels; only the channel set differs. Both also answer the pulse map (§1) from the
same clock.

What a query returns: for each requested channel, its events with a timestamp in the half-open
range ``[startDate, endDate)``, limited to what the buffer holds — pulses from
``first_pulse_id`` (the simulation start) or the retention window, whichever is newer, up to
``clock - ingestion_lag`` — with the injected faults applied. The reply is streamed in batches
of about ``batch_bytes``; a batch is encoded in a worker thread (images are compressed there)
so a large reply neither fills memory nor stalls the event loop.

The pulse map knows a pulse once the buffer has ingested it (``pid <= clock - ingestion_lag``):
a worker that waits for the map to know ``stop + 1`` can then be sure the data is there. With
no ingestion lag that is exactly "the clock has reached it".
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from aiohttp import web

from sf_daq_broker.buffers.api1_bulk import encode_compressed_events
from sf_daq_broker.buffers.api1_format import (
    BLOCK_SIZE_BYTES,
    ChannelHeader,
    event_frame,
    fixed_event_dtype,
    header_frame,
)
from sf_daq_broker.buffers.dates import date_to_ns
from sf_daq_broker.simulation.channels import ChannelSpec, channel_pulse_ids, expected_values
from sf_daq_broker.simulation.clock import PulseClock, PulseTiming
from sf_daq_broker.simulation.faults import Api1Faults

log = logging.getLogger(__name__)

#: Default retention: one hour at 100 Hz.
DEFAULT_RETENTION_PULSES = 360_000
_MAX_STATUSES = 1000


class SimulatedApi1Buffer:
    """The state behind one api/1 server: channels, clock, lag, retention, faults."""

    def __init__(
        self,
        channels: Iterable[ChannelSpec],
        clock: PulseClock,
        *,
        name: str = "data buffer",
        ingestion_lag_pulses: int = 0,
        retention_pulses: int = DEFAULT_RETENTION_PULSES,
        first_pulse_id: int | None = None,
        batch_bytes: int = 1 << 20,
    ) -> None:
        self.channels: dict[str, ChannelSpec] = {spec.name: spec for spec in channels}
        self.clock = clock
        self.name = name
        self.ingestion_lag_pulses = ingestion_lag_pulses
        self.retention_pulses = retention_pulses
        self.first_pulse_id = clock.start_pulse_id if first_pulse_id is None else first_pulse_id
        self.batch_bytes = batch_bytes
        self.faults = Api1Faults()
        self.statuses: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.queries = 0

    @property
    def timing(self) -> PulseTiming:
        return self.clock.timing

    def newest_pulse_id(self) -> int:
        """The newest pulse the buffer has ingested."""
        return self.clock.current_pulse_id() - self.ingestion_lag_pulses

    def oldest_pulse_id(self) -> int:
        """The oldest pulse still in the buffer."""
        return max(self.first_pulse_id, self.newest_pulse_id() - self.retention_pulses + 1)

    def map_pulse(self, pid: int) -> int | None:
        """The pulse map: timestamp of ``pid`` in ns, None when the buffer does not know it."""
        if pid < 0 or pid > self.newest_pulse_id():
            return None
        return self.timing.ts_ns(pid)

    def event_pulse_ids(self, channel: str, first: int, last: int) -> np.ndarray:
        """Pulse ids a query for ``[first, last]`` returns for ``channel``, in reply order.

        Includes the buffer's holdings and the injected gaps, duplicates and out-of-order
        pulses, so tests can compute exactly what a reply holds.
        """
        spec = self.channels[channel]
        pids = channel_pulse_ids(
            spec, max(first, self.oldest_pulse_id()), min(last, self.newest_pulse_id())
        )
        gaps = self.faults.gaps_for(channel)
        if gaps is not None:
            pids = pids[~gaps.mask(pids)]
        duplicates = self.faults.duplicates_for(channel)
        if duplicates is not None:
            pids = np.repeat(pids, 1 + duplicates.mask(pids).astype(np.int64))
        out_of_order = self.faults.out_of_order_for(channel)
        if out_of_order is not None:
            late = out_of_order.mask(pids)
            pids = np.concatenate([pids[~late], pids[late]])
        return pids

    def serves(self, channel: str) -> bool:
        return channel in self.channels and channel not in self.faults.missing_channels

    def remember_status(self, request_id: str, status: dict[str, Any]) -> None:
        self.statuses[request_id] = status
        while len(self.statuses) > _MAX_STATUSES:
            self.statuses.popitem(last=False)


def encode_events(spec: ChannelSpec, pids: np.ndarray, timing: PulseTiming) -> bytes:
    """The event frames of ``spec`` at ``pids``, concatenated (BUFFERS.md §2).

    Fixed-size values through one packed dtype, compressed ones through one numba pass
    (``api1_bulk.encode_compressed_events``: the bytes of ``compress_value`` per event); only
    strings are encoded one by one.
    """
    header = spec.header
    timestamps = timing.ts_ns_array(pids)
    values = expected_values(spec, pids)
    if header.value_nbytes is not None:
        frames = np.empty(len(pids), dtype=fixed_event_dtype(header))
        length = frames.dtype.itemsize - 8
        frames["length"] = length
        frames["mtype"] = 1
        frames["timestamp"] = timestamps
        frames["pulse_id"] = pids
        frames["value"] = values
        frames["trailer"] = length
        return frames.tobytes()
    if header.compressed:
        wire = np.asarray(values, dtype=header.dtype)
        return encode_compressed_events(wire, timestamps, np.asarray(pids), BLOCK_SIZE_BYTES)
    parts = [
        event_frame(timestamp, pid, value.encode())
        for timestamp, pid, value in zip(timestamps.tolist(), pids.tolist(), values, strict=True)
    ]
    return b"".join(parts)


def _events_per_batch(spec: ChannelSpec, batch_bytes: int) -> int:
    header = spec.header
    if header.type == "string":
        per_event = 80
    else:
        per_event = 25 + int(np.prod(spec.shape, dtype=np.int64)) * header.dtype.itemsize
    return max(1, batch_bytes // per_event)


class _CutReply(Exception):
    """The injected stream cut happened; the handler stops writing."""


class _ReplyWriter:
    """Writes the reply body, cutting it after a given number of bytes when asked to."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        cut: tuple[int, Literal["abort", "eof"]] | None,
    ) -> None:
        self._request = request
        self._response = response
        self._cut = cut
        self.written = 0

    async def write(self, data: bytes) -> None:
        if self._cut is not None and self.written + len(data) >= self._cut[0]:
            limit, mode = self._cut
            await self._response.write(data[: limit - self.written])
            self.written = limit
            if mode == "eof":
                await self._response.write_eof()
            elif self._request.transport is not None:
                self._request.transport.close()
            raise _CutReply
        await self._response.write(data)
        self.written += len(data)


BUFFER_KEY = web.AppKey("api1_buffer", SimulatedApi1Buffer)


def create_api1_app(buffer: SimulatedApi1Buffer) -> web.Application:
    """The aiohttp application of one simulated api/1 buffer."""
    app = web.Application()
    app[BUFFER_KEY] = buffer
    app.add_routes(
        [
            web.post("/api/1/query", _query),
            web.get("/api/1/requestStatus/{request_id}", _request_status),
            web.get("/api/1/map/pulse/{pid}", _map_pulse),
            web.get("/api/4/map/pulse/sf-databuffer/{pid}", _map_pulse),
        ]
    )
    return app


def _json_error(request_id: str, message: str, status: int) -> web.Response:
    return web.json_response({"requestId": request_id, "error": message}, status=status)


def _parse_query(document: Any) -> tuple[list[str], int, int]:
    """Channel names and the ``[start_ns, end_ns)`` range of a query body."""
    if not isinstance(document, dict):
        raise ValueError("body must be a JSON object")
    channels = document.get("channels")
    if not isinstance(channels, list) or not channels:
        raise ValueError("'channels' must be a non-empty list")
    names = []
    for entry in channels:
        name = entry.get("name") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not name:
            raise ValueError(f"bad channel entry {entry!r}")
        names.append(name)
    query_range = document.get("range")
    if not isinstance(query_range, dict):
        raise ValueError("'range' must be an object")
    try:
        start_ns = date_to_ns(query_range["startDate"])
        end_ns = date_to_ns(query_range["endDate"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"'range' needs ISO-8601 startDate and endDate ({exc})") from exc
    return names, start_ns, end_ns


async def _query(request: web.Request) -> web.StreamResponse:
    buffer = request.app[BUFFER_KEY]
    buffer.queries += 1
    request_id = uuid.uuid4().hex
    faults = buffer.faults
    if faults.reply_delay:
        await asyncio.sleep(faults.reply_delay)
    error_status = faults.take_http_error()
    if error_status is not None:
        return _json_error(request_id, "injected fault", error_status)
    try:
        names, start_ns, end_ns = _parse_query(await request.json())
    except (ValueError, json.JSONDecodeError) as exc:
        return _json_error(request_id, str(exc), 400)
    pulses = buffer.timing.pulses_in(start_ns, end_ns)
    response = web.StreamResponse(
        headers={"x-daqbuffer-request-id": request_id, "Content-Type": "application/octet-stream"}
    )
    await response.prepare(request)
    writer = _ReplyWriter(request, response, faults.take_cut())
    status: dict[str, Any] = {"error_count": 0, "warn_count": 0, "channel_not_found": 0}
    try:
        for name in names:
            await _stream_channel(buffer, name, pulses, writer, status)
    except _CutReply:
        status["errors"] = [f"reply cut after {writer.written} bytes (injected fault)"]
        status["error_count"] = 1
        buffer.remember_status(request_id, status)
        return response
    if faults.take_failed_status():
        status["errors"] = ["injected failure"]
        status["error_count"] = 1
    buffer.remember_status(request_id, status)
    await response.write_eof()
    return response


async def _stream_channel(
    buffer: SimulatedApi1Buffer,
    name: str,
    pulses: range,
    writer: _ReplyWriter,
    status: dict[str, Any],
) -> None:
    if not buffer.serves(name):
        status["channel_not_found"] += 1
        if buffer.faults.missing_style == "name_only":
            await writer.write(header_frame(ChannelHeader(name, has_data=False)))
        return
    spec = buffer.channels[name]
    pids = buffer.event_pulse_ids(name, pulses.start, pulses.stop - 1)
    if len(pids) == 0:
        return  # newer servers send nothing for a channel without data in the range
    await writer.write(header_frame(spec.header))
    step = _events_per_batch(spec, buffer.batch_bytes)
    for begin in range(0, len(pids), step):
        batch = pids[begin : begin + step]
        await writer.write(await asyncio.to_thread(encode_events, spec, batch, buffer.timing))
        if buffer.faults.batch_delay:
            await asyncio.sleep(buffer.faults.batch_delay)


async def _request_status(request: web.Request) -> web.Response:
    buffer = request.app[BUFFER_KEY]
    request_id = request.match_info["request_id"]
    status = buffer.statuses.get(request_id)
    if status is None:
        return _json_error(request_id, "unknown request id", 404)
    return web.json_response(status)


async def _map_pulse(request: web.Request) -> web.Response:
    buffer = request.app[BUFFER_KEY]
    try:
        pid = int(request.match_info["pid"])
    except ValueError:
        return web.json_response({"error": "pulse id must be an integer"}, status=400)
    timestamp = buffer.map_pulse(pid)
    if timestamp is None:
        return web.Response(status=204)
    return web.json_response(timestamp)
