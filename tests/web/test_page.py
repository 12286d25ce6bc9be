"""The page served by the broker: the run list, a run's page, previews and the live stream.

The broker application runs for real (HTTP, the embedded queue, the SQLite status store); the
test plays the workers: it takes the jobs from the queue, writes real HDF5 files where the jobs
say with the project's own writers, and publishes the status events a worker publishes.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from sf_daq_broker.api.app import create_app
from sf_daq_broker.api.state import STATUS
from sf_daq_broker.bookkeeping.paths import PgroupDirs
from sf_daq_broker.config import Settings
from sf_daq_broker.h5.channels import ChannelRows, write_channels
from sf_daq_broker.h5.detector import DetectorFileWriter, FrameColumns
from sf_daq_broker.jobs import RETRIEVAL_KINDS, Action, Job, SourceKind, StatusEvent
from sf_daq_broker.status.store import StatusStore
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.web import render
from sf_daq_broker.web.pages import PAGE
from sf_daq_broker.web.previews import PreviewService
from sf_daq_broker.web.runs import list_runs
from tests.support import PATIENCE, async_wait_until
from tests.web import preview_support

START, STOP = 15_000_001_000, 15_000_001_199
REQUEST: dict[str, Any] = {
    "pgroup": "p12345",
    "start_pulseid": START,
    "stop_pulseid": STOP,
    "rate_multiplicator": 4,
    "directory_name": "scan",
    "channels_list": ["SAR:SCALAR", "SAR:WAVE"],
    "camera_list": ["SAR-CAM:FPICTURE"],
    "pv_list": ["SAR:PV"],
    "detectors": {"JF13T01V01": {"adc_to_energy": True, "geometry": True}},
}
CHANNELS_ONLY = {**REQUEST, "camera_list": [], "pv_list": [], "detectors": {}}
BEAM = np.arange(START, STOP + 1, 4, dtype=np.int64)  # 50 beam pulses
COMPLETE = {
    "complete": True,
    "summary": "complete: 2 of 2 names, no pulse missing",
    "names": [
        {
            "name": name,
            "expected": 50,
            "found": 50,
            "missing": 0,
            "missing_pulse_ids": [],
            "duplicates_removed": 0,
            "extra": {},
            "unit": "beam pulses",
        }
        for name in ("SAR:SCALAR", "SAR:WAVE")
    ],
    "absent": [],
}
INCOMPLETE = {
    "complete": False,
    "summary": "incomplete: 1 names with missing pulses, 0 names without data",
    "names": [
        {
            "name": "SAR-CAM:FPICTURE",
            "expected": 50,
            "found": 48,
            "missing": 2,
            "missing_pulse_ids": [15000001004, 15000001008],
            "duplicates_removed": 0,
            "extra": {},
            "unit": "beam pulses",
        }
    ],
    "absent": [],
}


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[tuple[TestClient, EmbeddedTransport]]:
    transport = EmbeddedTransport()
    client = TestClient(TestServer(create_app(settings, transport)))
    await client.start_server()
    yield client, transport
    await client.close()


async def retrieve(client: TestClient, request: dict[str, Any]) -> int:
    response = await client.post("/retrieve_from_buffers", json=request)
    assert response.status == 200, await response.text()
    return int((await response.json())["run_number"])


async def take_jobs(transport: EmbeddedTransport, kinds: list[SourceKind]) -> dict[str, Job]:
    jobs = {}
    for kind in kinds:
        consumer = transport.consume_jobs(kind)
        delivery = await consumer.__anext__()
        jobs[delivery.job.source] = delivery.job
        await delivery.ack()
        await consumer.aclose()
    return jobs


async def page(client: TestClient, path: str = "/", **params: Any) -> tuple[int, str]:
    response = await client.get(path, params=params)
    return response.status, await response.text()


def row_of(html: str, run: int) -> str:
    match = re.search(rf'<tr id="run-{run}".*?</tr>', html, re.DOTALL)
    assert match, html
    return match.group(0)


def chips(row: str) -> dict[str, str]:
    return dict(re.findall(r'class="chip [^"]*" data-source="([^"]+)" data-state="([^"]+)"', row))


def glances(row: str) -> dict[str, str]:
    found = re.findall(r'<div class="glance-\w*" data-source="([^"]+)" title="[^"]*">([^<]*)<', row)
    return dict(found)


# --- files as the workers write them --------------------------------------------------------


def write_bsdata(job: Job) -> None:
    scalar = ChannelRows("SAR:SCALAR", BEAM, BEAM * 10, (BEAM - START).astype(np.float64) / 4)
    waves = np.tile(np.arange(8, dtype=np.float32), (len(BEAM), 1))
    waveform = ChannelRows("SAR:WAVE", BEAM, BEAM * 10, waves)
    write_channels(Path(job.output_file), {"run_number": job.run_number}, [scalar, waveform])


def write_camera(job: Job) -> None:
    images = np.arange(len(BEAM) * 6 * 8, dtype=np.uint16).reshape(len(BEAM), 6, 8)
    camera = ChannelRows("SAR-CAM:FPICTURE", BEAM, BEAM * 10, images)
    write_channels(Path(job.output_file), {"run_number": job.run_number}, [camera])


def write_pvs(job: Job) -> None:
    pv = ChannelRows(
        "SAR:PV",
        np.array([START - 7, START + 100], dtype=np.int64),
        np.array([1, 2], dtype=np.int64),
        np.array([7.25, 8.5]),
        extra={"changed_in_interval": np.array([False, True])},
    )
    write_channels(Path(job.output_file), {"run_number": job.run_number}, [pv])


def write_detector(path: Path, frames: np.ndarray, good: list[int], mask: np.ndarray) -> None:
    count = len(frames)
    columns = FrameColumns.from_arrays(
        pulse_id=BEAM[:count],
        frame_index=np.arange(count),
        daq_rec=np.zeros(count),
        is_good_frame=good,
        requested_pulse_id=BEAM[:count],
    )
    with DetectorFileWriter(
        path,
        "JF13T01V01",
        count,
        frames.shape[1:],
        np.float32,
        pixel_mask=mask,
        conversion_factor=1.0,
    ) as writer:
        writer.write(frames.astype(np.float32), columns)


async def finish(transport: EmbeddedTransport, job: Job, report: dict[str, Any]) -> None:
    await transport.publish_status(StatusEvent.for_job(Action.WRITE_START, job, "", total=50))
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_FINISHED, job, report["summary"], total=50, report=report)
    )


# --- the run list ---------------------------------------------------------------------------


async def test_run_list_shows_each_run_with_its_sources_newest_first(
    broker: tuple[TestClient, EmbeddedTransport],
) -> None:
    client, transport = broker
    assert await retrieve(client, CHANNELS_ONLY) == 1
    assert await retrieve(client, {**REQUEST, "rate_multiplicator": 1}) == 2

    status, html = await page(client)
    assert status == 200
    assert html.index('id="run-2"') < html.index('id="run-1"')
    assert "<option selected>p12345</option>" in html
    assert "beamline bernina" in html
    first = row_of(html, 1)
    assert "15000001000\u201315000001199" in first  # an en dash
    assert "200 pulses, 2.00 s" in first
    assert "25 Hz" in first and "50 beam pulses" in first
    assert '<td class="directory">scan</td>' in first
    assert chips(first) == {"BSDATA": "queued"}
    assert chips(row_of(html, 2)) == {
        "BSDATA": "queued",
        "CAMERAS": "queued",
        "PVCHANNELS": "queued",
        "JF13T01V01": "queued",
    }
    assert "100 Hz" in row_of(html, 2) and "200 beam pulses" in row_of(html, 2)

    jobs = await take_jobs(transport, [SourceKind.DATABUFFER, SourceKind.IMAGEBUFFER])
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_START, jobs["BSDATA"], "", total=50)
    )
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_PROGRESS, jobs["BSDATA"], "", done=20, total=50)
    )
    write_camera(jobs["CAMERAS"])
    await finish(transport, jobs["CAMERAS"], INCOMPLETE)

    async def updated() -> bool:
        _, now = await page(client)
        return chips(row_of(now, 1)) == {
            "BSDATA": "running"
        } and 'data-filter="running incomplete"' in row_of(now, 2)

    await async_wait_until(updated, timeout=PATIENCE, what="the running job on the page")
    _, html = await page(client)
    first = row_of(html, 1)
    assert '<progress max="100" value="40">' in first
    camera_size = Path(jobs["CAMERAS"].output_file).stat().st_size
    second = row_of(html, 2)
    assert chips(second)["CAMERAS"] == "done"
    assert glances(second)["CAMERAS"] == "1 name missing"
    assert f"{camera_size / 1000:.1f} kB" in second
    assert 'data-filter="running incomplete"' in second


async def test_the_state_filter_keeps_only_matching_runs(
    broker: tuple[TestClient, EmbeddedTransport],
) -> None:
    client, transport = broker
    for _ in range(3):
        await retrieve(client, CHANNELS_ONLY)
    consumer = transport.consume_jobs(SourceKind.DATABUFFER)
    delivery = await consumer.__anext__()  # run 1
    await delivery.ack()
    await consumer.aclose()
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_REJECTED, delivery.job, "data buffer: HTTP 500 x5")
    )

    async def failed_listed() -> list[str]:
        _, html = await page(client, state="failed")
        return re.findall(r'<tr id="run-(\d+)"', html)

    assert await async_wait_until(failed_listed, timeout=PATIENCE, what="the failed run") == ["1"]
    _, html = await page(client, state="failed")
    assert glances(row_of(html, 1)) == {"BSDATA": "failed: data buffer: HTTP 500 x5"}
    _, html = await page(client, state="queued")
    assert re.findall(r'<tr id="run-(\d+)"', html) == ["3", "2"]
    _, html = await page(client, state="done")
    assert 'id="run-' not in html
    assert "no run of p12345 is done" in html
    _, html = await page(client, before="3")
    assert re.findall(r'<tr id="run-(\d+)"', html) == ["2", "1"]

    status, html = await page(client, state="lost")
    assert status == 400
    assert (
        "state must be one of queued, running, done, failed, incomplete, not &#39;lost&#39;" in html
    )


async def test_callers_see_only_what_their_beamline_may(
    make_settings: Callable[..., Settings], data_root: Path
) -> None:
    client = TestClient(TestServer(create_app(make_settings(local_beamline=None))))
    await client.start_server()
    try:
        status, html = await page(client)
        assert status == 403
        assert "requests from 127.0.0.1 are not allowed: loopback clients need a local" in html
    finally:
        await client.close()

    (data_root / "alvra" / "data" / "p99999" / "raw").mkdir(parents=True)
    client = TestClient(TestServer(create_app(make_settings())))
    await client.start_server()
    try:
        status, html = await page(client, pgroup="p99999")
        assert status == 404
        assert "pgroup p99999 does not exist for beamline bernina" in html
        status, html = await page(client)
        assert re.findall(r"<option(?: selected)?>(p\d+)</option>", html) == ["p12345"]
        status, html = await page(client, "/page/run", pgroup="p12345", run_number="4")
        assert status == 404
        assert "run 4 of p12345 does not exist" in html
    finally:
        await client.close()


# --- a run's page and its previews ------------------------------------------------------------


async def test_a_run_page_shows_completeness_log_request_and_previews(
    broker: tuple[TestClient, EmbeddedTransport],
) -> None:
    client, transport = broker
    await retrieve(client, REQUEST)
    jobs = await take_jobs(transport, list(RETRIEVAL_KINDS))
    write_bsdata(jobs["BSDATA"])
    write_camera(jobs["CAMERAS"])
    write_pvs(jobs["PVCHANNELS"])
    frames = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    write_detector(
        Path(jobs["JF13T01V01"].output_file), frames, [1, 0, 1, 1], np.ones((6, 8), bool)
    )
    Path(jobs["BSDATA"].log_file).write_text("".join(f"line {i}\n" for i in range(100)))
    await finish(transport, jobs["BSDATA"], COMPLETE)
    await finish(transport, jobs["CAMERAS"], INCOMPLETE)
    await finish(transport, jobs["PVCHANNELS"], {**COMPLETE, "names": [], "summary": "pv"})
    await transport.publish_status(
        StatusEvent.for_job(
            Action.WRITE_REJECTED, jobs["JF13T01V01"], "pulses 1-2: Jungfrau buffer: aged out"
        )
    )

    async def run_page() -> str:
        status, html = await page(client, "/page/run", pgroup="p12345", run_number="1")
        assert status == 200
        return html if 'data-state="failed"' in html and "aged out" in html else ""

    html = await async_wait_until(run_page, timeout=PATIENCE, what="the finished run's page")
    assert "<h1>Run 1 of p12345" in html
    assert "<td>SAR-CAM:FPICTURE</td><td>50 <span" in html
    assert "<td>15000001004, 15000001008</td>" in html
    assert '<p class="message error">pulses 1-2: Jungfrau buffer: aged out</p>' in html
    assert "line 99" in html and "line 60" in html and "line 59\n" not in html
    request_shown = re.search(r"<pre>(\{.*?)</pre>", html, re.DOTALL)
    assert request_shown is not None
    assert json.loads(request_shown.group(1).replace("&#34;", '"'))["directory_name"] == "scan"
    images = re.findall(r'<img class="preview preview-(\w+)" src="([^"]+)"', html)
    assert [kind for kind, _ in images] == ["channel", "channel", "camera"]  # not the failed one
    for kind, url in images:
        response = await client.get(url.replace("&amp;", "&"))
        assert response.status == 200, await response.text()
        assert response.content_type == "image/png"
        size = Image.open(io.BytesIO(await response.read())).size
        assert size == {"channel": (480, 240), "camera": (640, 420)}[kind]
    fragment = re.search(r'data-fragment="([^"]+)"', html)
    assert fragment is not None
    pvs_url = fragment.group(1).replace("&amp;", "&")
    status, pvs = await page(client, pvs_url)
    assert status == 200
    assert '<td>15000000993</td><td class="value">7.25</td><td>no (value from before' in pvs
    assert '<td>15000001100</td><td class="value">8.5</td><td>yes</td>' in pvs


async def test_previews_are_computed_once_and_refused_for_what_is_not_there(
    broker: tuple[TestClient, EmbeddedTransport], tmp_path: Path
) -> None:
    client, transport = broker
    await retrieve(client, REQUEST)
    jobs = await take_jobs(transport, [SourceKind.DATABUFFER, SourceKind.DETECTOR])
    frames = np.arange(3 * 6 * 8, dtype=np.float32).reshape(3, 6, 8)
    write_detector(Path(jobs["JF13T01V01"].output_file), frames, [1, 1, 1], np.ones((6, 8), bool))
    await finish(transport, jobs["JF13T01V01"], {**COMPLETE, "names": []})
    params = {"pgroup": "p12345", "run_number": "1", "source": "JF13T01V01", "name": "JF13T01V01"}

    async def detector_done() -> bool:
        return (await client.get("/page/preview.png", params=params)).status == 200

    await async_wait_until(detector_done, timeout=60, what="the detector preview")
    previews = client.app[PAGE].previews
    computed = previews.computed
    response = await client.get("/page/preview.png", params=params)
    assert Image.open(io.BytesIO(await response.read())).size == (960, 420)
    assert previews.computed == computed  # from the cache
    etag = response.headers["ETag"]
    again = await client.get("/page/preview.png", params=params, headers={"If-None-Match": etag})
    assert again.status == 304

    async def refused(**changes: str) -> tuple[int, str]:
        reply = await client.get("/page/preview.png", params={**params, **changes})
        return reply.status, (await reply.json())["message"]

    assert await refused(source="BSDATA", name="SAR:SCALAR") == (
        404,
        "BSDATA of run 1 is queued: there is no file yet",
    )
    assert await refused(name="JF06T04V02") == (
        404,
        "'JF06T04V02' is not a name of JF13T01V01 in run 1",
    )
    assert await refused(source="ELSEWHERE") == (404, "run 1 of p12345 has no source 'ELSEWHERE'")

    # A symlink planted where the file was: the page shows nothing from elsewhere.
    detector_file = Path(jobs["JF13T01V01"].output_file)
    outside = tmp_path / "outside.h5"  # not below raw/
    detector_file.rename(outside)
    detector_file.symlink_to(outside)
    assert await refused() == (
        404,
        "the file of JF13T01V01 of run 1 is gone (or is not a regular file)",
    )
    assert await refused(run_number="x") == (400, "run_number must be an integer, got 'x'")
    assert await refused(run_number="1" + "0" * 30) == (
        400,
        f"run_number must be between 1 and 1000000000, got 1{'0' * 30}",
    )


async def test_a_stuck_or_dying_preview_is_answered_503_and_logged_with_its_file(
    broker: tuple[TestClient, EmbeddedTransport],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, transport = broker
    await retrieve(client, REQUEST)
    jobs = await take_jobs(transport, [SourceKind.DETECTOR])
    detector_file = Path(jobs["JF13T01V01"].output_file)
    write_detector(detector_file, np.zeros((2, 6, 8)), [1, 1], np.ones((6, 8), bool))
    await finish(transport, jobs["JF13T01V01"], {**COMPLETE, "names": []})
    client.app[PAGE].previews = PreviewService(timeout=1.5)  # closed with the page
    params = {"pgroup": "p12345", "run_number": "1", "source": "JF13T01V01", "name": "JF13T01V01"}

    async def preview() -> tuple[int, str] | None:
        reply = await client.get("/page/preview.png", params=params)
        if reply.status == 404:
            return None  # the run's file is not known yet
        return reply.status, (await reply.json())["message"]

    caplog.set_level(logging.WARNING, logger="sf_daq_broker.web.previews")
    monkeypatch.setattr(render, "draw", preview_support.draw_forever)
    assert await async_wait_until(preview, what="the preview's answer") == (
        503,
        "the preview took too long and was given up",
    )
    monkeypatch.setattr(render, "draw", preview_support.draw_and_die)
    assert await preview() == (503, "the preview process died; try again")
    what = f"detector JF13T01V01 of {detector_file}"
    assert [r.getMessage() for r in caplog.records if r.name == "sf_daq_broker.web.previews"] == [
        f"the preview {what} ran longer than 1.5 s: its process was terminated, a new one "
        "takes the next preview",
        f"the preview process died (exit code 3) computing the preview {what}; a new one "
        "takes the next preview",
    ]


# --- live -------------------------------------------------------------------------------------


async def next_event(response: ClientResponse, timeout: float = 20) -> dict[str, Any]:
    """The next ``run`` event of a Server-Sent Events stream (comments skipped)."""
    fields: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while True:
        line = await asyncio.wait_for(response.content.readline(), deadline - time.monotonic())
        text = line.decode().rstrip("\r\n")
        if text == "" and fields:
            if fields.get("event") == "run":
                return dict(json.loads(fields["data"]))
            fields = {}
        elif ":" in text and not text.startswith(":"):
            key, value = text.split(":", 1)
            fields[key] = fields.get(key, "") + value.lstrip(" ")


async def test_the_live_stream_sends_each_changed_row(
    broker: tuple[TestClient, EmbeddedTransport],
) -> None:
    client, transport = broker
    stream = await client.get("/page/events", params={"pgroup": "p12345"})
    assert stream.status == 200
    assert stream.headers["Content-Type"] == "text/event-stream"
    await async_wait_until(
        lambda: client.app[PAGE].hub.watching("p12345") == 1, what="the subscription"
    )
    await retrieve(client, CHANNELS_ONLY)
    event = await next_event(stream)
    assert (event["run"], event["state"]) == (1, "queued")
    assert event["html"].startswith('<tr id="run-1" class="run" data-run="1" data-state="queued"')

    jobs = await take_jobs(transport, [SourceKind.DATABUFFER])
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_START, jobs["BSDATA"], "", total=50)
    )
    for done in range(1, 51):  # a burst of progress: coalesced, never one message per event
        await transport.publish_status(
            StatusEvent.for_job(Action.WRITE_PROGRESS, jobs["BSDATA"], "", done=done, total=50)
        )
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_FINISHED, jobs["BSDATA"], "ok", total=50, report=COMPLETE)
    )
    states: list[str] = []
    while not states or states[-1] != "done":
        event = await next_event(stream)
        assert event["run"] == 1
        states.append(event["state"])
    assert set(states) <= {"running", "done"}
    assert len(states) < 26  # 52 events, one row per flush
    assert glances(event["html"]) == {"BSDATA": "complete"}
    stream.close()
    await async_wait_until(
        lambda: client.app[PAGE].hub.watching("p12345") == 0, what="the page to go"
    )


async def test_stopping_the_broker_ends_open_streams(settings: Settings) -> None:
    client = TestClient(TestServer(create_app(settings, EmbeddedTransport())))
    await client.start_server()
    stream = await client.get("/page/events", params={"pgroup": "p12345"})
    assert stream.status == 200
    started = time.monotonic()
    await client.close()  # aiohttp would wait 60 s for a handler that never ends
    assert time.monotonic() - started < 30
    stream.close()


def test_store_listeners_hear_each_committed_change(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "status.sqlite")
    heard: list[tuple[str, int]] = []

    def broken(pgroup: str, run: int) -> None:
        raise RuntimeError("a page bug")

    store.add_listener(broken)  # must not break the store
    store.add_listener(lambda pgroup, run: heard.append((pgroup, run)))
    event = StatusEvent(Action.WRITE_START, "r", "job-1", "p12345", 7, "BSDATA", "/x.h5")
    store.apply(event)
    store.apply(StatusEvent(Action.WRITE_REQUEST, "r", "job-2", "p12345", 8, "BSDATA", "/y.h5"))
    assert heard == [("p12345", 7), ("p12345", 8)]
    assert store.run_status("p12345", 7)[0]["state"] == "running"
    store.remove_listener(broken)
    store.close()


async def test_older_runs_page_by_page_and_filters_look_further_back(
    broker: tuple[TestClient, EmbeddedTransport], raw_dir: Path
) -> None:
    client, transport = broker
    for _ in range(5):
        await retrieve(client, CHANNELS_ONLY)
    consumer = transport.consume_jobs(SourceKind.DATABUFFER)
    delivery = await consumer.__anext__()  # run 1, the oldest
    await delivery.ack()
    await consumer.aclose()
    await transport.publish_status(StatusEvent.for_job(Action.WRITE_REJECTED, delivery.job, "x"))
    store = client.app[STATUS]
    dirs = PgroupDirs("bernina", "p12345", raw_dir)

    def numbers(**options: Any) -> tuple[list[int], int | None]:
        listing = list_runs(dirs, store, limit=2, **{"before": None, "state": None, **options})
        return [run.number for run in listing.runs], listing.older

    assert numbers() == ([5, 4], 4)
    assert numbers(before=4) == ([3, 2], 2)
    assert numbers(before=2) == ([1], None)

    async def failed() -> bool:
        return numbers(state="failed") == ([1], None)

    await async_wait_until(failed, timeout=PATIENCE, what="the failed run, four runs back")
    assert numbers(state="queued", before=5) == ([4, 3], 3)
