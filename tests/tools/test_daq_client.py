"""daq_client against the real broker: the seed's Example 1, every file error, --wait."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.tools import daq_client
from sf_daq_broker.tools.daq_client import Accepted, BrokerRefused, InputFileError, main, retrieve
from sf_daq_broker.transport.amqp import AmqpTransport
from tests.support import PATIENCE
from tests.tools.support import REPO, SEED_START, SEED_STOP, LiveBroker, take_job, write_job

SEED_CHANNELS = ["SAR-CVME-TIFALL5:EvtSet", "SAR-CVME-TIFALL4:EvtSet"]


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daq_client, "POLL_INTERVAL", 0.05)


@pytest.fixture
def seed_files(tmp_path: Path) -> dict[str, Path]:
    channels = tmp_path / "channel_list"
    channels.write_text("# Example 1\n" + "\n".join(SEED_CHANNELS) + "\n\n")
    detectors = tmp_path / "jf.json"
    detectors.write_text(json.dumps({"JF07T32V01": {}}))
    return {"channels": channels, "detectors": detectors}


def seed_argv(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "-p",
        "p12345",
        "-d",
        "covid/detector_test2",
        "-c",
        str(files["channels"]),
        "-f",
        str(files["detectors"]),
        "--start_pulseid",
        str(SEED_START),
        "--stop_pulseid",
        str(SEED_STOP),
        *extra,
    ]


def run_json(raw_dir: Path, run: int = 1) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        (raw_dir / "run_info" / "000000" / f"run_{run:06d}.json").read_text()
    )
    return document


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_script(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), PATIENCE)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_seed_example_1_end_to_end(
    broker: LiveBroker, seed_files: dict[str, Path], raw_dir: Path
) -> None:
    """`python daq_client.py …` as in the seed, the broker found through $SF_DAQ_BROKER."""
    env = dict(os.environ, SF_DAQ_BROKER=broker.url)
    status, stdout, stderr = await run_script("daq_client.py", *seed_argv(seed_files), env=env)
    assert (status, stdout, stderr) == (0, "success: run number(request_id) is 1\n", "")
    record = run_json(raw_dir)
    request_id = record.pop("request_id")
    request_time = record.pop("request_time")
    assert record == {
        "pgroup": "p12345",
        "start_pulseid": SEED_START,
        "stop_pulseid": SEED_STOP,
        "rate_multiplicator": 1,
        "directory_name": "covid/detector_test2",
        "channels_list": SEED_CHANNELS,
        "detectors": {"JF07T32V01": {}},
        "beamline": "bernina",
        "run_number": 1,
    }
    assert re.fullmatch(r"[0-9a-f-]{36}", request_id)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", request_time)


async def test_help_shows_the_seed_options() -> None:
    status, stdout, _ = await run_script("daq_client.py", "-h")
    assert status == 0
    assert stdout.startswith("usage: daq_client.py [-h] [-p PGROUP] [-d OUTPUT_DIRECTORY]")
    lines = [line.strip() for line in stdout.splitlines()]
    for option, help_text in [
        ("-p PGROUP, --pgroup PGROUP", "pgroup, example p12345"),
        ("-c CHANNELS_FILE, --channels_file CHANNELS_FILE", "TXT file with list channels"),
        ("-e EPICS_FILE, --epics_file EPICS_FILE", "TXT file with list of epics channels to save"),
        ("-f FILE_DETECTORS, --file_detectors FILE_DETECTORS", "JSON file with the detector list"),
        (
            "-r RATE_MULTIPLICATOR, --rate_multiplicator RATE_MULTIPLICATOR",
            "rate multiplicator (1(default): 100Hz, 2: 50Hz,)",
        ),
        (
            "-s SCAN_STEP_FILE, --scan_step_file SCAN_STEP_FILE",
            "JSON file with the scan step information",
        ),
        ("--start_pulseid START_PULSEID", "start pulseid"),
        ("--stop_pulseid STOP_PULSEID", "stop pulseid"),
    ]:
        index = lines.index(option)
        assert lines[index + 1] == help_text
    assert "-d OUTPUT_DIRECTORY, --output_directory OUTPUT_DIRECTORY" in lines


def test_console_commands_are_installed() -> None:
    commands = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert commands["daq_client"] == "sf_daq_broker.tools.daq_client:main"
    assert commands["sf-daq-check"] == "sf_daq_broker.tools.check:main"
    assert commands["broker_debugger"] == "sf_daq_broker.tools.broker_debugger:main"


async def test_channel_files_split_cameras_and_skip_comments(
    broker: LiveBroker, tmp_path: Path, raw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    channels = tmp_path / "channels.txt"
    channels.write_text(
        "# beam-synchronous channels and cameras\n"
        "  SAR-CVME-TIFALL5:EvtSet  \n"
        "\n"
        "SARES11-SPEC125-M1:FPICTURE   # the spectrometer camera\n"
        "#SAR-CVME-TIFALL4:EvtSet\n"
        "SAR-CVME-TIFALL5:EvtSet\n"
    )
    epics = tmp_path / "epics.txt"
    epics.write_text("SARFE10-OAPU044:SPECTRUM_CENTER\n# off: SLAAR21-LMOT-M521:MOTOR_1\n")
    scan = tmp_path / "scan_step.json"
    scan.write_text(json.dumps({"scan_name": "scan_a", "scan_values": [1.5]}))
    argv = ["-p", "p12345", "-c", str(channels), "-e", str(epics), "-s", str(scan), "-r", "2"]
    argv += ["--start_pulseid", "1000", "--stop_pulseid", "1999", "--broker", broker.url]
    assert await asyncio.to_thread(main, argv) == 0
    assert capsys.readouterr().out == "success: run number(request_id) is 1\n"
    record = run_json(raw_dir)
    assert record["channels_list"] == ["SAR-CVME-TIFALL5:EvtSet"]
    assert record["camera_list"] == ["SARES11-SPEC125-M1:FPICTURE"]
    assert record["pv_list"] == ["SARFE10-OAPU044:SPECTRUM_CENTER"]
    assert record["scan_info"] == {"scan_name": "scan_a", "scan_values": [1.5]}
    assert record["rate_multiplicator"] == 2
    assert "directory_name" not in record and "detectors" not in record


@pytest.mark.parametrize(
    ("option", "name", "content", "message"),
    [
        ("-c", "missing", None, "channels file {path} does not exist"),
        ("-c", "a_directory", "DIR", "channels file {path} is not a file"),
        ("-c", "empty.txt", "", "channels file {path} lists no names"),
        ("-c", "comments.txt", "# nothing yet\n\n", "channels file {path} lists no names"),
        (
            "-c",
            "binary.txt",
            b"\xff\xfe\x00A",
            "channels file {path} is not a text file (byte 0xff at position 0)",
        ),
        ("-e", "missing", None, "epics file {path} does not exist"),
        ("-f", "missing.json", None, "detectors file {path} does not exist"),
        ("-f", "empty.json", "", "detectors file {path} is empty"),
        (
            "-f",
            "text.json",
            "JF07T32V01\n",
            "detectors file {path} is not JSON: Expecting value (line 1 column 1)",
        ),
        (
            "-f",
            "list.json",
            '["JF07T32V01"]',
            "detectors file {path} must hold a JSON object, not list",
        ),
        ("-f", "nothing.json", "{}", "detectors file {path} is an empty JSON object"),
        (
            "-s",
            "scan.json",
            '{"scan_name": "a",}',
            "scan step file {path} is not JSON: Expecting property name enclosed in double "
            "quotes (line 1 column 19)",
        ),
    ],
)
def test_bad_input_files_give_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    name: str,
    content: str | bytes | None,
    message: str,
) -> None:
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    other = tmp_path / "ok.txt"
    other.write_text("SAR-CVME-TIFALL5:EvtSet\n")
    argv = ["-p", "p12345", "--start_pulseid", "1", "--stop_pulseid", "2"]
    # Nothing listens there: a request sent in spite of the bad file would fail differently.
    argv += ["--broker", f"http://127.0.0.1:{closed_port()}"]
    argv += ["-c", str(other), option, str(path)] if option != "-c" else [option, str(path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"error: {message.format(path=path)}\n")


def test_missing_pulse_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["-p", "p12345", "--start_pulseid", "1"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.endswith(
        "error: the pulse range is needed (--start_pulseid and --stop_pulseid)"
    )


def test_unreachable_broker_is_one_line(
    seed_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert main([*seed_argv(seed_files), "--broker", url]) == 3
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "",
        f"error: the broker at {url} is not reachable: connection refused\n",
    )


async def test_refusal_prints_the_brokers_reason(
    broker: LiveBroker,
    seed_files: dict[str, Path],
    data_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*seed_argv(seed_files), "--broker", broker.url, "--wait"]
    argv[1] = "p99999"
    assert await asyncio.to_thread(main, argv) == 1
    captured = capsys.readouterr()
    raw = data_root / "bernina/data/p99999/raw"
    assert (captured.out, captured.err) == (
        "",
        f"Error, reason : pgroup p99999 does not exist for beamline bernina: no directory {raw}\n",
    )


async def test_python_api_for_scripts(
    broker: LiveBroker, seed_files: dict[str, Path], raw_dir: Path
) -> None:
    accepted = await asyncio.to_thread(
        retrieve,
        "p12345",
        SEED_START,
        SEED_STOP,
        output_directory="covid/detector_test2",
        channels_file=seed_files["channels"],
        detectors_file=seed_files["detectors"],
        broker=broker.url,
    )
    assert accepted == Accepted(
        run_number=1,
        request_id=run_json(raw_dir)["request_id"],
        files=[
            str(raw_dir / "covid/detector_test2/run_000001.BSDATA.h5"),
            str(raw_dir / "covid/detector_test2/run_000001.JF07T32V01.h5"),
        ],
    )
    with pytest.raises(InputFileError) as bad_file:
        retrieve("p12345", 1, 2, channels_file="nowhere", broker=broker.url)
    assert str(bad_file.value) == "channels file nowhere does not exist"
    with pytest.raises(BrokerRefused) as refused:
        await asyncio.to_thread(
            retrieve, "p12345", 3, 2, channels_file=seed_files["channels"], broker=broker.url
        )
    assert (str(refused.value), refused.value.http_status) == (
        "stop_pulseid 2 is before start_pulseid 3",
        400,
    )


@pytest.fixture(params=["embedded", "rabbitmq"])
async def broker_and_worker(
    request: pytest.FixtureRequest, start_broker: Callable[..., Awaitable[LiveBroker]]
) -> Any:
    """The broker, and the transport a worker would use to take jobs and announce status."""
    if request.param == "embedded":
        live = await start_broker()
        yield live, live.transport
        return
    url, prefix = request.getfixturevalue("amqp_url"), request.getfixturevalue("amqp_prefix")
    live = await start_broker(AmqpTransport(url, prefix=prefix))
    worker = AmqpTransport(url, prefix=prefix)
    await worker.connect()
    yield live, worker
    await worker.close()


@pytest.mark.parametrize("outcome", ["success", "failure"])
async def test_wait_follows_the_run(
    broker_and_worker: tuple[LiveBroker, Any],
    seed_files: dict[str, Path],
    raw_dir: Path,
    capsys: pytest.CaptureFixture[str],
    outcome: str,
) -> None:
    live, worker = broker_and_worker
    client = asyncio.create_task(
        asyncio.to_thread(main, [*seed_argv(seed_files), "--broker", live.url, "--wait"])
    )
    channels = await take_job(worker, SourceKind.DATABUFFER)
    detector = await take_job(worker, SourceKind.DETECTOR)
    await write_job(worker, channels)
    reason = "detector buffer of JF07T32V01 holds no pulse of 11884948775-11884949774"
    await write_job(worker, detector, fail=reason if outcome == "failure" else None)
    status = await asyncio.wait_for(client, PATIENCE)

    directory = raw_dir / "covid" / "detector_test2"
    expected = [
        "success: run number(request_id) is 1",
        f"BSDATA done: {directory}/run_000001.BSDATA.h5 (complete: 2 of 2 names, no pulse missing)",
    ]
    if outcome == "success":
        expected += [
            f"JF07T32V01 done: {directory}/run_000001.JF07T32V01.h5 "
            "(complete: 1 of 1 names, no pulse missing)",
            "run 1 of p12345 is done: 2 of 2 sources written",
        ]
    else:
        expected += [
            f"JF07T32V01 failed: {directory}/run_000001.JF07T32V01.h5 not written: {reason}",
            "run 1 of p12345 failed: 1 of 2 sources failed",
        ]
    assert capsys.readouterr().out.splitlines() == expected
    assert status == (0 if outcome == "success" else 1)


def test_follow_shows_a_bar_per_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bars (on stderr, off when it is not a terminal) show each source's pulses and state."""
    import io

    replies = iter(
        [
            {"sources": {"BSDATA": {"state": "queued", "progress": {"done": None, "total": None}}}},
            {"sources": {"BSDATA": {"state": "running", "progress": {"done": 500, "total": 1000}}}},
            {
                "sources": {
                    "BSDATA": {
                        "state": "done",
                        "progress": {"done": 1000, "total": 1000},
                        "file": "/raw/run_000001.BSDATA.h5",
                        "completeness": {"summary": "complete"},
                    }
                }
            },
        ]
    )

    class Remote:
        def run_status(self, pgroup: str, run_number: int) -> dict[str, Any]:
            return next(replies)

    screen = io.StringIO()
    result = daq_client.follow_run(
        Remote(),  # type: ignore[arg-type]
        "p12345",
        1,
        poll_interval=0.001,
        bars=daq_client.ProgressBars(screen, enabled=True),
    )
    assert result.lines() == [
        "BSDATA done: /raw/run_000001.BSDATA.h5 (complete)",
        "run 1 of p12345 is done: 1 of 1 sources written",
    ]
    shown = screen.getvalue()
    assert "BSDATA:  50%" in shown and "500/1000" in shown
    assert "BSDATA: 100%" in shown and "1000/1000" in shown and "done" in shown


def test_a_finished_source_keeps_its_own_time() -> None:
    """A source done after 3 s of work shows 00:03 to the end, however long the others take
    (the demo showed BSDATA, done at 3 s, as [00:27, …, done])."""
    import io

    done = {
        "state": "done",
        "progress": {"done": 1000, "total": 1000},
        "message": "complete: 1 of 1 names, no pulse missing",
        "started_at": 100.0,
        "finished_at": 103.0,
    }
    running = {"state": "running", "progress": {"done": 10, "total": 1000}, "message": "10 of 1000"}
    screen = io.StringIO()
    bars = daq_client.ProgressBars(screen, enabled=True)
    bars.show({"BSDATA": done, "JF13T01V01": running})
    bars.show({"BSDATA": done, "JF13T01V01": {**running, "started_at": 0.0}})
    bars.close()  # renders every bar once more, as tqdm does when it leaves them
    shown = re.split(r"[\r\n]", screen.getvalue())
    bsdata = [part for part in shown if part.startswith("BSDATA: 100%")]  # after its creation
    assert len(bsdata) >= 3 and all(
        part.endswith("| 1000/1000 pulses, 00:03, 333.3 pulses/s, done") for part in bsdata
    ), bsdata


def test_plain_lines_without_tqdm(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a copied daq_client.py prints where tqdm is not installed: a line per change."""
    import io

    monkeypatch.setattr(daq_client, "_tqdm_class", lambda: None)
    waiting = "waiting for pulse 1111 (the buffers are at 1000, about 1 s)"
    screen = io.StringIO()
    bars = daq_client.ProgressBars(screen)
    statuses: list[dict[str, Any]] = [
        {"state": "queued", "progress": {"done": None, "total": None}},
        {"state": "running", "progress": {"done": 0, "total": 100}, "message": waiting},
        {"state": "running", "progress": {"done": 0, "total": 100}, "message": waiting},
        {"state": "running", "progress": {"done": 50, "total": 100}, "message": "50 of 100"},
        {"state": "running", "progress": {"done": 60, "total": 100}, "message": "60 of 100"},
        {
            "state": "done",
            "progress": {"done": 100, "total": 100},
            "started_at": 1.0,
            "finished_at": 2.0,
        },
    ]
    for status in statuses:
        bars.show({"BSDATA": status})
    bars.close()
    assert re.sub(r" \[\d\d:\d\d\]$", "", screen.getvalue(), flags=re.MULTILINE).splitlines() == [
        "BSDATA: queued",
        f"BSDATA: {waiting} 0/100 pulses",
        "BSDATA: running 50/100 pulses",
        "BSDATA: done 100/100 pulses",
    ]
    assert screen.getvalue().splitlines()[-1] == "BSDATA: done 100/100 pulses [00:01]"
