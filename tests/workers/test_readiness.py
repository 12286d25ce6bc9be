"""Readiness from the pulse map, against a pulse map that forgets old pulses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from sf_daq_broker.buffers.errors import DataAgedOut, DataNotYetAvailable
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.workers.readiness import range_when_ready

OLDEST, NEWEST = 1_000, 2_000


def job(start: int, stop: int) -> Job:
    return Job(
        job_id="j",
        request_id="r",
        kind=SourceKind.DATABUFFER,
        source="BSDATA",
        names=("A:B",),
        start_pulse_id=start,
        stop_pulse_id=stop,
        requested_start=start,
        requested_stop=stop,
        rate_multiplicator=1,
        pgroup="p12345",
        beamline="bernina",
        run_number=1,
        output_file="/nowhere/run_000001.BSDATA.h5",
        log_file="/nowhere/run_000001.BSDATA.log",
        run_info_file="/nowhere/run_000001.json",
        request_time="2026-11-21 00:00:00.000000",
    )


@pytest.fixture
async def pulse_map(aiohttp_server: Any) -> str:
    """A pulse map that knows pulses OLDEST..NEWEST (ts = pid * 10 ms)."""

    async def answer(request: web.Request) -> web.Response:
        pid = int(request.match_info["pid"])
        if OLDEST <= pid <= NEWEST:
            return web.json_response(pid * 10_000_000)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/api/1/map/pulse/{pid}", answer)
    return str((await aiohttp_server(app)).make_url(""))


async def test_a_known_range_is_ready_at_once(pulse_map: str) -> None:
    async with PulseMapClient(pulse_map) as client:
        assert await range_when_ready(client, job(1500, 1599), 1.0, 0.01) == (
            15_000_000_000,
            16_000_000_000,
        )


async def test_a_start_the_map_forgot_is_aged_out_at_once(pulse_map: str) -> None:
    async with PulseMapClient(pulse_map) as client:
        async with asyncio.timeout(1):  # no waiting: it is permanent
            with pytest.raises(DataAgedOut) as error:
                await range_when_ready(client, job(900, 1099), 60.0, 0.01)
    assert str(error.value) == "pulse map: pulse 900 is no longer known: the range has aged out"


async def test_a_future_stop_is_not_ready_after_the_timeout(pulse_map: str) -> None:
    async with PulseMapClient(pulse_map) as client:
        with pytest.raises(DataNotYetAvailable) as error:
            await range_when_ready(client, job(1900, 2000), 0.05, 0.01)
    assert str(error.value) == "pulse map: pulse 2001 is not known yet (waited 0 s)"
