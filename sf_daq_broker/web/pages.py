"""The page's handlers: the run list, a run's page, previews, PV values and the live stream.

The caller's beamline decides what is shown, as for the API: pgroups of other beamlines do not
exist for it. Blocking work (files, SQLite) runs on the page's own small thread pool, previews
in the preview process, so the API's threads and event loop never wait for a page. HTML pages
answer errors with an HTML page (same status codes as the API); previews, PV values and the
stream answer them as the API does.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from markupsafe import Markup
from pebble import ProcessExpired

from sf_daq_broker.api.handlers import caller_beamline
from sf_daq_broker.api.state import SETTINGS, STATUS
from sf_daq_broker.bookkeeping.paths import PgroupDirs, open_pgroup
from sf_daq_broker.errors import BadRequest, BrokerError, NotFound, Unavailable
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.retrieval import parse_integer
from sf_daq_broker.status.store import JobState
from sf_daq_broker.web import render
from sf_daq_broker.web.live import LiveHub
from sf_daq_broker.web.previews import PreviewBusy, PreviewService
from sf_daq_broker.web.runs import (
    FILTERS,
    RunList,
    RunView,
    SourceView,
    detector_layout,
    list_pgroups,
    list_runs,
    load_run,
    log_tail,
    most_recent_pgroup,
    source_names,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUNS_PER_PAGE = 50
#: Run numbers have six digits in file names; anything far beyond is a typo.
MAX_RUN_NUMBER = 10**9
ROW_CACHE_SIZE = 2000
#: Seconds between two checks whether a stream's page is still there.
STREAM_CHECK_SECONDS = 5.0
PAGE_THREADS = 2


@dataclass
class PageState:
    """The page's resources, made when the broker starts."""

    hub: LiveHub
    previews: PreviewService = field(default_factory=PreviewService)
    threads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PAGE_THREADS, thread_name_prefix="page")
    )
    #: The directories of the pgroups some page watches live (the store knows only names).
    watched: dict[str, PgroupDirs] = field(default_factory=dict)
    rows: RowCache = field(default_factory=lambda: RowCache())


PAGE = web.AppKey("page", PageState)


async def blocking(
    request: web.Request, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run blocking page work on the page's threads (never on the API's)."""
    loop = asyncio.get_running_loop()
    call = functools.partial(function, *args, **kwargs)
    return await loop.run_in_executor(request.app[PAGE].threads, call)


async def render_page(
    request: web.Request, template: str, status: int = 200, **context: Any
) -> web.Response:
    """A page, rendered on the page's threads: a long run list takes milliseconds of pure
    Python, which would otherwise hold up every API request waiting on the event loop.
    ``beamline`` and ``pgroup`` (the header's) default to none."""
    context = {"beamline": "", "pgroup": "", **context}
    compiled = aiohttp_jinja2.get_env(request.app).get_template(template)
    text = await blocking(request, compiled.render, context)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def html_errors(handler: Handler) -> Handler:
    """A refused page request is answered with a page that says why, with the API's status."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BrokerError as exc:
            log.info("page %s refused (%d): %s", request.path_qs, exc.http_status, exc)
            return await render_page(request, "error.html", exc.http_status, message=exc.message)

    return wrapper


def page_url(path: str, **query: Any) -> str:
    return f"{path}?{urlencode(query)}" if query else path


async def page_pgroup(request: web.Request, pgroup: object) -> PgroupDirs:
    settings = request.app[SETTINGS]
    return await blocking(
        request, open_pgroup, settings.data_root, caller_beamline(request), pgroup
    )


def run_number_of(request: web.Request, key: str = "run_number") -> int:
    value = request.query.get(key)
    if value is None or not value.strip():
        raise BadRequest(f"{key} is missing")
    number = parse_integer(value.strip(), key)
    if not 1 <= number <= MAX_RUN_NUMBER:
        raise BadRequest(f"{key} must be between 1 and {MAX_RUN_NUMBER}, got {number}")
    return number


# --- the run list -----------------------------------------------------------------------------


@html_errors
async def runs_page(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    beamline = caller_beamline(request)
    query = request.query
    pgroups = await blocking(request, list_pgroups, settings.data_root, beamline)
    pgroup = query.get("pgroup") or await blocking(
        request, most_recent_pgroup, settings.data_root, beamline, pgroups
    )
    context: dict[str, Any] = {
        "beamline": beamline,
        "pgroups": pgroups,
        "filters": FILTERS,
        "message": "",
        "listing": None,
        "state": None,
        "before": None,
    }
    if pgroup is None:
        context["message"] = (
            f"beamline {beamline} has no pgroup yet (no {settings.data_root}/{beamline}/data/"
            "pNNNNN/raw directory)"
        )
        return await render_page(request, "runs.html", **context)
    dirs = await page_pgroup(request, pgroup)
    state = query.get("state") or None
    if state is not None and state not in FILTERS:
        raise BadRequest(f"state must be one of {', '.join(FILTERS)}, not {state!r}")
    before = run_number_of(request, "before") if query.get("before") else None

    def rows() -> tuple[RunList, list[Markup]]:
        listing = list_runs(
            dirs, request.app[STATUS], before=before, limit=RUNS_PER_PAGE, state=state
        )
        return listing, [row_html(request.app, run) for run in listing.runs]

    listing, rendered = await blocking(request, rows)
    context.update(pgroup=dirs.pgroup, listing=listing, rows=rendered, state=state, before=before)
    return await render_page(request, "runs.html", **context)


class RowCache:
    """Rendered table rows, reused while their run's fingerprint is unchanged: most rows of a
    run list are finished runs, and rendering fifty rows anew for every view is most of the
    list's cost. Used from the page's threads."""

    def __init__(self, size: int = ROW_CACHE_SIZE) -> None:
        self._size = size
        self._rows: OrderedDict[tuple[str, int], tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def html(self, app: web.Application, run: RunView) -> Markup:
        key = (run.pgroup, run.number)
        with self._lock:
            cached = self._rows.get(key)
            if cached is not None and cached[0] == run.fingerprint:
                self._rows.move_to_end(key)
                return Markup(cached[1])
        html = aiohttp_jinja2.get_env(app).get_template("_row.html").render(run=run)
        with self._lock:
            self._rows[key] = (run.fingerprint, html)
            self._rows.move_to_end(key)
            while len(self._rows) > self._size:
                self._rows.popitem(last=False)
        return Markup(html)


def row_html(app: web.Application, run: RunView) -> Markup:
    return app[PAGE].rows.html(app, run)


def live_renderer(app: web.Application) -> Callable[[str, set[int]], Awaitable[dict[int, str]]]:
    """What the live hub sends for changed runs: each run's row, rendered as on the page."""

    async def render_rows(pgroup: str, numbers: set[int]) -> dict[int, str]:
        store, dirs = app[STATUS], app[PAGE].watched.get(pgroup)
        if dirs is None:
            return {}

        def load_and_render() -> dict[int, str]:
            runs = [load_run(dirs, store, number) for number in sorted(numbers)]
            return {
                run.number: json.dumps(
                    {"run": run.number, "state": run.state, "html": row_html(app, run)}
                )
                for run in runs
            }

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(app[PAGE].threads, load_and_render)

    return render_rows


# --- a run's page -----------------------------------------------------------------------------


@dataclass
class Preview:
    """One picture on a run's page."""

    url: str
    name: str
    width: int
    height: int
    kind: str


def previews_of(run: RunView, source: SourceView) -> list[Preview]:
    if source.state != JobState.DONE or source.file_size is None or run.record is None:
        return []
    kinds = {
        SourceKind.DETECTOR: render.PreviewKind.DETECTOR,
        SourceKind.IMAGEBUFFER: render.PreviewKind.CAMERA,
        SourceKind.DATABUFFER: render.PreviewKind.CHANNEL,
    }
    kind = kinds.get(source.kind)
    if kind is None:
        return []
    width, height = render.SIZES[kind]
    return [
        Preview(
            page_url(
                "/page/preview.png",
                pgroup=run.pgroup,
                run_number=run.number,
                source=source.name,
                name=name,
            ),
            name,
            width,
            height,
            kind.value,
        )
        for name in source_names(run.record, source.name)
    ]


@html_errors
async def run_page(request: web.Request) -> web.StreamResponse:
    dirs = await page_pgroup(request, request.query.get("pgroup"))
    number = run_number_of(request)
    run = await blocking(request, load_run, dirs, request.app[STATUS], number)
    if run.record is None and not run.sources:
        raise NotFound(run.problem or f"run {number} of {dirs.pgroup} does not exist")
    logs = {
        source.name: await blocking(request, log_tail, dirs.run_log(number, source.name))
        for source in run.sources
    }
    return await render_page(
        request,
        "run.html",
        beamline=dirs.beamline,
        pgroup=dirs.pgroup,
        run=run,
        logs=logs,
        previews={source.name: previews_of(run, source) for source in run.sources},
        record_json=json.dumps(run.record, indent=2) if run.record is not None else "",
        pv_url=page_url("/page/pvs", pgroup=dirs.pgroup, run_number=number),
    )


# --- previews ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileOfRun:
    path: Path
    key: tuple[str, int, int]  # path, mtime_ns, size: a rewritten file is another file
    record: dict[str, Any]


def written_file(dirs: PgroupDirs, run: RunView, source: str) -> FileOfRun:
    """The finished file of one source of a run, checked to lie inside the pgroup's raw/."""
    job = next((s for s in run.sources if s.name == source), None)
    if job is None or run.record is None:
        raise NotFound(f"run {run.number} of {dirs.pgroup} has no source {source!r}")
    if job.state != JobState.DONE or not job.file:
        raise NotFound(f"{source} of run {run.number} is {job.state}: there is no file yet")
    path = Path(job.file)
    what = f"the file of {source} of run {run.number}"
    if not path.is_relative_to(dirs.raw):
        raise NotFound(f"{what} is not below the raw directory of {dirs.pgroup}")
    # Reached from raw/ without following a symlink, and a regular file itself: a symlink
    # planted below raw/ cannot make the page show a file from elsewhere.
    try:
        with dirs.open_dir(path.parent, what) as directory:
            stat = directory.lstat(path.name)
    except FileNotFoundError:
        stat = None
    if stat is None or not S_ISREG(stat.st_mode):
        raise NotFound(f"{what} is gone (or is not a regular file)")
    return FileOfRun(path, (str(path), stat.st_mtime_ns, stat.st_size), run.record)


async def run_file(request: web.Request, source: str) -> tuple[RunView, FileOfRun]:
    dirs = await page_pgroup(request, request.query.get("pgroup"))
    number = run_number_of(request)
    run = await blocking(request, load_run, dirs, request.app[STATUS], number)
    return run, await blocking(request, written_file, dirs, run, source)


async def computed(
    request: web.Request, what: str, key: Any, function: Callable[..., T], *args: Any
) -> T:
    """A preview from the preview service; its failures answered 503 (come back later).

    ``what`` names the preview (kind, name, file) in the service's log when it fails.
    """
    previews = request.app[PAGE].previews
    try:
        return await previews.get(key, function, *args, what=what)
    except PreviewBusy as exc:
        raise Unavailable(f"previews are busy ({exc}); try again in a moment") from None
    except TimeoutError:
        raise Unavailable("the preview took too long and was given up") from None
    except (BrokenProcessPool, ProcessExpired):
        raise Unavailable("the preview process died; try again") from None


async def preview_png(request: web.Request) -> web.StreamResponse:
    source = request.query.get("source", "")
    name = request.query.get("name", "")
    run, file = await run_file(request, source)
    kind = run.sources[[s.name for s in run.sources].index(source)].kind
    if name not in source_names(file.record, source):
        raise NotFound(f"{name!r} is not a name of {source} in run {run.number}")
    if kind is SourceKind.ARCHIVER:
        raise BadRequest("PVs have no picture: their values are on the run's page")
    preview_kind = {
        SourceKind.DETECTOR: render.PreviewKind.DETECTOR,
        SourceKind.IMAGEBUFFER: render.PreviewKind.CAMERA,
        SourceKind.DATABUFFER: render.PreviewKind.CHANNEL,
    }[kind]
    note = detector_layout(file.record, source) if kind is SourceKind.DETECTOR else ""
    key = (*file.key, preview_kind.value, name)
    etag = hashlib.sha1(repr(key).encode()).hexdigest()
    if etag in {tag.value for tag in request.if_none_match or ()}:
        return web.Response(status=304, headers={"ETag": f'"{etag}"'})
    spec = render.PreviewSpec(preview_kind, str(file.path), name, note)
    what = f"{preview_kind.value} {name} of {file.path}"
    png = await computed(request, what, key, render.draw, spec)
    response = web.Response(body=png, content_type="image/png")
    response.headers["Cache-Control"] = "no-cache"  # revalidate: the ETag follows the file
    response.etag = etag
    return response


async def pv_table(request: web.Request) -> web.StreamResponse:
    _, file = await run_file(request, "PVCHANNELS")
    names = source_names(file.record, "PVCHANNELS")
    key = (*file.key, "pvs")
    what = f"PV table of {file.path}"
    values = await computed(request, what, key, render.pv_values, str(file.path), names)
    return await render_page(request, "_pvs.html", pvs=values, names=len(names))


# --- the live stream --------------------------------------------------------------------------


async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the rows of the pgroup's runs as they change (``event: run``)."""
    dirs = await page_pgroup(request, request.query.get("pgroup"))
    page = request.app[PAGE]
    page.watched[dirs.pgroup] = dirs
    subscription = page.hub.subscribe(dirs.pgroup)
    stream = EventSourceResponse()
    try:
        await stream.prepare(request)
        async with stream:
            while stream.is_connected() and not subscription.closed:
                for message in (await subscription.next(STREAM_CHECK_SECONDS)).values():
                    await stream.send(message, event="run")
    except (ConnectionResetError, TimeoutError):
        pass  # the page went away
    finally:
        page.hub.unsubscribe(subscription)
    return stream
