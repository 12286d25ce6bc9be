"""The configured detector control: which ``DetectorConnector`` the broker and the pedestal
worker use (a production adapter would be chosen here)."""

from __future__ import annotations

from sf_daq_broker.config import Settings
from sf_daq_broker.detector_control.interface import DetectorConnector


def connector_from_settings(settings: Settings) -> DetectorConnector | None:
    """The detectors behind ``detector_control.url`` (None: no detector control configured)."""
    url = settings.detector_control.url
    if not url:
        return None
    from sf_daq_broker.detector_control.http import http_connector

    return http_connector(url, settings.detector_control.timeout_s)
