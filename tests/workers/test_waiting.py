"""A job whose range ends in the future says what it waits for, where every user looks:
/run_status, the status events (broker_debugger) and ``daq_client --wait``'s progress.

The real data buffer worker against the simulated buffer on a manual clock; the broker's
/run_status reads the status store the events fed.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from sf_daq_broker.jobs import Action
from sf_daq_broker.simulation.channels import expected_values
from sf_daq_broker.tools.broker_debugger import format_event
from sf_daq_broker.tools.daq_client import ProgressBars
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers import readiness
from tests.support import PATIENCE, async_wait_until
from tests.workers.test_end_to_end import (
    CHANNELS,
    START,
    System,
    outcome,
    start_system,
    transports_for,
)


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
    async with asyncio.timeout(PATIENCE):
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


@pytest.fixture(params=["embedded", "rabbitmq"])
async def system(
    request: pytest.FixtureRequest,
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[System]:
    monkeypatch.setattr(readiness, "ANNOUNCE_EVERY", 0.05)
    transport, worker_transport = transports_for(request)
    async for system in start_system(
        aiohttp_server, aiohttp_client, make_settings, transport, worker_transport
    ):
        yield system
    await worker_transport.close()


async def test_a_job_waiting_for_its_data_does_not_hold_back_the_next_one(
    system: System, raw_dir: Path
) -> None:
    """Two jobs of one kind, one worker: the first waits for a range the buffers have not
    reached, the second's range is in the buffer. The second is written while the first
    still waits; the first is written once its data arrives."""
    events = await system.transport.subscribe_status()
    system.clock.advance_to(START + 300)
    spec = CHANNELS[0]  # SAR:F64, every pulse
    future = await system.request(
        channels_list=[spec.name], start_pulseid=START + 1000, stop_pulseid=START + 1099
    )
    present = await system.request(channels_list=[spec.name])  # START+10 .. START+109
    assert (future, present) == (1, 2)
    waiting = f"waiting for pulse {START + 1101} (the buffers are at {START + 300}, about 8 s)"

    async def says_waiting() -> bool:
        reply = await run_status(system, future)
        return bool(reply["sources"]["BSDATA"]["message"] == waiting)

    await async_wait_until(says_waiting, timeout=60, what="run 1 to wait for its data")
    finished = await outcome(events)  # the first final event: run 2's
    assert (finished["BSDATA"].run_number, finished["BSDATA"].action) == (
        present,
        Action.WRITE_FINISHED,
    )
    assert await says_waiting()  # run 1 still waits, its file is not there
    assert not (raw_dir / "run_000001.BSDATA.h5").exists()
    pids = np.arange(START + 9, START + 111)  # widened by one pulse for the edges
    with h5py.File(raw_dir / "run_000002.BSDATA.h5") as file:
        assert list(file) == [spec.name]
        assert file[spec.name]["pulse_id"][:].tolist() == pids.tolist()
        np.testing.assert_array_equal(file[spec.name]["data"][:], expected_values(spec, pids))

    system.clock.advance_to(START + 1200)  # the buffers reach run 1's range
    finished = await outcome(events)
    assert (finished["BSDATA"].run_number, finished["BSDATA"].action) == (
        future,
        Action.WRITE_FINISHED,
    )
    pids = np.arange(START + 999, START + 1101)
    with h5py.File(raw_dir / "run_000001.BSDATA.h5") as file:
        assert file[spec.name]["pulse_id"][:].tolist() == pids.tolist()
        np.testing.assert_array_equal(file[spec.name]["data"][:], expected_values(spec, pids))
    done = "run 1 of p12345 is done: 1 of 1 sources done"

    async def says_done() -> bool:
        # the broker's store hears the event on its own subscription, maybe after this test
        return bool((await run_status(system, future))["message"] == done)

    await async_wait_until(says_done, what="/run_status to say run 1 is done")
    await events.close()
