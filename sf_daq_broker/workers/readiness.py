"""When may a job read its range, and is the range still there? Answered from the pulse map.

Readiness instead of a fixed delay: a buffer's pulse map knows a pulse once the buffer has
ingested it, so a job waits until the map knows ``stop + 1`` and then reads — no sooner (data
would be missing) and no later (the user waits). Retention: the api/1 buffers cannot be asked
for their oldest pulse, but the newest one can be found, and a buffer keeps a known number of
pulses; a range starting further back than that, for which the buffer indeed returns nothing,
has aged out and fails at once, with that reason, instead of being retried or written empty.
While a job waits, it says for which pulse and where the buffers are (``buffers.horizon``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from sf_daq_broker.buffers.errors import BufferClientError, DataAgedOut, DataNotYetAvailable
from sf_daq_broker.buffers.horizon import Waiting
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.cancellation import raise_if_cancelled
from sf_daq_broker.jobs import Job

#: Seconds between two "waiting for pulse …" announcements of one job.
ANNOUNCE_EVERY = 2.0

OnWait = Callable[[Waiting], Awaitable[None]]


class WaitAnnouncer:
    """Tells ``on_wait`` where the buffers are while a job waits for ``pulse_id``: at once, then
    every ``ANNOUNCE_EVERY`` seconds (finding the buffers' newest pulse costs a few requests)."""

    def __init__(
        self, pulse_map: PulseMapClient, pulse_id: int, hint: int, on_wait: OnWait
    ) -> None:
        self._pulse_map = pulse_map
        self._pulse_id = pulse_id
        self._hint = hint
        self._on_wait = on_wait
        self._last = -math.inf

    async def tick(self) -> None:
        if time.monotonic() - self._last < ANNOUNCE_EVERY:
            return
        self._last = time.monotonic()
        try:
            buffers_at = await self._pulse_map.newest_pulse_id_near(self._hint)
        except BufferClientError:
            return  # where the buffers are cannot be told now; the wait goes on regardless
        self._hint = buffers_at
        await self._on_wait(Waiting.at_pulse_rate(self._pulse_id, buffers_at))


async def range_when_ready(
    pulse_map: PulseMapClient,
    job: Job,
    timeout: float,
    poll_seconds: float,
    on_wait: OnWait | None = None,
) -> tuple[int, int]:
    """``[ts(start), ts(stop + 1))`` of the job's range once the map knows ``stop + 1``.

    While it waits, ``on_wait`` hears where the buffers are (``Progress.waiting``). Raises
    DataNotYetAvailable (transient: the loop retries) after ``timeout`` seconds, and
    DataAgedOut at once when the map knows ``stop + 1`` but no longer ``start``.
    """
    deadline = time.monotonic() + timeout
    announcer = None
    if on_wait is not None:
        announcer = WaitAnnouncer(pulse_map, job.stop_pulse_id + 1, job.start_pulse_id, on_wait)
    while True:
        raise_if_cancelled()  # a library may have swallowed a stop (``cancellation``)
        end = await pulse_map.timestamp_ns(job.stop_pulse_id + 1)
        if end is not None:
            start = await pulse_map.timestamp_ns(job.start_pulse_id)
            if start is None:
                raise DataAgedOut(
                    f"pulse map: pulse {job.start_pulse_id} is no longer known: the range has "
                    "aged out"
                )
            return start, end
        if time.monotonic() > deadline:
            raise DataNotYetAvailable(
                f"pulse map: pulse {job.stop_pulse_id + 1} is not known yet "
                f"(waited {timeout:.0f} s)"
            )
        if announcer is not None:
            await announcer.tick()
        await asyncio.sleep(poll_seconds)


async def beyond_retention(
    pulse_map: PulseMapClient, job: Job, retention_pulses: int, buffer_name: str
) -> str | None:
    """Why the job's range is presumably gone from the buffer (its first pulse is older than
    the configured retention), or None. Only a presumption: the configured figure may be
    lower than the buffer's real retention, so the caller confirms it with the data."""
    newest = await pulse_map.newest_pulse_id(job.stop_pulse_id)
    oldest_kept = newest - retention_pulses + 1
    if job.start_pulse_id >= oldest_kept:
        return None
    return (
        f"{buffer_name}: aged out — the buffer keeps {retention_pulses} pulses, the oldest "
        f"now is {oldest_kept}, so the data of this range is gone"
    )
