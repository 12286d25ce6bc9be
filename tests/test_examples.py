"""``examples/``: the facility-style files and the start/stop script, run as users run them.

Against the demo's system (the shipped simulation, the broker, every worker, in this process):
the examples name channels, PVs and a detector of ``configs/simulation.toml``, so what they ask
for exists and every file comes out complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sf_daq_broker.demo.plan import PulseRange
from sf_daq_broker.demo.system import DemoSystem, SystemOptions, simulation_config
from sf_daq_broker.simulation.config import load_simulation_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
pytestmark = pytest.mark.slow


@dataclass
class Demo:
    url: str
    raw: Path
    pulses: PulseRange


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    workspace = tmp_path_factory.mktemp("examples")
    base = load_simulation_config()
    pulses = PulseRange.for_run(base.clock.start_pulse_id, 200)
    options = SystemOptions(
        workspace=workspace,
        data_root=workspace / "sf",
        beamline="bernina",
        clock_at_start=pulses.clock_at_start,
    )
    raw = options.data_root / "bernina" / "data" / "p12345" / "raw"
    raw.mkdir(parents=True)
    system = DemoSystem(options, simulation_config(base, options, ("JF13T01V01",)))
    system.start()
    try:
        yield Demo(system.broker_url, raw, pulses)
    finally:
        system.stop()


def python(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_daq_client_with_every_example_file(demo: Demo) -> None:
    """The seed's Example 1 with the example files: channels (and a camera), PVs, a detector
    and a scan step, at 50 Hz."""
    argv = ["daq_client.py", "-p", "p12345", "-d", "examples", "-r", "2"]
    argv += ["-c", "examples/channel_list", "-e", "examples/epics_list"]
    argv += ["-f", "examples/jf_jf13.json", "-s", "examples/scan_step.json"]
    argv += [f"--start_pulseid={demo.pulses.start}", f"--stop_pulseid={demo.pulses.stop}"]
    result = python(*argv, "--broker", demo.url, "--wait")
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    lines = result.stdout.splitlines()
    run = int(lines[0].removeprefix("success: run number(request_id) is "))
    files = demo.raw / "examples"
    assert lines[1:] == [
        f"BSDATA done: {files}/run_{run:06d}.BSDATA.h5 (complete: 5 of 5 names, no pulse missing)",
        f"CAMERAS done: {files}/run_{run:06d}.CAMERAS.h5 "
        "(complete: 1 of 1 names, no pulse missing)",
        f"PVCHANNELS done: {files}/run_{run:06d}.PVCHANNELS.h5 "
        "(complete: 3 of 3 names, no pulse missing)",
        f"JF13T01V01 done: {files}/run_{run:06d}.JF13T01V01.h5 "
        "(complete: 1 of 1 names, no pulse missing)",
        f"run {run} of p12345 is done: 4 of 4 sources written",
    ]
    record = json.loads((demo.raw / "run_info" / "000000" / f"run_{run:06d}.json").read_text())
    assert record["channels_list"] == [
        "SARFE10-PBPG050:HAMP-INTENSITY-CAL",
        "SAROP11-PBPS117:INTENSITY",
        "SAR-CVME-TIFALL5:EvtSet",
        "SLAAR11-LTIM01-EVR0:LASER_ON",
        "SARES11-SPEC125-M1:PROJECTION",
    ]
    assert record["camera_list"] == ["SARES11-SPEC125-M1:FPICTURE"]
    assert record["detectors"] == json.loads((EXAMPLES / "jf_jf13.json").read_text())
    scan = json.loads((demo.raw / "scan_info" / "sample_x_scan.json").read_text())
    assert scan["scan_parameters"] == {
        "scan_name": "sample_x_scan",
        "name": ["SARES11-XSAM125:MOTOR_X"],
        "Id": ["SARES11-XSAM125:MOTOR_X"],
        "units": ["mm"],
    }
    assert scan["scan_files"] == [
        [
            f"{files}/run_{run:06d}.{suffix}.h5"
            for suffix in ("BSDATA", "CAMERAS", "PVCHANNELS", "JF13T01V01")
        ]
    ]
    assert scan["pulseIds"] == [[demo.pulses.start, demo.pulses.stop]]
    assert (scan["scan_values"], scan["scan_readbacks"]) == ([[0.25]], [[0.2497]])
    assert scan["scan_step_info"] == [{"step_number": 3, "steps": 11}]


def test_client_example_takes_a_run_and_returns_when_it_is_written(demo: Demo) -> None:
    """``client_example.py``: start/stop on the buffers' current pulse, files written on return."""
    env = {**os.environ, "SF_DAQ_BROKER": demo.url}
    result = subprocess.run(
        [sys.executable, "client_example.py", "--pulses", "50", "--no-detector"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    run = int(lines[0].removeprefix("success: run number(request_id) is "))
    files = demo.raw / "client_example"
    assert lines[-1] == f"run {run} of p12345 is done: 3 of 3 sources written"
    for suffix in ("BSDATA", "CAMERAS", "PVCHANNELS"):
        assert (files / f"run_{run:06d}.{suffix}.h5").is_file()  # written when run() returned
    assert "100% Run:" in result.stderr


def test_client_example_reads_like_the_facilitys(demo: Demo) -> None:
    """``import client_example as client; client.BrokerClient(pgroup=…)``, as in the seed."""
    probe = "import client_example as client; print(client.BrokerClient.__module__)"
    result = python("-c", probe, cwd=EXAMPLES)
    assert (result.returncode, result.stdout) == (0, "sf_daq_broker.tools.client\n")
