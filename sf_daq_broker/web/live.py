"""Live updates of the page: the status store's changes, coalesced, pushed to open pages.

The status store tells the hub which run changed (from whatever thread applied the event).
Only runs of pgroups that some page is watching are noted; at most every ``interval`` seconds
the hub renders each noted run's table row once and hands it to every page watching that
pgroup. A page that reads slowly keeps only the newest row of each run, so memory does not
grow and a burst of progress events costs one row per run, not one message per event: the API
never waits for a page, and a page never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

from sf_daq_broker.status.store import StatusStore

log = logging.getLogger(__name__)

#: Renders the rows of some runs of a pgroup: run number -> the message for the page.
RowRenderer = Callable[[str, set[int]], Awaitable[dict[int, str]]]

INTERVAL_SECONDS = 0.5


class Subscription:
    """One open page: the newest message of each changed run, until the page takes them."""

    def __init__(self, pgroup: str) -> None:
        self.pgroup = pgroup
        self._messages: dict[int, str] = {}
        self._ready = asyncio.Event()
        self.closed = False

    def push(self, messages: dict[int, str]) -> None:
        self._messages.update(messages)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self, timeout: float) -> dict[int, str]:
        """The messages waiting (newest run last), or {} after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        self._ready.clear()
        messages, self._messages = self._messages, {}
        return dict(sorted(messages.items()))


class LiveHub:
    def __init__(self, render_rows: RowRenderer, interval: float = INTERVAL_SECONDS) -> None:
        self._render_rows = render_rows
        self._interval = interval
        self._subscriptions: dict[str, set[Subscription]] = defaultdict(set)
        self._changed: dict[str, set[int]] = defaultdict(set)
        self._flush: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: StatusStore | None = None
        self.closed = False

    def attach(self, store: StatusStore) -> None:
        """Listen to ``store``; call on the event loop that serves the pages."""
        self._loop = asyncio.get_running_loop()
        self._store = store
        store.add_listener(self._changed_in_store)

    async def close(self) -> None:
        """Stop listening and end every open page's stream (the broker is stopping)."""
        self.closed = True
        if self._store is not None:
            self._store.remove_listener(self._changed_in_store)
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.close()
        if self._flush is not None:
            self._flush.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush

    def subscribe(self, pgroup: str) -> Subscription:
        subscription = Subscription(pgroup)
        self._subscriptions[pgroup].add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        watching = self._subscriptions.get(subscription.pgroup)
        if watching is not None:
            watching.discard(subscription)
            if not watching:
                del self._subscriptions[subscription.pgroup]

    def watching(self, pgroup: str) -> int:
        return len(self._subscriptions.get(pgroup, ()))

    def _changed_in_store(self, pgroup: str, run_number: int) -> None:
        """Store listener: runs in the thread that changed the store."""
        loop = self._loop
        if loop is None or self.closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is watching
            loop.call_soon_threadsafe(self._note, pgroup, run_number)

    def _note(self, pgroup: str, run_number: int) -> None:
        if self.closed or pgroup not in self._subscriptions:
            return
        self._changed[pgroup].add(run_number)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._interval)
        changed, self._changed = self._changed, defaultdict(set)
        for pgroup, runs in changed.items():
            if not self._subscriptions.get(pgroup):
                continue
            try:
                messages = await self._render_rows(pgroup, runs)
            except Exception:
                log.exception("live rows of %s could not be rendered", pgroup)
                continue
            for subscription in list(self._subscriptions.get(pgroup, ())):
                subscription.push(messages)
        if any(self._changed.values()):  # changes that came while rendering
            self._flush = asyncio.create_task(self._flush_later())
