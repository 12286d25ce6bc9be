"""The page's routes, templates and resources, added to the broker's application in one place.

``setup_page`` must come after the status store's lifetime context: the page listens to the
store. When the broker stops, open live streams are ended first (``on_shutdown``), so a browser
tab left open does not hold the shutdown for aiohttp's grace period.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from sf_daq_broker.api.state import STATUS
from sf_daq_broker.web import pages
from sf_daq_broker.web.live import LiveHub

STATIC_DIR = Path(__file__).resolve().parent / "static"

ROUTES: list[tuple[str, str, pages.Handler]] = [
    ("GET", "/", pages.runs_page),
    ("GET", "/page/run", pages.run_page),
    ("GET", "/page/preview.png", pages.preview_png),
    ("GET", "/page/pvs", pages.pv_table),
    ("GET", "/page/events", pages.events),
]


def setup_page(app: web.Application) -> None:
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("sf_daq_broker.web", "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_static("/page/static/", STATIC_DIR)
    app.cleanup_ctx.append(_page_lifetime)
    app.on_shutdown.append(_end_streams)


async def _page_lifetime(app: web.Application) -> AsyncIterator[None]:
    page = pages.PageState(hub=LiveHub(pages.live_renderer(app)))
    page.hub.attach(app[STATUS])
    app[pages.PAGE] = page
    yield
    await page.hub.close()
    await asyncio.to_thread(page.previews.close)
    page.threads.shutdown(wait=False, cancel_futures=True)


async def _end_streams(app: web.Application) -> None:
    if pages.PAGE in app:
        await app[pages.PAGE].hub.close()
