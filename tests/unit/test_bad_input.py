"""No input yields a 5xx (issue 11, items 5 and 6): each case is a 4xx or 507 with a message
naming the key, and no run number is spent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import ROUTES, create_app
from sf_daq_broker.transport.embedded import EmbeddedTransport
from tests.support import fill, tmpfs

BASE: dict[str, Any] = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 2000,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet"],
}
BODY_READERS = {
    "/retrieve_from_buffers",
    "/get_current_run_number",
    "/advance_run_number",
    "/close_pgroup_writing",
    "/run_status",
    # detector control, pedestals and the facility's other endpoints
    "/power_on_detector",
    "/get_detector_settings",
    "/set_detector_settings",
    "/power_on_modules",
    "/power_off_modules",
    "/get_detector_status",
    "/get_detector_temperatures",
    "/get_jfctrl_monitor",
    "/get_detector_pings",
    "/get_jfstats",
    "/take_pedestal",
    "/pedestal_status",
    "/get_pvlist",
    "/set_pvlist",
    "/get_dap_settings",
    "/set_dap_settings",
    "/copy_user_files",
    "/upload_custom_dap_script",
    "/get_next_acquistion_number",
}


@pytest.fixture
async def client(aiohttp_client: Any, settings: Any) -> TestClient:
    return await aiohttp_client(create_app(settings, EmbeddedTransport()))


def nothing_spent(raw_dir: Path) -> bool:
    return not (raw_dir / "run_info" / "LAST_RUN").exists() and not list(
        (raw_dir / "run_info").rglob("*.json") if (raw_dir / "run_info").exists() else []
    )


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _ in ROUTES])
async def test_deeply_nested_json_is_refused_on_every_endpoint(
    client: TestClient, raw_dir: Path, method: str, path: str
) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    response = await client.request(
        method, path, data=deep, headers={"Content-Type": "application/json"}
    )
    if path in BODY_READERS:
        assert (response.status, (await response.json())["message"]) == (
            400,
            "the request body is nested too deeply (at most 32 levels)",
        )
    else:  # endpoints that read no body answer as usual (/current_pulse_id: 503, no buffers)
        assert response.status in (200, 503)
    assert nothing_spent(raw_dir)


async def test_nesting_that_parses_but_is_too_deep_names_the_key(
    client: TestClient, raw_dir: Path
) -> None:
    metadata: Any = "leaf"
    for _ in range(40):
        metadata = {"a": metadata}
    response = await client.post("/retrieve_from_buffers", json={**BASE, "meta": metadata})
    message = (await response.json())["message"]
    assert response.status == 400
    assert message == (
        f"the request body is nested too deeply at meta{'.a' * 32} (at most 32 levels)"
    )
    assert nothing_spent(raw_dir)


@pytest.mark.parametrize(
    ("key", "raw_value", "message"),
    [
        (
            "directory_name",
            '"\\ud800"',
            "directory_name in the request body is not valid Unicode: a lone surrogate "
            "'\\ud800' at position 0",
        ),
        (
            "channels_list",
            '["A:B", "x\\udfff"]',
            "channels_list[1] in the request body is not valid Unicode: a lone surrogate "
            "'\\udfff' at position 1",
        ),
        (
            "laser_mode",
            '{"\\ud800": 1}',
            "laser_mode.\\ud800 in the request body is not valid Unicode: a lone surrogate "
            "'\\ud800' at position 0",
        ),
    ],
)
async def test_lone_surrogates_are_refused_before_a_run_is_spent(
    client: TestClient, raw_dir: Path, key: str, raw_value: str, message: str
) -> None:
    body = json.dumps({k: v for k, v in BASE.items() if k != key})[:-1]
    data = f'{body}, "{key}": {raw_value}}}'.encode()
    response = await client.post(
        "/retrieve_from_buffers", data=data, headers={"Content-Type": "application/json"}
    )
    assert (response.status, (await response.json())["message"]) == (400, message)
    assert nothing_spent(raw_dir)


@pytest.mark.parametrize("key", ["directory_name", "scan_name"])
async def test_a_path_component_too_long_for_a_file_system_is_refused(
    client: TestClient, raw_dir: Path, key: str
) -> None:
    long = "é" * 101  # 202 bytes of UTF-8
    body = (
        {**BASE, "directory_name": f"a/{long}"}
        if key == "directory_name"
        else {**BASE, "scan_info": {"scan_name": long}}
    )
    shown = "directory_name" if key == "directory_name" else "scan_info.scan_name"
    response = await client.post("/retrieve_from_buffers", json=body)
    assert (response.status, (await response.json())["message"]) == (
        400,
        f"{shown}: the path component {'é' * 20!r}... is 202 bytes long, at most 200 bytes "
        "are allowed",
    )
    assert nothing_spent(raw_dir)


@pytest.mark.parametrize("run", [2**63, 2**64, -(2**63) - 1, "9" * 5000])
async def test_run_status_with_a_run_number_sqlite_cannot_hold(
    client: TestClient, run: int | str
) -> None:
    response = await client.get("/run_status", params={"pgroup": "p12345", "run_number": run})
    message = (await response.json())["message"]
    assert response.status == 400
    if isinstance(run, int):
        assert message == f"run_number must be between 1 and {2**63 - 1}, got {run}"
    else:
        assert message == f"run_number must be an integer, got '{'9' * 59}... (5002 characters)"


@pytest.mark.parametrize(
    ("start", "stop", "message"),
    [
        (
            1,
            2**63,
            f"stop_pulseid must be at most {2**53 - 1} (the largest pulse id accepted), "
            f"got {2**63}",
        ),
        (
            2**64,
            2**64,
            f"start_pulseid must be at most {2**53 - 1} (the largest pulse id "
            f"accepted), got {2**64}",
        ),
        (
            2**53,
            2**53,
            f"start_pulseid must be at most {2**53 - 1} (the largest pulse id "
            f"accepted), got {2**53}",
        ),
    ],
)
async def test_pulse_ids_beyond_what_the_buffers_hold_are_refused(
    client: TestClient, raw_dir: Path, start: int, stop: int, message: str
) -> None:
    response = await client.post(
        "/retrieve_from_buffers", json={**BASE, "start_pulseid": start, "stop_pulseid": stop}
    )
    assert (response.status, (await response.json())["message"]) == (400, message)
    assert nothing_spent(raw_dir)


async def test_pulse_id_bounds_are_configurable(
    aiohttp_client: Any, make_settings: Any, raw_dir: Path
) -> None:
    limit = 2**63 - 2
    client = await aiohttp_client(
        create_app(make_settings(min_pulse_id=500, max_pulse_id=limit), EmbeddedTransport())
    )
    response = await client.post(
        "/retrieve_from_buffers", json={**BASE, "start_pulseid": limit - 10, "stop_pulseid": limit}
    )
    assert response.status == 200
    response = await client.post(
        "/retrieve_from_buffers", json={**BASE, "start_pulseid": 100, "stop_pulseid": 200}
    )
    assert (response.status, (await response.json())["message"]) == (
        400,
        "start_pulseid must be at least 500 (the smallest pulse id accepted), got 100",
    )
    with pytest.raises(Exception, match="max_pulse_id"):
        make_settings(max_pulse_id=2**63 - 1)


# --- a full disk (a real tmpfs: tests.support.tmpfs; mounting needs root, which CI has) -------


@pytest.mark.parametrize("kind", ["bytes", "inodes"])
async def test_a_full_disk_is_507_and_shows_in_health(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path, kind: str
) -> None:
    options = "size=2m" if kind == "bytes" else "size=64m,nr_inodes=16"
    with tmpfs(tmp_path / "disk", options) as root:
        raw = root / "bernina" / "data" / "p12345" / "raw"
        raw.mkdir(parents=True)
        settings = make_settings(data_root=str(root), min_free_bytes=65536)
        client = await aiohttp_client(create_app(settings, EmbeddedTransport()))
        fill(root)
        response = await client.post("/retrieve_from_buffers", json=BASE)
        message = (await response.json())["message"]
        assert response.status == 507
        if kind == "bytes":
            needed = message.split("at least ")[1].split(" ")[0]
            assert message == (
                f"the file system of {raw} is full (0 bytes free, at least {needed} needed): "
                "no run number was given out; free space and send the request again"
            )
        else:  # bytes are free, inodes are not: the write itself fails
            assert message == (
                f"the file system is full (No space left on device: {raw / 'run_info'}); "
                "free space and send the request again"
            )
        assert not (raw / "run_info" / "LAST_RUN").exists()
        health = await client.get("/health")
        document = await health.json()
        if kind == "bytes":
            assert (health.status, document["data_root_ok"], document["data_root_free_bytes"]) == (
                503,
                False,
                0,
            )
            assert document["message"] == (
                f"data root {root} is full (0 bytes free, requests need 65536)"
            )
        for filler in root.glob("filler*"):
            os.unlink(filler)
        response = await client.post("/retrieve_from_buffers", json=BASE)
        assert (response.status, (await response.json())["run_number"]) == (200, 1)
        assert (await (await client.get("/health")).json())["data_root_ok"] is True
        await client.close()
