"""The simulation's own control endpoint (not a facility interface).

- ``GET /status``: clock, addresses, Jungfrau writer progress — a readiness probe for scripts;
- ``POST /jungfrau/materialise`` ``{"detector": "JF13T01V01", "pulse_ids": [...]}`` (or
  ``"start_pulse_id"``/``"stop_pulse_id"``, inclusive, with optional ``"step"``): writes those
  records now. In lazy mode this is how a reader gets its frames; it answers
  ``{"written": n}`` once they are on disk.

The simulated detectors' control routes (``/detectors/…``) live in ``detector_server``.

``http_materialiser(url)`` is the matching ``before_read`` hook for ``JungfrauBufferReader``: a
worker reading a lazy simulated buffer passes it; production passes nothing.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from aiohttp import web

from sf_daq_broker.simulation.detector_server import add_detector_routes
from sf_daq_broker.simulation.jungfrau_detector import SimulatedJungfrau
from sf_daq_broker.simulation.jungfrau_writer import JungfrauBufferWriter

WRITER_KEY = web.AppKey("jungfrau_writer", JungfrauBufferWriter)
StatusFunction = Callable[[], dict[str, Any]]
STATUS_KEY: web.AppKey[StatusFunction] = web.AppKey("status")
_MAX_PULSES = 1_000_000


def create_control_app(
    writer: JungfrauBufferWriter,
    status: StatusFunction,
    detectors: Mapping[str, SimulatedJungfrau] | None = None,
) -> web.Application:
    app = web.Application()
    app[WRITER_KEY] = writer
    app[STATUS_KEY] = status
    app.add_routes([web.get("/status", _status), web.post("/jungfrau/materialise", _materialise)])
    add_detector_routes(app, detectors or {})
    return app


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATUS_KEY]())


def _requested_pulses(document: Any) -> tuple[str, list[int]]:
    if not isinstance(document, dict) or not isinstance(document.get("detector"), str):
        raise ValueError("body needs 'detector'")
    if "pulse_ids" in document:
        pulses = document["pulse_ids"]
        if not isinstance(pulses, list) or not all(isinstance(p, int) for p in pulses):
            raise ValueError("'pulse_ids' must be a list of integers")
    else:
        start, stop = document.get("start_pulse_id"), document.get("stop_pulse_id")
        step = document.get("step", 1)
        if not (isinstance(start, int) and isinstance(stop, int) and isinstance(step, int)):
            raise ValueError("give 'pulse_ids' or integer 'start_pulse_id', 'stop_pulse_id'")
        if step < 1:
            raise ValueError("'step' must be positive")
        pulses = list(range(start, stop + 1, step))
    if len(pulses) > _MAX_PULSES:
        raise ValueError(f"at most {_MAX_PULSES} pulses per call")
    return document["detector"], pulses


async def _materialise(request: web.Request) -> web.Response:
    writer = request.app[WRITER_KEY]
    try:
        detector, pulses = _requested_pulses(await request.json())
    except ValueError as exc:  # includes JSONDecodeError
        return web.json_response({"error": str(exc)}, status=400)
    if detector not in {d.name for d in writer.detectors}:
        return web.json_response({"error": f"unknown detector {detector}"}, status=404)
    written = await asyncio.to_thread(writer.materialise, detector, pulses)
    return web.json_response({"written": written})


def http_materialiser(
    control_url: str, timeout: float = 600.0
) -> Callable[[str, np.ndarray], None]:
    """A ``before_read`` hook that asks the simulation at ``control_url`` to write the pulses
    (blocking: readers run in worker threads)."""
    url = control_url.rstrip("/") + "/jungfrau/materialise"

    def before_read(detector: str, pulse_ids: np.ndarray) -> None:
        body = json.dumps({"detector": detector, "pulse_ids": pulse_ids.tolist()}).encode()
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()

    return before_read
