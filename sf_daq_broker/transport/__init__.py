"""Queue transports: RabbitMQ for production, an embedded one for a single machine."""

from __future__ import annotations

from pathlib import Path

from sf_daq_broker.transport.base import (
    REJECTED_BY_WORKER,
    DeadLetter,
    HandoverError,
    JobDelivery,
    StatusSubscription,
    Transport,
)

__all__ = [
    "REJECTED_BY_WORKER",
    "DeadLetter",
    "HandoverError",
    "JobDelivery",
    "StatusSubscription",
    "Transport",
    "create_transport",
]


def create_transport(
    amqp_url: str,
    prefix: str = "sf-daq",
    status_outbox: Path | None = None,
    state_dir: Path | None = None,
) -> Transport:
    """RabbitMQ when a URL is given, otherwise the embedded in-process transport.

    ``status_outbox``: where a worker keeps the status events RabbitMQ did not take yet.
    ``state_dir``: where the embedded transport keeps its jobs (the broker's, so that a restart
    resumes them; in memory without one).
    """
    if amqp_url:
        from sf_daq_broker.transport.amqp import AmqpTransport

        return AmqpTransport(amqp_url, prefix=prefix, status_outbox=status_outbox)
    from sf_daq_broker.transport.embedded import EmbeddedTransport
    from sf_daq_broker.transport.job_store import QUEUE_FILE

    return EmbeddedTransport(state_dir / QUEUE_FILE if state_dir is not None else None)
