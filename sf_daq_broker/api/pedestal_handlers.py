"""``POST /take_pedestal`` and ``GET /pedestal_status``.

``take_pedestal`` checks the request (``pedestals.request``), the pgroup (it exists, is not
closed) and that detectors can be controlled, writes ``raw/JF_pedestals/<name>.json`` and
queues one pedestal job for all the request's detectors; the pedestal worker does the rest.
The reply names the pedestal and its files and says how long to wait at least (upstream's
message). ``pedestal_status`` {pgroup, pedestal} answers like ``/run_status``: state,
progress of the step it is in, and when done the result (range, files, frames per gain
stage, good pixels) or the reason it failed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sf_daq_broker.api.detector_handlers import DETECTOR_SERVICES
from sf_daq_broker.api.handlers import (
    caller_beamline,
    caller_pgroup,
    read_json_body,
    read_params,
    reply,
)
from sf_daq_broker.api.state import HANDOVER, SETTINGS, STATUS, TRANSPORT
from sf_daq_broker.bookkeeping.atomic import dump_json
from sf_daq_broker.bookkeeping.ledger import request_time_now
from sf_daq_broker.bookkeeping.paths import PEDESTAL_DIRECTORY, PgroupDirs, open_pgroup
from sf_daq_broker.bookkeeping.runs import check_open, pgroup_lock
from sf_daq_broker.errors import BadRequest, Conflict, NotFound, Unavailable
from sf_daq_broker.jobs import Action, Job, StatusEvent
from sf_daq_broker.pedestals.request import (
    NAME_FORMAT,
    PedestalFiles,
    expected_frames,
    parse_pedestal_request,
    pedestal_job,
    pedestal_job_id,
    pedestal_name_now,
    read_record,
)
from sf_daq_broker.status.store import JobState
from sf_daq_broker.transport import HandoverError

log = logging.getLogger(__name__)


async def take_pedestal(request: web.Request) -> web.Response:
    settings, transport = request.app[SETTINGS], request.app[TRANSPORT]
    body = await read_json_body(request)
    beamline = caller_beamline(request)
    parsed = parse_pedestal_request(
        body, beamline=beamline, allowed_detectors=settings.detectors_of(beamline)
    )
    if request.app[DETECTOR_SERVICES].connector is None:
        raise Unavailable(
            f"this broker has no detector control (set detector_control.url in {settings.source})"
        )
    dirs = await asyncio.to_thread(open_pgroup, settings.data_root, beamline, parsed.pgroup)
    request_id = str(uuid.uuid4())
    request_time = request_time_now()
    files = await asyncio.to_thread(_record_request, dirs, parsed.record or {}, request_id)
    job = pedestal_job(parsed, dirs, files, settings, request_id, request_time)
    await asyncio.to_thread(request.app[STATUS].record_queued, [job])
    try:
        waiting = await request.app[HANDOVER].submit([job])
    except HandoverError as exc:
        await asyncio.to_thread(request.app[STATUS].record_handover_failed, [job], str(exc), [])
        raise Unavailable(
            f"pedestal {files.name} of {dirs.pgroup} was recorded but could not be queued "
            f"({exc}): send the request again when the queue is back"
        ) from exc
    if not waiting:  # else announced when handed over
        await transport.publish_status(
            StatusEvent.for_job(Action.WRITE_REQUEST, job, "pedestal job queued")
        )
    frames = expected_frames(settings, parsed)
    wait = frames / 100 * parsed.rate_multiplicator + 10
    log.info(
        "pedestal %s of %s (%s): %s, rate 1/%d, request %s",
        files.name,
        dirs.pgroup,
        beamline,
        ", ".join(parsed.detectors),
        parsed.rate_multiplicator,
        request_id,
    )
    return reply(
        f"request to take pedestal sent, wait at least {wait:g} seconds",
        pedestal=files.name,
        request_id=request_id,
        detectors=list(parsed.detectors),
        files=_files(job),
    )


def _record_request(dirs: PgroupDirs, body: dict[str, Any], request_id: str) -> PedestalFiles:
    """Write ``JF_pedestals/<name>.json`` (a name used already this second is refused)."""
    directory = dirs.raw / PEDESTAL_DIRECTORY
    with pgroup_lock(dirs) as run_info:
        check_open(dirs, run_info)
        with dirs.open_dir(directory, PEDESTAL_DIRECTORY, create=True) as pedestals:
            files = PedestalFiles(directory, pedestal_name_now())
            record = {
                **body,
                "beamline": dirs.beamline,
                "pedestal": files.name,
                "request_id": request_id,
                "request_time": request_time_now(),
            }
            try:
                pedestals.create_atomic(files.record.name, dump_json(record))
            except FileExistsError:
                raise Conflict(
                    f"a pedestal of {dirs.pgroup} was requested in this second already "
                    f"({files.record}): send the request again"
                ) from None
    return files


def _files(job: Job) -> dict[str, Any]:
    detectors = job.options["detectors"]
    return {
        "json": job.output_file,
        "log": job.log_file,
        "raw": {name: files["raw_file"] for name, files in detectors.items()},
        "pedestal": {name: files["result_file"] for name, files in detectors.items()},
        "installed": {name: files["installed_file"] for name, files in detectors.items()},
    }


async def pedestal_status(request: web.Request) -> web.Response:
    params = await read_params(request)
    dirs = await caller_pgroup(request, params)
    name = params.get("pedestal")
    if name is None:
        raise BadRequest("pedestal is missing (the name /take_pedestal replied)")
    if not isinstance(name, str) or not _is_name(name):
        raise BadRequest(f"pedestal must be a pedestal name YYYYmmdd_HHMMSS, got {name!r}")
    status = await asyncio.to_thread(
        request.app[STATUS].job_status, pedestal_job_id(dirs.pgroup, name)
    )
    if status is None:
        raise NotFound(f"this broker knows no pedestal {name} of {dirs.pgroup}")
    step = status.pop("message")
    message = f"pedestal {name} of {dirs.pgroup} is {status['state']}"
    if step:
        message += f": {step}"
    result = None
    if status["state"] == JobState.DONE:
        record = await asyncio.to_thread(read_record, Path(status["file"]))
        result = record.get("result")
    return reply(message, pgroup=dirs.pgroup, pedestal=name, result=result, **status)


def _is_name(name: str) -> bool:
    from datetime import datetime

    try:
        datetime.strptime(name, NAME_FORMAT)
    except ValueError:
        return False
    return True


ROUTES: list[tuple[str, str, Callable[[web.Request], Any]]] = [
    ("POST", "/take_pedestal", take_pedestal),
    ("GET", "/pedestal_status", pedestal_status),
]
