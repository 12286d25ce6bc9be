"""/take_pedestal at the door (every rule, nothing written when refused), the pedestal job it
queues, /pedestal_status, and which pedestal a run records and converts with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.transport.embedded import EmbeddedTransport

GOOD = {"pgroup": "p12345", "detectors": {"JF13T01V01": {}}}


@pytest.fixture
def transport() -> EmbeddedTransport:
    return EmbeddedTransport()


@pytest.fixture
def pedestal_root(tmp_path: Path) -> Path:
    return tmp_path / "pedestals"


@pytest.fixture
async def client(
    aiohttp_client: Any, make_settings: Any, transport: EmbeddedTransport, pedestal_root: Path
) -> TestClient:
    settings = make_settings(
        detector_control={"url": "http://127.0.0.1:9"},  # never reached at the door
        pedestals={"root": str(pedestal_root), "frames_per_stage": 500},
        detectors={
            "JF13T01V01": {"beamline": "bernina", "pedestal_file": "/configured/ped.h5"},
            "JF07T03V01": {"beamline": "bernina", "number_bad_modules": 1},
            "JF02T09V02": {"beamline": "alvra"},
        },
    )
    return await aiohttp_client(create_app(settings, transport))


async def call(client: TestClient, method: str, path: str, body: Any) -> tuple[int, Any]:
    response = await client.request(method, path, json=body)
    return response.status, await response.json()


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ([], 400, "the request body must be a JSON object"),
        (
            {"detectors": ["JF13T01V01"]},
            400,
            "pgroup is missing (pgroup and detectors are mandatory)",
        ),
        ({"pgroup": "p12345"}, 400, "detectors is missing (pgroup and detectors are mandatory)"),
        (
            {**GOOD, "detectors": []},
            400,
            "detectors must be a non-empty list of detector names (or an object whose keys are "
            "the names), got []",
        ),
        (
            {**GOOD, "detectors": "JF13T01V01"},
            400,
            "detectors must be a non-empty list of detector names (or an object whose keys are "
            "the names), got 'JF13T01V01'",
        ),
        (
            {**GOOD, "detectors": ["JF13"]},
            400,
            "detectors: 'JF13' is not a Jungfrau detector name (JFxxTyyVzz, e.g. JF07T32V01)",
        ),
        (
            {**GOOD, "detectors": ["JF02T09V02"]},
            403,
            "detectors: JF02T09V02 is not allowed for beamline bernina (allowed: JF07T03V01, "
            "JF13T01V01)",
        ),
        (
            {**GOOD, "rate_multiplicator": 3},
            400,
            "rate_multiplicator must be one of 1, 2, 4, 8, 10, 20, 40, 50, 100, got 3",
        ),
        (
            {**GOOD, "rate_multiplicator": "x"},
            400,
            "rate_multiplicator must be an integer, got 'x'",
        ),
        ({**GOOD, "pedestalmode": "yes"}, 400, "pedestalmode must be true or false, got 'yes'"),
        (
            {**GOOD, "run_log_level": "verbose"},
            400,
            "run_log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (or 10, 20, 30, "
            "40, 50), got 'verbose'",
        ),
        (
            {**GOOD, "pgroup": "p1"},
            400,
            "pgroup must be 'p' followed by 5 digits (e.g. p12345), got 'p1'",
        ),
        ({**GOOD, "pgroup": "p99999"}, 404, None),
    ],
)
async def test_bad_pedestal_requests_are_refused_and_nothing_is_written(
    client: TestClient,
    raw_dir: Path,
    transport: EmbeddedTransport,
    body: Any,
    code: int,
    message: str | None,
) -> None:
    status, reply = await call(client, "POST", "/take_pedestal", body)
    assert status == code
    if message is not None:
        assert reply == {"status": "failed", "message": message}
    assert list(raw_dir.iterdir()) == []
    assert transport.queued(SourceKind.PEDESTAL) == 0


async def test_a_closed_pgroup_takes_no_pedestal(client: TestClient, raw_dir: Path) -> None:
    assert (await call(client, "POST", "/close_pgroup_writing", {"pgroup": "p12345"}))[0] == 200
    status, reply = await call(client, "POST", "/take_pedestal", GOOD)
    assert (status, reply["message"]) == (409, "pgroup p12345 is closed for writing")
    assert not (raw_dir / "JF_pedestals").exists()


async def test_without_detector_control_no_pedestal(
    aiohttp_client: Any, make_settings: Any, raw_dir: Path
) -> None:
    client = await aiohttp_client(
        create_app(make_settings(detector_control={"url": ""}), EmbeddedTransport())
    )
    status, reply = await call(client, "POST", "/take_pedestal", GOOD)
    assert status == 503
    assert reply["message"].startswith("this broker has no detector control (set ")
    assert list(raw_dir.iterdir()) == []


async def test_a_pedestal_request_is_recorded_queued_and_followed(
    client: TestClient, raw_dir: Path, transport: EmbeddedTransport, pedestal_root: Path
) -> None:
    body = {
        "pgroup": "p12345",
        "detectors": ["JF07T03V01", "JF13T01V01", "JF07T03V01"],
        "rate_multiplicator": 2,
        "laser_mode": "off",
    }
    status, reply = await call(client, "POST", "/take_pedestal", body)
    assert status == 200, reply
    name = reply["pedestal"]
    # 3 stages of 500 frames at 50 Hz, plus upstream's 10 s
    assert reply["message"] == "request to take pedestal sent, wait at least 40 seconds"
    assert reply["detectors"] == ["JF07T03V01", "JF13T01V01"]
    directory = raw_dir / "JF_pedestals"
    record = json.loads((directory / f"{name}.json").read_text())
    assert {k: record[k] for k in ("pgroup", "laser_mode", "beamline", "pedestal")} == {
        "pgroup": "p12345",
        "laser_mode": "off",
        "beamline": "bernina",
        "pedestal": name,
    }
    assert record["request_id"] == reply["request_id"]
    async for delivery in transport.consume_jobs(SourceKind.PEDESTAL):
        job = delivery.job
        await delivery.ack()
        break
    assert (job.kind, job.source, job.names) == (
        SourceKind.PEDESTAL,
        "pedestal",
        ("JF07T03V01", "JF13T01V01"),
    )
    assert (job.run_number, job.rate_multiplicator, job.log_level) == (0, 2, "INFO")
    assert (job.output_file, job.log_file) == (
        str(directory / f"{name}.json"),
        str(directory / f"{name}.log"),
    )
    assert job.options["detectors"]["JF07T03V01"] == {
        "raw_file": str(directory / f"{name}.JF07T03V01.h5"),
        "result_file": str(directory / f"{name}.JF07T03V01.res.h5"),
        "installed_file": str(pedestal_root / "JF07T03V01" / f"{name}.h5"),
        "number_bad_modules": 1,
    }
    assert {k: job.options[k] for k in ("name", "pedestalmode", "frames_per_stage")} == {
        "name": name,
        "pedestalmode": False,
        "frames_per_stage": 500,
    }
    status, answer = await call(
        client, "GET", "/pedestal_status", {"pgroup": "p12345", "pedestal": name}
    )
    assert status == 200
    assert answer["state"] == "queued" and answer["result"] is None
    assert answer["message"] == f"pedestal {name} of p12345 is queued: queued"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"pgroup": "p12345"}, 400, "pedestal is missing (the name /take_pedestal replied)"),
        (
            {"pgroup": "p12345", "pedestal": "../x"},
            400,
            "pedestal must be a pedestal name YYYYmmdd_HHMMSS, got '../x'",
        ),
        (
            {"pgroup": "p12345", "pedestal": "20240101_120000"},
            404,
            "this broker knows no pedestal 20240101_120000 of p12345",
        ),
    ],
)
async def test_pedestal_status_of_what_does_not_exist(
    client: TestClient, body: dict[str, Any], code: int, message: str
) -> None:
    status, reply = await call(client, "GET", "/pedestal_status", body)
    assert (status, reply["message"]) == (code, message)


async def test_run_status_of_run_zero_is_refused(client: TestClient) -> None:
    status, reply = await call(client, "GET", "/run_status", {"pgroup": "p12345", "run_number": 0})
    assert (status, reply["message"]) == (
        400,
        f"run_number must be between 1 and {2**63 - 1}, got 0",
    )


async def test_a_run_records_and_converts_with_the_newest_installed_pedestal(
    client: TestClient, raw_dir: Path, transport: EmbeddedTransport, pedestal_root: Path
) -> None:
    run_body = {
        "pgroup": "p12345",
        "start_pulseid": 1000,
        "stop_pulseid": 1010,
        "detectors": {"JF13T01V01": {}, "JF07T03V01": {"adc_to_energy": False}},
    }

    async def accepted() -> tuple[dict[str, Any], dict[str, str | None]]:
        status, reply = await call(client, "POST", "/retrieve_from_buffers", run_body)
        assert status == 200, reply
        run = reply["run_number"]
        record = json.loads((raw_dir / "run_info/000000" / f"run_{run:06d}.json").read_text())
        jobs = {}
        for _ in range(2):
            async for delivery in transport.consume_jobs(SourceKind.DETECTOR):
                jobs[delivery.job.source] = delivery.job.pedestal_file
                await delivery.ack()
                break
        return record, jobs

    record, jobs = await accepted()  # nothing installed: the configured file
    assert record["pedestal_files"] == {"JF13T01V01": "/configured/ped.h5"}
    assert jobs == {"JF13T01V01": "/configured/ped.h5", "JF07T03V01": None}
    installed = pedestal_root / "JF13T01V01"
    installed.mkdir(parents=True)
    for name in ("20240101_120000.h5", "20240301_080000.h5", "20991231_000000.h5.tmp", "x.h5"):
        (installed / name).write_bytes(b"")
    record, jobs = await accepted()
    assert record["pedestal_files"] == {"JF13T01V01": str(installed / "20240301_080000.h5")}
    assert jobs["JF13T01V01"] == str(installed / "20240301_080000.h5")
