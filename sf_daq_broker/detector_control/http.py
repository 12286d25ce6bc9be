"""``DetectorControl`` over HTTP: the simulated detectors of ``sf-daq-broker simulate``.

The broker and the pedestal worker are other processes than the simulation, so they reach its
detectors through the control endpoint's ``/detectors/{name}/…`` routes
(``simulation.detector_server``). Blocking (``requests``), like the detector library a
production adapter wraps: callers run it in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import requests

from sf_daq_broker.buffers.jungfrau_format import n_modules
from sf_daq_broker.detector_control.interface import (
    DetectorConnector,
    DetectorControlError,
    DetectorRefused,
    DetectorSettings,
    DetectorStatus,
    DetectorUnreachable,
    PedestalMode,
)

DEFAULT_TIMEOUT = 10.0


class HttpDetectorControl:
    """One simulated detector at ``{control_url}/detectors/{name}``."""

    def __init__(self, control_url: str, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._base = f"{control_url.rstrip('/')}/detectors/{name}"
        self._name = name
        self._n_modules = n_modules(name)
        self.timeout = timeout

    @property
    def name(self) -> str:
        return self._name

    @property
    def n_modules(self) -> int:
        return self._n_modules

    def _call(self, method: str, action: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self._base}/{action}"
        try:
            response = requests.request(method, url, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise DetectorUnreachable(
                f"{self._name}: the detector control at {url} does not answer "
                f"({type(exc).__name__})"
            ) from None
        try:
            document = response.json()
        except ValueError:
            document = {}
        error = document.get("error") if isinstance(document, dict) else None
        if response.status_code == 404:
            raise DetectorUnreachable(f"{self._name}: {error or 'unknown to the detector control'}")
        if response.status_code == 409:
            raise DetectorRefused(str(error))
        if response.status_code != 200:
            raise DetectorControlError(
                f"{self._name}: {action} failed (HTTP {response.status_code}: {error})"
            )
        return document

    def status(self) -> DetectorStatus:
        return DetectorStatus.from_json(self._call("GET", "status"))

    def start(self) -> None:
        self._call("POST", "start")

    def stop(self) -> None:
        self._call("POST", "stop")

    def power_on(self) -> None:
        self._call("POST", "power_on")

    def power_modules(self, modules: Sequence[int], on: bool) -> None:
        self._call("POST", "modules", {"modules": list(modules), "on": on})

    def settings(self) -> DetectorSettings:
        return DetectorSettings.from_json(self._call("GET", "settings"))

    def apply_settings(self, settings: DetectorSettings) -> None:
        self._call("POST", "settings", settings.to_json())

    def enable_pedestal_mode(self, mode: PedestalMode) -> int:
        reply = self._call(
            "POST", "pedestal_mode", {"enable": True, "frames": mode.frames, "loops": mode.loops}
        )
        return int(reply["frames"])

    def disable_pedestal_mode(self) -> None:
        self._call("POST", "pedestal_mode", {"enable": False})

    def temperatures(self) -> dict[str, list[float | None]]:
        reply: dict[str, list[float | None]] = self._call("GET", "temperatures")
        return reply

    def monitor(self) -> dict[str, list[Any]]:
        reply: dict[str, list[Any]] = self._call("GET", "monitor")
        return reply

    def pings(self) -> list[bool]:
        return [bool(ping) for ping in self._call("GET", "pings")["pings"]]

    def set_illuminated(self, illuminated: bool) -> None:
        """Simulation only: the beam reaches the detector (or the shutter is closed)."""
        self._call("POST", "illumination", {"illuminated": illuminated})


def http_connector(control_url: str, timeout: float = DEFAULT_TIMEOUT) -> DetectorConnector:
    """A connector to the simulated detectors behind ``control_url``."""

    def connect(name: str) -> HttpDetectorControl:
        return HttpDetectorControl(control_url, name, timeout=timeout)

    return connect
