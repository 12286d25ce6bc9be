"""The task that empties an outbox into RabbitMQ: oldest first, one confirmed message at a time.

One message at a time, each confirmed before the next is sent, so the order the messages were
put in is the order RabbitMQ gets them (a status event never overtakes an earlier one of its
job, a job never overtakes an earlier run's). A message is removed from the outbox only after
its confirm; if the process dies between the confirm and the removal, the message is sent
again by the next process (at least once: job ids are stable, a status event applied twice
leaves the job where it was).

While RabbitMQ is away, sends are retried with a growing pause (``RetryTiming``), and a
``wake`` (new entries, or a transport that saw RabbitMQ come back) cuts the pause short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sf_daq_broker.cancellation import raise_if_cancelled
from sf_daq_broker.transport.outbox import Entry, Outbox

log = logging.getLogger(__name__)

#: Sends one entry; returns when RabbitMQ confirmed it, raises otherwise.
Send = Callable[[Entry], Awaitable[None]]
#: Called after a run of entries was confirmed and removed (e.g. to update a status store).
Confirmed = Callable[[list[Entry]], Awaitable[None]]
#: Plain words for a failure (never an object repr): ``failures.describe_failure``.
Describe = Callable[[BaseException], str]

BATCH = 100


@dataclass(frozen=True)
class RetryTiming:
    first: float = 0.5
    factor: float = 2.0
    longest: float = 5.0

    def pause(self, failures: int) -> float:
        return float(min(self.longest, self.first * self.factor ** min(30, max(0, failures - 1))))


class OutboxSender:
    """Drains ``outbox`` through ``send`` until cancelled (see the module docstring)."""

    def __init__(
        self,
        outbox: Outbox,
        send: Send,
        what: str,
        describe: Describe,
        confirmed: Confirmed | None = None,
        timing: RetryTiming | None = None,
    ) -> None:
        self.outbox = outbox
        self.what = what
        self._send = send
        self._describe = describe
        self._confirmed = confirmed
        self._timing = timing or RetryTiming()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The last send failed: new entries do not cut the pause short (RabbitMQ is away).
        self._failing = False

    @property
    def failing(self) -> bool:
        """The last try failed (RabbitMQ away): the sender pauses before the next."""
        return self._failing

    def wake(self) -> None:
        """Entries were added: send them (after the pause, if the last try failed)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"outbox of {self.what}")
        elif not self._failing:
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        failures = 0
        started = time.monotonic()
        sent = 0
        # ``count`` is updated before ``wake`` is called and checked here with no pause before
        # the task ends, so an entry put in while the task ends is never left behind.
        while self.outbox.count:
            raise_if_cancelled()  # a library may have swallowed the request (``cancellation``)
            self._wake.clear()
            try:
                done, problem = await self._send_batch()
            except Exception as exc:  # the outbox itself failed (disk): keep trying, loudly
                log.exception("outbox of %s", self.what)
                done, problem = 0, f"the outbox failed: {exc}"
            sent += done
            if done:
                failures = 0
            self._failing = problem is not None
            if problem is None:
                continue
            failures += 1
            pause = self._timing.pause(failures)
            if failures == 1 or failures % 20 == 0:
                log.warning(
                    "%d %s wait in the outbox: %s; next try in %.1f s",
                    self.outbox.count,
                    self.what,
                    problem,
                    pause,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
        self._failing = False
        if sent:
            log.info(
                "outbox of %s empty: %d sent in %.1f s", self.what, sent, time.monotonic() - started
            )

    async def _send_batch(self) -> tuple[int, str | None]:
        """Send the oldest entries, remove those confirmed; (how many, the failure)."""
        entries = await asyncio.to_thread(self.outbox.head, BATCH)
        done, problem = await self._send_in_order(entries)
        if done:
            await asyncio.to_thread(self.outbox.remove, [entry.seq for entry in done])
            if self._confirmed is not None:
                try:
                    await self._confirmed(done)
                except Exception:  # they are in RabbitMQ: a bookkeeping hiccup must not resend
                    log.exception("after handing over %d %s", len(done), self.what)
        return len(done), problem

    async def _send_in_order(self, entries: list[Entry]) -> tuple[list[Entry], str | None]:
        """The entries confirmed (a prefix of ``entries``), and the failure that stopped."""
        done: list[Entry] = []
        for entry in entries:
            try:
                await self._send(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return done, self._describe(exc)
            done.append(entry)
        return done, None
