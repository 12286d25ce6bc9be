"""Queue transports: RabbitMQ for production, an embedded one for a single machine."""

from __future__ import annotations

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


def create_transport(amqp_url: str, prefix: str = "sf-daq") -> Transport:
    """RabbitMQ when a URL is given, otherwise the embedded in-process transport."""
    if amqp_url:
        from sf_daq_broker.transport.amqp import AmqpTransport

        return AmqpTransport(amqp_url, prefix=prefix)
    from sf_daq_broker.transport.embedded import EmbeddedTransport

    return EmbeddedTransport()
