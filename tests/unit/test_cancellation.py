"""A background loop stops when asked, even if a library swallowed the CancelledError.

Seen on a loaded machine: aio-pika swallowed the cancellation of the broker's reconciler while
it inspected the queues, the reconciler went round again, and the broker's stop waited for it
for ever (a test's teardown hung until pytest-timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.status.reconcile import ReconcilePolicy, Reconciler
from sf_daq_broker.status.store import StatusStore
from sf_daq_broker.transport.embedded import EmbeddedTransport
from tests.support import PATIENCE


class SwallowingTransport(EmbeddedTransport):
    """Its queue inspection swallows a cancellation, as a library closing a channel may."""

    def __init__(self) -> None:
        super().__init__()
        self.inspections = 0
        self.inspecting = asyncio.Event()

    async def job_queue_depths(self) -> dict[SourceKind, tuple[int, int]] | None:
        self.inspections += 1
        self.inspecting.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed: only counted on the task
            await asyncio.sleep(3600)
        return None


async def test_the_reconciler_stops_although_its_cancellation_was_swallowed(
    tmp_path: Path,
) -> None:
    transport = SwallowingTransport()
    store = StatusStore(tmp_path / "status.sqlite")
    reconciler = Reconciler(transport, store, set, "broker", ReconcilePolicy(interval=0))
    task = asyncio.create_task(reconciler.run())
    await asyncio.wait_for(transport.inspecting.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, PATIENCE)
    assert transport.inspections == 1  # it did not go round again
    store.close()
