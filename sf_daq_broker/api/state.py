"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from sf_daq_broker.api.handover import Handover
from sf_daq_broker.api.metrics import BrokerMetrics
from sf_daq_broker.config import Settings
from sf_daq_broker.status.store import StatusStore
from sf_daq_broker.transport import Transport

SETTINGS = web.AppKey("settings", Settings)
TRANSPORT = web.AppKey("transport", Transport)
METRICS = web.AppKey("metrics", BrokerMetrics)
STATUS = web.AppKey("status", StatusStore)
HANDOVER = web.AppKey("handover", Handover)
#: Where the last /current_pulse_id search ended ({"known": pulse id}).
PULSE_SEARCH = web.AppKey("pulse_search", dict)
