"""PV list, DAP settings, user files, the 2021 names, the refused code upload, and the run
options user_tag / append_user_tag_to_data_dir / run_log_level — on the embedded transport,
with real files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import RETRIEVAL_KINDS, Job
from sf_daq_broker.simulation.archiver import SimulatedArchiver
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.loop import _JobLog

ALVRA_CONSOLE = {"X-Forwarded-For": "129.129.242.17"}
RUN: dict[str, Any] = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 1010,
    "channels_list": ["A"],
}


@pytest.fixture
def service_dirs(tmp_path: Path) -> tuple[Path, Path]:
    pv_dir, dap_dir = tmp_path / "service_configs", tmp_path / "dap"
    pv_dir.mkdir()
    dap_dir.mkdir()
    return pv_dir, dap_dir


@pytest.fixture
def transport() -> EmbeddedTransport:
    return EmbeddedTransport()


@pytest.fixture
async def client(
    aiohttp_client: Any,
    make_settings: Any,
    service_dirs: tuple[Path, Path],
    transport: EmbeddedTransport,
) -> TestClient:
    settings = make_settings(
        trusted_proxies=["127.0.0.0/8"],  # the tests call as alvra's console through "a proxy"
        service_files={"pv_list_dir": str(service_dirs[0]), "dap_config_dir": str(service_dirs[1])},
        detectors={
            "JF13T01V01": {
                "beamline": "bernina",
                "description": "Bernina 1M",
                "visualisation_address": "http://sf-daq-1:5006",
            },
            "JF07T03V01": {"beamline": "bernina"},
            "JF02T09V02": {"beamline": "alvra"},
        },
    )
    return await aiohttp_client(create_app(settings, transport))


async def call(
    client: TestClient, method: str, path: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, Any]:
    response = await client.request(method, path, json=body or None, headers=headers)
    return response.status, await response.json()


# -- PV list ---------------------------------------------------------------------------------


async def test_the_pv_list_is_the_beamlines_own_deduplicated_and_backed_up(
    client: TestClient, service_dirs: tuple[Path, Path]
) -> None:
    pv_dir = service_dirs[0]
    status, reply = await call(client, "GET", "/get_pvlist")
    assert (status, reply["message"]) == (
        404,
        f"the PV list of bernina {pv_dir / 'sf.bernina.epics_buffer.json'} does not exist",
    )
    status, reply = await call(client, "POST", "/set_pvlist", pv_list=["B:X", "A:Y", "B:X"])
    assert (status, reply) == (
        200,
        {"status": "ok", "message": "PV list of bernina set: 2 PVs", "pv_list": ["B:X", "A:Y"]},
    )
    bernina = pv_dir / "sf.bernina.epics_buffer.json"
    assert json.loads(bernina.read_text()) == {
        "pulse_id_pv": "SLAAR11-LTIM01-EVR0:RX-PULSEID",
        "pv_list": ["B:X", "A:Y"],
    }
    status, reply = await call(client, "POST", "/set_pvlist", pv_list=["C:Z"])
    assert status == 200
    backups = sorted(p.name for p in pv_dir.glob("sf.bernina.epics_buffer.json.*"))
    assert len(backups) == 1
    assert json.loads((pv_dir / backups[0]).read_text())["pv_list"] == ["B:X", "A:Y"]
    status, reply = await call(client, "GET", "/get_pvlist")
    assert (status, reply["pv_list"]) == (200, ["C:Z"])
    # alvra has its own list; bernina's stays
    status, reply = await call(client, "POST", "/set_pvlist", ALVRA_CONSOLE, pv_list=["AL:1"])
    assert (status, reply["message"]) == (200, "PV list of alvra set: 1 PVs")
    status, reply = await call(client, "GET", "/get_pvlist", ALVRA_CONSOLE)
    assert reply["pv_list"] == ["AL:1"]
    assert json.loads(bernina.read_text())["pv_list"] == ["C:Z"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "pv_list is missing"),
        ({"pv_list": "A:B"}, "pv_list must be a list of PV names, got 'A:B'"),
        ({"pv_list": ["A", ""]}, "pv_list[1] must be a non-empty string, got ''"),
        ({"pv_list": [3]}, "pv_list[0] must be a non-empty string, got 3"),
    ],
)
async def test_bad_pv_lists_are_refused_and_nothing_written(
    client: TestClient, service_dirs: tuple[Path, Path], body: dict[str, Any], message: str
) -> None:
    status, reply = await call(client, "POST", "/set_pvlist", **body)
    assert (status, reply["message"]) == (400, message)
    assert list(service_dirs[0].iterdir()) == []


def test_the_simulated_archiver_records_exactly_the_listed_pvs(tmp_path: Path) -> None:
    from sf_daq_broker.service_files import write_pv_list
    from sf_daq_broker.simulation.archiver import PvSpec

    clock = ManualClock(15_000_000_000, 1_700_000_000_000)
    clock.advance(1000)
    archiver = SimulatedArchiver(
        [PvSpec(name="A:INT", type="int32"), PvSpec(name="B:NOT-LISTED")],
        clock,
        pv_list_dir=tmp_path,
    )
    query = {
        "range": {"startSeconds": "1700000001.0", "endSeconds": "1700000009.0"},
        "channels": ["A:INT", "B:NOT-LISTED", "C:NEW"],
    }
    assert archiver.answer(query) == []  # no list yet: nothing recorded
    write_pv_list(tmp_path, "bernina", ["A:INT", "C:NEW"])
    reply = archiver.answer(query)
    assert [entry["channel"]["name"] for entry in reply] == ["A:INT", "C:NEW"]
    assert {sample["type"] for sample in reply[0]["data"]} == {"int32"}  # its configured spec
    assert {sample["type"] for sample in reply[1]["data"]} == {"float64"}  # the default
    write_pv_list(tmp_path, "alvra", ["B:NOT-LISTED"])  # the union of the beamlines' lists
    assert len(archiver.answer(query)) == 3


# -- DAP settings ----------------------------------------------------------------------------


async def test_dap_settings_are_merged_backed_up_and_replied_as_changes(
    client: TestClient, service_dirs: tuple[Path, Path]
) -> None:
    dap = service_dirs[1]
    status, reply = await call(client, "GET", "/get_dap_settings", detector_name="JF13T01V01")
    assert status == 404
    assert reply["message"] == (
        f"the DAP settings of JF13T01V01 {dap / 'pipeline_parameters.JF13T01V01.json'} does not "
        "exist"
    )
    settings_file = dap / "pipeline_parameters.JF13T01V01.json"
    settings_file.write_text(json.dumps({"threshold": 5, "roi": [0, 10], "mode": "sum"}))
    status, reply = await call(
        client,
        "POST",
        "/set_dap_settings",
        detector_name="JF13T01V01",
        parameters={"threshold": 7, "roi": [0, 10], "new": None},
    )
    assert (status, reply) == (
        200,
        {
            "status": "ok",
            "message": "successfully changed DAP settings for JF13T01V01",
            "changed_parameters": {"threshold": [5, 7], "new": [None, None]},
        },
    )
    assert json.loads(settings_file.read_text()) == {
        "threshold": 7,
        "roi": [0, 10],
        "mode": "sum",
        "new": None,
    }
    backups = list((dap / "backup").iterdir())
    assert len(backups) == 1 and backups[0].name.startswith("pipeline_parameters.JF13T01V01.json.")
    assert json.loads(backups[0].read_text()) == {"threshold": 5, "roi": [0, 10], "mode": "sum"}
    status, reply = await call(
        client, "POST", "/set_dap_settings", detector_name="JF13T01V01", parameters={"roi": [0, 10]}
    )
    assert (status, reply["changed_parameters"]) == (200, {})
    assert len(list((dap / "backup").iterdir())) == 1  # nothing changed, nothing written
    status, reply = await call(client, "GET", "/get_dap_settings", detector_name="JF13T01V01")
    assert reply["parameters"]["threshold"] == 7
    status, reply = await call(
        client, "POST", "/set_dap_settings", detector_name="JF13T01V01", parameters=[1]
    )
    assert (status, reply["message"]) == (
        400,
        "parameters must be an object of DAP settings, got [1]",
    )
    settings_file.write_text("{not json")
    status, reply = await call(client, "GET", "/get_dap_settings", detector_name="JF13T01V01")
    assert status == 409 and "is not valid JSON" in reply["message"]


# -- user files ------------------------------------------------------------------------------


async def accept_run(client: TestClient, **fields: Any) -> int:
    status, reply = await call(client, "POST", "/retrieve_from_buffers", **{**RUN, **fields})
    assert status == 200, reply
    return int(reply["run_number"])


@pytest.fixture
def user_files(tmp_path: Path, raw_dir: Path) -> dict[str, Path]:
    """A user's files: readable by the pgroup's group, or not, in several ways."""
    home = tmp_path / "home"
    home.mkdir()
    group = os.stat(raw_dir).st_gid

    def make(name: str, mode: int = 0o640, gid: int | None = None) -> Path:
        path = home / name
        path.write_text(f"content of {name}\n")
        os.chmod(path, mode)
        os.chown(path, -1, group if gid is None else gid)
        return path

    (home / "sub").mkdir()
    os.mkfifo(home / "pipe")
    os.chown(home / "pipe", -1, group)
    os.chmod(home / "pipe", 0o640)
    return {
        "good": make("notes.txt"),
        "other": make("script.py"),
        "private": make("private.txt", mode=0o600),
        "foreign": make("foreign.txt", gid=group + 4242),
        "dir": home / "sub",
        "fifo": home / "pipe",
        "missing": home / "missing.txt",
    }


async def test_user_files_readable_by_the_pgroup_are_copied_next_to_the_run(
    client: TestClient, raw_dir: Path, user_files: dict[str, Path], tmp_path: Path
) -> None:
    run = await accept_run(client, directory_name="scan/a")
    aux = raw_dir / "scan/a" / f"run_{run:06d}.aux"
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    aux.mkdir()
    (aux / "notes.txt").symlink_to(outside)  # planted: replaced, never followed
    files = [str(user_files["good"]), str(user_files["other"])]
    status, reply = await call(
        client, "POST", "/copy_user_files", pgroup="p12345", run_number=run, files=files
    )
    assert (status, reply) == (
        200,
        {
            "status": "ok",
            "message": f"copied 2 files into {aux}",
            "destination_files": {
                str(user_files["good"]): str(aux / "notes.txt"),
                str(user_files["other"]): str(aux / "script.py"),
            },
            "error_files": {},
        },
    )
    assert (aux / "notes.txt").read_text() == "content of notes.txt\n"
    assert not (aux / "notes.txt").is_symlink()
    assert outside.read_text() == "keep me"
    assert sorted(p.name for p in aux.iterdir()) == ["notes.txt", "script.py"]


async def test_files_the_pgroup_may_not_read_are_refused_each_with_its_reason(
    client: TestClient, raw_dir: Path, user_files: dict[str, Path]
) -> None:
    run = await accept_run(client)
    group = os.stat(raw_dir).st_gid
    names = ["good", "private", "foreign", "dir", "fifo", "missing"]
    files = [str(user_files[name]) for name in names] + ["relative.txt", "/elsewhere/notes.txt"]
    status, reply = await call(
        client, "POST", "/copy_user_files", pgroup="p12345", run_number=run, files=files
    )
    aux = raw_dir / f"run_{run:06d}.aux"
    assert status == 400
    assert reply["message"] == (
        f"copied 1 of 8 files into {aux}; the others are in error_files with the reason"
    )
    assert reply["destination_files"] == {str(user_files["good"]): str(aux / "notes.txt")}
    assert reply["error_files"] == {
        str(user_files["private"]): "is not readable by the pgroup's group",
        str(user_files["foreign"]): f"belongs to group {group + 4242}, not to the pgroup's group "
        f"{group}",
        str(user_files["dir"]): "is not a regular file",
        str(user_files["fifo"]): "is not a regular file",
        str(user_files["missing"]): "cannot be opened: No such file or directory",
        "relative.txt": "'relative.txt' is not an absolute path",
        "/elsewhere/notes.txt": "cannot be opened: No such file or directory",
    }
    assert sorted(p.name for p in aux.iterdir()) == ["notes.txt"]


async def test_user_files_never_go_outside_the_pgroup(
    client: TestClient, raw_dir: Path, user_files: dict[str, Path], tmp_path: Path
) -> None:
    run = await accept_run(client)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (raw_dir / f"run_{run:06d}.aux").symlink_to(elsewhere)
    status, reply = await call(
        client,
        "POST",
        "/copy_user_files",
        pgroup="p12345",
        run_number=run,
        files=[str(user_files["good"])],
    )
    assert (status, reply["message"]) == (
        400,
        "the run's aux directory leads outside the raw directory of p12345",
    )
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"run_number": 1, "files": []}, 400, "pgroup is missing"),
        ({"pgroup": "p12345", "files": []}, 400, "run_number is missing"),
        (
            {"pgroup": "p12345", "run_number": 0},
            400,
            "run_number must be a positive integer, got 0",
        ),
        ({"pgroup": "p12345", "run_number": 7}, 404, "run 7 of p12345 does not exist"),
        ({"pgroup": "p99999", "run_number": 1}, 404, None),
        (
            {"pgroup": "p12345", "run_number": 1, "files": "a.txt"},
            400,
            "files must be a list of absolute paths, got 'a.txt'",
        ),
        (
            {"pgroup": "p12345", "run_number": 1, "files": [None]},
            400,
            "files[0] must be a non-empty string, got None",
        ),
    ],
)
async def test_bad_copy_requests_are_refused(
    client: TestClient, body: dict[str, Any], code: int, message: str | None
) -> None:
    await accept_run(client)
    status, reply = await call(client, "POST", "/copy_user_files", **body)
    assert status == code
    if message is not None:
        assert reply["message"] == message


async def test_no_user_files_into_a_closed_pgroup(client: TestClient) -> None:
    run = await accept_run(client)
    status, _ = await call(client, "POST", "/close_pgroup_writing", pgroup="p12345")
    assert status == 200
    status, reply = await call(
        client, "POST", "/copy_user_files", pgroup="p12345", run_number=run, files=[]
    )
    assert (status, reply["message"]) == (409, "pgroup p12345 is closed for writing")


# -- user_tag, append_user_tag_to_data_dir, run_log_level ------------------------------------


async def test_a_tagged_run_has_the_tag_in_its_file_names_and_aux_directory(
    client: TestClient, raw_dir: Path, transport: EmbeddedTransport, user_files: dict[str, Path]
) -> None:
    run = await accept_run(
        client,
        user_tag="dark ref/2",
        append_user_tag_to_data_dir=True,
        run_log_level="warning",
        directory_name="d",
    )
    record = json.loads((raw_dir / "run_info/000000" / f"run_{run:06d}.json").read_text())
    assert record["appended_directory_suffix"] == "dark_ref_2"
    assert record["user_tag"] == "dark ref/2" and record["run_log_level"] == "warning"
    job = await take_job(transport)
    assert job.output_file == str(raw_dir / "d" / f"run_{run:06d}-dark_ref_2.BSDATA.h5")
    assert job.log_level == "WARNING"
    status, reply = await call(
        client,
        "POST",
        "/copy_user_files",
        pgroup="p12345",
        run_number=run,
        files=[str(user_files["good"])],
    )
    aux = raw_dir / "d" / f"run_{run:06d}-dark_ref_2.aux"
    assert (status, reply["destination_files"]) == (
        200,
        {str(user_files["good"]): str(aux / "notes.txt")},
    )


async def take_job(transport: EmbeddedTransport) -> Job:
    for kind in RETRIEVAL_KINDS:
        if transport.queued(kind):
            async for delivery in transport.consume_jobs(kind):
                await delivery.ack()
                return delivery.job
    raise AssertionError("no job queued")


@pytest.mark.parametrize(
    ("tag", "append", "suffix"),
    [
        ("x", False, None),  # without the flag the tag is only kept in the JSON
        ("", True, None),  # an empty tag changes nothing
        ("a" * 60 + "!", True, "a" * 50),  # cut to 50
        ("ok-", True, "ok_"),  # a last character that is not a letter or digit
        ("é+b.c", True, "_+b.c"),
    ],
)
async def test_tags_are_cleaned_as_upstream_cleans_them(
    client: TestClient,
    raw_dir: Path,
    transport: EmbeddedTransport,
    tag: str,
    append: bool,
    suffix: str | None,
) -> None:
    run = await accept_run(client, user_tag=tag, append_user_tag_to_data_dir=append)
    record = json.loads((raw_dir / "run_info/000000" / f"run_{run:06d}.json").read_text())
    assert record.get("appended_directory_suffix") == suffix
    prefix = f"run_{run:06d}" + (f"-{suffix}" if suffix else "")
    assert (await take_job(transport)).output_file == str(raw_dir / f"{prefix}.BSDATA.h5")


async def test_a_tag_that_would_collide_with_the_runs_files_is_refused(
    client: TestClient, raw_dir: Path
) -> None:
    status, reply = await call(client, "POST", "/advance_run_number", pgroup="p12345")
    assert reply["run_number"] == 1
    (raw_dir / "run_000001-first.BSDATA.h5").write_bytes(b"")
    status, reply = await call(
        client,
        "POST",
        "/retrieve_from_buffers",
        **RUN,
        run_number=1,
        user_tag="second",
        append_user_tag_to_data_dir=True,
    )
    assert (status, reply["message"]) == (
        409,
        "data files of run 1 exist already with another tag (run_000001-first.BSDATA.h5), not "
        "'second': use the same tag or another run",
    )
    assert not (raw_dir / "run_info/000000/run_000001.json").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user_tag": 5}, "user_tag must be a string, got 5"),
        (
            {"append_user_tag_to_data_dir": "yes"},
            "append_user_tag_to_data_dir must be true or false, got 'yes'",
        ),
        (
            {"run_log_level": "LOUD"},
            "run_log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (or 10, 20, 30, "
            "40, 50), got 'LOUD'",
        ),
        (
            {"run_log_level": 15},
            "run_log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (or 10, 20, 30, "
            "40, 50), got 15",
        ),
    ],
)
async def test_bad_run_options_are_refused_before_a_run_number_is_spent(
    client: TestClient, raw_dir: Path, fields: dict[str, Any], message: str
) -> None:
    status, reply = await call(client, "POST", "/retrieve_from_buffers", **RUN, **fields)
    assert (status, reply["message"]) == (400, message)
    assert not (raw_dir / "run_info" / "LAST_RUN").exists()


@pytest.mark.parametrize(("value", "level"), [("debug", logging.DEBUG), (40, logging.ERROR)])
async def test_run_log_level_is_the_level_of_the_job_log(
    client: TestClient, transport: EmbeddedTransport, value: Any, level: int
) -> None:
    await accept_run(client, run_log_level=value)
    job = await take_job(transport)
    job_log = _JobLog(job)
    try:
        assert job_log.logger.level == level
        job_log.logger.debug("a debug line")
        job_log.logger.error("an error line")
    finally:
        job_log.close()
    text = Path(job.log_file).read_text()
    assert ("a debug line" in text) is (level == logging.DEBUG)
    assert "an error line" in text


# -- the 2021 names, allowed detectors, the refused upload -----------------------------------


async def test_the_2021_names_answer_as_their_successors(client: TestClient, raw_dir: Path) -> None:
    for old, new in [
        ("/get_allowed_detectors_list", "/get_allowed_detectors"),
        ("/get_running_detectors_list", "/get_running_detectors"),
    ]:
        assert await call(client, "GET", old) == await call(client, "GET", new)
    for expected in (1, 2):
        status, reply = await call(client, "GET", "/get_next_acquistion_number", pgroup="p12345")
        assert (status, reply["message"], reply["run_number"]) == (200, str(expected), expected)
    assert (raw_dir / "run_info/LAST_RUN").read_text() == "2\n"


async def test_allowed_detectors_carry_descriptions_and_visualisation_addresses(
    client: TestClient,
) -> None:
    status, reply = await call(client, "GET", "/get_allowed_detectors")
    assert status == 200
    assert reply["detectors"] == ["JF07T03V01", "JF13T01V01"]
    assert reply["descriptions"] == ["", "Bernina 1M"]
    assert reply["visualisation_address"] == ["", "http://sf-daq-1:5006"]


async def test_uploading_code_is_refused_with_a_reason(client: TestClient) -> None:
    status, reply = await call(
        client, "POST", "/upload_custom_dap_script", name="proc", code="import os"
    )
    assert (status, reply) == (
        403,
        {
            "status": "failed",
            "message": "upload_custom_dap_script is not offered by this broker: it would run "
            "uploaded code on the facility's machines; ask the facility's DAQ team to install a "
            "DAP script",
        },
    )
