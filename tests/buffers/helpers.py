"""Constants and helpers shared by the buffer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from aiohttp import web
from aiohttp.test_utils import TestServer

from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer

#: 2021-08-17T13:00:00Z, the moment of the start pulse in every test.
T0_MS = 1_629_205_200_000
P0 = 15_000_000_000


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free local port; yields its base URL."""
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


#: The ``api1_buffer`` fixture: ``async with api1_buffer(channels, **options) as (buffer, url)``.
StartBuffer = Callable[..., AbstractAsyncContextManager[tuple[SimulatedApi1Buffer, str]]]
