"""Async client of the data buffer and the image buffer (api/1, BUFFERS.md §2).

Two ways to read a reply:

- ``async with client.query(channels, start_ns, end_ns) as reply: async for item in reply``
  streams channel headers and event batches as they arrive — memory stays bounded however long
  the range; an image worker passes ``decompress=False`` and gets the bitshuffle-LZ4 blobs
  untouched, ready for an HDF5 direct chunk write;
- ``await client.fetch(...)`` collects everything into one ``ChannelData`` per channel and then
  checks the request status — for scalars and waveforms, and for tests.

Ranges are half-open ``[start_ns, end_ns)`` in ns; for the pulses ``[start, stop]`` pass
``ts(start)`` and ``ts(stop + 1)`` (``PulseMapClient.range_ns``). Dates on the wire are
truncated to microseconds. Every failure is a ``BufferClientError`` whose ``transient`` flag
tells the worker whether to retry.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
import numpy as np

from sf_daq_broker.buffers.api1_decoder import EventBatch, FrameDecoder
from sf_daq_broker.buffers.api1_format import ChannelHeader
from sf_daq_broker.buffers.dates import ns_to_date
from sf_daq_broker.buffers.errors import (
    BufferRequestRejected,
    BufferServerError,
    BufferUnavailable,
    CorruptStream,
    RequestFailed,
    StreamCut,
)
from sf_daq_broker.buffers.http import HttpClient, HttpEndpoint, raise_for_status

REQUEST_ID_HEADER = "x-daqbuffer-request-id"


@dataclass
class ChannelData:
    """All events of one channel in a reply, in the order received.

    ``pulse_id`` and ``timestamp`` are int64 ``(N,)``; ``values`` is ``(N, *header.shape)`` in
    native byte order (object array of ``str`` for strings), or None when compressed values
    were kept as ``blobs`` (one ``bytes`` per event, HDF5 bitshuffle chunks).
    """

    header: ChannelHeader
    pulse_id: np.ndarray
    timestamp: np.ndarray
    values: np.ndarray | None
    blobs: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.pulse_id)

    @classmethod
    def from_batches(cls, header: ChannelHeader, batches: Sequence[EventBatch]) -> ChannelData:
        empty = np.empty(0, dtype=np.int64)
        pulse_id = np.concatenate([b.pulse_id for b in batches]) if batches else empty
        timestamp = np.concatenate([b.timestamp for b in batches]) if batches else empty
        if header.compressed and batches and batches[0].blobs is not None:
            blobs = [blob for b in batches for blob in b.blobs or ()]
            return cls(header, pulse_id, timestamp, None, blobs)
        if batches:
            values = np.concatenate([b.values for b in batches if b.values is not None])
        else:
            values = np.empty((0, *header.shape), dtype=header.native_dtype)
        return cls(header, pulse_id, timestamp, values)


@dataclass
class Api1Result:
    """A whole reply: the channels with data, the requested channels without, the status."""

    request_id: str | None
    channels: dict[str, ChannelData]
    missing: list[str]
    status: dict[str, Any] | None = None


@dataclass
class Api1Reply:
    """An open reply; iterate it for ``ChannelHeader`` and ``EventBatch`` items."""

    request_id: str | None
    _response: aiohttp.ClientResponse
    _decoder: FrameDecoder
    _source: str
    headers: list[ChannelHeader] = field(default_factory=list)

    @property
    def bytes_received(self) -> int:
        """Body bytes received so far."""
        return self._decoder.bytes_received

    async def __aiter__(self) -> AsyncIterator[ChannelHeader | EventBatch]:
        try:
            async for chunk in self._response.content.iter_any():
                for item in self._decoder.feed(chunk):
                    if isinstance(item, ChannelHeader):
                        self.headers.append(item)
                    yield item
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise StreamCut(
                f"{self._source}: reply cut after {self._decoder.bytes_received} bytes "
                f"(request {self.request_id}): {exc}"
            ) from exc
        except TimeoutError as exc:
            raise StreamCut(
                f"{self._source}: reply stalled after {self._decoder.bytes_received} bytes "
                f"(request {self.request_id})"
            ) from exc
        for item in self._decoder.finish():
            yield item


class Api1Client(HttpClient):
    """Client of one api/1 buffer (data buffer or image buffer)."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        name: str = "api/1 buffer",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        backend: str | None = None,
    ) -> None:
        self._http = HttpEndpoint(base_url, name, session, connect_timeout, read_timeout)
        self.name = name
        self.backend = backend

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def query_body(self, channels: Sequence[str], start_ns: int, end_ns: int) -> dict[str, Any]:
        """The JSON body of a query for ``[start_ns, end_ns)``."""
        body: dict[str, Any] = {
            "channels": list(channels),
            "range": {
                "type": "date",
                "startDate": ns_to_date(start_ns),
                "endDate": ns_to_date(end_ns),
            },
        }
        if self.backend:
            body["defaultBackend"] = self.backend
        return body

    def query(
        self,
        channels: Sequence[str],
        start_ns: int,
        end_ns: int,
        *,
        decompress: bool = True,
    ) -> _QueryContext:
        """Open a streamed reply (an async context manager yielding an ``Api1Reply``)."""
        return _QueryContext(self, self.query_body(channels, start_ns, end_ns), decompress)

    async def stream(
        self,
        channels: Sequence[str],
        start_ns: int,
        end_ns: int,
        *,
        decompress: bool = True,
    ) -> AsyncGenerator[ChannelHeader | EventBatch, None]:
        """The reply's headers and event batches as they arrive; once the body has ended, the
        request status is checked (``RequestFailed`` if the buffer reports errors)."""
        async with self.query(channels, start_ns, end_ns, decompress=decompress) as reply:
            async for item in reply:
                yield item
        await self.check_status(reply.request_id)

    async def fetch(
        self,
        channels: Sequence[str],
        start_ns: int,
        end_ns: int,
        *,
        decompress: bool = True,
        check_status: bool = True,
    ) -> Api1Result:
        """Read a whole reply into memory, then check the request status."""
        batches: dict[str, list[EventBatch]] = {}
        headers: dict[str, ChannelHeader] = {}
        async with self.query(channels, start_ns, end_ns, decompress=decompress) as reply:
            async for item in reply:
                if isinstance(item, ChannelHeader):
                    if item.has_data:
                        headers.setdefault(item.name, item)
                        batches.setdefault(item.name, [])
                else:
                    batches[item.header.name].append(item)
        data = {name: ChannelData.from_batches(headers[name], batches[name]) for name in headers}
        missing = [name for name in dict.fromkeys(channels) if name not in data]
        status = await self.check_status(reply.request_id) if check_status else None
        return Api1Result(reply.request_id, data, missing, status)

    async def check_status(self, request_id: str | None) -> dict[str, Any] | None:
        """The request's status once its reply has ended; ``RequestFailed`` if it failed."""
        if request_id is None:
            return None
        status = await self.request_status(request_id)
        if "errors" in status:
            raise RequestFailed(f"{self.name}: request {request_id} failed: {status['errors']}")
        return status

    async def request_status(self, request_id: str) -> dict[str, Any]:
        """``GET /api/1/requestStatus/{id}``; a status with an ``errors`` key means failure."""
        status = await self._http.get_json(f"/api/1/requestStatus/{request_id}")
        if not isinstance(status, dict):
            raise CorruptStream(f"{self.name}: request status is not an object: {status!r}")
        return status


class _QueryContext:
    """``async with client.query(...) as reply``: the response is released on exit."""

    def __init__(self, client: Api1Client, body: dict[str, Any], decompress: bool) -> None:
        self._client = client
        self._body = body
        self._decompress = decompress
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> Api1Reply:
        client = self._client
        http = client._http
        try:
            response = await http.session().post(
                http.url("/api/1/query"),
                data=json.dumps(self._body),
                headers={
                    "Content-Type": "application/json",
                    "Accept": "application/octet-stream",
                },
            )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise BufferUnavailable(f"{client.name} at {http.base_url}: {exc!r}") from exc
        self._response = response
        try:
            await raise_for_status(response, client.name)
        except (BufferServerError, BufferRequestRejected):
            response.release()
            raise
        return Api1Reply(
            response.headers.get(REQUEST_ID_HEADER),
            response,
            FrameDecoder(decompress=self._decompress, source=client.name),
            client.name,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._response is None:
            return
        if exc is not None:
            self._response.close()  # do not reuse a connection in an unknown state
        else:
            self._response.release()
