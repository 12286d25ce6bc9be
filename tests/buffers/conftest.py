"""Fixtures of the buffer tests: a manual clock and simulated api/1 buffers on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.channels import ChannelSpec
from sf_daq_broker.simulation.clock import ManualClock
from tests.buffers.helpers import P0, T0_MS, StartBuffer, serve


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(P0, T0_MS)


@pytest.fixture
def api1_buffer(clock: ManualClock) -> StartBuffer:
    """``async with api1_buffer(channels, **options) as (buffer, url)``."""

    @asynccontextmanager
    async def start(
        channels: Iterable[ChannelSpec], **options: Any
    ) -> AsyncIterator[tuple[SimulatedApi1Buffer, str]]:
        buffer = SimulatedApi1Buffer(channels, clock, **options)
        async with serve(create_api1_app(buffer)) as url:
            yield buffer, url

    return start
