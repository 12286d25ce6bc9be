"""When may a job read its range, and is the range still there? Answered from the pulse map.

Readiness instead of a fixed delay: a buffer's pulse map knows a pulse once the buffer has
ingested it, so a job waits until the map knows ``stop + 1`` and then reads — no sooner (data
would be missing) and no later (the user waits). Retention: the api/1 buffers cannot be asked
for their oldest pulse, but the newest one can be found, and a buffer keeps a known number of
pulses; a range starting further back than that has aged out and fails at once, with that
reason, instead of coming back empty.
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

    Raises DataNotYetAvailable (transient: the loop retries) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await pulse_map.range_ns(job.start_pulse_id, job.stop_pulse_id)
        except DataNotYetAvailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(poll_seconds)


async def check_retention(
    pulse_map: PulseMapClient, job: Job, retention_pulses: int, buffer_name: str
) -> None:
    """Raise DataAgedOut if the job's first pulse is older than the buffer keeps."""
    newest = await pulse_map.newest_pulse_id(job.stop_pulse_id)
    oldest_kept = newest - retention_pulses + 1
    if job.start_pulse_id < oldest_kept:
        raise DataAgedOut(
            f"{buffer_name}: aged out — the buffer keeps {retention_pulses} pulses, the oldest "
            f"now is {oldest_kept}, so the data of this range is gone"
        )
