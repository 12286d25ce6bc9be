"""The broker's HTTP calls for clients: kept in ``daq_client.py``, which must stay one file that
needs only Python and requests (users copy it); imported from there under this old name."""

from sf_daq_broker.tools.daq_client import (
    BROKER_ENVIRONMENT,
    DEFAULT_BROKER,
    DEFAULT_TIMEOUT,
    Accepted,
    BrokerRefused,
    BrokerUnreachable,
    ClientError,
    RemoteBroker,
    broker_url,
)

__all__ = [
    "BROKER_ENVIRONMENT",
    "DEFAULT_BROKER",
    "DEFAULT_TIMEOUT",
    "Accepted",
    "BrokerRefused",
    "BrokerUnreachable",
    "ClientError",
    "RemoteBroker",
    "broker_url",
]
