"""The detector endpoints of the facility's broker (UPSTREAM_HEAD §5), on our server.

Each one names a detector (``detector_name``; ``det`` for ``get_jfstats``) that must be a
configured detector of the caller's beamline: a malformed name is 400, a detector configured
nowhere 404, another beamline's detector 403. The detector is reached through
``detector_control`` (the simulated detectors of ``sf-daq-broker simulate`` unless a
production adapter is configured); without a configured detector control every endpoint
answers 503, a detector that does not answer 503, a detector that refuses 409.

``power_on_detector`` takes minutes on a real detector, so, as upstream, it is started and
answered at once (202); ``get_detector_status`` then shows how the power-on went.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from sf_daq_broker.api.handlers import caller_beamline, judge_detectors, read_params, reply
from sf_daq_broker.api.state import SETTINGS
from sf_daq_broker.config import DETECTOR_NAME, Settings
from sf_daq_broker.detector_control.connect import connector_from_settings
from sf_daq_broker.detector_control.interface import (
    DetectorConnector,
    DetectorControl,
    DetectorControlError,
    DetectorRefused,
    DetectorUnreachable,
)
from sf_daq_broker.errors import BadRequest, BrokerError, Conflict, Forbidden, NotFound, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class PowerOn:
    """The last power-on of a detector, as ``get_detector_status`` reports it."""

    state: str  # running, done, failed
    message: str
    started_at: float
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "message": self.message,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


@dataclass
class DetectorServices:
    """How this broker reaches detectors, and the power-ons it has started."""

    connector: DetectorConnector | None
    power_on: dict[str, PowerOn] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectorServices:
        return cls(connector_from_settings(settings))


DETECTOR_SERVICES = web.AppKey("detector_services", DetectorServices)


def install(app: web.Application, settings: Settings) -> None:
    """Give the application its detector services (called by ``create_app``)."""
    app[DETECTOR_SERVICES] = DetectorServices.from_settings(settings)
    app.cleanup_ctx.append(_power_on_lifetime)


async def _power_on_lifetime(app: web.Application) -> AsyncIterator[None]:
    yield
    tasks = app[DETECTOR_SERVICES].tasks
    for task in tasks:
        task.cancel()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError):
            await task


def allowed_detector(request: web.Request, params: dict[str, Any], key: str) -> str:
    """The detector named by ``key``, checked against the caller's beamline."""
    settings = request.app[SETTINGS]
    name = params.get(key)
    if name is None:
        raise BadRequest(f"{key} is missing")
    if not isinstance(name, str) or not DETECTOR_NAME.match(name):
        raise BadRequest(f"{key} must be a Jungfrau detector name (JFxxTyyVzz), got {name!r}")
    beamline = caller_beamline(request)
    detector = settings.detectors.get(name)
    if detector is None:
        raise NotFound(f"{key}: {name} is not a configured detector")
    if detector.beamline != beamline:
        raise Forbidden(f"{key}: {name} is not a detector of beamline {beamline}")
    return name


def _control(request: web.Request, name: str) -> DetectorControl:
    connector = request.app[DETECTOR_SERVICES].connector
    if connector is None:
        raise Unavailable(
            "this broker has no detector control (set detector_control.url in "
            f"{request.app[SETTINGS].source})"
        )
    return connector(name)


async def call(function: Callable[[], T]) -> T:
    """A blocking detector call in a thread, its failures as honest replies."""
    try:
        return await asyncio.to_thread(function)
    except DetectorUnreachable as exc:
        raise Unavailable(str(exc)) from exc
    except DetectorRefused as exc:
        raise Conflict(str(exc)) from exc
    except DetectorControlError as exc:
        raise BrokerError(str(exc), http_status=502) from exc


async def _detector(request: web.Request, key: str = "detector_name") -> tuple[str, Any, Any]:
    params = await read_params(request)
    name = allowed_detector(request, params, key)
    return name, _control(request, name), params


async def power_on_detector(request: web.Request) -> web.Response:
    name, control, _ = await _detector(request)
    services = request.app[DETECTOR_SERVICES]
    current = services.power_on.get(name)
    if current is not None and current.state == "running":
        since = time.ctime(current.started_at)
        raise Conflict(f"{name} is being powered on already (since {since})")
    services.power_on[name] = PowerOn("running", "power on started", time.time())
    task = asyncio.create_task(_power_on(services, name, control))
    services.tasks.add(task)
    task.add_done_callback(services.tasks.discard)
    log.info("power on of %s started", name)
    return reply(
        f"request to power on {name} sent, wait a few minutes (get_detector_status shows it)",
        status=202,
        detector_name=name,
    )


async def _power_on(services: DetectorServices, name: str, control: DetectorControl) -> None:
    record = services.power_on[name]
    try:
        await call(control.power_on)
    except BrokerError as exc:
        log.error("power on of %s failed: %s", name, exc.message)
        record.state, record.message = "failed", exc.message
    else:
        log.info("%s powered on", name)
        record.state, record.message = "done", f"{name} powered on and started"
    record.finished_at = time.time()


async def get_detector_status(request: web.Request) -> web.Response:
    name, control, _ = await _detector(request)
    status = await call(control.status)
    power_on = request.app[DETECTOR_SERVICES].power_on.get(name)
    mode = status.to_json()["pedestal_mode"]
    return reply(
        f"successfully retrieved status from {name}",
        detector_status=status.summary,
        modules=[state.value for state in status.modules],
        powered_modules=status.powered_modules,
        pedestal_mode=mode,
        power_on=power_on.to_json() if power_on else None,
    )


async def get_detector_settings(request: web.Request) -> web.Response:
    name, control, _ = await _detector(request)
    settings = await call(control.settings)
    return reply(
        f"successfully retrieved detector settings from {name}", parameters=settings.to_json()
    )


async def set_detector_settings(request: web.Request) -> web.Response:
    name, control, params = await _detector(request)
    parameters = params.get("parameters")
    if not isinstance(parameters, dict):
        raise BadRequest(f"parameters must be an object of settings, got {parameters!r}")
    current = await call(control.settings)
    try:
        wanted = current.with_changes(parameters)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    changed = current.changed(wanted)
    if changed:
        await call(lambda: control.apply_settings(wanted))
        for setting, (old, new) in changed.items():
            log.info("%s: changed %s from %r to %r", name, setting, old, new)
    return reply(
        f"successfully changed detector settings of {name}"
        if changed
        else f"nothing to change: {name} has these settings already",
        changed_parameters=changed,
    )


async def _power_modules(request: web.Request, on: bool) -> web.Response:
    name, control, params = await _detector(request)
    modules = _parse_modules(params.get("modules"), control.n_modules, name)
    await call(lambda: control.power_modules(modules, on))
    verb = "on" if on else "off"
    log.info("%s: modules %s powered %s", name, modules, verb)
    return reply(f"successfully powered {verb} modules {modules} of {name}", modules=modules)


def _parse_modules(value: Any, n_modules: int, name: str) -> list[int]:
    if value is None:
        raise BadRequest("modules is missing")
    if not isinstance(value, list) or not value:
        raise BadRequest(f"modules must be a non-empty list of module numbers, got {value!r}")
    modules: list[int] = []
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise BadRequest(f"modules must hold integers, got {entry!r}")
        if not 0 <= entry < n_modules:
            raise BadRequest(
                f"modules: {name} has no module {entry} (its modules are 0..{n_modules - 1})"
            )
        if entry not in modules:
            modules.append(entry)
    return modules


async def power_on_modules(request: web.Request) -> web.Response:
    return await _power_modules(request, True)


async def power_off_modules(request: web.Request) -> web.Response:
    return await _power_modules(request, False)


async def get_detector_temperatures(request: web.Request) -> web.Response:
    name, control, _ = await _detector(request)
    temperatures = await call(control.temperatures)
    return reply(f"successfully retrieved temperatures from {name}", temperatures=temperatures)


async def get_jfctrl_monitor(request: web.Request) -> web.Response:
    name, control, _ = await _detector(request)
    parameters = await call(control.monitor)
    return reply(
        f"successfully retrieved JFCtrl monitor parameters from {name}", parameters=parameters
    )


async def get_detector_pings(request: web.Request) -> web.Response:
    name, control, _ = await _detector(request)
    pings = await call(control.pings)
    return reply(f"successfully retrieved pings of {name}", pings=pings)


async def get_jfstats(request: web.Request) -> web.Response:
    """Temperatures, monitor and whether the buffer is being written, in one call (``det``)."""
    name, control, _ = await _detector(request, key="det")
    settings = request.app[SETTINGS]
    temperatures = await call(control.temperatures)
    parameters = await call(control.monitor)
    verdict = await asyncio.to_thread(
        judge_detectors, settings.buffers.jungfrau_root, [name], settings.detector_stale_seconds
    )
    return reply(
        f"successfully retrieved JFCtrl monitor parameters and temperatures from {name}",
        parameters=parameters,
        temperatures=temperatures,
        writing=name not in verdict["missing"],
    )


ROUTES: list[tuple[str, str, Callable[[web.Request], Any]]] = [
    ("POST", "/power_on_detector", power_on_detector),
    ("GET", "/get_detector_settings", get_detector_settings),
    ("POST", "/set_detector_settings", set_detector_settings),
    ("POST", "/power_on_modules", power_on_modules),
    ("POST", "/power_off_modules", power_off_modules),
    ("GET", "/get_detector_status", get_detector_status),
    ("GET", "/get_detector_temperatures", get_detector_temperatures),
    ("GET", "/get_jfctrl_monitor", get_jfctrl_monitor),
    ("GET", "/get_detector_pings", get_detector_pings),
    ("GET", "/get_jfstats", get_jfstats),
]
