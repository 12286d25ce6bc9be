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
from sf_daq_broker.api.models import PgroupQuery, Reply, RetrieveBody, RunStatusQuery

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
}


@functools.lru_cache(maxsize=8)
def openapi_document(routes: tuple[tuple[str, str], ...], pulse_bounds: tuple[int, int]) -> Any:
    """The document for ``routes`` ((method, path) pairs); pulse ids within ``pulse_bounds``."""
    models: list[type[BaseModel]] = [Reply, RetrieveBody, PgroupQuery, RunStatusQuery]
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
