"""check.py on detector files written with the facility's newer options (UPSTREAM_HEAD §1-§2):
regions of interest (one group ``data/<DET>:ROI_<label>`` per region, no full frame) and
``selected_pulse_ids`` / ``save_ppicker_events_only`` (fewer frames than the range, by design).

The files are the detector worker's own: broker → RabbitMQ → detector worker on the simulated
Jungfrau buffer (the fixture of tests/workers/test_detector_source.py); faults come from the
simulator (incomplete frames) or, for layouts no worker writes, from editing its file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import pytest

from sf_daq_broker.jobs import Action
from sf_daq_broker.simulation.faults import PulseSelection
from sf_daq_broker.tools.check import main
from tests.workers import test_detector_source as base
from tests.workers.test_detector_source import FOUR, ONE, System, no_leases_left, pulses

system = base.system  # the fixture: simulator, broker, RabbitMQ and a detector worker

ROIS = {"spot": [10, 200, 0, 300], "border": [250, 270, 250, 530]}
PASSED = "Result of consistency check (summary) : True"


def run_file(system: System, run: int) -> Path:
    return system.raw_dir / "run_info" / "000000" / f"run_{run:06d}.json"


def check(
    system: System, run: int, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, list[str]]:
    status = main(["-r", str(run_file(system, run)), *options])
    return status, capsys.readouterr().out.splitlines()


def failed(*reasons: str) -> list[str]:
    return [
        "Result of consistency check (summary) : False",
        *(f"    Reason : {reason}" for reason in reasons),
    ]


async def written(system: System, count: int) -> None:
    """The next ``count`` jobs wrote their files and let go of their leases."""
    outcomes = await system.outcomes(count)
    assert {e.action for e in outcomes.values()} == {Action.WRITE_FINISHED}, outcomes
    await no_leases_left(system.raw_dir)


async def test_roi_and_selected_pulse_runs_pass(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    pids = pulses()
    roi_run = await system.request({ONE: {"roi": ROIS}})
    system.pass_files()
    await written(system, 1)
    with h5py.File(system.raw_dir / f"run_{roi_run:06d}.{ONE}.h5") as file:
        assert sorted(file["data"]) == [f"{ONE}:ROI_border", f"{ONE}:ROI_spot"]
    assert check(system, roi_run, capsys) == (
        0,
        [PASSED, "    OK : all tests passed (1 sources, 5 beam pulses at rate 1/4)"],
    )

    faults = system.simulation.jungfrau.faults
    faults.event_bits[19] = PulseSelection.of(pids[2], pids[3])  # pulse picker
    selected = [pids[0], pids[2], 999]  # 999: outside the range, ignored (as upstream)
    selected_run = await system.request(
        {
            ONE: {"factor": 12.4},
            FOUR: {"roi": [[0, 100, 0, 50]], "save_ppicker_events_only": True},
        },
        selected_pulse_ids=selected,
    )
    await written(system, 2)
    with h5py.File(system.raw_dir / f"run_{selected_run:06d}.{ONE}.h5") as file:
        assert file[f"data/{ONE}/pulse_id"][:, 0].tolist() == [pids[0], pids[2]]
    with h5py.File(system.raw_dir / f"run_{selected_run:06d}.{FOUR}.h5") as file:
        assert file[f"data/{FOUR}:ROI_0/pulse_id"][:, 0].tolist() == [pids[2]]
    assert check(system, selected_run, capsys) == (
        0,
        [PASSED, "    OK : all tests passed (2 sources, 5 beam pulses at rate 1/4)"],
    )
    assert main(["-r", str(run_file(system, selected_run)), "--json"]) == 0
    sources = json.loads(capsys.readouterr().out)["sources"]
    assert sources[ONE]["names"][ONE] == {
        "expected": 2,
        "found": 2,
        "missing": 0,
        "missing_pulse_ids": [],
        "selected_pulse_ids": 2,
        "frames": 2,
        "bad_frames": 0,
        "frames_without_pulse_id": 0,
    }
    assert sources[FOUR]["names"][f"{FOUR}:ROI_0"] == {
        "pulse_picker_events": 1,
        "selected_pulse_ids": 2,
        "frames": 1,
        "bad_frames": 0,
        "frames_without_pulse_id": 0,
    }


async def test_each_region_is_checked_on_its_own(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    pids = pulses()
    system.simulation.jungfrau.faults.incomplete_frames[(ONE, 0)] = PulseSelection.of(pids[4])
    run = await system.request({ONE: {"roi": ROIS}})
    system.pass_files()
    await written(system, 1)
    incomplete = [
        f"{ONE}:ROI_{label} {problem}"
        for label in ROIS
        for problem in (
            "number of pulse_id is different from expected : 4 vs 5",
            "there are bad frames : 1 out of 5",
        )
    ]
    assert check(system, run, capsys) == (1, failed(*incomplete))

    # A file whose regions are not the ones the run asked for: the run file says the spot is
    # one row taller than what was written, and the border region is gone.
    record = json.loads(run_file(system, run).read_text())
    record["detectors"][ONE]["roi"]["spot"] = [10, 201, 0, 300]
    run_file(system, run).write_text(json.dumps(record))
    with h5py.File(system.raw_dir / f"run_{run:06d}.{ONE}.h5", "r+") as file:
        del file[f"data/{ONE}:ROI_border"]
    assert check(system, run, capsys) == (
        1,
        failed(
            f"{ONE}:ROI_spot frames are 190 x 300, the roi [10, 201, 0, 300] makes 191 x 300",
            f"{ONE}:ROI_spot meta/roi is [[10, 200], [0, 300]], the run asked for "
            "[[10, 201], [0, 300]]",
            *incomplete[:2],
            f"{ONE} has no group /data/{ONE}:ROI_border",
        ),
    )


async def test_selected_pulses_are_judged_against_the_selection(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    pids = pulses()
    system.simulation.jungfrau.faults.incomplete_frames[(ONE, 0)] = PulseSelection.of(pids[2])
    run = await system.request({ONE: {}}, selected_pulse_ids=[pids[0], pids[2], 999])
    system.pass_files()
    await written(system, 1)
    # The frame of pids[2] was not good: the worker does not keep it, the user asked for it.
    assert check(system, run, capsys) == (
        1,
        failed(f"{ONE} number of pulse_id is different from expected : 1 vs 2"),
    )
    assert main(["-r", str(run_file(system, run)), "--json"]) == 1
    details = json.loads(capsys.readouterr().out)["sources"][ONE]["names"][ONE]
    assert (details["expected"], details["missing_pulse_ids"]) == (2, [pids[2]])

    # A frame of a pulse that was not selected (a file written without the selection).
    with h5py.File(system.raw_dir / f"run_{run:06d}.{ONE}.h5", "r+") as file:
        file[f"data/{ONE}/pulse_id"][0, 0] = pids[1]
        file[f"data/{ONE}/requested_pulse_id"][0, 0] = pids[1]
    assert check(system, run, capsys) == (
        1,
        failed(
            f"{ONE} number of pulse_id is different from expected : 0 vs 2",
            f"{ONE} has 1 frames outside the selected pulse ids",
        ),
    )


async def test_pulse_picker_runs_keep_only_pulse_picker_events(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    pids = pulses()
    system.simulation.jungfrau.faults.event_bits[19] = PulseSelection.of(pids[1], pids[3])
    run = await system.request({FOUR: {"adc_to_energy": False, "save_ppicker_events_only": True}})
    system.pass_files()
    await written(system, 1)
    assert check(system, run, capsys)[0] == 0
    with h5py.File(system.raw_dir / f"run_{run:06d}.{FOUR}.h5", "r+") as file:
        assert file[f"data/{FOUR}/pulse_id"][:, 0].tolist() == [pids[1], pids[3]]
        file[f"data/{FOUR}/daq_rec"][1, 0] = 0
    assert check(system, run, capsys) == (
        1,
        failed(f"{FOUR} 1 frames are not pulse-picker events (daq_rec bit 19)"),
    )


def test_detector_options_the_check_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run file whose options no broker would have accepted: said, not guessed around."""
    folder = tmp_path / "raw" / "run_info" / "000000"
    folder.mkdir(parents=True)
    path = folder / "run_000001.json"
    record: dict[str, Any] = {
        "pgroup": "p12345",
        "run_number": 1,
        "start_pulseid": 1000,
        "stop_pulseid": 1099,
        "detectors": {ONE: {"roi": [10, 20, 30, 40]}},
    }
    path.write_text(json.dumps(record))
    assert main(["-r", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == failed(
        f"{path} is not a run file: detectors.{ONE}.roi is [10, 20, 30, 40], not "
        "{label: [y1, y2, x1, x2]} nor a list of [y1, y2, x1, x2]"
    )
    record["detectors"] = {ONE: {}}
    record["selected_pulse_ids"] = "all"
    path.write_text(json.dumps(record))
    assert main(["-r", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == failed(
        f"{path} is not a run file: selected_pulse_ids must be a list of pulse ids, got 'all'"
    )
