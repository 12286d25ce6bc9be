"""Thin request handlers: read parameters, call the domain code off the event loop, reply.

Every blocking file operation (locks, fsync) runs in a thread via ``asyncio.to_thread``, so a
slow file system delays one request, not the whole broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from sf_daq_broker import __version__
from sf_daq_broker.api.caller import beamline_of, client_address
from sf_daq_broker.api.handover import announce_queued
from sf_daq_broker.api.horizon import buffers_now, check_range
from sf_daq_broker.api.json_input import check_document, parse_json
from sf_daq_broker.api.models import MAX_RUN_NUMBER
from sf_daq_broker.api.openapi import OPERATIONS, openapi_document
from sf_daq_broker.api.state import HANDOVER, METRICS, SETTINGS, STATUS, TRANSPORT
from sf_daq_broker.bookkeeping.ledger import accept_request, close_pgroup, record_handover_failure
from sf_daq_broker.bookkeeping.paths import PgroupDirs, open_pgroup
from sf_daq_broker.bookkeeping.runs import allocate_run_number, read_last_run
from sf_daq_broker.buffers.errors import BufferClientError
from sf_daq_broker.buffers.horizon import WAITING_PREFIX
from sf_daq_broker.errors import BadRequest, NotFound, Unavailable
from sf_daq_broker.pedestals.store import pedestals_in_use
from sf_daq_broker.retrieval import module_count, parse_integer, parse_retrieve_request
from sf_daq_broker.status.store import WAITING_FOR_QUEUE, JobState, run_state
from sf_daq_broker.transport import HandoverError

log = logging.getLogger(__name__)


def reply(message: str, status: int = 200, **fields: Any) -> web.Response:
    ok = status < 400
    return web.json_response(
        {"status": "ok" if ok else "failed", "message": message, **fields}, status=status
    )


async def read_json_body(request: web.Request) -> Any:
    """The JSON body (None when there is none). Too large → 413, not JSON → 400."""
    if not request.body_exists:
        return None
    raw = await request.read()  # raises 413 beyond the application's client_max_size
    if not raw.strip():
        return None
    return parse_json(raw)


async def read_params(request: web.Request) -> dict[str, Any]:
    """Parameters from the query string and/or a JSON object body (existing clients use both)."""
    params: dict[str, Any] = dict(request.query)
    check_document(params, "the query string")
    body = await read_json_body(request)
    if body is not None:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        params.update(body)
    return params


def caller_beamline(request: web.Request) -> str:
    settings = request.app[SETTINGS]
    address = client_address(request.remote, request.headers.get("X-Forwarded-For"), settings)
    return beamline_of(address, settings)


async def caller_pgroup(request: web.Request, params: dict[str, Any]) -> PgroupDirs:
    if "pgroup" not in params:
        raise BadRequest("pgroup is missing")
    beamline = caller_beamline(request)
    return await asyncio.to_thread(
        open_pgroup, request.app[SETTINGS].data_root, beamline, params["pgroup"]
    )


async def retrieve_from_buffers(request: web.Request) -> web.Response:
    settings, store = request.app[SETTINGS], request.app[STATUS]
    body = await read_json_body(request)
    beamline = caller_beamline(request)
    parsed = parse_retrieve_request(
        body,
        beamline=beamline,
        allowed_detectors=settings.detectors_of(beamline),
        max_pulse_range=settings.max_pulse_range,
        pulse_id_bounds=(settings.min_pulse_id, settings.max_pulse_id),
        known_detectors=settings.detectors.keys(),
    )
    dirs = await asyncio.to_thread(open_pgroup, settings.data_root, beamline, parsed.pgroup)
    await check_range(request.app, parsed)
    converting = [name for name, options in parsed.detectors.items() if options.adc_to_energy]
    pedestals = await asyncio.to_thread(pedestals_in_use, settings, converting)
    accepted = await asyncio.to_thread(
        accept_request, parsed, dirs, settings.min_free_bytes, pedestals
    )
    run = accepted.run_number
    await asyncio.to_thread(store.record_queued, accepted.jobs)
    try:
        waiting = await request.app[HANDOVER].submit(accepted.jobs)
    except HandoverError as exc:
        log.error("run %d of %s: jobs not handed over: %s", run, dirs.pgroup, exc)
        await asyncio.to_thread(
            store.record_handover_failed, accepted.jobs, str(exc), exc.handed_over
        )
        await asyncio.to_thread(record_handover_failure, dirs, accepted, str(exc), exc.handed_over)
        raise Unavailable(
            f"run {run} of {dirs.pgroup} was recorded but its jobs could not be queued ({exc}); "
            "the run number is not reused: send the request again when the queue is back",
        ) from exc
    waiting_ids = {job.job_id for job in waiting}
    await announce_queued(
        request.app[TRANSPORT], [job for job in accepted.jobs if job.job_id not in waiting_ids]
    )
    log.info(
        "run %d of %s (%s): pulses %d-%d, %d jobs%s, request %s",
        run,
        dirs.pgroup,
        beamline,
        parsed.start_pulseid,
        parsed.stop_pulseid,
        len(accepted.jobs),
        f" ({len(waiting)} waiting for the queue)" if waiting else "",
        accepted.request_id,
    )
    return reply(
        str(run),
        run_number=run,
        request_id=accepted.request_id,
        files=[job.output_file for job in accepted.jobs],
    )


async def get_current_run_number(request: web.Request) -> web.Response:
    dirs = await caller_pgroup(request, await read_params(request))
    run = await asyncio.to_thread(read_last_run, dirs)
    return reply(str(run), run_number=run)


async def advance_run_number(request: web.Request) -> web.Response:
    dirs = await caller_pgroup(request, await read_params(request))
    run = await asyncio.to_thread(allocate_run_number, dirs)
    log.info("run %d of %s reserved by /advance_run_number", run, dirs.pgroup)
    return reply(str(run), run_number=run)


async def close_pgroup_writing(request: web.Request) -> web.Response:
    dirs = await caller_pgroup(request, await read_params(request))
    await asyncio.to_thread(close_pgroup, dirs)
    log.info("pgroup %s closed for writing", dirs.pgroup)
    return reply(f"pgroup {dirs.pgroup} is closed for writing")


async def get_allowed_detectors(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    beamline = caller_beamline(request)
    detectors = settings.detectors_of(beamline)
    return reply(
        f"{len(detectors)} detectors allowed for {beamline}",
        detectors=detectors,
        beamline=beamline,
        # upstream's lists, in the order of ``detectors``
        descriptions=[settings.detectors[name].description for name in detectors],
        visualisation_address=[
            settings.detectors[name].visualisation_address for name in detectors
        ],
    )


def free_bytes(directory: Path) -> int | None:
    """Bytes free for unprivileged writers below ``directory``; None if it is no directory."""
    if not directory.is_dir():
        return None
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def judge_detectors(
    buffer_root: Path, detectors: list[str], stale_seconds: float
) -> dict[str, Any]:
    """Running / limping / missing, from the age of each module's buffer ``LATEST`` file.

    ``limping`` maps a detector to ``{"missing_modules": [...]}`` (upstream's shape), the
    modules whose LATEST is stale or absent.
    """
    now = time.time()
    verdict: dict[str, Any] = {"running": [], "limping": {}, "missing": []}
    for detector in detectors:
        stale: list[int] = []
        n_modules = module_count(detector)
        for module in range(n_modules):
            latest = buffer_root / detector / f"M{module:02d}" / "LATEST"
            try:
                fresh = now - latest.stat().st_mtime <= stale_seconds
            except OSError:  # no LATEST file: the module never ran
                fresh = False
            if not fresh:
                stale.append(module)
        if not stale:
            verdict["running"].append(detector)
        elif len(stale) < n_modules:
            verdict["limping"][detector] = {"missing_modules": stale}
        else:
            verdict["missing"].append(detector)
    return verdict


async def get_running_detectors(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    beamline = caller_beamline(request)
    verdict = await asyncio.to_thread(
        judge_detectors,
        settings.buffers.jungfrau_root,
        settings.detectors_of(beamline),
        settings.detector_stale_seconds,
    )
    total = sum(map(len, verdict.values()))
    return reply(
        f"{len(verdict['running'])} of {total} detectors of {beamline} running",
        running_detectors=verdict["running"],
        limping_detectors=verdict["limping"],
        missing_detectors=verdict["missing"],
        detectors=verdict["running"],  # the key older clients read
    )


async def health(request: web.Request) -> web.Response:
    settings, transport = request.app[SETTINGS], request.app[TRANSPORT]
    transport_ok = await transport.is_healthy()
    free = await asyncio.to_thread(free_bytes, settings.data_root)
    data_root_ok = free is not None and free >= settings.min_free_bytes
    backlog = await asyncio.to_thread(request.app[HANDOVER].backlog)
    age = backlog.oldest_age()
    oldest = None if age is None else round(age, 1)  # one value for the field and the message
    fields: dict[str, Any] = {
        "version": __version__,
        "transport": transport.name,
        "transport_ok": transport_ok,
        # Accepted jobs waiting in the broker's outbox for the queue (RabbitMQ away).
        "handover_backlog": backlog.count,
        "handover_oldest_age_seconds": oldest,
        "data_root": str(settings.data_root),
        "data_root_ok": data_root_ok,
        "data_root_free_bytes": free,
    }
    if transport_ok and data_root_ok:
        return reply("healthy", **fields)
    data_root_problem = (
        f"data root {settings.data_root} is not a directory"
        if free is None
        else f"data root {settings.data_root} is full ({free} bytes free, requests need "
        f"{settings.min_free_bytes})"
    )
    transport_problem = f"{transport.name} transport is not reachable"
    if backlog.count:
        transport_problem += (
            f" ({backlog.count} accepted jobs wait for it, the oldest for {oldest:.0f} s)"
        )
    problems = [
        what
        for what, ok in (
            (transport_problem, transport_ok),
            (data_root_problem, data_root_ok),
        )
        if not ok
    ]
    return reply("; ".join(problems), status=503, **fields)


async def metrics(request: web.Request) -> web.Response:
    from sf_daq_broker.api.metrics import CONTENT_TYPE_LATEST

    counts = await asyncio.to_thread(request.app[STATUS].state_counts)
    refused = request.app[TRANSPORT].refused_messages
    response = web.Response(body=request.app[METRICS].render(counts, refused))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def run_status(request: web.Request) -> web.Response:
    params = await read_params(request)
    dirs = await caller_pgroup(request, params)
    if params.get("run_number") is None:
        raise BadRequest("run_number is missing")
    run = parse_integer(params["run_number"], "run_number")
    if not 1 <= run <= MAX_RUN_NUMBER:  # 0 is where pedestals (no run number) are kept
        raise BadRequest(f"run_number must be between 1 and {MAX_RUN_NUMBER}, got {run}")
    jobs = await asyncio.to_thread(request.app[STATUS].run_status, dirs.pgroup, run)
    if not jobs:
        if await asyncio.to_thread(dirs.run_json(run).is_file):
            raise NotFound(
                f"run {run} of {dirs.pgroup} exists, but this broker has no job status for it"
            )
        if 0 < run <= await asyncio.to_thread(read_last_run, dirs):
            raise NotFound(
                f"run {run} of {dirs.pgroup} is reserved (/advance_run_number) but not retrieved "
                f"yet: send /retrieve_from_buffers with run_number {run} to fill it"
            )
        raise NotFound(f"run {run} of {dirs.pgroup} does not exist")
    state = run_state(jobs)
    incomplete = incomplete_sources(jobs)
    return reply(
        run_summary(f"run {run} of {dirs.pgroup}", state, jobs, incomplete),
        pgroup=dirs.pgroup,
        run_number=run,
        run_state=state,
        incomplete_sources=incomplete,
        sources={job["source"]: job for job in jobs},
    )


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of this broker's endpoints (generated from the request models)."""
    settings = request.app[SETTINGS]
    routes = tuple(
        (route.method, route.resource.canonical)
        for route in request.app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and route.resource.canonical in OPERATIONS  # the API, not the page (sf_daq_broker.web)
    )
    document = openapi_document(routes, (settings.min_pulse_id, settings.max_pulse_id))
    return web.json_response(document)


def incomplete_sources(jobs: list[dict[str, Any]]) -> list[str]:
    """Sources written but not complete (names without data, missing pulses)."""
    return [
        job["source"]
        for job in jobs
        if job["state"] == JobState.DONE
        and isinstance(job["completeness"], dict)
        and job["completeness"].get("complete") is False
    ]


def run_summary(run: str, state: str, jobs: list[dict[str, Any]], incomplete: list[str]) -> str:
    """``run 2 of p12345 is done, incomplete: 4 of 4 sources done (BSDATA incomplete)``: an
    incomplete run must not read like a success."""
    finished = sum(job["state"] == JobState.DONE for job in jobs)
    words = f"{state}, incomplete" if incomplete and state == JobState.DONE else state
    line = f"{run} is {words}: {finished} of {len(jobs)} sources done"
    if incomplete:
        line += f" ({', '.join(incomplete)} incomplete)"
    waiting = [job for job in jobs if job["message"].startswith(WAITING_PREFIX)]
    if waiting and state == JobState.RUNNING:
        line += f"; {waiting[0]['source']} {waiting[0]['message']}"
    unqueued = [job["source"] for job in jobs if job["message"] == WAITING_FOR_QUEUE]
    if unqueued and state in (JobState.QUEUED, JobState.RUNNING):
        line += f"; {', '.join(unqueued)} {WAITING_FOR_QUEUE}"
    return line


async def current_pulse_id(request: web.Request) -> web.Response:
    """The newest pulse id the buffers' pulse map knows (for start/stop clients).

    The search starts from the last answer, so after the first call it costs a few requests.
    """
    try:
        newest = await buffers_now(request.app)
    except BufferClientError as exc:
        url = request.app[SETTINGS].buffers.databuffer_url
        raise Unavailable(f"the pulse map at {url} does not answer: {exc}") from exc
    return reply(str(newest), pulse_id=newest)
