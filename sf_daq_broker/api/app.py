"""The application factory, the route table and the reply envelope.

Every reply — also 404s, 413s and unexpected errors — is a JSON object with ``status`` and
``message``: existing clients only read the body. An unexpected error never shows a traceback
to the client; it is logged in full with a reference the user can quote.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from sf_daq_broker.api import detector_handlers, facility_handlers, handlers, pedestal_handlers
from sf_daq_broker.api.handover import Handover
from sf_daq_broker.api.metrics import BrokerMetrics
from sf_daq_broker.api.state import HANDOVER, METRICS, PULSE_SEARCH, SETTINGS, STATUS, TRANSPORT
from sf_daq_broker.config import Settings
from sf_daq_broker.errors import BrokerError
from sf_daq_broker.status.follower import follow_status
from sf_daq_broker.status.reconcile import ReconcilePolicy, Reconciler
from sf_daq_broker.status.store import StatusStore
from sf_daq_broker.transport import Transport, create_transport
from sf_daq_broker.transport.amqp import BROKER_STATUS_QUEUE
from sf_daq_broker.transport.failures import describe_failure, without_reprs
from sf_daq_broker.web.app import setup_page

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/retrieve_from_buffers", handlers.retrieve_from_buffers),
    ("GET", "/get_current_run_number", handlers.get_current_run_number),
    ("POST", "/advance_run_number", handlers.advance_run_number),
    ("POST", "/close_pgroup_writing", handlers.close_pgroup_writing),
    ("GET", "/get_allowed_detectors", handlers.get_allowed_detectors),
    ("GET", "/get_running_detectors", handlers.get_running_detectors),
    ("GET", "/run_status", handlers.run_status),
    ("GET", "/current_pulse_id", handlers.current_pulse_id),
    ("GET", "/health", handlers.health),
    ("GET", "/metrics", handlers.metrics),
    ("GET", "/openapi.json", handlers.openapi),
    *detector_handlers.ROUTES,
    *pedestal_handlers.ROUTES,
    *facility_handlers.ROUTES,
]


def _endpoint(request: web.Request) -> str:
    route = request.match_info.route
    return route.resource.canonical if route.resource is not None else "unmatched"


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    endpoint = _endpoint(request)
    started = time.perf_counter()
    try:
        response = await handler(request)
        outcome = "ok"
    except BrokerError as exc:
        log.info("%s %s refused (%d): %s", request.method, request.path, exc.http_status, exc)
        response = handlers.reply(exc.message, status=exc.http_status)
        outcome = "refused" if exc.http_status < 500 else "error"
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _http_error_message(request, exc)
        response = handlers.reply(message, status=exc.status)
        outcome = "refused"
    except Exception as exc:
        response = _unexpected(request, exc)
        outcome = "error"
    metrics.requests.labels(endpoint, outcome).inc()
    metrics.duration.labels(endpoint).observe(time.perf_counter() - started)
    return response


def _unexpected(request: web.Request, exc: Exception) -> web.Response:
    """507 for a full file system (the pre-check of free space passed, then the disk filled);
    otherwise 500 with a reference to the full traceback in the log, never shown to clients."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("%s %s: file system full: %s", request.method, request.path, exc)
        return handlers.reply(
            f"the file system is full ({exc.strerror}: {exc.filename}); free space and send "
            "the request again",
            status=507,
        )
    reference = uuid.uuid4().hex[:12]
    log.exception(
        "%s %s failed unexpectedly (reference %s)", request.method, request.path, reference
    )
    return handlers.reply(
        f"internal error in the broker (reference {reference}, see the broker log)", status=500
    )


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[SETTINGS].max_body_bytes
        return f"the request body is too large (at most {limit} bytes)"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"{request.method} is not allowed on {request.path} (use {allowed})"
    if isinstance(exc, web.HTTPNotFound):
        return f"no endpoint {request.path}"
    return exc.reason


RECONCILE = web.AppKey("reconcile", ReconcilePolicy)


def create_app(
    settings: Settings,
    transport: Transport | None = None,
    reconcile: ReconcilePolicy | None = None,
) -> web.Application:
    """The broker application; the transport defaults to the one the settings name.

    The status store, the outbox of accepted jobs (``handover``) and the embedded queue's
    jobs live in ``settings.state_dir`` so /run_status, jobs waiting for RabbitMQ and the jobs
    of a single-machine setup survive restarts.
    """
    app = web.Application(middlewares=[envelope], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[TRANSPORT] = transport or create_transport(
        settings.amqp_url, settings.amqp_prefix, state_dir=settings.state_dir
    )
    app[METRICS] = BrokerMetrics()
    app[PULSE_SEARCH] = {}
    app[RECONCILE] = reconcile or ReconcilePolicy()
    detector_handlers.install(app, settings)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.cleanup_ctx.append(_transport_lifetime)
    app.cleanup_ctx.append(_status_lifetime)
    setup_page(app)  # after the status store: the page listens to it
    return app


async def _transport_lifetime(app: web.Application) -> AsyncIterator[None]:
    transport = app[TRANSPORT]
    try:
        await transport.connect()
    except Exception as exc:
        # Start anyway: /health says what is wrong; accepted jobs wait in the outbox.
        url = getattr(transport, "url", "")
        reason = describe_failure(url, exc) if url else without_reprs(str(exc))
        log.error("%s transport not reachable at start-up: %s", transport.name, reason)
    yield
    await transport.close()


async def _status_lifetime(app: web.Application) -> AsyncIterator[None]:
    store = StatusStore(app[SETTINGS].state_dir / "status.sqlite")
    app[STATUS] = store
    transport = app[TRANSPORT]
    handover = await asyncio.to_thread(Handover.open, transport, store, app[SETTINGS].state_dir)
    app[HANDOVER] = handover
    handover.start()
    reconciler = Reconciler(
        transport, store, handover.waiting_job_ids, BROKER_STATUS_QUEUE, app[RECONCILE]
    )
    tasks = [
        asyncio.create_task(follow_status(transport, store, BROKER_STATUS_QUEUE)),
        asyncio.create_task(reconciler.run()),
    ]
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await handover.close()
    store.close()
