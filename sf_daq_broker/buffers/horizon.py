"""Where the buffers are now, and what that means for a pulse range.

One mechanism, at the broker's door and in the workers. The buffers know pulses up to a newest
one (the pulse map answers for it) and keep a configured number of pulses back from there
(``buffers.*_retention_pulses``). So a range
- whose last pulse is older than the oldest pulse kept has **aged out**: nothing of it can be
  retrieved, and the broker refuses it before a run number is spent;
- whose last pulse is more than ``max_pulses_ahead`` ahead of the buffers is **too far
  ahead**: surely a typo, refused too (a worker would be blocked waiting for it);
- whose end the buffers have not reached yet is **waited for**, and says so:
  ``waiting for pulse X (the buffers are at Y, about Z s)`` — in /run_status, in
  ``daq_client --wait`` and in broker_debugger, all from the worker's status events.

Seconds are estimated at the machine's nominal 100 Hz: the real rate drifts a little, which
does not matter for "about Z s".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: Pulses per second of the machine.
PULSE_RATE_HZ = 100.0
#: The start of every waiting message; clients recognise a waiting source by it.
WAITING_PREFIX = "waiting for pulse "


def seconds_between(first_pulse: int, later_pulse: int) -> float:
    return (later_pulse - first_pulse) / PULSE_RATE_HZ


@dataclass(frozen=True)
class Waiting:
    """A job waits for ``pulse_id``; the buffers are at ``buffers_at``, about ``seconds`` away.

    Travels in a ``write_progress`` event (``details["waiting"]``, its message is
    ``message()``); the status store keeps the message, so /run_status shows it.
    """

    pulse_id: int
    buffers_at: int
    seconds: float

    @classmethod
    def at_pulse_rate(cls, pulse_id: int, buffers_at: int) -> Waiting:
        return cls(pulse_id, buffers_at, max(seconds_between(buffers_at, pulse_id), 0.0))

    def message(self) -> str:
        return (
            f"{WAITING_PREFIX}{self.pulse_id} (the buffers are at {self.buffers_at}, "
            f"about {self.seconds:.0f} s)"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def oldest_kept(buffers_at: int, retention_pulses: int) -> int:
    return buffers_at - retention_pulses + 1


def aged_out(
    start: int, stop: int, buffers_at: int, retention_pulses: int, buffer_name: str
) -> str | None:
    """Why nothing of ``[start, stop]`` (the user's range) is left in the buffer, or None."""
    oldest = oldest_kept(buffers_at, retention_pulses)
    if stop >= oldest:
        return None
    return (
        f"pulses {start}-{stop} have aged out of the {buffer_name}: it keeps "
        f"{retention_pulses} pulses (about {seconds_between(0, retention_pulses) / 60:.0f} "
        f"minutes) and is at pulse {buffers_at}, so the oldest it holds is {oldest}"
    )


def too_far_ahead(stop: int, buffers_at: int, max_pulses_ahead: int) -> str | None:
    """Why ``stop`` cannot be meant (too far in the future), or None."""
    ahead = stop - buffers_at
    if ahead <= max_pulses_ahead:
        return None
    return (
        f"stop_pulseid {stop} is {ahead} pulses (about {seconds_between(0, ahead):.0f} s) ahead "
        f"of the buffers, which are at pulse {buffers_at}; the limit is {max_pulses_ahead} "
        "pulses (max_pulses_ahead): is it a typo?"
    )
