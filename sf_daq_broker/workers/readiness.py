"""When may a job read its range, and is the range still there? Answered from the pulse map.

Readiness instead of a fixed delay: a buffer's pulse map knows a pulse once the buffer has
ingested it, so a job waits until the map knows ``stop + 1`` and then reads — no sooner (data
would be missing) and no later (the user waits). Retention: the api/1 buffers cannot be asked
for their oldest pulse, but the newest one can be found, and a buffer keeps a known number of
pulses; a range starting further back than that, for which the buffer indeed returns nothing,
has aged out and fails at once, with that reason, instead of being retried or written empty.
"""

from __future__ import annotations

import asyncio
import time

from sf_daq_broker.buffers.errors import DataAgedOut, DataNotYetAvailable
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.jobs import Job


async def range_when_ready(
    pulse_map: PulseMapClient, job: Job, timeout: float, poll_seconds: float
) -> tuple[int, int]:
    """``[ts(start), ts(stop + 1))`` of the job's range once the map knows ``stop + 1``.

    Raises DataNotYetAvailable (transient: the loop retries) after ``timeout`` seconds, and
    DataAgedOut at once when the map knows ``stop + 1`` but no longer ``start``.
    """
    deadline = time.monotonic() + timeout
    while True:
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
