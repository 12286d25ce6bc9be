"""At the broker's door: a range that has aged out, or ends too far ahead, is refused before a
run number is spent; when the buffers cannot be asked the request goes through.

Against a real simulated data buffer (its pulse map) on a manual clock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.buffers.horizon import Waiting, aged_out, too_far_ahead
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.transport.embedded import EmbeddedTransport

START = 15_000_000_000
NOW = START + 400_000  # the clock when the requests come: 4000 s of history
RETENTION = 360_000  # the shipped configuration's, for both api/1 buffers
OLDEST = NOW - RETENTION + 1


@pytest.fixture
async def pulse_map_url(aiohttp_server: Any) -> str:
    clock = ManualClock(start_pulse_id=START)
    clock.advance_to(NOW)
    server = await aiohttp_server(create_api1_app(SimulatedApi1Buffer([], clock)))
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def post(
    aiohttp_client: Any, make_settings: Any, pulse_map_url: str
) -> Callable[..., Awaitable[tuple[int, dict[str, Any]]]]:
    settings = make_settings(buffers={"databuffer_url": pulse_map_url})
    client: TestClient = await aiohttp_client(create_app(settings, EmbeddedTransport()))

    async def send(start: int, stop: int, **fields: Any) -> tuple[int, dict[str, Any]]:
        body = {"pgroup": "p12345", "start_pulseid": start, "stop_pulseid": stop, **fields}
        body.setdefault("channels_list", ["SAR-CVME-TIFALL5:EvtSet"])
        response = await client.post("/retrieve_from_buffers", json=body)
        return response.status, await response.json()

    return send


def last_run(raw_dir: Path) -> str | None:
    path = raw_dir / "run_info" / "LAST_RUN"
    return path.read_text().strip() if path.exists() else None


async def test_an_aged_out_range_is_refused_naming_the_users_range(
    post: Callable[..., Awaitable[tuple[int, dict[str, Any]]]], raw_dir: Path
) -> None:
    # rate 10: the channel job would be widened to START+999 .. START+1101
    status, reply = await post(START + 1000, START + 1100, rate_multiplicator=10)
    assert (status, reply) == (
        400,
        {
            "status": "failed",
            "message": f"pulses {START + 1000}-{START + 1100} have aged out of the data buffer: "
            f"it keeps {RETENTION} pulses (about 60 minutes) and is at pulse {NOW}, so the "
            f"oldest it holds is {OLDEST}",
        },
    )
    assert last_run(raw_dir) is None  # no run number spent
    status, reply = await post(
        START + 1000, START + 1100, channels_list=[], camera_list=["C:FPICTURE"]
    )
    assert status == 400
    assert reply["message"].startswith(
        f"pulses {START + 1000}-{START + 1100} have aged out of the image buffer: "
    )


async def test_a_range_partly_kept_or_read_from_other_buffers_is_accepted(
    post: Callable[..., Awaitable[tuple[int, dict[str, Any]]]], raw_dir: Path
) -> None:
    """Only a range of which nothing is left is refused; the Jungfrau buffer and the archiver
    have no configured retention, so their ranges are the workers' to judge."""
    assert (await post(OLDEST - 10, OLDEST))[0] == 200
    old = (START + 1000, START + 1100)
    assert (await post(*old, channels_list=[], pv_list=["SARUN:FELPHOTENE"]))[0] == 200
    assert (await post(*old, channels_list=[], detectors={"JF13T01V01": {}}))[0] == 200
    assert last_run(raw_dir) == "3"


async def test_a_range_ending_too_far_ahead_is_refused(
    post: Callable[..., Awaitable[tuple[int, dict[str, Any]]]], raw_dir: Path
) -> None:
    """~3 h ahead (a typo) is refused; up to max_pulses_ahead (5 minutes) is waited for."""
    stop = NOW + 1_080_000
    status, reply = await post(stop - 100, stop, detectors={"JF13T01V01": {}})
    assert (status, reply["message"]) == (
        400,
        f"stop_pulseid {stop} is 1080000 pulses (about 10800 s) ahead of the buffers, which are "
        f"at pulse {NOW}; the limit is 30000 pulses (max_pulses_ahead): is it a typo?",
    )
    assert (await post(NOW + 29_900, NOW + 30_001))[0] == 400
    assert last_run(raw_dir) is None
    assert (await post(NOW + 29_900, NOW + 30_000))[0] == 200
    assert last_run(raw_dir) == "1"


async def test_buffers_that_cannot_be_asked_do_not_block_requests(
    aiohttp_client: Any,
    make_settings: Any,
    raw_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await aiohttp_client(create_app(make_settings(), EmbeddedTransport()))
    body = {"pgroup": "p12345", "start_pulseid": 1000, "stop_pulseid": 1100, "pv_list": ["A:B"]}
    with caplog.at_level(logging.WARNING, logger="sf_daq_broker.api.horizon"):
        response = await client.post("/retrieve_from_buffers", json=body)
    assert response.status == 200, await response.json()
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "pulses 1000-1100 of p12345 accepted unchecked: where the buffers are cannot be asked "
        "(pulse map at http://127.0.0.1:1/api/1/map/pulse/"
    )
    assert record.getMessage().endswith("the workers will judge the range")


async def test_the_newest_pulse_is_found_from_a_pulse_ahead_too(pulse_map_url: str) -> None:
    async with PulseMapClient(pulse_map_url) as pulse_map:
        for hint in (START, NOW, NOW + 1, NOW + 12_345_678, 0):
            assert await pulse_map.newest_pulse_id_near(hint) == NOW


def test_the_messages() -> None:
    assert Waiting.at_pulse_rate(1111, 1000).message() == (
        "waiting for pulse 1111 (the buffers are at 1000, about 1 s)"
    )
    assert Waiting.at_pulse_rate(1000, 1200).seconds == 0.0
    assert aged_out(10, 21, 100, 80, "data buffer") is None  # 21 is the oldest kept
    assert aged_out(10, 20, 100, 80, "data buffer") is not None
    assert too_far_ahead(130, 100, 30) is None
    assert too_far_ahead(131, 100, 30) is not None
