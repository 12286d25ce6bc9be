"""daq_client --take-pedestal (--wait) and the run options against the real broker; the test
plays the pedestal worker by announcing its status events. And what broker_debugger shows of
a pedestal."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sf_daq_broker.api.app import create_app
from sf_daq_broker.bookkeeping.atomic import dump_json
from sf_daq_broker.jobs import Action, Job, SourceKind, StatusEvent
from sf_daq_broker.tools import daq_client as pedestal_tool
from sf_daq_broker.tools.broker_debugger import format_event
from sf_daq_broker.tools.daq_client import main
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.report import CompletenessReport, NameReport
from tests.support import PATIENCE
from tests.tools.support import LiveBroker, serve, take_job

DETECTOR = "JF13T01V01"


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pedestal_tool, "POLL_INTERVAL", 0.05)


@pytest.fixture
async def broker(make_settings: Any) -> AsyncIterator[LiveBroker]:
    settings = make_settings(detector_control={"url": "http://127.0.0.1:9"})
    transport = EmbeddedTransport()
    server = await serve(create_app(settings, transport))
    yield LiveBroker(str(server.make_url("")).rstrip("/"), transport, server)
    await server.close()


def result_of(job: Job) -> dict[str, Any]:
    files = job.options["detectors"][DETECTOR]
    return {
        "start_pulse_id": 1000,
        "stop_pulse_id": 1094,
        "detectors": {
            DETECTOR: {
                **{key: files[key] for key in ("raw_file", "result_file", "installed_file")},
                "stage_frames": {"G0": 16, "G1": 16, "G2": 16},
                "good_pixels": 524287,
            }
        },
    }


async def play_pedestal_worker(transport: EmbeddedTransport, fail: str | None = None) -> Job:
    job = await take_job(transport, SourceKind.PEDESTAL)
    await transport.publish_status(StatusEvent.for_job(Action.WRITE_START, job, "started"))
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_PROGRESS, job, "gain stage G1: 8 of 16", done=8, total=16)
    )
    if fail is not None:
        await transport.publish_status(StatusEvent.for_job(Action.WRITE_REJECTED, job, fail))
        return job
    record = json.loads(Path(job.output_file).read_text())
    record["result"] = result_of(job)
    Path(job.output_file).write_bytes(dump_json(record))
    report = CompletenessReport([NameReport(DETECTOR, 48, 48, 0, [])]).to_json()
    await transport.publish_status(
        StatusEvent.for_job(Action.WRITE_FINISHED, job, report["summary"], report=report)
    )
    return job


@pytest.mark.parametrize("outcome", ["done", "failed"])
async def test_take_pedestal_and_wait_for_its_result(
    broker: LiveBroker, raw_dir: Path, capsys: pytest.CaptureFixture[str], outcome: str
) -> None:
    argv = [
        "-p", "p12345", "--take-pedestal", DETECTOR, "-r", "2", "--run-log-level", "debug",
        "--wait", "--broker", broker.url,
    ]  # fmt: skip
    client = asyncio.create_task(asyncio.to_thread(main, argv))
    reason = f"{DETECTOR} cannot take a pedestal: modules 0: off"
    assert isinstance(broker.transport, EmbeddedTransport)
    job = await play_pedestal_worker(broker.transport, reason if outcome == "failed" else None)
    status = await asyncio.wait_for(client, PATIENCE)
    name = job.options["name"]
    files = job.options["detectors"][DETECTOR]
    expected = [
        # upstream's estimate: 3000 frames at 50 Hz, plus 10 s
        f"success: pedestal {name}: request to take pedestal sent, wait at least 70 seconds"
    ]
    if outcome == "done":
        expected += [
            f"{DETECTOR}: {files['result_file']} (G0 16, G1 16, G2 16 frames; 524287 good "
            f"pixels), in use as {files['installed_file']}",
            f"pedestal {name} of p12345 is done: pulses 1000-1094",
        ]
    else:
        expected += [f"pedestal {name} of p12345 failed: {reason}"]
    assert capsys.readouterr().out.splitlines() == expected
    assert status == (0 if outcome == "done" else 1)
    record = json.loads((raw_dir / "JF_pedestals" / f"{name}.json").read_text())
    assert {k: record[k] for k in ("detectors", "rate_multiplicator", "pedestalmode")} == {
        "detectors": {DETECTOR: {}},
        "rate_multiplicator": 2,
        "pedestalmode": False,
    }
    assert record["run_log_level"] == "debug" and job.log_level == "DEBUG"


async def test_a_refused_pedestal_says_why(
    broker: LiveBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["-p", "p12345", "--take-pedestal", "JF02T09V02", "--broker", broker.url]
    assert await asyncio.to_thread(main, argv) == 1
    assert capsys.readouterr().err == (
        "Error, reason : detectors: JF02T09V02 is not allowed for beamline bernina (allowed: "
        "JF01T03V01, JF03T01V02, JF04T01V01, JF05T01V01, JF07T03V01, JF07T32V01, JF13T01V01, "
        "JF14T01V01)\n"
    )


async def test_run_options_go_into_the_request(
    broker: LiveBroker, raw_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    channels = tmp_path / "channels.txt"
    channels.write_text("SAR-CVME-TIFALL5:EvtSet\n")
    argv = [
        "-p", "p12345", "-c", str(channels), "--start_pulseid", "1000", "--stop_pulseid", "1010",
        "--user-tag", "dark", "--append-user-tag", "--run-log-level", "ERROR",
        "--broker", broker.url,
    ]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    assert capsys.readouterr().out == "success: run number(request_id) is 1\n"
    record = json.loads((raw_dir / "run_info/000000/run_000001.json").read_text())
    assert {k: record[k] for k in ("user_tag", "append_user_tag_to_data_dir", "run_log_level")} == {
        "user_tag": "dark",
        "append_user_tag_to_data_dir": True,
        "run_log_level": "ERROR",
    }
    assert record["appended_directory_suffix"] == "dark"
    assert isinstance(broker.transport, EmbeddedTransport)
    job = await take_job(broker.transport, SourceKind.DATABUFFER)
    assert job.output_file == str(raw_dir / "run_000001-dark.BSDATA.h5")


def test_the_debugger_names_a_pedestal_and_its_step() -> None:
    event = StatusEvent(
        action=Action.WRITE_PROGRESS,
        request_id="r",
        job_id="j",
        pgroup="p12345",
        run_number=0,
        source="pedestal",
        file="/sf/bernina/data/p12345/raw/JF_pedestals/20240101_120000.json",
        message="gain stage G1: 8 of 16",
        timestamp=1_700_000_000.0,
        details={"done": 8, "total": 16},
    )
    line = format_event(event, colour=False)
    assert line.endswith(
        "write_progress pedestal     p12345 pedestal 20240101_120000 "
        "/sf/bernina/data/p12345/raw/JF_pedestals/20240101_120000.json gain stage G1: 8 of 16"
    )
