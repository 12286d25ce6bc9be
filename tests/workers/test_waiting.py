"""A job whose range ends in the future says what it waits for, where every user looks:
/run_status, the status events (broker_debugger) and ``daq_client --wait``'s progress.

The real data buffer worker against the simulated buffer on a manual clock; the broker's
/run_status reads the status store the events fed.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sf_daq_broker.jobs import Action
from sf_daq_broker.tools.broker_debugger import format_event
from sf_daq_broker.tools.daq_client import ProgressBars
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers import readiness
from tests.support import async_wait_until
from tests.workers.test_end_to_end import START, System, outcome, start_system


@pytest.fixture
async def embedded(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[System]:
    monkeypatch.setattr(readiness, "ANNOUNCE_EVERY", 0.05)
    transport = EmbeddedTransport()
    async for system in start_system(
        aiohttp_server, aiohttp_client, make_settings, transport, transport
    ):
        yield system


async def run_status(system: System, run: int = 1) -> dict[str, Any]:
    response = await system.broker.get(
        "/run_status", params={"pgroup": "p12345", "run_number": run}
    )
    reply: dict[str, Any] = await response.json()
    return reply


async def test_a_range_in_the_future_says_what_it_waits_for(embedded: System) -> None:
    events = await embedded.transport.subscribe_status()
    # pulses START+10 .. START+109 (the job reads START+9 .. START+110, for the edge pulses)
    # while the buffers are at START: it waits for the pulse after its last, START+111
    await embedded.request(channels_list=["SAR:F64"])
    waiting = f"waiting for pulse {START + 111} (the buffers are at {START}, about 1 s)"

    async def says(text: str) -> dict[str, Any] | None:
        reply = await run_status(embedded)
        return reply if reply["sources"]["BSDATA"]["message"] == text else None

    reply = await async_wait_until(lambda: says(waiting), what="the waiting message")
    assert reply["message"] == f"run 1 of p12345 is running: 0 of 1 sources done; BSDATA {waiting}"
    assert (reply["run_state"], reply["sources"]["BSDATA"]["state"]) == ("running", "running")

    embedded.clock.advance_to(START + 60)  # the buffers move on: the message follows
    later = f"waiting for pulse {START + 111} (the buffers are at {START + 60}, about 1 s)"
    await async_wait_until(lambda: says(later), what="the updated waiting message")

    # broker_debugger's line of such an event, and the event's figures
    async with asyncio.timeout(10):
        while (event := await events.__anext__()).action is not Action.WRITE_PROGRESS:
            pass
    assert event.details["waiting"] == {
        "pulse_id": START + 111,
        "buffers_at": START,
        "seconds": 1.11,
    }
    assert format_event(event, colour=False).endswith(
        f"write_progress BSDATA       p12345 run 1 {event.file} {waiting}"
    )

    # daq_client --wait's bar shows it too
    screen = io.StringIO()
    bars = ProgressBars(screen, enabled=True)
    bars.show((await run_status(embedded))["sources"])
    bars.close()
    assert "BSDATA" in screen.getvalue() and later in screen.getvalue()

    embedded.clock.advance_to(START + 200)
    final = await outcome(events)
    assert final["BSDATA"].action is Action.WRITE_FINISHED
    reply = await run_status(embedded)
    assert reply["message"] == "run 1 of p12345 is done: 1 of 1 sources done"
    await events.close()
