"""Feeds the status store from the status exchange, for as long as the broker runs.

On RabbitMQ the broker listens through a named durable queue, so the events published while
the broker is down wait for it and the store catches up after a restart.
"""

from __future__ import annotations

import asyncio
import logging

from sf_daq_broker.cancellation import raise_if_cancelled
from sf_daq_broker.status.store import StatusStore
from sf_daq_broker.transport import Transport
from sf_daq_broker.transport.failures import without_reprs

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0


async def follow_status(transport: Transport, store: StatusStore, queue_name: str) -> None:
    """Apply every status event to the store; reconnects until cancelled."""
    while True:
        raise_if_cancelled()  # a library may have swallowed the request (``cancellation``)
        try:
            async with await transport.subscribe_status(queue_name) as events:
                async for event in events:
                    await asyncio.to_thread(store.apply, event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = without_reprs(str(exc)) or exc.__class__.__name__
            log.warning(
                "status events not followed (%s); retrying in %.0f s", reason, RETRY_SECONDS
            )
            await asyncio.sleep(RETRY_SECONDS)
