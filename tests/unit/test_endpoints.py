"""The broker's endpoints on the embedded transport: bookkeeping, run numbers, scans, callers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import RETRIEVAL_KINDS, Action, Job, SourceKind, job_id_for
from sf_daq_broker.transport.embedded import EmbeddedTransport

SEED_REQUEST = {
    "pgroup": "p12345",
    "directory_name": "covid/detector_test2",
    "start_pulseid": 11884948775,
    "stop_pulseid": 11884949774,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet", "SAR-CVME-TIFALL4:EvtSet"],
    "detectors": {"JF07T32V01": {}},
}


@pytest.fixture
def transport() -> EmbeddedTransport:
    return EmbeddedTransport()


@pytest.fixture
async def client(aiohttp_client: Any, settings: Any, transport: EmbeddedTransport) -> TestClient:
    return await aiohttp_client(create_app(settings, transport))


async def call(client: TestClient, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await client.request(method, path, **kwargs)
    return response.status, await response.json()


async def test_seed_example_writes_run_json(client: TestClient, raw_dir: Path) -> None:
    status, reply = await call(client, "POST", "/retrieve_from_buffers", json=SEED_REQUEST)
    assert status == 200
    assert reply["status"] == "ok"
    assert reply["message"] == "1"
    assert reply["run_number"] == 1
    assert re.fullmatch(r"[0-9a-f-]{36}", reply["request_id"])
    assert reply["files"] == [
        str(raw_dir / "covid/detector_test2/run_000001.BSDATA.h5"),
        str(raw_dir / "covid/detector_test2/run_000001.JF07T32V01.h5"),
    ]
    record_file = raw_dir / "run_info" / "000000" / "run_000001.json"
    text = record_file.read_text()
    record = json.loads(text)
    assert list(record) == [
        "pgroup",
        "directory_name",
        "start_pulseid",
        "stop_pulseid",
        "channels_list",
        "detectors",
        "beamline",
        "run_number",
        "request_id",
        "request_time",
    ]
    assert {key: record[key] for key in SEED_REQUEST} == SEED_REQUEST
    assert record["beamline"] == "bernina"
    assert record["run_number"] == 1
    assert record["request_id"] == reply["request_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", record["request_time"])
    assert text.startswith('{\n  "pgroup": "p12345",\n')  # indented, as the seed shows
    assert (raw_dir / "run_info" / "LAST_RUN").read_text() == "1\n"
    assert (raw_dir / "covid" / "detector_test2").is_dir()


async def test_jobs_carry_everything_a_worker_needs(
    client: TestClient, raw_dir: Path, transport: EmbeddedTransport
) -> None:
    body = dict(
        SEED_REQUEST,
        camera_list=["CAM:FPICTURE"],
        pv_list=["PV:A", "PV:B"],
        rate_multiplicator=10,
        detectors={"JF07T32V01": {"factor": 1.5}},
    )
    status, reply = await call(client, "POST", "/retrieve_from_buffers", json=body)
    assert status == 200
    jobs: dict[SourceKind, Job] = {}
    for kind in RETRIEVAL_KINDS:
        async for delivery in transport.consume_jobs(kind):
            jobs[kind] = delivery.job
            await delivery.ack()
            break
    info = raw_dir / "run_info" / "000000"
    expected_common = {
        "request_id": reply["request_id"],
        "pgroup": "p12345",
        "beamline": "bernina",
        "run_number": 1,
        "rate_multiplicator": 10,
        "requested_start": 11884948775,
        "requested_stop": 11884949774,
        "run_info_file": str(info / "run_000001.json"),
    }
    # 11884948775 % 10 != 0 and 11884949774 % 10 != 0: the channel range is not widened.
    for kind, source, names in [
        (SourceKind.DATABUFFER, "BSDATA", ("SAR-CVME-TIFALL5:EvtSet", "SAR-CVME-TIFALL4:EvtSet")),
        (SourceKind.IMAGEBUFFER, "CAMERAS", ("CAM:FPICTURE",)),
        (SourceKind.ARCHIVER, "PVCHANNELS", ("PV:A", "PV:B")),
    ]:
        job = jobs[kind]
        assert (job.source, job.names) == (source, names)
        assert (job.start_pulse_id, job.stop_pulse_id) == (11884948775, 11884949774)
        assert job.output_file == str(raw_dir / f"covid/detector_test2/run_000001.{source}.h5")
        assert job.log_file == str(info / f"run_000001.{source}.log")
        assert job.job_id == job_id_for("p12345", 1, source)
        assert job.options == {}
        assert {key: getattr(job, key) for key in expected_common} == expected_common
    detector = jobs[SourceKind.DETECTOR]
    assert (detector.source, detector.names) == ("JF07T32V01", ("JF07T32V01",))
    assert (detector.start_pulse_id, detector.stop_pulse_id) == (11884948780, 11884949770)
    assert detector.options == {
        "adc_to_energy": True,
        "compression": True,
        "mask": True,
        "double_pixels_action": "mask",
        "module_edge_pixels": "keep",
        "geometry": False,
        "gap_pixels": True,
        "factor": 1.5,
        "disabled_modules": [],
        "roi": {},
        "downsample": None,
        "keep_raw": False,
        "save_ppicker_events_only": False,
        "crystfel_lists_laser": False,
        "selected_pulse_ids": [],
    }


@pytest.mark.parametrize(
    ("start", "stop", "rate", "channel_range", "detector_range"),
    [
        (1000, 2000, 1, (999, 2001), (1000, 2000)),
        (1000, 2000, 4, (999, 2001), (1000, 2000)),
        (1001, 2003, 4, (1001, 2003), (1004, 2000)),
        (1001, 1019, 10, (1001, 1019), (1010, 1010)),
        (0, 10, 2, (0, 11), (0, 10)),
    ],
)
async def test_reduced_rate_ranges(
    client: TestClient,
    transport: EmbeddedTransport,
    start: int,
    stop: int,
    rate: int,
    channel_range: tuple[int, int],
    detector_range: tuple[int, int],
) -> None:
    body = {
        "pgroup": "p12345",
        "start_pulseid": start,
        "stop_pulseid": stop,
        "rate_multiplicator": rate,
        "channels_list": ["A:B"],
        "detectors": {"JF13T01V01": {}},
    }
    status, _ = await call(client, "POST", "/retrieve_from_buffers", json=body)
    assert status == 200
    ranges = {}
    for kind in (SourceKind.DATABUFFER, SourceKind.DETECTOR):
        async for delivery in transport.consume_jobs(kind):
            ranges[kind] = (delivery.job.start_pulse_id, delivery.job.stop_pulse_id)
            break
    assert ranges == {SourceKind.DATABUFFER: channel_range, SourceKind.DETECTOR: detector_range}


async def test_write_request_event_per_job(
    client: TestClient, transport: EmbeddedTransport
) -> None:
    subscription = await transport.subscribe_status()
    status, reply = await call(client, "POST", "/retrieve_from_buffers", json=SEED_REQUEST)
    assert status == 200
    events = [await subscription.__anext__() for _ in range(2)]
    await subscription.close()
    assert [(e.action, e.source, e.run_number, e.file) for e in events] == [
        (Action.WRITE_REQUEST, "BSDATA", 1, reply["files"][0]),
        (Action.WRITE_REQUEST, "JF07T32V01", 1, reply["files"][1]),
    ]
    assert all(e.request_id == reply["request_id"] for e in events)


async def test_concurrent_requests_get_consecutive_numbers(
    client: TestClient, raw_dir: Path
) -> None:
    replies = await asyncio.gather(
        *(call(client, "POST", "/retrieve_from_buffers", json=SEED_REQUEST) for _ in range(40))
    )
    assert sorted(reply["run_number"] for _, reply in replies) == list(range(1, 41))
    assert (raw_dir / "run_info" / "LAST_RUN").read_text() == "40\n"
    assert len(list((raw_dir / "run_info" / "000000").glob("run_*.json"))) == 40


async def test_run_info_directories_split_by_thousand(client: TestClient, raw_dir: Path) -> None:
    (raw_dir / "run_info").mkdir()
    (raw_dir / "run_info" / "LAST_RUN").write_text("3140\n")
    status, reply = await call(client, "POST", "/retrieve_from_buffers", json=SEED_REQUEST)
    assert (status, reply["run_number"]) == (200, 3141)
    assert (raw_dir / "run_info" / "003000" / "run_003141.json").is_file()


async def test_current_and_advance_run_number(client: TestClient, raw_dir: Path) -> None:
    assert await call(client, "GET", "/get_current_run_number", params={"pgroup": "p12345"}) == (
        200,
        {"status": "ok", "message": "0", "run_number": 0},
    )
    assert await call(client, "POST", "/advance_run_number", json={"pgroup": "p12345"}) == (
        200,
        {"status": "ok", "message": "1", "run_number": 1},
    )
    # GET with a JSON body, as existing clients send it.
    assert await call(client, "GET", "/get_current_run_number", json={"pgroup": "p12345"}) == (
        200,
        {"status": "ok", "message": "1", "run_number": 1},
    )
    # The reserved run can be filled once.
    status, reply = await call(
        client, "POST", "/retrieve_from_buffers", json=dict(SEED_REQUEST, run_number=1)
    )
    assert (status, reply["run_number"]) == (200, 1)
    assert (raw_dir / "run_info/000000/run_000001.json").is_file()
    status, reply = await call(
        client, "POST", "/retrieve_from_buffers", json=dict(SEED_REQUEST, run_number=1)
    )
    assert status == 409
    assert reply["message"] == (
        f"run_number 1 of p12345 already holds a retrieval "
        f"({raw_dir}/run_info/000000/run_000001.json)"
    )
    status, reply = await call(client, "POST", "/retrieve_from_buffers", json=SEED_REQUEST)
    assert (status, reply["run_number"]) == (200, 2)


async def test_endpoint_errors(client: TestClient) -> None:
    assert await call(client, "GET", "/get_current_run_number") == (
        400,
        {"status": "failed", "message": "pgroup is missing"},
    )
    assert await call(client, "POST", "/get_current_run_number", json={"pgroup": "p12345"}) == (
        405,
        {"status": "failed", "message": "POST is not allowed on /get_current_run_number (use GET)"},
    )
    assert await call(client, "GET", "/no_such_thing") == (
        404,
        {"status": "failed", "message": "no endpoint /no_such_thing"},
    )


async def test_scan_steps_are_appended(client: TestClient, raw_dir: Path) -> None:
    steps = []
    for step in range(3):
        scan_info = {
            "scan_name": "energy scan",
            "motor": "SARES11:ENERGY",
            "scan_values": [step],
            "scan_readbacks": [step + 0.01],
        }
        body = dict(
            SEED_REQUEST,
            start_pulseid=1000 + 100 * step,
            stop_pulseid=1099 + 100 * step,
            scan_info=scan_info,
        )
        status, reply = await call(client, "POST", "/retrieve_from_buffers", json=body)
        assert status == 200
        steps.append(reply["files"])
    scan = json.loads((raw_dir / "scan_info" / "energy_scan.json").read_text())
    assert scan == {
        "scan_parameters": {"scan_name": "energy scan", "motor": "SARES11:ENERGY"},
        "scan_files": steps,
        "pulseIds": [[1000, 1099], [1100, 1199], [1200, 1299]],
        "scan_values": [[0], [1], [2]],
        "scan_readbacks": [[0.01], [1.01], [2.01]],
        "scan_readbacks_raw": [[], [], []],
        "scan_step_info": [[], [], []],
    }


async def test_concurrent_scan_steps_are_all_kept(client: TestClient, raw_dir: Path) -> None:
    bodies = [
        dict(SEED_REQUEST, scan_info={"scan_name": "s", "scan_values": [i]}) for i in range(20)
    ]
    replies = await asyncio.gather(
        *(call(client, "POST", "/retrieve_from_buffers", json=b) for b in bodies)
    )
    assert all(status == 200 for status, _ in replies)
    scan = json.loads((raw_dir / "scan_info" / "s.json").read_text())
    assert len(scan["scan_files"]) == 20
    # Steps are recorded in run-number order.
    runs = [int(re.search(r"run_(\d+)", files[0]).group(1)) for files in scan["scan_files"]]  # type: ignore[union-attr]
    assert runs == list(range(1, 21))
    assert sorted(v[0] for v in scan["scan_values"]) == list(range(20))


async def test_corrupt_scan_file_spends_no_run(client: TestClient, raw_dir: Path) -> None:
    (raw_dir / "scan_info").mkdir()
    (raw_dir / "scan_info" / "s.json").write_text("{not json")
    status, reply = await call(
        client,
        "POST",
        "/retrieve_from_buffers",
        json=dict(SEED_REQUEST, scan_info={"scan_name": "s"}),
    )
    assert status == 409
    assert reply["message"].startswith(f"scan file {raw_dir}/scan_info/s.json is not valid JSON (")
    assert not (raw_dir / "run_info" / "LAST_RUN").exists()


async def test_beamline_from_forwarded_address_of_trusted_proxy(
    aiohttp_client: Any, make_settings: Any, data_root: Path
) -> None:
    (data_root / "alvra" / "data" / "p12345" / "raw").mkdir(parents=True)
    settings = make_settings(local_beamline="", trusted_proxies=["127.0.0.0/8"])
    client = await aiohttp_client(create_app(settings, EmbeddedTransport()))
    headers = {"X-Forwarded-For": "1.2.3.4, 129.129.242.17"}
    status, reply = await call(client, "GET", "/get_allowed_detectors", headers=headers)
    assert (status, reply["beamline"]) == (200, "alvra")
    assert reply["detectors"] == [
        "JF02T09V02",
        "JF06T08V02",
        "JF06T32V02",
        "JF08T01V01",
        "JF09T01V01",
        "JF10T01V01",
    ]
    status, reply = await call(
        client, "POST", "/retrieve_from_buffers", headers=headers, json=SEED_REQUEST
    )
    assert status == 403  # JF07T32V01 belongs to bernina
    status, reply = await call(
        client,
        "POST",
        "/retrieve_from_buffers",
        headers=headers,
        json=dict(SEED_REQUEST, detectors={"JF06T08V02": {}}),
    )
    assert status == 200
    assert (data_root / "alvra/data/p12345/raw/run_info/000000/run_000001.json").is_file()
    status, reply = await call(
        client, "GET", "/get_allowed_detectors", headers={"X-Forwarded-For": "10.0.0.1"}
    )
    assert (status, reply["message"]) == (
        403,
        "requests from 10.0.0.1 are not allowed: the address is in no beamline's subnet",
    )


async def test_forwarded_header_ignored_from_untrusted_peer(
    aiohttp_client: Any, make_settings: Any
) -> None:
    client = await aiohttp_client(create_app(make_settings(), EmbeddedTransport()))
    status, reply = await call(
        client, "GET", "/get_allowed_detectors", headers={"X-Forwarded-For": "129.129.242.17"}
    )
    assert (status, reply["beamline"]) == (200, "bernina")  # the loopback peer, not the header


async def test_running_detectors_from_latest_age(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    buffer_root = tmp_path / "buffer"
    now = time.time()
    ages = {"JF13T01V01": [1], "JF07T03V01": [1, 2, 100], "JF01T03V01": [100, 100, 100]}
    for detector, module_ages in ages.items():
        for module, age in enumerate(module_ages):
            latest = buffer_root / detector / f"M{module:02d}" / "LATEST"
            latest.parent.mkdir(parents=True)
            latest.write_text("x")
            os.utime(latest, (now - age, now - age))
    settings = make_settings(buffers={"jungfrau_root": str(buffer_root)})
    client = await aiohttp_client(create_app(settings, EmbeddedTransport()))
    status, reply = await call(client, "GET", "/get_running_detectors")
    assert status == 200
    assert reply["running_detectors"] == ["JF13T01V01"]
    assert reply["detectors"] == ["JF13T01V01"]  # upstream's older key
    # upstream's shape: the modules whose LATEST is stale
    assert reply["limping_detectors"] == {"JF07T03V01": {"missing_modules": [2]}}
    assert reply["missing_detectors"] == [
        "JF01T03V01",
        "JF03T01V02",
        "JF04T01V01",
        "JF05T01V01",
        "JF07T32V01",
        "JF14T01V01",
    ]
    assert reply["message"] == "1 of 8 detectors of bernina running"


async def test_health_and_metrics(client: TestClient, data_root: Path) -> None:
    status, reply = await call(client, "GET", "/health")
    assert status == 200
    assert {k: reply[k] for k in ("status", "transport", "transport_ok", "data_root_ok")} == {
        "status": "ok",
        "transport": "embedded",
        "transport_ok": True,
        "data_root_ok": True,
    }
    await call(client, "POST", "/retrieve_from_buffers", json=SEED_REQUEST)
    await call(client, "POST", "/retrieve_from_buffers", json={"pgroup": "bad"})
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert 'sf_daq_http_requests_total{endpoint="/retrieve_from_buffers",outcome="ok"} 1.0' in text
    assert (
        'sf_daq_http_requests_total{endpoint="/retrieve_from_buffers",outcome="refused"} 1.0'
        in text
    )
    assert 'sf_daq_jobs{kind="databuffer",state="queued"} 1.0' in text
    assert 'sf_daq_jobs{kind="detector",state="queued"} 1.0' in text


async def test_health_reports_missing_data_root(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings(data_root=str(tmp_path / "nowhere"))
    client = await aiohttp_client(create_app(settings, EmbeddedTransport()))
    status, reply = await call(client, "GET", "/health")
    assert (status, reply["status"]) == (503, "failed")
    assert reply["message"] == f"data root {tmp_path / 'nowhere'} is not a directory"


async def test_unexpected_error_hides_traceback(
    client: TestClient, raw_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (raw_dir / "run_info").mkdir()
    (raw_dir / "run_info" / "LAST_RUN").write_text("garbage")
    status, reply = await call(client, "POST", "/retrieve_from_buffers", json=SEED_REQUEST)
    assert status == 500
    assert re.fullmatch(
        r"internal error in the broker \(reference [0-9a-f]{12}, see the broker log\)",
        reply["message"],
    )
    assert "Traceback" not in json.dumps(reply)
    assert "does not hold a run number: 'garbage'" in caplog.text
    assert (raw_dir / "run_info" / "LAST_RUN").read_text() == "garbage"  # never guessed over


async def test_current_pulse_id_from_the_pulse_map(
    aiohttp_client: Any, make_settings: Any, aiohttp_server: Any
) -> None:
    from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
    from sf_daq_broker.simulation.clock import ManualClock

    clock = ManualClock(start_pulse_id=15_000_000_000)
    buffer_server = await aiohttp_server(create_api1_app(SimulatedApi1Buffer([], clock)))
    settings = make_settings(buffers={"databuffer_url": str(buffer_server.make_url(""))})
    client = await aiohttp_client(create_app(settings, EmbeddedTransport()))
    assert await call(client, "GET", "/current_pulse_id") == (
        200,
        {"status": "ok", "message": "15000000000", "pulse_id": 15_000_000_000},
    )
    clock.advance(1234)
    assert (await call(client, "GET", "/current_pulse_id"))[1]["pulse_id"] == 15_000_001_234


async def test_current_pulse_id_without_pulse_map(aiohttp_client: Any, make_settings: Any) -> None:
    settings = make_settings(buffers={"databuffer_url": "http://127.0.0.1:1"})
    client = await aiohttp_client(create_app(settings, EmbeddedTransport()))
    status, reply = await call(client, "GET", "/current_pulse_id")
    assert (status, reply["status"]) == (503, "failed")
    assert reply["message"].startswith("the pulse map at http://127.0.0.1:1 does not answer: ")
