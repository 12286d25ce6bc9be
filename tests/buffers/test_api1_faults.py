"""Every injected api/1 fault, and what the client makes of it."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from sf_daq_broker.buffers.api1 import Api1Client
from sf_daq_broker.buffers.errors import (
    BufferRequestRejected,
    BufferServerError,
    BufferUnavailable,
    RequestFailed,
    StreamCut,
)
from sf_daq_broker.simulation.channels import ChannelSpec, expected_values
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.faults import ALL, PulseSelection
from tests.buffers.helpers import P0, StartBuffer

SCALAR = ChannelSpec(name="A:SCALAR", type="float64")
WAVE = ChannelSpec(name="B:WAVE", type="int32", shape=(100,), byte_order="LITTLE_ENDIAN")


@pytest.fixture(autouse=True)
def _clock_ahead(clock: ManualClock) -> None:
    clock.advance_to(P0 + 1000)


def span(buffer: object, start: int, stop: int) -> tuple[int, int]:
    """The half-open ns range of the pulses [start, stop]."""
    timing = buffer.timing  # type: ignore[attr-defined]
    return timing.ts_ns(start), timing.ts_ns(stop + 1)


async def test_gaps_and_duplicates(api1_buffer: StartBuffer) -> None:
    async with api1_buffer([SCALAR, WAVE]) as (buffer, url), Api1Client(url) as client:
        buffer.faults.gaps[SCALAR.name] = PulseSelection.of(P0 + 3, P0 + 4)
        buffer.faults.gaps[ALL] = PulseSelection(every=5)
        buffer.faults.duplicates[WAVE.name] = PulseSelection.of(P0 + 1, P0 + 7)
        result = await client.fetch([SCALAR.name, WAVE.name], *span(buffer, P0, P0 + 9))
    scalar, wave = result.channels[SCALAR.name], result.channels[WAVE.name]
    # SCALAR has its own gap entry, which replaces the "*" entry (every 5th pulse).
    assert scalar.pulse_id.tolist() == [P0 + p for p in (0, 1, 2, 5, 6, 7, 8, 9)]
    # WAVE: the "*" gaps (P0 % 5 == 0: pulses 0 and 5), and 1 and 7 twice.
    assert wave.pulse_id.tolist() == [P0 + p for p in (1, 1, 2, 3, 4, 6, 7, 7, 8, 9)]
    assert wave.values is not None
    np.testing.assert_array_equal(wave.values, expected_values(WAVE, wave.pulse_id))
    np.testing.assert_array_equal(wave.pulse_id, buffer.event_pulse_ids(WAVE.name, P0, P0 + 9))


@pytest.mark.parametrize("style", ["absent", "name_only"])
async def test_missing_and_unknown_channels(api1_buffer: StartBuffer, style: str) -> None:
    async with api1_buffer([SCALAR, WAVE]) as (buffer, url), Api1Client(url) as client:
        buffer.faults.missing_channels.add(WAVE.name)
        buffer.faults.missing_style = style  # type: ignore[assignment]
        result = await client.fetch(
            [SCALAR.name, WAVE.name, "NOT:THERE"], *span(buffer, P0, P0 + 4)
        )
    assert list(result.channels) == [SCALAR.name]
    assert result.missing == [WAVE.name, "NOT:THERE"]
    assert result.status == {"error_count": 0, "warn_count": 0, "channel_not_found": 2}


async def test_http_errors_then_recovery(api1_buffer: StartBuffer) -> None:
    async with api1_buffer([SCALAR]) as (buffer, url), Api1Client(url) as client:
        buffer.faults.http_errors = 2
        for _ in range(2):
            with pytest.raises(BufferServerError) as caught:
                await client.fetch([SCALAR.name], *span(buffer, P0, P0 + 4))
            assert caught.value.transient and caught.value.status == 500
            assert "requestId" in str(caught.value)
        result = await client.fetch([SCALAR.name], *span(buffer, P0, P0 + 4))
        assert len(result.channels[SCALAR.name]) == 5
        buffer.faults.http_errors, buffer.faults.http_error_status = 1, 503
        with pytest.raises(BufferServerError, match="HTTP 503"):
            await client.fetch([SCALAR.name], *span(buffer, P0, P0 + 4))


@pytest.mark.parametrize("mode", ["abort", "eof"])
@pytest.mark.parametrize("cut", [1, 60, 4000])
async def test_cut_stream(api1_buffer: StartBuffer, mode: str, cut: int) -> None:
    async with api1_buffer([SCALAR, WAVE]) as (buffer, url), Api1Client(url) as client:
        buffer.faults.cut_after_bytes = cut
        buffer.faults.cut_mode = mode  # type: ignore[assignment]
        with pytest.raises(StreamCut) as caught:
            await client.fetch([SCALAR.name, WAVE.name], *span(buffer, P0, P0 + 99))
        assert caught.value.transient
        # The cut applied once; the retry gets everything.
        result = await client.fetch([SCALAR.name, WAVE.name], *span(buffer, P0, P0 + 99))
        assert len(result.channels[WAVE.name]) == 100


async def test_cut_reported_in_request_status(api1_buffer: StartBuffer) -> None:
    async with api1_buffer([WAVE]) as (buffer, url), Api1Client(url) as client:
        buffer.faults.cut_after_bytes = 1000
        request_id = None
        with pytest.raises(StreamCut):
            async with client.query([WAVE.name], *span(buffer, P0, P0 + 99)) as reply:
                request_id = reply.request_id
                async for _ in reply:
                    pass
        assert request_id is not None
        status = await client.request_status(request_id)
        assert status["error_count"] == 1 and "errors" in status


async def test_failed_request_status_is_permanent(api1_buffer: StartBuffer) -> None:
    async with api1_buffer([SCALAR]) as (buffer, url), Api1Client(url) as client:
        buffer.faults.failed_status = 1
        with pytest.raises(RequestFailed) as caught:
            await client.fetch([SCALAR.name], *span(buffer, P0, P0 + 4))
        assert not caught.value.transient


async def test_slow_replies(api1_buffer: StartBuffer) -> None:
    async with api1_buffer([WAVE], batch_bytes=2000) as (buffer, url):
        buffer.faults.reply_delay = 0.05
        buffer.faults.batch_delay = 0.01
        async with Api1Client(url) as client:
            result = await client.fetch([WAVE.name], *span(buffer, P0, P0 + 49))
            assert len(result.channels[WAVE.name]) == 50
        buffer.faults.reply_delay = 0.0
        buffer.faults.batch_delay = 1.0
        async with Api1Client(url, read_timeout=0.2) as impatient:
            with pytest.raises(StreamCut, match="Timeout"):
                await impatient.fetch([WAVE.name], *span(buffer, P0, P0 + 49))
        buffer.faults.batch_delay = 0.0
        buffer.faults.reply_delay = 1.0
        async with Api1Client(url, read_timeout=0.2) as impatient:
            with pytest.raises(BufferUnavailable):
                await impatient.fetch([WAVE.name], *span(buffer, P0, P0 + 49))


async def test_bad_request_is_permanent(api1_buffer: StartBuffer) -> None:
    async with api1_buffer([SCALAR]) as (buffer, url), Api1Client(url) as client:
        with pytest.raises(BufferRequestRejected) as caught:
            await client.fetch([], *span(buffer, P0, P0 + 4))
    assert caught.value.status == 400 and not caught.value.transient


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with Api1Client(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(BufferUnavailable) as caught:
            await client.fetch(["X"], 0, 10)
    assert caught.value.transient


def test_faults_reset() -> None:
    from sf_daq_broker.simulation.faults import Api1Faults

    faults = Api1Faults(http_errors=3, missing_channels={"X"})
    faults.clear()
    assert faults == Api1Faults()
