"""Each tool against the real system: broker on a port, RabbitMQ, simulated buffers, workers.

Nothing is hand-made: the simulators (``Simulation``: data buffer, image buffer, archiver,
Jungfrau buffer) serve the data, the real workers of every registered source write the files,
and the tools are run as users run them. The simulators' values are deterministic functions of
(name, pulse), so a file is checked value for value; problems come from their fault injection.

The simulated machine runs on a wall clock started a minute ago: the runs of the check and
daq_client tests lie in the buffers' past (workers need not wait), while the start/stop client
follows the pulses as they happen, as it does at a beamline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import h5py
import hdf5plugin  # noqa: F401 - camera chunks are bitshuffle+LZ4
import numpy as np
import pytest
from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity

from sf_daq_broker.api.app import create_app
from sf_daq_broker.config import Settings
from sf_daq_broker.simulation.archiver import (
    PvSpec,
    expected_pv_value,
    last_change_at_or_before,
    pv_change_time,
)
from sf_daq_broker.simulation.channels import ChannelSpec, expected_values
from sf_daq_broker.simulation.clock import PulseClock
from sf_daq_broker.simulation.config import (
    Api1Config,
    ArchiverConfig,
    ClockConfig,
    JungfrauConfig,
    ServerConfig,
    SimulationConfig,
)
from sf_daq_broker.simulation.faults import PulseSelection
from sf_daq_broker.simulation.jungfrau_writer import DetectorSpec
from sf_daq_broker.simulation.runner import Simulation
from sf_daq_broker.tools import client as client_module
from sf_daq_broker.tools import daq_client
from sf_daq_broker.tools.check import main as check_main
from sf_daq_broker.tools.client import BrokerClient
from sf_daq_broker.tools.daq_client import retrieve
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.workers.cli import SOURCE_CLASSES, make_source
from sf_daq_broker.workers.loop import RetryPolicy, Worker
from tests.support import PATIENCE, async_wait_until
from tests.tools.support import REPO, read_until, serve

pytestmark = pytest.mark.rabbitmq

START = 15_000_000_000
#: The runs of the check and daq_client tests: 200 pulses well inside the buffers' past.
RUN_START, RUN_STOP = START + 1000, START + 1199

PROFILE = "SARES11-SPEC125-M1.roi_signal_x_profile"
EVTSET5 = "SAR-CVME-TIFALL5:EvtSet"
EVTSET4 = "SAR-CVME-TIFALL4:EvtSet"
CAMERA = "SARES11-SPEC125-M1:FPICTURE"
PV_CENTER = "SARFE10-OAPU044:SPECTRUM_CENTER"
PV_STATE = "SLAAR21-LMOT-M521:STATE"
DETECTOR = "JF13T01V01"  # one module, allowed for bernina (the loopback beamline)

CHANNELS = {
    spec.name: spec
    for spec in [
        ChannelSpec(name=PROFILE, type="float32", shape=(16,)),
        ChannelSpec(name=EVTSET5, type="uint16"),
        ChannelSpec(name=EVTSET4, type="int32", byte_order="LITTLE_ENDIAN"),
        ChannelSpec(name=CAMERA, type="uint16", shape=(24, 32), compression="bitshuffle_lz4"),
    ]
}
PVS = {
    spec.name: spec
    for spec in [
        PvSpec(name=PV_CENTER, type="float64", period_s=0.5),
        PvSpec(name=PV_STATE, type="string", period_s=0.7),
    ]
}


@dataclass
class Daq:
    """The running system, and what a test needs to drive it and look at its results."""

    url: str
    simulation: Simulation
    settings: Settings
    raw_dir: Path
    files: Path  # the users' channel and epics lists

    @property
    def clock(self) -> PulseClock:
        return self.simulation.clock

    async def run_status(self, run: int, pgroup: str = "p12345") -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{self.url}/run_status", params={"pgroup": pgroup, "run_number": str(run)}
            ) as response,
        ):
            reply: dict[str, Any] = await response.json()
            return reply

    async def finished(self, run: int, pgroup: str = "p12345") -> dict[str, dict[str, Any]]:
        """The sources of the run once every one is done or failed."""

        async def final() -> dict[str, dict[str, Any]] | None:
            sources: dict[str, dict[str, Any]] = (await self.run_status(run, pgroup))["sources"]
            states = {s["state"] for s in sources.values()}
            return sources if states <= {"done", "failed"} else None

        result: dict[str, dict[str, Any]] = await async_wait_until(
            final, timeout=2 * PATIENCE, what=f"run {run} of {pgroup} to finish"
        )
        return result

    def run_file(self, run: int) -> Path:
        return self.raw_dir / "run_info" / "000000" / f"run_{run:06d}.json"

    def record(self, run: int) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.run_file(run).read_text())
        return document


@pytest.fixture
async def daq(
    make_settings: Callable[..., Settings],
    raw_dir: Path,
    tmp_path: Path,
    amqp_url: str,
    amqp_prefix: str,
) -> AsyncIterator[Daq]:
    config = SimulationConfig(
        clock=ClockConfig(start_pulse_id=START, t0_ms=time.time_ns() // 1_000_000 - 60_000),
        databuffer=Api1Config(channels=[s for name, s in CHANNELS.items() if name != CAMERA]),
        imagebuffer=Api1Config(channels=[CHANNELS[CAMERA]]),
        archiver=ArchiverConfig(pvs=list(PVS.values())),
        control=ServerConfig(),
        jungfrau=JungfrauConfig(
            buffer_root=tmp_path / "buffer",
            calibration_root=tmp_path / "calibration",
            retention_pulses=100_000,
            mode="lazy",
            detectors=[DetectorSpec(name=DETECTOR)],
        ),
    )
    simulation = Simulation(config)
    await simulation.start()
    addresses = simulation.addresses
    gain, pedestal = simulation.calibration_files[DETECTOR]
    settings = make_settings(
        amqp_url=amqp_url,
        amqp_prefix=amqp_prefix,
        buffers={
            "databuffer_url": addresses["databuffer"],
            "imagebuffer_url": addresses["imagebuffer"],
            "archiver_url": addresses["archiver"],
            "jungfrau_root": str(config.jungfrau.buffer_root),
            "jungfrau_control_url": addresses["control"],
            "ingestion_window_s": 1.0,
        },
        detectors={DETECTOR: {"beamline": "bernina", "gain_file": gain, "pedestal_file": pedestal}},
    )
    broker = await serve(create_app(settings, AmqpTransport(amqp_url, prefix=amqp_prefix)))
    sources = [make_source(kind, settings) for kind in SOURCE_CLASSES]
    for source in sources:  # small runs: short waits (where a source has the knob)
        for attribute, value in (("poll_seconds", 0.05), ("ready_timeout", 10.0)):
            if hasattr(source, attribute):
                setattr(source, attribute, value)
    worker_transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    worker = asyncio.create_task(
        Worker(worker_transport, sources, RetryPolicy(attempts=2, first_delay=0.01)).run()
    )
    files = tmp_path / "user"
    files.mkdir()
    (files / "channel_list").write_text(
        f"# Example 1: channels and a camera\n{PROFILE}\n{EVTSET5}\n\n{EVTSET4}\n{CAMERA}\n"
    )
    (files / "epics_list").write_text(f"{PV_CENTER}\n# {PV_STATE} is off\n")
    try:
        yield Daq(str(broker.make_url("")).rstrip("/"), simulation, settings, raw_dir, files)
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
        await worker_transport.close()
        await broker.close()
        await simulation.stop()


async def run_tool(
    *argv: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``python argv…`` as users run the scripts; (status, out, err)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 2 * PATIENCE)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def check(run_file: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = await asyncio.to_thread(check_main, ["-r", str(run_file)])
    return status, capsys.readouterr().out.splitlines()


def failed(*reasons: str) -> list[str]:
    return [
        "Result of consistency check (summary) : False",
        *(f"    Reason : {reason}" for reason in reasons),
    ]


def widened(start: int, stop: int) -> np.ndarray:
    """The pulses a channel job retrieves at 100 Hz: one more at each edge (SPEC §3)."""
    return np.arange(start - 1, stop + 2, dtype=np.int64)


def assert_channel(file: h5py.File, name: str, pulse_ids: np.ndarray) -> None:
    """The channel's rows are exactly the simulator's values at ``pulse_ids``."""
    group = file[name]
    assert group["pulse_id"][:].tolist() == pulse_ids.tolist()
    np.testing.assert_array_equal(group["data"][:], expected_values(CHANNELS[name], pulse_ids))


def assert_pv(file: h5py.File, name: str, start: int, stop: int) -> None:
    """The value in force at the start, then every change inside the run, as simulated."""
    spec, group = PVS[name], file[name]
    timestamps = group["timestamp"][:]
    changes = [last_change_at_or_before(spec, int(t)) for t in timestamps]
    assert [pv_change_time(spec, k) for k in changes] == timestamps.tolist()
    assert changes == list(range(changes[0], changes[0] + len(changes)))
    assert group["data"][:].tolist() == [expected_pv_value(spec, k) for k in changes]
    assert group["changed_in_interval"][:].tolist() == [False] + [True] * (len(changes) - 1)
    assert group["pulse_id"][0] < start < group["pulse_id"][1] <= stop + 1


async def test_seed_example_1_with_wait(daq: Daq) -> None:
    """``python daq_client.py -p … -d … -c channel_list -e epics_list --start_pulseid …
    --stop_pulseid …`` (seed Example 1, the broker from $SF_DAQ_BROKER) plus --wait, run in
    the user's folder where the lists are: the workers write the files, the client follows them
    and says where they are; check.py then passes on them, run as users run it."""
    argv = [str(REPO / "daq_client.py"), "-p", "p12345", "-d", "test/daq"]
    argv += ["-c", "channel_list", "-e", "epics_list"]
    argv += ["--start_pulseid", str(RUN_START), "--stop_pulseid", str(RUN_STOP), "--wait"]
    env = dict(os.environ, SF_DAQ_BROKER=daq.url)
    status, out, err = await run_tool(*argv, cwd=daq.files, env=env)

    directory = daq.raw_dir / "test" / "daq"
    assert out.splitlines() == [
        "success: run number(request_id) is 1",
        f"BSDATA done: {directory}/run_000001.BSDATA.h5 (complete: 3 of 3 names, no pulse missing)",
        f"CAMERAS done: {directory}/run_000001.CAMERAS.h5 "
        "(complete: 1 of 1 names, no pulse missing)",
        f"PVCHANNELS done: {directory}/run_000001.PVCHANNELS.h5 "
        "(complete: 1 of 1 names, no pulse missing)",
        "run 1 of p12345 is done: 3 of 3 sources written",
    ]
    assert (status, err) == (0, "")

    pulse_ids = widened(RUN_START, RUN_STOP)
    with h5py.File(directory / "run_000001.BSDATA.h5") as file:
        assert sorted(file) == sorted([PROFILE, EVTSET5, EVTSET4])
        for name in (PROFILE, EVTSET5, EVTSET4):
            assert_channel(file, name, pulse_ids)
    with h5py.File(directory / "run_000001.CAMERAS.h5") as file:
        assert_channel(file, CAMERA, pulse_ids)
    with h5py.File(directory / "run_000001.PVCHANNELS.h5") as file:
        assert list(file) == [PV_CENTER]
        assert_pv(file, PV_CENTER, RUN_START, RUN_STOP)

    passed = [
        "Result of consistency check (summary) : True",
        "    OK : all tests passed (3 sources, 200 beam pulses at rate 1/1)",
    ]
    printed = "\n".join(passed) + "\n"
    assert await run_tool("check.py", "-r", str(daq.run_file(1))) == (0, printed, "")
    # The same from inside run_info/000000/, with the run file's bare name.
    check_py = str(REPO / "check.py")
    in_run_info = await run_tool(check_py, "-r", "run_000001.json", cwd=daq.run_file(1).parent)
    assert in_run_info == (0, printed, "")


async def test_check_names_a_missing_channel_and_missing_pulses(
    daq: Daq, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data buffer lost a channel and two pulses of another: check says so, in the
    facility's words; the worker's report said the same on the status exchange."""
    daq.simulation.databuffer.faults.missing_channels = {EVTSET4}
    daq.simulation.databuffer.faults.gaps[PROFILE] = PulseSelection.of(RUN_START + 5, RUN_START + 6)
    accepted = await asyncio.to_thread(
        retrieve,
        "p12345",
        RUN_START,
        RUN_STOP,
        channels_file=daq.files / "channel_list",
        broker=daq.url,
    )
    sources = await daq.finished(accepted.run_number)
    assert {name: s["state"] for name, s in sources.items()} == {
        "BSDATA": "done",
        "CAMERAS": "done",
    }
    report = sources["BSDATA"]["completeness"]
    assert report["absent"] == [EVTSET4]
    assert {r["name"]: r["missing_pulse_ids"] for r in report["names"]}[PROFILE] == [
        RUN_START + 5,
        RUN_START + 6,
    ]

    assert await check(daq.run_file(1), capsys) == (
        1,
        failed(
            f"{PROFILE} number of pulse_id is different from expected : 198 vs 200",
            f"channel {EVTSET4} requested but not present in BSDATA file",
        ),
    )
    with h5py.File(daq.raw_dir / "run_000001.BSDATA.h5") as file:
        pulse_ids = widened(RUN_START, RUN_STOP)
        assert_channel(
            file, PROFILE, pulse_ids[~np.isin(pulse_ids, [RUN_START + 5, RUN_START + 6])]
        )
        assert_channel(file, EVTSET5, pulse_ids)

    # --json: which pulses are missing, for scripts
    capsys.readouterr()
    assert await asyncio.to_thread(check_main, ["-r", str(daq.run_file(1)), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["sources"]["BSDATA"]["names"][PROFILE] == {
        "expected": 200,
        "found": 198,
        "missing": 2,
        "missing_pulse_ids": [RUN_START + 5, RUN_START + 6],
    }


async def test_a_failed_job_leaves_a_missing_file(
    daq: Daq, capsys: pytest.CaptureFixture[str]
) -> None:
    """The image buffer answers only errors: the camera job fails after its retries, daq_client
    --wait says why and exits 1, and check.py finds no camera file."""
    daq.simulation.imagebuffer.faults.http_errors = 1000
    channels = daq.files / "channel_list"
    argv = ["daq_client.py", "-p", "p12345", "-c", str(channels), "--broker", daq.url]
    argv += ["--start_pulseid", str(RUN_START), "--stop_pulseid", str(RUN_STOP), "--wait"]
    status, out, err = await run_tool(*argv)

    cameras = daq.raw_dir / "run_000001.CAMERAS.h5"
    sources = await daq.finished(1)
    reason = sources["CAMERAS"]["error"]
    query = f"{daq.settings.buffers.imagebuffer_url}/api/1/query"
    assert re.fullmatch(
        rf"pulses {RUN_START}-{RUN_STOP}: image buffer at {re.escape(query)}: "
        r"HTTP 500 \{.*\"error\": \"injected fault\"\} \(gave up after 2 tries\)",
        reason,
    ), reason
    assert out.splitlines() == [
        "success: run number(request_id) is 1",
        f"BSDATA done: {daq.raw_dir}/run_000001.BSDATA.h5 "
        "(complete: 3 of 3 names, no pulse missing)",
        f"CAMERAS failed: {cameras} not written: {reason}",
        "run 1 of p12345 failed: 1 of 2 sources failed",
    ]
    assert (status, err) == (1, "")
    assert not cameras.exists()
    assert await check(daq.run_file(1), capsys) == (
        1,
        failed(f"CAMERAS file {cameras} does not exist"),
    )


async def test_a_name_unknown_to_the_buffer_makes_the_run_incomplete(daq: Daq) -> None:
    """A typo in a channel name: the run is written, but says per name that there is no data
    at all, reads "done, incomplete", and daq_client --wait exits 4, not 0."""
    (daq.files / "typo").write_text(f"{EVTSET5}\nSAR-CVME-TIFALL5:EvtSte\n")
    argv = [str(REPO / "daq_client.py"), "-p", "p12345", "-c", "typo", "--broker", daq.url]
    argv += ["--start_pulseid", str(RUN_START), "--stop_pulseid", str(RUN_STOP), "--wait"]
    status, out, err = await run_tool(*argv, cwd=daq.files)
    summary = "incomplete: SAR-CVME-TIFALL5:EvtSte: no data at all (unknown to the buffer?)"
    assert out.splitlines() == [
        "success: run number(request_id) is 1",
        f"BSDATA done: {daq.raw_dir}/run_000001.BSDATA.h5 ({summary})",
        "run 1 of p12345 is done, incomplete: 1 of 1 sources written, 1 incomplete (BSDATA)",
    ]
    assert (status, err) == (4, "")
    reply = await daq.run_status(1)
    assert (
        reply["message"] == "run 1 of p12345 is done, incomplete: 1 of 1 sources done "
        "(BSDATA incomplete)"
    )
    assert (reply["run_state"], reply["incomplete_sources"]) == ("done", ["BSDATA"])
    completeness = reply["sources"]["BSDATA"]["completeness"]
    assert (completeness["summary"], completeness["absent"]) == (
        summary,
        ["SAR-CVME-TIFALL5:EvtSte"],
    )
    assert completeness["lines"] == [
        f"{EVTSET5}: 200 of 200 beam pulses",
        "SAR-CVME-TIFALL5:EvtSte: no data at all (unknown to the buffer?)",
    ]


async def test_check_counts_bad_detector_frames(
    daq: Daq, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Jungfrau module drops a frame and loses packets of three others: the detector worker
    keeps every row and flags the four; daq_client -f … -r 4 --wait and check.py tell it."""
    jungfrau = daq.simulation.jungfrau.faults
    start, stop = RUN_START, RUN_START + 99  # rate 4: 25 beam pulses, start .. start + 96
    jungfrau.dropped_frames[(DETECTOR, 0)] = PulseSelection.of(start + 48)
    jungfrau.incomplete_frames[(DETECTOR, 0)] = PulseSelection.of(start + 8, start + 12, start + 88)
    (daq.files / "jf.json").write_text(json.dumps({DETECTOR: {"adc_to_energy": False}}))
    (daq.files / "evtset").write_text(f"{EVTSET5}\n")
    argv = ["-p", "p12345", "-c", "evtset", "-f", "jf.json", "-r", "4", "--broker", daq.url]
    argv += ["--start_pulseid", str(start), "--stop_pulseid", str(stop), "--wait"]
    status, out, err = await run_tool(str(REPO / "daq_client.py"), *argv, cwd=daq.files)
    detector = daq.raw_dir / f"run_000001.{DETECTOR}.h5"
    assert out.splitlines() == [
        "success: run number(request_id) is 1",
        f"BSDATA done: {daq.raw_dir}/run_000001.BSDATA.h5 "
        "(complete: 1 of 1 names, no pulse missing)",
        f"{DETECTOR} done: {detector} (incomplete: 1 of 1 names with missing pulses)",
        f"run 1 of p12345 is done, incomplete: 2 of 2 sources written, 1 incomplete ({DETECTOR})",
    ]
    assert (status, err) == (4, "")  # written, but incomplete: its own exit status
    report = (await daq.run_status(1))["sources"][DETECTOR]["completeness"]["names"][0]
    lost = [start + 8, start + 12, start + 48, start + 88]
    assert (report["found"], report["missing_pulse_ids"]) == (21, lost)

    with h5py.File(detector) as file:
        group = file[f"data/{DETECTOR}"]
        pulses = np.arange(start, stop + 1, 4)
        assert group["requested_pulse_id"][:, 0].tolist() == pulses.tolist()
        good = ~np.isin(pulses, lost)
        assert group["is_good_frame"][:, 0].tolist() == good.astype(int).tolist()
        assert group["pulse_id"][:, 0].tolist() == np.where(good, pulses, 0).tolist()
    # The seed's two lines: the pulses without a frame, and the rows flagged bad.
    assert await check(daq.run_file(1), capsys) == (
        1,
        failed(
            f"{DETECTOR} number of pulse_id is different from expected : 21 vs 25",
            f"{DETECTOR} there are bad frames : 4 out of 25",
        ),
    )


async def test_start_stop_client_runs_on_the_pulse_map(
    daq: Daq, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed Example 2: ``run(n)`` takes its pulse ids from the broker's /current_pulse_id,
    i.e. from the simulated buffers' pulse map, and the run it makes is written and sound.
    With ``wait=True`` it returns when the file is written: a check right after it passes."""
    monkeypatch.setattr(client_module, "POLL_INTERVAL", 0.02)
    monkeypatch.setattr(daq_client, "POLL_INTERVAL", 0.05)
    channels = daq.files / "evtset"
    channels.write_text(f"{EVTSET5}\n{PROFILE}\n")
    client = BrokerClient("p12345", broker=daq.url)
    client.configure(output_directory="test/daq", channels_file=channels, rate_multiplicator=2)
    before = daq.clock.current_pulse_id()
    assert await asyncio.to_thread(client.run, 50, wait=True) == 1
    after = daq.clock.current_pulse_id()

    captured = capsys.readouterr()
    bsdata = daq.raw_dir / "test" / "daq" / "run_000001.BSDATA.h5"
    assert captured.out.splitlines() == [
        "success: run number(request_id) is 1",
        f"BSDATA done: {bsdata} (complete: 2 of 2 names, no pulse missing)",
        "run 1 of p12345 is done: 1 of 1 sources written",
    ]
    assert "[####################] 100% Run: 1" in captured.err
    assert client.last_result is not None and client.last_result.exit_status == 0
    record = daq.record(1)
    start, stop = record["start_pulseid"], record["stop_pulseid"]
    assert before <= start and stop == start + 50 * 2 - 1 and stop <= after
    assert record["rate_multiplicator"] == 2 and client.last_run == 1
    with h5py.File(daq.raw_dir / "test" / "daq" / "run_000001.BSDATA.h5") as file:
        # rate 2: the edges are widened only where they are beam pulses
        first = start - 1 if start % 2 == 0 else start
        last = stop + 1 if stop % 2 == 0 else stop
        assert_channel(file, EVTSET5, np.arange(first, last + 1, dtype=np.int64))
    assert await check(daq.run_file(1), capsys) == (
        0,
        [
            "Result of consistency check (summary) : True",
            "    OK : all tests passed (1 sources, 50 beam pulses at rate 1/2)",
        ],
    )


RUN_WITH_CTRL_C = """
import sys
from sf_daq_broker.tools.client import BrokerClient

broker, channels = sys.argv[1:]
client = BrokerClient("p12345", broker=broker)
client.configure(output_directory="test/daq", channels_file=channels)
print("returned", client.run(1_000_000))
"""
PROMPT = "[s]-save them into; any other key - discard : "


@pytest.mark.parametrize("answer", ["s", "x"])
async def test_ctrl_c_during_run(daq: Daq, capsys: pytest.CaptureFixture[str], answer: str) -> None:
    """A real SIGINT in the middle of ``run``: the seed's question; ``s`` keeps the pulses taken
    so far (and the workers write them), anything else discards them without a run number."""
    channels = daq.files / "evtset"
    channels.write_text(f"{EVTSET5}\n")
    launched = daq.clock.current_pulse_id()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        "-c",
        RUN_WITH_CTRL_C,
        daq.url,
        str(channels),
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin and process.stdout and process.stderr
    try:
        await read_until(process.stderr, "Run: 1")  # the progress bar: the run is on
        process.send_signal(signal.SIGINT)
        prompt = await read_until(process.stdout, PROMPT)
        process.stdin.write(f"{answer}\n".encode())
        await process.stdin.drain()
        rest = (await asyncio.wait_for(process.stdout.read(), PATIENCE)).decode()
        assert await asyncio.wait_for(process.wait(), PATIENCE) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    match = re.fullmatch(
        r"\nYou pressed Ctrl\+C!\n"
        r"what do you want me to do with already collected up to now frames "
        r"\(pulseids: (\d+)-(\d+)\)\n" + re.escape(PROMPT),
        prompt,
    )
    assert match, prompt
    start, current = int(match[1]), int(match[2])
    assert launched <= start <= current <= daq.clock.current_pulse_id()
    if answer != "s":
        assert rest == f"discarded pulses {start}-{current}: no run was made\nreturned None\n"
        assert not (daq.raw_dir / "run_info" / "LAST_RUN").exists()  # no run number spent
        return
    assert rest == "success: run number(request_id) is 1\nreturned 1\n"
    record = daq.record(1)
    assert (record["start_pulseid"], record["stop_pulseid"]) == (start, current)
    assert (await daq.finished(1))["BSDATA"]["state"] == "done"
    with h5py.File(daq.raw_dir / "test" / "daq" / "run_000001.BSDATA.h5") as file:
        assert_channel(file, EVTSET5, widened(start, current))
    status, lines = await check(daq.run_file(1), capsys)
    assert (status, lines[0]) == (0, "Result of consistency check (summary) : True")


async def test_broker_debugger_json_shows_a_real_run(
    daq: Daq, amqp_url: str, amqp_prefix: str
) -> None:
    """``broker_debugger --json --pgroup p12345`` during two real runs: only p12345's events,
    per source write_request, write_start, write_progress…, write_finished; and once it is
    stopped its queue is gone from RabbitMQ."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sf_daq_broker.tools.broker_debugger",
        "--amqp-url",
        amqp_url,
        "--prefix",
        amqp_prefix,
        "--json",
        "--pgroup",
        "p12345",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout and process.stderr
    try:
        said = await read_until(process.stderr, "(Ctrl-C to stop)\n")
        found = re.fullmatch(
            rf"listening to {amqp_prefix}\.status through queue (\S+) \(Ctrl-C to stop\)\n", said
        )
        assert found, said
        queue = found[1]
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            with pytest.raises(ChannelLockedResource):  # there, and exclusively its own
                await channel.declare_queue(queue, passive=True)

        # Another pgroup's run first: the filter must hide it.
        other = daq.raw_dir.parents[1] / "p54321" / "raw"
        other.mkdir(parents=True)
        channels = daq.files / "evtset"
        channels.write_text(f"{EVTSET5}\n{CAMERA}\n")
        epics = daq.files / "epics_list"
        for pgroup in ("p54321", "p12345"):
            await asyncio.to_thread(
                retrieve,
                pgroup,
                RUN_START,
                RUN_STOP,
                channels_file=channels,
                epics_file=epics,
                broker=daq.url,
            )
            await daq.finished(1, pgroup)

        sources = {"BSDATA", "CAMERAS", "PVCHANNELS"}
        events: list[dict[str, Any]] = []
        while {e["source"] for e in events if e["action"] == "write_finished"} != sources:
            line = await asyncio.wait_for(process.stdout.readline(), PATIENCE)
            events.append(json.loads(line))

        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), PATIENCE) == 0
        assert (await process.stdout.read(), await process.stderr.read()) == (b"", b"")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert {e["pgroup"] for e in events} == {"p12345"}
    for source in sources:
        mine = [e for e in events if e["source"] == source]
        # The broker announces write_request once RabbitMQ has the job, so a quick worker's
        # write_start may overtake it: the worker's own events are what is strictly ordered.
        assert [e["action"] for e in mine].count("write_request") == 1
        actions = [e["action"] for e in mine if e["action"] != "write_request"]
        collapsed = [a for i, a in enumerate(actions) if i == 0 or a != actions[i - 1]]
        assert collapsed == ["write_start", "write_progress", "write_finished"]
        assert {(e["run_number"], e["file"]) for e in mine} == {
            (1, str(daq.raw_dir / f"run_000001.{source}.h5"))
        }
        assert len({e["job_id"] for e in mine}) == 1
        progress = [e["details"] for e in mine if e["action"] == "write_progress"]
        assert progress[-1]["done"] == progress[-1]["total"]
        times = [e["timestamp"] for e in mine if e["action"] != "write_request"]
        assert times == sorted(times)
    reports = [e["details"]["report"] for e in events if e["action"] == "write_finished"]
    assert [report["complete"] for report in reports] == [True] * len(sources)

    # Nothing left behind: its private queue went with it.
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        with pytest.raises(ChannelNotFoundEntity):
            await channel.declare_queue(queue, passive=True)
