"""The rest of the facility broker's endpoints (UPSTREAM_HEAD §5): the beamline's PV list, a
detector's DAP settings, user files next to a run, the 2021 endpoint names, and the refusal
to take code (``upload_custom_dap_script``).

Each is restricted to the caller's beamline: the PV list is the beamline's own, DAP settings
only of its detectors, user files only into its pgroups.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sf_daq_broker.api import handlers
from sf_daq_broker.api.detector_handlers import allowed_detector
from sf_daq_broker.api.handlers import caller_beamline, caller_pgroup, read_params, reply
from sf_daq_broker.api.state import SETTINGS
from sf_daq_broker.bookkeeping.user_files import (
    aux_directory,
    check_pgroup_open,
    copy_user_files,
    parse_file_list,
)
from sf_daq_broker.errors import BadRequest, Forbidden, NotFound
from sf_daq_broker.retrieval import parse_integer
from sf_daq_broker.service_files import (
    parse_pv_list,
    read_dap_settings,
    read_json_object,
    read_pv_list,
    update_dap_settings,
    write_pv_list,
)

log = logging.getLogger(__name__)


async def get_pvlist(request: web.Request) -> web.Response:
    await read_params(request)  # none are needed, but a malformed body is refused as anywhere
    beamline = caller_beamline(request)
    pv_list_dir = request.app[SETTINGS].service_files.pv_list_dir
    pv_list = await asyncio.to_thread(read_pv_list, pv_list_dir, beamline)
    return reply(f"successfully retrieved list of PVs of {beamline}", pv_list=pv_list)


async def set_pvlist(request: web.Request) -> web.Response:
    params = await read_params(request)
    if "pv_list" not in params:
        raise BadRequest("pv_list is missing")
    pv_list = parse_pv_list(params["pv_list"])
    beamline = caller_beamline(request)
    pv_list_dir = request.app[SETTINGS].service_files.pv_list_dir
    await asyncio.to_thread(write_pv_list, pv_list_dir, beamline, pv_list)
    log.info("PV list of %s set: %d PVs", beamline, len(pv_list))
    return reply(f"PV list of {beamline} set: {len(pv_list)} PVs", pv_list=pv_list)


async def get_dap_settings(request: web.Request) -> web.Response:
    params = await read_params(request)
    detector = allowed_detector(request, params, "detector_name")
    directory = request.app[SETTINGS].service_files.dap_config_dir
    parameters = await asyncio.to_thread(read_dap_settings, directory, detector)
    return reply(f"successfully retrieved DAP settings for {detector}", parameters=parameters)


async def set_dap_settings(request: web.Request) -> web.Response:
    params = await read_params(request)
    detector = allowed_detector(request, params, "detector_name")
    parameters = params.get("parameters")
    if not isinstance(parameters, dict):
        raise BadRequest(f"parameters must be an object of DAP settings, got {parameters!r}")
    directory = request.app[SETTINGS].service_files.dap_config_dir
    changed = await asyncio.to_thread(update_dap_settings, directory, detector, parameters)
    if changed:
        log.info("DAP settings of %s changed: %s", detector, ", ".join(changed))
    return reply(
        f"successfully changed DAP settings for {detector}"
        if changed
        else f"nothing to change: the DAP settings of {detector} have these values already",
        changed_parameters=changed,
    )


async def copy_user_files_handler(request: web.Request) -> web.Response:
    params = await read_params(request)
    dirs = await caller_pgroup(request, params)
    if params.get("run_number") is None:
        raise BadRequest("run_number is missing")
    run = parse_integer(params["run_number"], "run_number")
    if run < 1:
        raise BadRequest(f"run_number must be a positive integer, got {run}")
    files = parse_file_list(params.get("files", []))
    await asyncio.to_thread(check_pgroup_open, dirs)
    record = await asyncio.to_thread(_run_record, dirs.run_json(run), run, dirs.pgroup)
    target = aux_directory(
        dirs, record.get("directory_name"), run, record.get("appended_directory_suffix")
    )
    outcome = await asyncio.to_thread(copy_user_files, dirs, target, files)
    copied, failed = len(outcome.destination_files), len(outcome.error_files)
    log.info("copy_user_files into %s: %d copied, %d refused", target, copied, failed)
    message = f"copied {copied} files into {target}"
    if failed:
        message = (
            f"copied {copied} of {copied + failed} files into {target}; the others are in "
            "error_files with the reason"
        )
    return reply(
        message,
        status=400 if failed else 200,
        destination_files=outcome.destination_files,
        error_files=outcome.error_files,
    )


def _run_record(path: Path, run: int, pgroup: str) -> dict[str, Any]:
    try:
        return read_json_object(path, "the run JSON")
    except NotFound:
        raise NotFound(f"run {run} of {pgroup} does not exist") from None


async def upload_custom_dap_script(request: web.Request) -> web.Response:
    await read_params(request)  # a malformed body is a 400, as anywhere
    raise Forbidden(
        "upload_custom_dap_script is not offered by this broker: it would run uploaded code on "
        "the facility's machines; ask the facility's DAQ team to install a DAP script"
    )


ROUTES: list[tuple[str, str, Callable[[web.Request], Any]]] = [
    ("GET", "/get_pvlist", get_pvlist),
    ("POST", "/set_pvlist", set_pvlist),
    ("GET", "/get_dap_settings", get_dap_settings),
    ("POST", "/set_dap_settings", set_dap_settings),
    ("POST", "/copy_user_files", copy_user_files_handler),
    ("POST", "/upload_custom_dap_script", upload_custom_dap_script),
    # The 2021 names (clients still call them; GET as they did).
    ("GET", "/get_allowed_detectors_list", handlers.get_allowed_detectors),
    ("GET", "/get_running_detectors_list", handlers.get_running_detectors),
    # sic: "acquistion". It reserved the next number, so it is advance_run_number.
    ("GET", "/get_next_acquistion_number", handlers.advance_run_number),
]
