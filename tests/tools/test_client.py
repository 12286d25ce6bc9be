"""The start/stop client (seed Example 2) against the real broker and a pulse-id server."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from sf_daq_broker.tools import client as client_module
from sf_daq_broker.tools.client import BrokerClient
from sf_daq_broker.tools.daq_client import InputFileError, RemoteBroker
from tests.support import PATIENCE
from tests.tools.support import REPO, LiveBroker, PulseServer, read_until

CHANNELS = ["SAR-CVME-TIFALL5:EvtSet", "SAR-CVME-TIFALL4:EvtSet"]

RUN_WITH_CTRL_C = """
import sys
from sf_daq_broker.tools.client import BrokerClient
from sf_daq_broker.tools.daq_client import RemoteBroker

broker, pulses, channels = sys.argv[1:]
client = BrokerClient("p12345", broker=broker, pulse_ids=RemoteBroker(pulses))
client.configure(output_directory="test/daq", channels_file=channels)
print("returned", client.run(1_000_000))
"""


@pytest.fixture
def channel_list(tmp_path: Path) -> Path:
    path = tmp_path / "channel_list"
    path.write_text("\n".join(CHANNELS) + "\n")
    return path


@pytest.fixture
def detectors_file(tmp_path: Path) -> Path:
    path = tmp_path / "jf_jf01.json"
    path.write_text(json.dumps({"JF01T03V01": {"compression": True}}))
    return path


def run_json(raw_dir: Path, run: int = 1) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        (raw_dir / "run_info" / "000000" / f"run_{run:06d}.json").read_text()
    )
    return document


async def test_run_takes_n_pulses_at_the_rate(
    broker: LiveBroker,
    pulse_server: PulseServer,
    channel_list: Path,
    detectors_file: Path,
    raw_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "POLL_INTERVAL", 0.02)
    daq = BrokerClient("p12345", broker=broker.url, pulse_ids=RemoteBroker(pulse_server.url))
    daq.configure(
        output_directory="test/daq",
        channels_file=channel_list,
        rate_multiplicator=2,
        detectors_file=detectors_file,
    )
    assert await asyncio.to_thread(daq.run, 20) == 1

    captured = capsys.readouterr()
    assert captured.out == "success: run number(request_id) is 1\n"
    assert "[####################] 100% Run: 1" in captured.err
    record = run_json(raw_dir)
    start = pulse_server.served[0]
    assert (record["start_pulseid"], record["stop_pulseid"]) == (start, start + 20 * 2 - 1)
    assert record["rate_multiplicator"] == 2
    assert record["directory_name"] == "test/daq"
    assert record["channels_list"] == CHANNELS
    assert record["detectors"] == {"JF01T03V01": {"compression": True}}
    assert daq.status() is None
    assert daq.last_run == 1


@pytest.mark.parametrize("answer", ["s", "n"])
async def test_ctrl_c_asks_whether_to_keep_the_pulses(
    broker: LiveBroker, pulse_server: PulseServer, channel_list: Path, raw_dir: Path, answer: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        "-c",
        RUN_WITH_CTRL_C,
        broker.url,
        pulse_server.url,
        str(channel_list),
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin and process.stdout and process.stderr
    try:
        await read_until(process.stderr, "Run: 1")  # the progress bar: the run is on
        process.send_signal(signal.SIGINT)
        prompt = await read_until(process.stdout, "[s]-save them into; any other key - discard : ")
        process.stdin.write(f"{answer}\n".encode())
        await process.stdin.drain()
        rest = (await asyncio.wait_for(process.stdout.read(), PATIENCE)).decode()
        assert await asyncio.wait_for(process.wait(), PATIENCE) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    start, current = pulse_server.served[0], pulse_server.served[-1]
    assert prompt == (
        "\nYou pressed Ctrl+C!\n"
        "what do you want me to do with already collected up to now frames "
        f"(pulseids: {start}-{current})\n"
        "[s]-save them into; any other key - discard : "
    )
    if answer == "s":
        assert rest == "success: run number(request_id) is 1\nreturned 1\n"
        record = run_json(raw_dir)
        assert (record["start_pulseid"], record["stop_pulseid"]) == (start, current)
        assert record["directory_name"] == "test/daq"
    else:
        assert rest == f"discarded pulses {start}-{current}: no run was made\nreturned None\n"
        assert not (raw_dir / "run_info" / "LAST_RUN").exists()  # no run number spent


async def test_default_pulse_ids_come_from_the_broker(
    pulse_server: PulseServer, channel_list: Path
) -> None:
    """Without a pulse-id source, ``GET {broker}/current_pulse_id`` is asked."""
    daq = BrokerClient("p12345", broker=pulse_server.url)
    daq.configure(channels_file=channel_list)
    start = await asyncio.to_thread(daq.start)
    assert start == pulse_server.served[-1]
    assert daq.status() == "running"


def test_start_stop_with_a_function_as_pulse_source(
    channel_list: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daq = BrokerClient("p12345", broker="http://127.0.0.1:9", pulse_ids=lambda: 42)
    assert daq.stop() is None
    assert capsys.readouterr().out == "Run was not started to stop it\n"
    daq.configure(channels_file=channel_list)
    assert daq.start() == 42


def test_configure_reads_the_files_at_once(tmp_path: Path) -> None:
    daq = BrokerClient("p12345", pulse_ids=lambda: 1)
    with pytest.raises(InputFileError) as bad_file:
        daq.configure(channels_file=tmp_path / "nowhere")
    assert str(bad_file.value) == f"channels file {tmp_path / 'nowhere'} does not exist"
    with pytest.raises(ValueError) as nothing:
        daq.configure(output_directory="test/daq")
    assert str(nothing.value) == (
        "nothing to retrieve: configure a channels, epics or detectors file"
    )
