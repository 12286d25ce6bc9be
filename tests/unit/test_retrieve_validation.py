"""Every validation rule of /retrieve_from_buffers: exact status, exact message, nothing written."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.transport.embedded import EmbeddedTransport

BASE: dict[str, Any] = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 2000,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet"],
}
MISSING = object()


def request_with(**changes: Any) -> dict[str, Any]:
    body = dict(BASE)
    for key, value in changes.items():
        if value is MISSING:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.fixture
async def client(aiohttp_client: Any, settings: Any) -> TestClient:
    return await aiohttp_client(create_app(settings, EmbeddedTransport()))


async def post(client: TestClient, body: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post("/retrieve_from_buffers", json=body)
    return response.status, await response.json()


CASES: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "missing pgroup",
        {"pgroup": MISSING},
        400,
        "pgroup is missing (pgroup, start_pulseid and stop_pulseid are mandatory)",
    ),
    (
        "missing start",
        {"start_pulseid": MISSING},
        400,
        "start_pulseid is missing (pgroup, start_pulseid and stop_pulseid are mandatory)",
    ),
    (
        "missing stop",
        {"stop_pulseid": MISSING},
        400,
        "stop_pulseid is missing (pgroup, start_pulseid and stop_pulseid are mandatory)",
    ),
    (
        "short pgroup",
        {"pgroup": "p1234"},
        400,
        "pgroup must be 'p' followed by 5 digits (e.g. p12345), got 'p1234'",
    ),
    (
        "pgroup traversal",
        {"pgroup": "../p12345"},
        400,
        "pgroup must be 'p' followed by 5 digits (e.g. p12345), got '../p12345'",
    ),
    (
        "pgroup with slash",
        {"pgroup": "p12345/../../etc"},
        400,
        "pgroup must be 'p' followed by 5 digits (e.g. p12345), got 'p12345/../../etc'",
    ),
    (
        "pgroup number",
        {"pgroup": 12345},
        400,
        "pgroup must be 'p' followed by 5 digits (e.g. p12345), got 12345",
    ),
    ("fractional start", {"start_pulseid": 1.5}, 400, "start_pulseid must be an integer, got 1.5"),
    ("bool start", {"start_pulseid": True}, 400, "start_pulseid must be an integer, got true"),
    ("null stop", {"stop_pulseid": None}, 400, "stop_pulseid must be an integer, got null"),
    ("text stop", {"stop_pulseid": "12a"}, 400, "stop_pulseid must be an integer, got '12a'"),
    ("negative start", {"start_pulseid": -1}, 400, "start_pulseid must not be negative, got -1"),
    (
        "stop before start",
        {"stop_pulseid": 999},
        400,
        "stop_pulseid 999 is before start_pulseid 1000",
    ),
    (
        "range too long",
        {"stop_pulseid": 61001},
        400,
        "the range stop_pulseid - start_pulseid = 60001 pulses is longer than the limit of "
        "60000 pulses",
    ),
    (
        "bad rate",
        {"rate_multiplicator": 3},
        400,
        "rate_multiplicator must be one of 1, 2, 4, 8, 10, 20, 40, 50, 100, got 3",
    ),
    (
        "fractional rate",
        {"rate_multiplicator": 2.5},
        400,
        "rate_multiplicator must be an integer, got 2.5",
    ),
    (
        "list not a list",
        {"channels_list": "SAR-CVME-TIFALL5:EvtSet"},
        400,
        "channels_list must be a list of strings, got 'SAR-CVME-TIFALL5:EvtSet'",
    ),
    (
        "empty name",
        {"channels_list": ["A:B", ""]},
        400,
        "channels_list[1] must be a non-empty string, got ''",
    ),
    ("number as name", {"pv_list": [5]}, 400, "pv_list[0] must be a non-empty string, got 5"),
    (
        "null as name",
        {"camera_list": [None]},
        400,
        "camera_list[0] must be a non-empty string, got null",
    ),
    (
        "camera in channels",
        {"channels_list": ["A:B", "SARES11-SPEC125-M1:FPICTURE"]},
        400,
        "channels_list[1] 'SARES11-SPEC125-M1:FPICTURE' is a camera image: put it in camera_list",
    ),
    (
        "channel in cameras",
        {"camera_list": ["SARES11-SPEC125-M1.roi"]},
        400,
        "camera_list[0] 'SARES11-SPEC125-M1.roi' is not a camera image (camera names end with "
        ":FPICTURE): put it in channels_list",
    ),
    (
        "nothing to retrieve",
        {"channels_list": MISSING},
        400,
        "nothing to retrieve: channels_list, camera_list, pv_list and detectors are all empty",
    ),
    (
        "only empty lists",
        {"channels_list": [], "camera_list": [], "pv_list": [], "detectors": {}},
        400,
        "nothing to retrieve: channels_list, camera_list, pv_list and detectors are all empty",
    ),
    (
        "detectors not object",
        {"detectors": ["JF07T32V01"]},
        400,
        "detectors must be an object mapping detector names to options, got ['JF07T32V01']",
    ),
    (
        "detector name",
        {"detectors": {"JF7T32V01": {}}},
        400,
        "detectors: 'JF7T32V01' is not a Jungfrau detector name (JFxxTyyVzz, e.g. JF07T32V01)",
    ),
    (
        "detector name with spaces",
        {"detectors": {"JF07 T32 V01": {}}},
        400,
        "detectors: 'JF07 T32 V01' is not a Jungfrau detector name (JFxxTyyVzz, e.g. JF07T32V01)",
    ),
    (
        "unknown detector",
        {"detectors": {"JF99T01V01": {}}},
        400,
        "detectors: JF99T01V01 is an unknown detector: no beamline has it (allowed for bernina: "
        "JF01T03V01, JF03T01V02, JF04T01V01, JF05T01V01, JF07T03V01, JF07T32V01, JF13T01V01, "
        "JF14T01V01)",
    ),
    (
        "detector of another beamline",
        {"detectors": {"JF02T09V02": {}}},
        403,
        "detectors: JF02T09V02 is not allowed for beamline bernina (allowed: JF01T03V01, "
        "JF03T01V02, JF04T01V01, JF05T01V01, JF07T03V01, JF07T32V01, JF13T01V01, JF14T01V01)",
    ),
    (
        "options not object",
        {"detectors": {"JF07T32V01": True}},
        400,
        "detectors.JF07T32V01 must be an object of options, got true",
    ),
    (
        "unknown option",
        {"detectors": {"JF07T32V01": {"compresion": False}}},
        400,
        "detectors.JF07T32V01: unknown option 'compresion' (known options: adc_to_energy, "
        "compression, mask, double_pixels_action, module_edge_pixels, geometry, gap_pixels, "
        "factor, disabled_modules, roi, downsample, keep_raw, save_ppicker_events_only, "
        "crystfel_lists_laser, mask_double_pixels, remove_raw_files)",
    ),
    (
        "bool option as string",
        {"detectors": {"JF07T32V01": {"geometry": "yes"}}},
        400,
        "detectors.JF07T32V01.geometry must be true or false, got 'yes'",
    ),
    (
        "bool option as int",
        {"detectors": {"JF07T32V01": {"compression": 0}}},
        400,
        "detectors.JF07T32V01.compression must be true or false, got 0",
    ),
    (
        "zero factor",
        {"detectors": {"JF07T32V01": {"factor": 0}}},
        400,
        "detectors.JF07T32V01.factor must be a positive number or null, got 0",
    ),
    (
        "factor as string",
        {"detectors": {"JF07T32V01": {"factor": "2"}}},
        400,
        "detectors.JF07T32V01.factor must be a positive number or null, got '2'",
    ),
    (
        "disabled modules not list",
        {"detectors": {"JF07T32V01": {"disabled_modules": 3}}},
        400,
        "detectors.JF07T32V01.disabled_modules must be a list of module indices, got 3",
    ),
    (
        "disabled module out of range",
        {"detectors": {"JF07T03V01": {"disabled_modules": [3]}}},
        400,
        "detectors.JF07T03V01.disabled_modules: module 3 does not exist (JF07T03V01 has "
        "modules 0..2)",
    ),
    (
        "disabled module not int",
        {"detectors": {"JF07T03V01": {"disabled_modules": [True]}}},
        400,
        "detectors.JF07T03V01.disabled_modules must hold integers, got true",
    ),
    (
        "all modules disabled",
        {"detectors": {"JF13T01V01": {"disabled_modules": [0]}}},
        400,
        "detectors.JF13T01V01.disabled_modules disables every module of JF13T01V01: nothing would "
        "be written",
    ),
    (
        "no beam pulse for detectors",
        {
            "start_pulseid": 1001,
            "stop_pulseid": 1009,
            "rate_multiplicator": 10,
            "detectors": {"JF13T01V01": {}},
        },
        400,
        "no beam pulse in [1001, 1009] at rate_multiplicator 10: detectors need at least one pulse "
        "id that is a multiple of 10",
    ),
    (
        "absolute directory",
        {"directory_name": "/etc"},
        400,
        "directory_name '/etc' must be relative, not an absolute path",
    ),
    (
        "dot-dot directory",
        {"directory_name": "a/../../b"},
        400,
        "directory_name 'a/../../b' must not contain '..' components",
    ),
    (
        "dot directory",
        {"directory_name": "./a"},
        400,
        "directory_name './a' must not contain '.' components",
    ),
    (
        "empty component",
        {"directory_name": "a//b"},
        400,
        "directory_name 'a//b' has an empty path component",
    ),
    (
        "control character",
        {"directory_name": "a\nb"},
        400,
        "directory_name 'a\\nb' contains control characters",
    ),
    ("directory not string", {"directory_name": 5}, 400, "directory_name must be a string, got 5"),
    (
        "bookkeeping directory",
        {"directory_name": "run_info/x"},
        400,
        "directory_name 'run_info/x' is inside a bookkeeping directory of raw/",
    ),
    (
        "scan_info not object",
        {"scan_info": "scan1"},
        400,
        "scan_info must be an object, got 'scan1'",
    ),
    (
        "scan_info without scan_name",
        {"scan_info": {"scan_values": [1.5]}},
        400,
        "scan_info.scan_name is missing: the scan step is written to scan_info/{scan_name}.json, "
        "so a scan needs a name",
    ),
    (
        "scan_name not string",
        {"scan_info": {"scan_name": 7}},
        400,
        "scan_info.scan_name must be a string, got 7",
    ),
    (
        "scan_name traversal",
        {"scan_info": {"scan_name": "../../x"}},
        400,
        "scan_info.scan_name '../../x' must not contain '..' components",
    ),
    (
        "scan_name absolute",
        {"scan_info": {"scan_name": "/tmp/x"}},
        400,
        "scan_info.scan_name '/tmp/x' must be relative, not an absolute path",
    ),
    (
        "misspelt list key",
        {"channel_list": ["SAR-CVME-TIFALL4:EvtSet"], "pv_list": ["SARUN:FELPHOTENE"]},
        400,
        "unknown key 'channel_list': did you mean 'channels_list'?",
    ),
    (
        "misspelt key in another case",
        {"PV_List": ["SARUN:FELPHOTENE"]},
        400,
        "unknown key 'PV_List': did you mean 'pv_list'?",
    ),
    (
        "misspelt detectors",
        {"detector": {"JF13T01V01": {}}},
        400,
        "unknown key 'detector': did you mean 'detectors'?",
    ),
    (
        "swapped letters",
        {"start_pulesid": 1000},
        400,
        "unknown key 'start_pulesid': did you mean 'start_pulseid'?",
    ),
    ("run_number zero", {"run_number": 0}, 400, "run_number must be a positive integer, got 0"),
    (
        "run_number not given out",
        {"run_number": 1},
        400,
        "run_number 1 has not been given out yet in p12345 (last is 0); reserve it with "
        "/advance_run_number first",
    ),
]


@pytest.mark.parametrize(
    ("changes", "status", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_refused_with_exact_message_and_nothing_written(
    client: TestClient, data_root: Path, changes: dict[str, Any], status: int, message: str
) -> None:
    before = tree(data_root)
    got_status, reply = await post(client, request_with(**changes))
    assert (got_status, reply) == (status, {"status": "failed", "message": message})
    after = tree(data_root) - {
        "bernina/data/p12345/raw/run_info",
        "bernina/data/p12345/raw/run_info/.lock",
    }
    assert after == before


async def test_unknown_pgroup_is_404(client: TestClient, data_root: Path) -> None:
    status, reply = await post(client, request_with(pgroup="p99999"))
    assert status == 404
    assert reply["message"] == (
        f"pgroup p99999 does not exist for beamline bernina: no directory "
        f"{data_root}/bernina/data/p99999/raw"
    )


async def test_body_not_json(client: TestClient, raw_dir: Path) -> None:
    response = await client.post("/retrieve_from_buffers", data=b"{pgroup: p12345")
    assert response.status == 400
    assert await response.json() == {
        "status": "failed",
        "message": "the request body is not valid JSON: Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)",
    }
    assert list(raw_dir.iterdir()) == []


async def test_body_not_object(client: TestClient) -> None:
    status, reply = await post(client, [BASE])
    assert (status, reply["message"]) == (400, "the request body must be a JSON object")


async def test_body_over_one_mebibyte_is_413(client: TestClient, raw_dir: Path) -> None:
    body = request_with(padding="x" * (1024 * 1024))
    response = await client.post(
        "/retrieve_from_buffers", data=io.BytesIO(json.dumps(body).encode())
    )
    assert response.status == 413
    assert await response.json() == {
        "status": "failed",
        "message": "the request body is too large (at most 1048576 bytes)",
    }
    assert list(raw_dir.iterdir()) == []


async def test_closed_pgroup_is_409(client: TestClient, raw_dir: Path) -> None:
    response = await client.post("/close_pgroup_writing", json={"pgroup": "p12345"})
    assert await response.json() == {
        "status": "ok",
        "message": "pgroup p12345 is closed for writing",
    }
    status, reply = await post(client, BASE)
    assert (status, reply) == (
        409,
        {"status": "failed", "message": "pgroup p12345 is closed for writing"},
    )
    assert not (raw_dir / "run_info" / "LAST_RUN").exists()
    again = await client.post("/close_pgroup_writing", json={"pgroup": "p12345"})
    assert again.status == 409
    assert (await again.json())["message"] == "pgroup p12345 is already closed for writing"


@pytest.mark.parametrize("key", ["directory_name", "scan_name"])
async def test_symlink_out_of_raw_is_refused(
    client: TestClient, raw_dir: Path, tmp_path: Path, key: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    if key == "directory_name":
        os.symlink(outside, raw_dir / "link")
        body = request_with(directory_name="link/sub")
        expected = "directory_name 'link/sub' leads outside the raw directory of p12345"
    else:
        os.symlink(outside, raw_dir / "scan_info")
        body = request_with(scan_info={"scan_name": "scan1"})
        expected = "scan_info.scan_name 'scan1' leads outside the raw directory of p12345"
    status, reply = await post(client, body)
    assert (status, reply["message"]) == (400, expected)
    assert list(outside.iterdir()) == []
    assert not (raw_dir / "run_info" / "LAST_RUN").exists()


async def test_symlinked_run_info_out_of_raw_is_refused(
    client: TestClient, raw_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, raw_dir / "run_info")
    status, reply = await post(client, BASE)
    assert (status, reply["message"]) == (400, "run_info leads outside the raw directory of p12345")
    assert list(outside.iterdir()) == []


async def test_loopback_refused_without_local_beamline(
    aiohttp_client: Any, make_settings: Any
) -> None:
    client = await aiohttp_client(create_app(make_settings(local_beamline=""), EmbeddedTransport()))
    status, reply = await post(client, BASE)
    assert status == 403
    assert reply["message"] == (
        "requests from 127.0.0.1 are not allowed: loopback clients need a local beamline "
        "(set SF_DAQ_LOCAL_BEAMLINE or local_beamline in the configuration)"
    )


async def test_a_trailing_slash_of_directory_name_is_dropped(
    client: TestClient, raw_dir: Path
) -> None:
    status, reply = await post(client, request_with(directory_name="sample 1/day/"))
    assert status == 200, reply
    record = json.loads((raw_dir / "run_info/000000/run_000001.json").read_text())
    assert record["directory_name"] == "sample_1/day"
    assert reply["files"] == [str(raw_dir / "sample_1/day/run_000001.BSDATA.h5")]


async def test_extra_keys_far_from_known_ones_are_kept(client: TestClient, raw_dir: Path) -> None:
    """Old clients put metadata beside the request: kept verbatim, never interpreted."""
    extra = {"laser_mode": "pumped", "user_tag": "t1", "comment": "x", "pgroup_owner": "me"}
    status, reply = await post(client, request_with(**extra))
    assert status == 200, reply
    record = json.loads((raw_dir / "run_info/000000/run_000001.json").read_text())
    assert {key: record[key] for key in extra} == extra


async def test_accepted_values_are_normalised(client: TestClient, raw_dir: Path) -> None:
    body = request_with(
        start_pulseid="1000",
        stop_pulseid=2000.0,
        rate_multiplicator="2",
        channels_list=["A:B", "C:D", "A:B"],
        camera_list=["X:FPICTURE", "X:FPICTURE"],
        directory_name="my sample/day 1",
        laser_mode="pumped",
        detectors={"JF07T32V01": {"factor": 2, "disabled_modules": [3, 1, 3]}},
    )
    status, reply = await post(client, body)
    assert status == 200, reply
    record = json.loads((raw_dir / "run_info/000000/run_000001.json").read_text())
    assert record["start_pulseid"] == 1000
    assert record["stop_pulseid"] == 2000
    assert record["rate_multiplicator"] == 2
    assert record["channels_list"] == ["A:B", "C:D"]
    assert record["camera_list"] == ["X:FPICTURE"]
    assert record["directory_name"] == "my_sample/day_1"
    assert record["laser_mode"] == "pumped"
    assert record["detectors"] == {"JF07T32V01": {"factor": 2, "disabled_modules": [3, 1, 3]}}
    assert (raw_dir / "my_sample" / "day_1").is_dir()
    assert reply["files"] == [
        str(raw_dir / "my_sample/day_1/run_000001.BSDATA.h5"),
        str(raw_dir / "my_sample/day_1/run_000001.CAMERAS.h5"),
        str(raw_dir / "my_sample/day_1/run_000001.JF07T32V01.h5"),
    ]
