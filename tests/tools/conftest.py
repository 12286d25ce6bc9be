"""Fixtures of the tool tests: the real broker on a real port and a pulse-id server.

The tools are HTTP clients, so they are tested against the broker application itself
(``create_app``) served on 127.0.0.1 — in the test's event loop, so a tool called in a thread or
a subprocess talks to it while the test drives the status events as a worker would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sf_daq_broker.api.app import create_app
from sf_daq_broker.config import Settings
from sf_daq_broker.transport import Transport
from sf_daq_broker.transport.embedded import EmbeddedTransport
from tests.tools.support import SEED_START, LiveBroker, PulseServer, serve


@pytest.fixture
async def start_broker(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[LiveBroker]]]:
    """Start the broker app with a given transport (default: embedded) on a free port."""
    servers: list[TestServer] = []

    async def start(transport: Transport | None = None) -> LiveBroker:
        transport = transport or EmbeddedTransport()
        server = await serve(create_app(settings, transport))
        servers.append(server)
        return LiveBroker(str(server.make_url("")).rstrip("/"), transport, server)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def broker(start_broker: Callable[..., Awaitable[LiveBroker]]) -> LiveBroker:
    return await start_broker()


@pytest.fixture
async def pulse_server() -> AsyncIterator[PulseServer]:
    pulses = PulseServer(url="", first=SEED_START)

    async def current_pulse_id(request: web.Request) -> web.Response:
        pulse_id = pulses.now()
        pulses.served.append(pulse_id)
        return web.json_response(
            {"status": "ok", "message": f"current pulse id {pulse_id}", "pulse_id": pulse_id}
        )

    app = web.Application()
    app.router.add_get("/current_pulse_id", current_pulse_id)
    server = await serve(app)
    pulses.url = str(server.make_url("")).rstrip("/")
    yield pulses
    await server.close()
