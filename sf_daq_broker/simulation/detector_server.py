"""The simulated detectors over HTTP, on the simulation's control endpoint.

One route per ``DetectorControl`` method, so that ``detector_control.http.HttpDetectorControl``
in the broker or a worker drives a detector of another process exactly as a production adapter
drives a real one:

- ``GET  /detectors``                          → ``{"detectors": [names]}``
- ``GET  /detectors/{name}/status``            → ``DetectorStatus.to_json()``
- ``POST /detectors/{name}/start``, ``/stop``, ``/power_on``
- ``POST /detectors/{name}/modules``           ``{"modules": [m, …], "on": bool}``
- ``GET  /detectors/{name}/settings``          → ``DetectorSettings.to_json()``
- ``POST /detectors/{name}/settings``          the whole settings object
- ``POST /detectors/{name}/pedestal_mode``     ``{"enable": true, "frames": F, "loops": L}``
  → ``{"frames": n}``; ``{"enable": false}`` switches it off
- ``GET  /detectors/{name}/temperatures``, ``/monitor``, ``/pings``
- ``POST /detectors/{name}/illumination``      ``{"illuminated": bool}`` (simulation only: the
  beam and the shutter)

Errors: 404 ``{"error"}`` for an unknown detector, 409 when the detector refuses, 400 for a
malformed body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from sf_daq_broker.detector_control.interface import (
    DetectorRefused,
    DetectorSettings,
    PedestalMode,
)
from sf_daq_broker.simulation.jungfrau_detector import SimulatedJungfrau

DETECTORS_KEY: web.AppKey[dict[str, SimulatedJungfrau]] = web.AppKey("simulated_detectors")
Handler = Callable[[SimulatedJungfrau, Any], Any]


def add_detector_routes(app: web.Application, detectors: Mapping[str, SimulatedJungfrau]) -> None:
    app[DETECTORS_KEY] = dict(detectors)
    app.router.add_get("/detectors", _list)
    for method, action, handler in _ACTIONS:
        app.router.add_route(method, f"/detectors/{{name}}/{action}", _route(handler))


async def _list(request: web.Request) -> web.Response:
    detectors = request.app[DETECTORS_KEY]
    return web.json_response({"detectors": sorted(detectors)})


def _route(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def route(request: web.Request) -> web.Response:
        detector = request.app[DETECTORS_KEY].get(request.match_info["name"])
        if detector is None:
            return _error(404, f"the simulation has no detector {request.match_info['name']}")
        body: Any = None
        if request.method == "POST" and request.body_exists:
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "the body is not JSON")
        try:
            result = await asyncio.to_thread(handler, detector, body)
        except DetectorRefused as exc:
            return _error(409, str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            return _error(400, f"malformed request: {exc!r}")
        return web.json_response(result if result is not None else {})

    return route


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _modules(detector: SimulatedJungfrau, body: Any) -> None:
    modules = body["modules"]
    if not isinstance(modules, list) or not all(type(m) is int for m in modules):
        raise ValueError("'modules' must be a list of integers")
    detector.power_modules(modules, bool(body["on"]))


def _set_settings(detector: SimulatedJungfrau, body: Any) -> None:
    detector.apply_settings(DetectorSettings.from_json(body))


def _pedestal_mode(detector: SimulatedJungfrau, body: Any) -> dict[str, int] | None:
    if not body["enable"]:
        detector.disable_pedestal_mode()
        return None
    return {"frames": detector.enable_pedestal_mode(PedestalMode(body["frames"], body["loops"]))}


def _illumination(detector: SimulatedJungfrau, body: Any) -> None:
    detector.illuminated = bool(body["illuminated"])


_ACTIONS: list[tuple[str, str, Handler]] = [
    ("GET", "status", lambda d, _: d.status().to_json()),
    ("POST", "start", lambda d, _: d.start()),
    ("POST", "stop", lambda d, _: d.stop()),
    ("POST", "power_on", lambda d, _: d.power_on()),
    ("POST", "modules", _modules),
    ("GET", "settings", lambda d, _: d.settings().to_json()),
    ("POST", "settings", _set_settings),
    ("POST", "pedestal_mode", _pedestal_mode),
    ("GET", "temperatures", lambda d, _: d.temperatures()),
    ("GET", "monitor", lambda d, _: d.monitor()),
    ("GET", "pings", lambda d, _: {"pings": d.pings()}),
    ("POST", "illumination", _illumination),
]
