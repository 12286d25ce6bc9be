"""What the HTTP buffer clients share: session ownership, timeouts, status → error mapping.

A client may be given the worker's session (one connection pool per process) or make its own,
which it then closes. Timeouts bound connecting and each read, never the whole transfer: a
long image reply is fine as long as bytes keep coming.
"""

from __future__ import annotations

from typing import Any, Self

import aiohttp

from sf_daq_broker.buffers.errors import (
    BufferRequestRejected,
    BufferServerError,
    BufferUnavailable,
    CorruptStream,
)

#: 4xx statuses that say "try again" rather than "your request is wrong".
_RETRYABLE_CLIENT_STATUSES = frozenset({408, 425, 429})


class HttpEndpoint:
    """A base URL plus the session used to reach it."""

    def __init__(
        self,
        base_url: str,
        name: str,
        session: aiohttp.ClientSession | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )

    def url(self, path: str) -> str:
        return self.base_url + path

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def get_json(self, path: str) -> Any:
        """GET a JSON document; None for 204 No Content."""
        return await self.request_json("GET", path)

    async def request_json(self, method: str, path: str, body: Any = None) -> Any:
        """Send a request, map failures to buffer errors, return the decoded JSON (or None
        for 204)."""
        try:
            async with self.session().request(
                method, self.url(path), json=body, timeout=self._timeout
            ) as response:
                await raise_for_status(response, self.name)
                if response.status == 204:
                    return None
                try:
                    return await response.json(content_type=None)
                except ValueError as exc:
                    raise CorruptStream(f"{self.name}: {path}: reply is not JSON: {exc}") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise BufferUnavailable(f"{self.name} at {self.base_url}{path}: {exc!r}") from exc


async def raise_for_status(response: aiohttp.ClientResponse, name: str) -> None:
    """Turn a non-2xx reply into BufferServerError (transient) or BufferRequestRejected."""
    if response.status < 300:
        return
    try:
        detail = (await response.text())[:500]
    except (aiohttp.ClientError, UnicodeDecodeError):
        detail = ""
    message = f"{name} at {response.url}: HTTP {response.status} {detail}".rstrip()
    if response.status >= 500 or response.status in _RETRYABLE_CLIENT_STATUSES:
        raise BufferServerError(message, response.status)
    raise BufferRequestRejected(message, response.status)


class HttpClient:
    """Base of the buffer clients: owns an ``HttpEndpoint`` and closes it, also as a context."""

    _http: HttpEndpoint

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
