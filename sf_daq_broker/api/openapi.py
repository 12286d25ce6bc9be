"""The OpenAPI 3.1 document of the HTTP API, generated from the request models.

Served at ``GET /openapi.json``; the test suite fuzzes the broker against it. The operations
here name the model each endpoint reads; the route table (``app.ROUTES``) is the list of
endpoints, and a test checks both list the same ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from sf_daq_broker import __version__
from sf_daq_broker.api.models import (
    CopyUserFilesBody,
    DapSettingsBody,
    DetectorQuery,
    DetectorSettingsBody,
    JfstatsQuery,
    ModulesBody,
    PedestalStatusQuery,
    PgroupQuery,
    PvListBody,
    Reply,
    RetrieveBody,
    RunStatusQuery,
    TakePedestalBody,
)

REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Operation:
    summary: str
    #: Read from the query string and/or a JSON object body (existing clients use both).
    params: type[BaseModel] | None = None
    #: A JSON body only.
    body: type[BaseModel] | None = None
    #: Statuses besides 200 and 400 that the endpoint answers with, and why.
    statuses: tuple[tuple[int, str], ...] = ()


_PGROUP_STATUSES = ((403, "caller not allowed"), (404, "no such pgroup"))
_DETECTOR_STATUSES = (
    (403, "another beamline's detector"),
    (404, "a detector configured nowhere"),
    (409, "the detector refuses"),
    (503, "no detector control, or the detector does not answer"),
)
#: The detector endpoints, pedestals and the facility's other endpoints (UPSTREAM_HEAD §4, §5).
DETECTOR_OPERATIONS: dict[str, Operation] = {
    "/power_on_detector": Operation(
        "Start powering a detector on (202; get_detector_status follows it)",
        params=DetectorQuery,
        statuses=((202, "started"), *_DETECTOR_STATUSES),
    ),
    "/get_detector_settings": Operation(
        "delay, detector_mode, exptime, gain_mode",
        params=DetectorQuery,
        statuses=_DETECTOR_STATUSES,
    ),
    "/set_detector_settings": Operation(
        "Change settings; changed_parameters {name: [old, new]}",
        params=DetectorSettingsBody,
        statuses=_DETECTOR_STATUSES,
    ),
    "/power_on_modules": Operation(
        "Chip power and high voltage on", params=ModulesBody, statuses=_DETECTOR_STATUSES
    ),
    "/power_off_modules": Operation(
        "Chip power and high voltage off", params=ModulesBody, statuses=_DETECTOR_STATUSES
    ),
    "/get_detector_status": Operation(
        "Run state per module, pedestal mode, the last power-on",
        params=DetectorQuery,
        statuses=_DETECTOR_STATUSES,
    ),
    "/get_detector_temperatures": Operation(
        "Temperatures per module", params=DetectorQuery, statuses=_DETECTOR_STATUSES
    ),
    "/get_jfctrl_monitor": Operation(
        "Power controller readings", params=DetectorQuery, statuses=_DETECTOR_STATUSES
    ),
    "/get_detector_pings": Operation(
        "Whether each module answers", params=DetectorQuery, statuses=_DETECTOR_STATUSES
    ),
    "/get_jfstats": Operation(
        "Temperatures, monitor and whether the buffer is written",
        params=JfstatsQuery,
        statuses=_DETECTOR_STATUSES,
    ),
    "/take_pedestal": Operation(
        "Take a pedestal: gain stages, retrieval, pedestal file, installed for later runs",
        body=TakePedestalBody,
        statuses=(*_PGROUP_STATUSES, (409, "pgroup closed"), (503, "no detector control")),
    ),
    "/pedestal_status": Operation(
        "A pedestal's state, step and result",
        params=PedestalStatusQuery,
        statuses=(*_PGROUP_STATUSES, (404, "no such pedestal")),
    ),
    "/get_pvlist": Operation(
        "The beamline's EPICS buffer PV list", statuses=((404, "no PV list"),)
    ),
    "/set_pvlist": Operation(
        "Set the beamline's PV list", params=PvListBody, statuses=((503, "no PV list directory"),)
    ),
    "/get_dap_settings": Operation(
        "A detector's DAP parameters", params=DetectorQuery, statuses=_DETECTOR_STATUSES
    ),
    "/set_dap_settings": Operation(
        "Merge DAP parameters; changed_parameters",
        params=DapSettingsBody,
        statuses=_DETECTOR_STATUSES,
    ),
    "/copy_user_files": Operation(
        "Copy files the pgroup may read next to a run (destination_files, error_files)",
        params=CopyUserFilesBody,
        statuses=(*_PGROUP_STATUSES, (404, "no such run"), (409, "pgroup closed")),
    ),
    "/upload_custom_dap_script": Operation(
        "Not offered: uploading code to run is refused", statuses=((403, "refused"),)
    ),
    "/get_allowed_detectors_list": Operation("The 2021 name of /get_allowed_detectors"),
    "/get_running_detectors_list": Operation("The 2021 name of /get_running_detectors"),
    "/get_next_acquistion_number": Operation(
        "The 2021 name (sic) of /advance_run_number",
        params=PgroupQuery,
        statuses=(*_PGROUP_STATUSES, (409, "pgroup closed")),
    ),
}
OPERATIONS: dict[str, Operation] = {
    "/retrieve_from_buffers": Operation(
        "Accept a retrieval: number the run, record it, queue one job per source",
        body=RetrieveBody,
        statuses=(
            *_PGROUP_STATUSES,
            (409, "pgroup closed, run number used"),
            (503, "the queue is away"),
            (507, "the file system is full"),
        ),
    ),
    "/get_current_run_number": Operation(
        "The last run number given out", params=PgroupQuery, statuses=_PGROUP_STATUSES
    ),
    "/advance_run_number": Operation(
        "Reserve the next run number",
        params=PgroupQuery,
        statuses=(*_PGROUP_STATUSES, (409, "pgroup closed"), (507, "file system full")),
    ),
    "/close_pgroup_writing": Operation(
        "Close a pgroup for writing",
        params=PgroupQuery,
        statuses=(*_PGROUP_STATUSES, (409, "already closed")),
    ),
    "/get_allowed_detectors": Operation("Detectors the caller's beamline may retrieve"),
    "/get_running_detectors": Operation("Detectors of the beamline: running, limping, missing"),
    "/run_status": Operation(
        "The state of a run's jobs",
        params=RunStatusQuery,
        statuses=(*_PGROUP_STATUSES, (404, "no such run")),
    ),
    "/current_pulse_id": Operation(
        "The newest pulse id of the buffers", statuses=((503, "the buffers do not answer"),)
    ),
    "/health": Operation(
        "Transport, data root and free space", statuses=((503, "something is wrong"),)
    ),
    "/metrics": Operation("Prometheus metrics (text format)"),
    "/openapi.json": Operation("This document"),
    **DETECTOR_OPERATIONS,
}


@functools.lru_cache(maxsize=8)
def openapi_document(routes: tuple[tuple[str, str], ...], pulse_bounds: tuple[int, int]) -> Any:
    """The document for ``routes`` ((method, path) pairs); pulse ids within ``pulse_bounds``."""
    models: list[type[BaseModel]] = [Reply, RetrieveBody, PgroupQuery, RunStatusQuery]
    for operation in DETECTOR_OPERATIONS.values():
        model = operation.body or operation.params
        if model is not None and model not in models:
            models.append(model)
    _, top = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    schemas: dict[str, Any] = top["$defs"]
    for key in ("start_pulseid", "stop_pulseid"):
        field = schemas[RetrieveBody.__name__]["properties"][key]
        field["minimum"], field["maximum"] = pulse_bounds
    paths: dict[str, Any] = {}
    for method, path in routes:
        paths.setdefault(path, {})[method.lower()] = _operation(path, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sf-daq-broker",
            "version": __version__,
            "description": "Retrieval requests for the data buffers (SPEC.md). Every reply is "
            "a JSON object with 'status' ('ok' or 'failed') and a 'message'.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _operation(path: str, schemas: dict[str, Any]) -> dict[str, Any]:
    operation = OPERATIONS[path]
    reply = {"application/json": {"schema": {"$ref": REF.format(model="Reply")}}}
    responses: dict[str, Any] = {"200": {"description": "ok", "content": reply}}
    if path == "/metrics":
        responses["200"] = {"description": "ok", "content": {"text/plain": {}}}
    responses["400"] = {"description": "the request is refused; message names the key"}
    for status, why in operation.statuses:
        responses[str(status)] = {"description": why, "content": reply}
    document: dict[str, Any] = {"summary": operation.summary, "responses": responses}
    model = operation.body or operation.params
    if model is not None:
        ref = {"$ref": REF.format(model=model.__name__)}
        document["requestBody"] = {
            "required": operation.body is not None,
            "content": {"application/json": {"schema": ref}},
        }
    if operation.params is not None:
        fields = schemas[operation.params.__name__]
        required = set(fields.get("required", []))
        document["parameters"] = [
            {"name": name, "in": "query", "required": False, "schema": schema}
            | ({"description": "also accepted in a JSON body"} if name in required else {})
            for name, schema in fields["properties"].items()
        ]
    return document
