"""The page in a real browser (Debian's Chromium driven by Playwright) against the demo system.

``sf-daq-broker demo --stay`` runs the whole system (simulated buffers, broker, workers) and
its first run; the browser opens the printed address, sees the run table, watches new runs
go from queued to done without reloading, and opens a run's page with every preview loaded at
its size. The data and image buffers answer 2 s late, so a job runs long enough to be seen
running, and a second run's job waits queued behind the first (one job per source kind at a
time). Screenshots go to the test's temporary directory.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import wait_until

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Milliseconds the browser waits for a condition (generous: the machine may be loaded).
WAIT_MS = 120_000
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("SF_DAQ_REQUIRE_BROWSER"):
            pytest.fail(f"{reason}, but SF_DAQ_REQUIRE_BROWSER is set")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    """The demo system, kept running; yields the page's address."""
    command = [
        sys.executable,
        "-m",
        "sf_daq_broker",
        "demo",
        "--stay",
        "--pulses",
        "100",
        "--detectors",
        "JF13T01V01",
        "--buffer-delay",
        "2",
    ]
    with subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        lines: queue.Queue[str] = queue.Queue()
        seen: list[str] = []
        assert process.stdout is not None
        stdout = process.stdout
        reader = threading.Thread(target=lambda: list(map(lines.put, stdout)))
        reader.start()

        def ready() -> bool:
            while not lines.empty():
                seen.append(lines.get())
            if process.poll() is not None:
                raise AssertionError("the demo ended:\n" + "".join(seen))
            return any(line.startswith("ready: ") for line in seen)

        try:
            wait_until(ready, timeout=300, what="the demo system")
            out = "".join(seen)
            assert "demo passed" in out, out
            match = re.search(r"^page\s+(http://\S+/)\s", out, re.MULTILINE)
            assert match, out
            yield match.group(1)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            reader.join()


def retrieve(page_url: str, start: int, stop: int) -> int:
    reply = requests.post(
        page_url + "retrieve_from_buffers",
        json={
            "pgroup": "p12345",
            "start_pulseid": start,
            "stop_pulseid": stop,
            "directory_name": "browser",
            "channels_list": ["SAROP11-PBPS117:INTENSITY"],
        },
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return int(reply.json()["run_number"])


def buffers_at(page_url: str) -> int:
    """Where the demo's buffers are now: the broker's refusal of a range far ahead says."""
    reply = requests.post(
        page_url + "retrieve_from_buffers",
        json={
            "pgroup": "p12345",
            "start_pulseid": 10**15,
            "stop_pulseid": 10**15,
            "channels_list": ["SAROP11-PBPS117:INTENSITY"],
        },
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    found = re.search(r"which are at pulse (\d+)", reply.json()["message"])
    assert found, reply.text
    return int(found[1])


def test_the_run_table_follows_new_runs_live(browser: Any, demo: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(demo)
    row = page.locator("#run-1")
    row.wait_for(timeout=WAIT_MS)
    assert row.get_attribute("data-state") == "done"
    chips = row.locator(".chip")
    assert chips.evaluate_all("cs => cs.map(c => [c.dataset.source, c.dataset.state])") == [
        ["BSDATA", "done"],
        ["CAMERAS", "done"],
        ["PVCHANNELS", "done"],
        ["JF13T01V01", "done"],
    ]
    assert row.locator("td.glance > div").all_inner_texts() == ["complete"] * 4
    assert row.locator("td.pulses").inner_text().startswith("15000001000\u201315000001099")
    page.wait_for_selector("#live.on", timeout=WAIT_MS)  # the live stream is open

    page.evaluate(
        """() => {
        window.samePage = true;
        window.seen = [];
        const note = () => {
            const row = document.getElementById("run-3");
            if (row && window.seen[window.seen.length - 1] !== row.dataset.state)
                window.seen.push(row.dataset.state);
        };
        new MutationObserver(note).observe(document.getElementById("runs"),
            {childList: true, subtree: true, attributes: true});
    }"""
    )
    assert retrieve(demo, 15_000_001_000, 15_000_001_099) == 2
    # Run 3 ends a few seconds ahead of the buffers, so that it is seen waiting for its data
    # (running) before it is done, however fast the worker is.
    now = buffers_at(demo)
    assert retrieve(demo, now + 100, now + 400) == 3
    page.wait_for_function("window.seen.includes('done')", timeout=WAIT_MS)
    # The row appears as the run is accepted and changes in place until it is done; the live
    # stream sends a run's row at most twice a second, so a short "queued" may be skipped.
    seen = page.evaluate("window.seen")
    assert seen in (["queued", "running", "done"], ["running", "done"])
    assert page.evaluate("window.samePage") is True  # updated in place, never reloaded
    assert page.locator("tbody#runs tr.run").evaluate_all("rs => rs.map(r => r.id)") == [
        "run-3",
        "run-2",
        "run-1",
    ]
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)

    page.select_option("select[name=state]", "failed")
    page.wait_for_url(re.compile(r"state=failed"), timeout=WAIT_MS)
    assert page.locator("tbody#runs tr.run").count() == 0
    assert page.locator("p.empty").inner_text() == "no run of p12345 is failed"

    page.fill("input[name=run_number]", "2")  # jump to a run
    page.click("form.jump button")
    page.wait_for_url(re.compile(r"/page/run\?pgroup=p12345&run_number=2$"), timeout=WAIT_MS)
    assert page.locator("h1").inner_text() == "Run 2 of p12345 done"
    page.close()


def test_a_run_page_shows_every_preview(browser: Any, demo: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(demo)
    page.click("#run-1 td.number a")
    page.wait_for_url(re.compile(r"/page/run\?pgroup=p12345&run_number=1$"), timeout=WAIT_MS)
    assert page.locator("h1").inner_text().startswith("Run 1 of p12345")
    page.wait_for_function(
        """() => [...document.querySelectorAll('img.preview')]
                   .every(image => image.complete && image.naturalWidth > 0)""",
        timeout=WAIT_MS,
    )
    sizes = page.locator("img.preview").evaluate_all(
        "images => images.map(i => [i.className, i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [["preview preview-channel", 480, 240]] * 6 + [
        ["preview preview-camera", 640, 420],
        ["preview preview-detector", 960, 420],
    ]
    page.wait_for_selector(".pv-values table", timeout=WAIT_MS)
    pvs = page.locator(".pv-values").inner_text()
    for name in ("SARUN:FELPHOTENE", "SARES11-XSAM125:MOTOR_X.RBV", "SIN-TIMAST-TMA:Beam-Exp-"):
        assert name in pvs
    first = page.locator("#source-BSDATA table.completeness tbody tr").first
    assert first.locator("td").all_inner_texts()[:4] == [
        "SARFE10-PBPG050:HAMP-INTENSITY-CAL",
        "25 beam pulses",
        "25",
        "0",
    ]
    assert '"directory_name": "demo"' in page.locator("section.request pre").inner_text()
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
    page.close()
