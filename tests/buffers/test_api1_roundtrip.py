"""Simulated api/1 buffer → HTTP → client: every type, shape, byte order and compression."""

from __future__ import annotations

import itertools
from typing import Literal

import aiohttp
import numpy as np

from sf_daq_broker.buffers.api1 import Api1Client
from sf_daq_broker.buffers.api1_decoder import EventBatch
from sf_daq_broker.buffers.api1_format import TYPES, ByteOrder, ChannelHeader
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.simulation.channels import (
    ChannelSpec,
    channel_pulse_ids,
    expected_value,
    expected_values,
)
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.noise import ELEMENT_STEP, GOLDEN, hash_grid, mix64, name_seed
from tests.buffers.helpers import P0, StartBuffer

NUMERIC = [t for t in TYPES if t != "string"]


def all_channels() -> list[ChannelSpec]:
    specs = [ChannelSpec(name="STRING", type="string", rate_divisor=3)]
    orders: tuple[ByteOrder, ...] = ("BIG_ENDIAN", "LITTLE_ENDIAN")
    compressions: tuple[Literal["none", "bitshuffle_lz4"], ...] = ("none", "bitshuffle_lz4")
    for type_name, order, shape, compression in itertools.product(
        NUMERIC, orders, ((), (7,), (5, 9)), compressions
    ):
        name = f"{type_name}-{order}-{len(shape)}d-{compression}"
        specs.append(
            ChannelSpec(
                name=name, type=type_name, byte_order=order, shape=shape, compression=compression
            )
        )
    return specs


async def test_every_type_shape_order_and_compression(
    api1_buffer: StartBuffer, clock: ManualClock
) -> None:
    specs = all_channels()
    clock.advance_to(P0 + 100)
    async with api1_buffer(specs) as (buffer, url), Api1Client(url) as client:
        start, stop = P0 + 10, P0 + 29
        result = await client.fetch(
            [s.name for s in specs], buffer.timing.ts_ns(start), buffer.timing.ts_ns(stop + 1)
        )
    assert result.missing == []
    assert result.status == {"error_count": 0, "warn_count": 0, "channel_not_found": 0}
    assert set(result.channels) == {s.name for s in specs}
    for spec in specs:
        data = result.channels[spec.name]
        pids = channel_pulse_ids(spec, start, stop)
        assert data.header == spec.header, spec.name
        assert data.pulse_id.dtype == np.int64 and data.timestamp.dtype == np.int64
        np.testing.assert_array_equal(data.pulse_id, pids)
        np.testing.assert_array_equal(data.timestamp, buffer.timing.ts_ns_array(pids))
        assert data.values is not None
        assert data.values.shape == (len(pids), *spec.shape)
        assert data.values.dtype == TYPES[spec.type], spec.name
        assert data.values.dtype.isnative
        np.testing.assert_array_equal(data.values, expected_values(spec, pids), err_msg=spec.name)
    strings = result.channels["STRING"].values
    assert strings is not None
    assert strings.tolist() == [
        f"STRING #{p} Δ{p % 7}" + "·" * (p % 4) for p in range(P0 + 12, stop + 1, 3)
    ]


def test_expected_values_are_deterministic_and_vary() -> None:
    spec = ChannelSpec(name="SAR:X", type="int64", shape=(4,))
    first = expected_value(spec, P0)
    assert np.array_equal(first, expected_value(spec, P0))
    assert not np.array_equal(first, expected_value(spec, P0 + 1))
    floats = expected_values(ChannelSpec(name="F", type="float32"), range(P0, P0 + 1000))
    assert np.array_equal(floats.astype(np.float64).astype(np.float32), floats)
    assert len(np.unique(floats)) > 990
    assert np.all(np.abs(floats) <= 32768)
    bools = expected_values(ChannelSpec(name="B", type="bool"), range(P0, P0 + 1000))
    assert 400 < bools.sum() < 600


def test_the_numba_grids_are_the_documented_formula() -> None:
    """``hash_grid`` and the float values, computed in one numba pass, against ``mix64`` and
    the formula of ``simulation.channels`` in plain numpy."""
    pids = np.array([0, 1, P0, P0 + 12345, 2**62], dtype=np.int64)
    for seed in (0, 1, 2**63 + 5, 2**64 - 1, name_seed("SAR:X")):
        base = np.uint64(seed % 2**64) + pids.astype(np.uint64) * np.uint64(GOLDEN)
        steps = np.arange(37, dtype=np.uint64) * np.uint64(ELEMENT_STEP)
        reference = mix64(base[:, None] + steps[None, :])
        np.testing.assert_array_equal(hash_grid(seed, pids, 37), reference)
    for type_name in ("float32", "float64"):
        spec = ChannelSpec(name="SAR:F", type=type_name, shape=(37,))
        h = hash_grid(name_seed(spec.name), pids, 37)
        formula = (((h >> np.uint64(40)).astype(np.int64) - 2**23) / 256.0).astype(type_name)
        values = expected_values(spec, pids)
        assert values.dtype == np.dtype(type_name)
        np.testing.assert_array_equal(values, formula)


async def test_images_stream_in_batches_and_blobs_pass_through(
    api1_buffer: StartBuffer, clock: ManualClock
) -> None:
    camera = ChannelSpec(
        name="CAM:FPICTURE", type="uint16", shape=(256, 512), compression="bitshuffle_lz4"
    )
    clock.advance_to(P0 + 50)
    async with (
        api1_buffer([camera], batch_bytes=300_000) as (buffer, url),
        Api1Client(url) as client,
    ):
        start_ns, end_ns = buffer.timing.ts_ns(P0), buffer.timing.ts_ns(P0 + 20)
        seen: list[EventBatch] = []
        async with client.query([camera.name], start_ns, end_ns, decompress=False) as reply:
            assert reply.request_id is not None
            async for item in reply:
                if isinstance(item, EventBatch):
                    seen.append(item)
        status = await client.request_status(reply.request_id)
    assert status["error_count"] == 0
    assert len(seen) > 1  # streamed, not one body
    pulse_ids = np.concatenate([b.pulse_id for b in seen])
    assert pulse_ids.tolist() == list(range(P0, P0 + 20))
    blobs = [blob for b in seen for blob in b.blobs or ()]
    from sf_daq_broker.buffers.api1_format import decompress_value

    for pid, blob in zip(pulse_ids.tolist(), blobs, strict=True):
        np.testing.assert_array_equal(
            decompress_value(blob, camera.header), expected_value(camera, pid)
        )


def test_image_values_look_like_a_camera() -> None:
    camera = ChannelSpec(name="CAM", type="uint16", shape=(100, 200))
    image = expected_value(camera, P0 + 3)
    assert image.dtype == np.uint16 and image.shape == (100, 200)
    assert image.max() > 3000 and np.median(image) < 100
    np.testing.assert_array_equal(np.roll(expected_value(camera, P0), 3, axis=1) + 3, image)


async def test_range_is_half_open_with_reduced_rate(
    api1_buffer: StartBuffer, clock: ManualClock
) -> None:
    spec = ChannelSpec(name="R", type="float64", rate_divisor=10)
    clock.advance_to(P0 + 1000)
    async with api1_buffer([spec]) as (buffer, url), Api1Client(url) as client:
        ts = buffer.timing.ts_ns
        # [ts(P0+10), ts(P0+30)) holds the events at 10 and 20, not 30.
        result = await client.fetch(["R"], ts(P0 + 10), ts(P0 + 30))
        assert result.channels["R"].pulse_id.tolist() == [P0 + 10, P0 + 20]
        # Edge timestamps with sub-microsecond digits (pid % 1000 ns): truncating them to the
        # microsecond dates neither adds nor loses an edge pulse.
        assert ts(P0 + 110) % 1000 == 110
        result = await client.fetch(["R"], ts(P0 + 110), ts(P0 + 130))
        assert result.channels["R"].pulse_id.tolist() == [P0 + 110, P0 + 120]
        # Below a microsecond the dates cannot tell: the range is truncated to the same one.
        result = await client.fetch(["R"], ts(P0 + 110) + 1, ts(P0 + 130) + 1)
        assert result.channels["R"].pulse_id.tolist() == [P0 + 110, P0 + 120]
        # A range without events: the channel has no data.
        result = await client.fetch(["R"], ts(P0 + 11), ts(P0 + 19))
        assert result.channels == {} and result.missing == ["R"]


async def test_ingestion_lag_and_retention(api1_buffer: StartBuffer, clock: ManualClock) -> None:
    spec = ChannelSpec(name="S", type="int8")
    clock.advance_to(P0 + 100)
    async with (
        api1_buffer([spec], ingestion_lag_pulses=5, retention_pulses=50) as (buffer, url),
        Api1Client(url) as client,
        PulseMapClient(url) as pulse_map,
    ):
        ts = buffer.timing.ts_ns
        result = await client.fetch(["S"], ts(P0), ts(P0 + 200))
        # Pulses 51..95 remain: older ones are past retention, newer ones not ingested yet.
        assert result.channels["S"].pulse_id.tolist() == list(range(P0 + 46, P0 + 96))
        assert await pulse_map.timestamp_ns(P0 + 95) == ts(P0 + 95)
        assert await pulse_map.timestamp_ns(P0 + 96) is None
        clock.advance(5)
        assert await pulse_map.timestamp_ns(P0 + 96) == ts(P0 + 96)


async def test_query_body_and_headers(api1_buffer: StartBuffer, clock: ManualClock) -> None:
    spec = ChannelSpec(name="S", type="uint8")
    async with api1_buffer([spec]) as (buffer, url):
        client = Api1Client(url, backend="sf-databuffer")
        body = client.query_body(["S"], buffer.timing.ts_ns(P0), buffer.timing.ts_ns(P0 + 1))
        assert body == {
            "channels": ["S"],
            "range": {
                "type": "date",
                "startDate": "2021-08-17T13:00:00.000000Z",
                "endDate": "2021-08-17T13:00:00.010000Z",
            },
            "defaultBackend": "sf-databuffer",
        }
        async with aiohttp.ClientSession() as session:
            reply = await session.post(f"{url}/api/1/query", json=body)
            assert reply.status == 200
            assert reply.headers["Content-Type"] == "application/octet-stream"
            request_id = reply.headers["x-daqbuffer-request-id"]
            raw = await reply.read()
            status = await (await session.get(f"{url}/api/1/requestStatus/{request_id}")).json()
            unknown = await session.get(f"{url}/api/1/requestStatus/nope")
            assert unknown.status == 404
        await client.close()
    header = b'{"name":"S","type":"uint8","byteOrder":"BIG_ENDIAN","shape":[],"compression":0}'
    assert raw.startswith((1 + len(header)).to_bytes(4, "big") + b"\x00" + header)
    assert len(raw) == 4 + 1 + len(header) + 4 + (4 + 1 + 16 + 1 + 4)
    assert status == {"error_count": 0, "warn_count": 0, "channel_not_found": 0}


async def test_channel_objects_in_query_and_header_type(api1_buffer: StartBuffer) -> None:
    spec = ChannelSpec(name="S", type="float32")
    async with api1_buffer([spec]) as (_buffer, url), aiohttp.ClientSession() as session:
        body = {
            "channels": [{"name": "S", "backend": "sf-databuffer"}],
            "range": {
                "startDate": "2021-08-17T13:00:00.000000Z",
                "endDate": "2021-08-17T13:00:00.010000Z",
            },
        }
        reply = await session.post(f"{url}/api/1/query", json=body)
        raw = await reply.read()
    assert reply.status == 200 and b'"name":"S"' in raw
    assert ChannelHeader.from_json({"name": "S", "type": "float32"}).dtype == np.dtype(">f4")
