"""The pulse map (both paths, the 204 case, readiness) and the archiver (query semantics)."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal

import aiohttp
import pytest

from sf_daq_broker.buffers.archiver import ArchiverClient
from sf_daq_broker.buffers.dates import ns_to_global_seconds
from sf_daq_broker.buffers.errors import BufferServerError, DataNotYetAvailable
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.simulation.archiver import (
    PvSpec,
    SimulatedArchiver,
    create_archiver_app,
    expected_pv_value,
    pv_change_time,
)
from sf_daq_broker.simulation.clock import ManualClock
from tests.buffers.helpers import P0, T0_MS, StartBuffer, serve


@pytest.mark.parametrize("api", ["api1", "api4"])
async def test_pulse_map(api1_buffer: StartBuffer, clock: ManualClock, api: str) -> None:
    clock.advance_to(P0 + 10)
    async with api1_buffer([]) as (buffer, url), PulseMapClient(url, api=api) as pulse_map:  # type: ignore[arg-type]
        expected = T0_MS * 1_000_000 + 7 * 10_000_000 + (P0 + 7) % 1_000_000
        assert await pulse_map.timestamp_ns(P0 + 7) == expected
        assert await pulse_map.timestamp_ns(P0 + 10) == buffer.timing.ts_ns(P0 + 10)
        assert await pulse_map.timestamp_ns(P0 + 11) is None  # 204: not reached yet
        with pytest.raises(DataNotYetAvailable):
            await pulse_map.range_ns(P0, P0 + 10)
        assert await pulse_map.range_ns(P0, P0 + 9) == (
            buffer.timing.ts_ns(P0),
            buffer.timing.ts_ns(P0 + 10),
        )
        assert await pulse_map.newest_pulse_id(P0) == P0 + 10
        clock.advance_to(P0 + 12_345)
        assert await pulse_map.newest_pulse_id(P0 + 3) == P0 + 12_345


async def test_pulse_map_raw_replies(api1_buffer: StartBuffer) -> None:
    async with api1_buffer([]) as (buffer, url), aiohttp.ClientSession() as session:
        reply = await session.get(f"{url}/api/1/map/pulse/{P0}")
        assert reply.status == 200 and await reply.text() == str(buffer.timing.ts_ns(P0))
        reply = await session.get(f"{url}/api/4/map/pulse/sf-databuffer/{P0 + 1}")
        assert reply.status == 204 and await reply.read() == b""
        reply = await session.get(f"{url}/api/1/map/pulse/abc")
        assert reply.status == 400


PVS = [
    PvSpec(name="PV:FLOAT", type="float64", period_s=2.0),
    PvSpec(name="PV:INT", type="int32", period_s=5.0),
    PvSpec(name="PV:TEXT", type="string", period_s=7.0),
    PvSpec(name="PV:WAVE", type="float32", shape=(4,), period_s=3.0),
]


async def test_archiver_query(clock: ManualClock) -> None:
    archiver = SimulatedArchiver(PVS, clock)
    clock.advance_to(P0 + 6000)  # one minute after T0
    start_ns = clock.timing.ts_ns(P0 + 1000)
    end_ns = clock.timing.ts_ns(P0 + 2000)  # a 10 s window
    async with serve(create_archiver_app(archiver)) as url, ArchiverClient(url) as client:
        result = await client.query([pv.name for pv in PVS] + ["PV:UNKNOWN"], start_ns, end_ns)
    assert set(result) == {pv.name for pv in PVS}
    for spec in PVS:
        data = result[spec.name]
        times = data.timestamps.tolist()
        # The value in force at the start, then every change inside [start, end].
        assert times[0] < start_ns <= times[1]
        assert all(start_ns <= t <= end_ns for t in times[1:])
        assert all(b - a == spec.period_ns for a, b in itertools.pairwise(times))
        assert times[-1] + spec.period_ns > end_ns
        ks = [(t - spec.phase_ns) // spec.period_ns for t in times]
        assert [pv_change_time(spec, k) for k in ks] == times
        assert data.values == [expected_pv_value(spec, k) for k in ks]
        assert set(data.types) == {spec.type}
        assert set(map(tuple, data.shapes)) == {spec.shape or (1,)}  # type: ignore[arg-type]
    assert isinstance(result["PV:TEXT"].values[0], str)
    assert len(result["PV:WAVE"].values[0]) == 4


async def test_archiver_edges_and_future(clock: ManualClock) -> None:
    spec = PvSpec(name="PV:EDGE", period_s=1.0)
    archiver = SimulatedArchiver([spec], clock)
    clock.advance_to(P0 + 1000)
    change = pv_change_time(spec, (clock.timing.ts_ns(P0 + 500) - spec.phase_ns) // spec.period_ns)

    def answer(start: int, end: int, expansion: bool, inclusive: bool) -> list[int]:
        body = {
            "range": {
                "startSeconds": Decimal(ns_to_global_seconds(start)),
                "endSeconds": Decimal(ns_to_global_seconds(end)),
                "startExpansion": expansion,
                "endInclusive": inclusive,
            },
            "channels": [spec.name],
        }
        reply = archiver.answer(body)
        return [int(Decimal(s["globalSeconds"]) * 10**9) for s in reply[0]["data"]]

    assert answer(change, change + 10, False, True) == [change]
    assert answer(change - 10, change, False, True) == [change]
    assert answer(change - 10, change, False, False) == []
    assert answer(change + 1, change + 10, True, True) == [change]
    # Changes after the clock's present are not known yet; the expansion gives the newest one.
    now = clock.timing.ts_ns(P0 + 1000)
    future = answer(now + 10**9, now + 5 * 10**9, True, True)
    assert len(future) == 1 and future[0] <= now


async def test_archiver_faults_and_wire_format(clock: ManualClock) -> None:
    archiver = SimulatedArchiver(PVS, clock)
    clock.advance_to(P0 + 3000)
    async with serve(create_archiver_app(archiver)) as url, ArchiverClient(url) as client:
        archiver.faults.http_errors = 1
        with pytest.raises(BufferServerError) as caught:
            await client.query(["PV:FLOAT"], clock.timing.ts_ns(P0), clock.timing.ts_ns(P0 + 100))
        assert caught.value.transient
        archiver.faults.missing_pvs.add("PV:INT")
        result = await client.query(
            ["PV:FLOAT", "PV:INT"], clock.timing.ts_ns(P0), clock.timing.ts_ns(P0 + 100)
        )
        assert list(result) == ["PV:FLOAT"]
        async with aiohttp.ClientSession() as session:
            body = ArchiverClient.query_body(
                ["PV:TEXT"], clock.timing.ts_ns(P0), clock.timing.ts_ns(P0 + 900)
            )
            raw = await (await session.post(f"{url}/query", json=body)).text()
            bad = await session.post(f"{url}/query", data="{not json")
            assert bad.status == 400
    (element,) = json.loads(raw)
    assert element["channel"] == {"name": "PV:TEXT", "backend": "sf-archiverappliance"}
    sample = element["data"][0]
    assert set(sample) == {"globalSeconds", "value", "type", "shape"}
    _seconds, fraction = sample["globalSeconds"].split(".")
    assert len(fraction) == 9 and sample["type"] == "string" and sample["shape"] == [1]


def test_archiver_request_edges_cover_the_interval() -> None:
    body = ArchiverClient.query_body(["X"], 1_629_205_200_551_143_999, 1_629_205_210_000_000_001)
    assert body["range"] == {
        "startSeconds": 1629205200.551143,
        "endSeconds": 1629205210.000001,
        "startExpansion": True,
        "endInclusive": True,
    }
