"""At the door: is the request's range still in the buffers, and not absurdly far ahead?

Checked before a run number is spent, from where the buffers are now (the pulse map's newest
pulse) and how long they keep data (``buffers.*_retention_pulses``): a range that has aged
out, or that ends further ahead than ``max_pulses_ahead``, is refused with the user's range in
the message (``buffers.horizon``). When the buffers cannot be asked, the request is accepted
and the workers judge the range: a broker must not refuse work because a buffer is slow to
answer one question.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiohttp import web

from sf_daq_broker.api.state import PULSE_SEARCH, SETTINGS
from sf_daq_broker.buffers.errors import BufferClientError, DataNotYetAvailable
from sf_daq_broker.buffers.horizon import aged_out, too_far_ahead
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.config import Settings
from sf_daq_broker.errors import BadRequest
from sf_daq_broker.retrieval import RetrieveRequest

log = logging.getLogger(__name__)

#: Longest the door waits for the pulse map, in seconds (then the request goes through).
DOOR_TIMEOUT = 5.0


async def buffers_now(app: web.Application, hints: Iterable[int] = ()) -> int:
    """The newest pulse the buffers' pulse map knows.

    The search starts from the last answer (a few requests after the first call), else from
    the ``hints`` (e.g. the request's own pulses), else from pulse 1. Raises a
    BufferClientError when the map does not answer or knows none of them.
    """
    state = app[PULSE_SEARCH]
    starts = [state["known"]] if "known" in state else []
    starts += [*hints, 1]
    async with PulseMapClient(
        app[SETTINGS].buffers.databuffer_url, connect_timeout=2.0, read_timeout=DOOR_TIMEOUT
    ) as pulse_map:
        for start in starts:
            try:
                newest = await pulse_map.newest_pulse_id_near(start)
            except DataNotYetAvailable:  # e.g. a remembered pulse the map has forgotten
                continue
            state["known"] = newest
            return newest
    raise DataNotYetAvailable(f"the pulse map knows none of the pulses {starts}")


def _buffers_of(request: RetrieveRequest, settings: Settings) -> list[tuple[str, int]]:
    """The buffers (name, retention) the request reads whose retention is configured."""
    buffers = []
    if request.channels:
        buffers.append(("data buffer", settings.buffers.databuffer_retention_pulses))
    if request.cameras:
        buffers.append(("image buffer", settings.buffers.imagebuffer_retention_pulses))
    return buffers


async def check_range(app: web.Application, request: RetrieveRequest) -> None:
    """Refuse (BadRequest) a range that has aged out or ends too far ahead of the buffers."""
    settings = app[SETTINGS]
    start, stop = request.start_pulseid, request.stop_pulseid
    try:
        newest = await asyncio.wait_for(buffers_now(app, (start, stop)), DOOR_TIMEOUT)
    except (BufferClientError, TimeoutError) as exc:
        log.warning(
            "pulses %d-%d of %s accepted unchecked: where the buffers are cannot be asked (%s);"
            " the workers will judge the range",
            start,
            stop,
            request.pgroup,
            exc or type(exc).__name__,
        )
        return
    problem = too_far_ahead(stop, newest, settings.max_pulses_ahead)
    for name, retention in _buffers_of(request, settings):
        problem = problem or aged_out(start, stop, newest, retention, name)
    if problem:
        raise BadRequest(problem)
