"""check.py on runs made by the real broker, with files written as the workers write them.

Each test makes a run through ``POST /retrieve_from_buffers``, takes its jobs, writes the files
of the jobs (``write_channels`` for channels, cameras and PVs; plain h5py for the detector, in
the layout of SPEC §5.4) with one fault or none, and reads what check says about it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bitshuffle
import h5py
import numpy as np
import pytest

from sf_daq_broker.bookkeeping.atomic import partial_path
from sf_daq_broker.h5.atomic import temporary_name
from sf_daq_broker.h5.channels import ChannelRows, CompressedImages, provenance, write_channels
from sf_daq_broker.jobs import RETRIEVAL_KINDS, Job
from sf_daq_broker.tools.check import main
from tests.support import PATIENCE
from tests.tools.support import REPO, LiveBroker, take_job

START, STOP = 11884948800, 11884948899  # 100 pulses
T0_NS = 1_700_000_000 * 10**9
PROFILE = "SARES11-SPEC125-M1.roi_signal_x_profile"
EVENTS = "SAR-CVME-TIFALL5:EvtSet"
CAMERA = "SARES11-SPEC125-M1:FPICTURE"
PV = "SARFE10-OAPU044:SPECTRUM_CENTER"
DETECTOR = "JF13T01V01"  # one module


@dataclass
class Run:
    run_file: Path
    jobs: dict[str, Job]

    def file(self, source: str) -> Path:
        return Path(self.jobs[source].output_file)


@pytest.fixture
async def make_run(broker: LiveBroker) -> Callable[..., Awaitable[Run]]:
    async def make(rate: int = 1, **fields: Any) -> Run:
        request = {
            **fields,
            "pgroup": "p12345",
            "directory_name": "check/test",
            "start_pulseid": START,
            "stop_pulseid": STOP,
            "rate_multiplicator": rate,
            "channels_list": [PROFILE, EVENTS],
            "camera_list": [CAMERA],
            "pv_list": [PV],
            "detectors": {DETECTOR: {"adc_to_energy": False}},
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{broker.url}/retrieve_from_buffers", json=request) as response,
        ):
            assert response.status == 200, await response.text()
        jobs = {}
        for kind in RETRIEVAL_KINDS:
            job = await take_job(broker.transport, kind)
            jobs[job.source] = job
        return Run(Path(next(iter(jobs.values())).run_info_file), jobs)

    return make


def per_pulse(job: Job, drop: Collection[int] = ()) -> np.ndarray:
    """A 100 Hz source over the job's range (the widened one), without the ``drop`` pulses."""
    pulse_ids = np.arange(job.start_pulse_id, job.stop_pulse_id + 1, dtype=np.int64)
    return pulse_ids[~np.isin(pulse_ids, list(drop))]


def timestamps(pulse_ids: np.ndarray) -> np.ndarray:
    return T0_NS + (pulse_ids - START) * 10_000_000


def write_bsdata(
    job: Job,
    drop: Collection[int] = (),
    omit: Collection[str] = (),
    scale: int = 1,
    attributes: dict[str, Any] | None = None,
) -> None:
    rows = []
    for name in job.names:
        if name in omit:
            continue
        pulse_ids = per_pulse(job, drop if name == PROFILE else ())
        values = (
            np.ones((pulse_ids.size, 8), np.float32)
            if name == PROFILE
            else pulse_ids.astype(np.int32) % 7
        )
        rows.append(ChannelRows(name, pulse_ids, timestamps(pulse_ids) // scale, values))
    write_channels(Path(job.output_file), {**provenance(job), **(attributes or {})}, rows)


def write_cameras(job: Job) -> None:
    pulse_ids = per_pulse(job)
    blobs = []
    for pulse_id in pulse_ids:
        image = np.full((4, 6), pulse_id % 100, np.uint16)
        header = np.array([image.nbytes], ">u8").tobytes() + np.array([8192], ">u4").tobytes()
        blobs.append(header + bitshuffle.compress_lz4(image, 8192 // 2).tobytes())
    images = CompressedImages(blobs, (4, 6), np.dtype(np.uint16))
    rows = [ChannelRows(CAMERA, pulse_ids, timestamps(pulse_ids), images)]
    write_channels(Path(job.output_file), provenance(job), rows)


def write_pvs(job: Job, changed: tuple[bool, ...] = (False, True, True)) -> None:
    pulse_ids = np.array([START - 37, START + 10, START + 60], np.int64)
    rows = [
        ChannelRows(
            PV,
            pulse_ids,
            timestamps(pulse_ids) + 1234,
            np.array([531.5, 532.0, 532.5]),
            extra={"changed_in_interval": np.array(changed)},
        )
    ]
    write_channels(Path(job.output_file), provenance(job), rows)


def write_detector(job: Job, bad_frames: int = 0, drop: Collection[int] = ()) -> None:
    """SPEC §5.4 raw layout; the image chunks are left unwritten (fill value) to stay small."""
    rate = job.rate_multiplicator
    pulse_ids = np.arange(job.start_pulse_id, job.stop_pulse_id + 1, rate, dtype=np.uint64)
    pulse_ids = pulse_ids[~np.isin(pulse_ids, list(drop))]
    count = pulse_ids.size
    good = np.ones((count, 1), np.uint8)
    good[:bad_frames] = 0
    with h5py.File(job.output_file, "w") as file:
        file.attrs.update(provenance(job))
        file["general/detector_name"] = DETECTOR
        group = file.create_group(f"data/{DETECTOR}")
        group.create_dataset(
            "data", shape=(count, 512, 1024), dtype=np.uint16, chunks=(1, 512, 1024)
        )
        group["pulse_id"] = pulse_ids.reshape(count, 1)
        group["frame_index"] = np.arange(count, dtype=np.uint64).reshape(count, 1)
        group["daq_rec"] = np.zeros((count, 1), np.uint32)
        group["is_good_frame"] = good


def write_all(run: Run, skip: Collection[str] = ()) -> None:
    writers = {
        "BSDATA": write_bsdata,
        "CAMERAS": write_cameras,
        "PVCHANNELS": write_pvs,
        DETECTOR: write_detector,
    }
    for source, writer in writers.items():
        if source not in skip:
            writer(run.jobs[source])


def check(run: Run, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, list[str]]:
    status = main(["-r", str(run.run_file), *options])
    return status, capsys.readouterr().out.splitlines()


def failed(*reasons: str) -> list[str]:
    return [
        "Result of consistency check (summary) : False",
        *(f"    Reason : {reason}" for reason in reasons),
    ]


async def test_a_good_run_passes(make_run: Callable[..., Awaitable[Run]], raw_dir: Path) -> None:
    """``python check.py -r …`` as in the seed; camera data needs the bitshuffle filter."""
    run = await make_run()
    assert run.run_file == raw_dir / "run_info" / "000000" / "run_000001.json"
    write_all(run)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "check.py",
        "-r",
        str(run.run_file),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), PATIENCE)
    assert stdout.decode().splitlines() == [
        "Result of consistency check (summary) : True",
        "    OK : all tests passed (4 sources, 100 beam pulses at rate 1/1)",
    ]
    assert (process.returncode, stderr) == (0, b"")


async def test_missing_channel(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run()
    write_all(run, skip={"BSDATA"})
    write_bsdata(run.jobs["BSDATA"], omit={EVENTS})
    assert check(run, capsys) == (
        1,
        failed(f"channel {EVENTS} requested but not present in BSDATA file"),
    )


async def test_missing_pulses_are_counted_inside_the_requested_range_only(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run()
    write_all(run, skip={"BSDATA"})
    # START - 1 and STOP + 1 are the widened edges (SPEC §3): their absence is no problem.
    write_bsdata(run.jobs["BSDATA"], drop={START - 1, START + 5, START + 6, STOP + 1})
    assert check(run, capsys) == (
        1,
        failed(f"{PROFILE} number of pulse_id is different from expected : 98 vs 100"),
    )
    assert main(["-r", str(run.run_file), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["check"] is False
    assert result["sources"]["BSDATA"]["names"][PROFILE] == {
        "expected": 100,
        "found": 98,
        "missing": 2,
        "missing_pulse_ids": [START + 5, START + 6],
    }
    assert result["sources"]["BSDATA"]["names"][EVENTS]["missing"] == 0


async def test_bad_and_missing_detector_frames(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run()
    write_all(run, skip={DETECTOR})
    write_detector(run.jobs[DETECTOR], bad_frames=3, drop={START + 50, START + 51})
    assert check(run, capsys) == (
        1,
        failed(
            f"{DETECTOR} number of pulse_id is different from expected : 98 vs 100",
            f"{DETECTOR} there are bad frames : 3 out of 98",
        ),
    )


async def test_missing_file_and_file_still_being_written(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run()
    write_all(run, skip={"CAMERAS", DETECTOR})
    cameras = run.file("CAMERAS")
    partial_path(Path(run.jobs[DETECTOR].output_file), "worker").write_bytes(
        b"\x89HDF half"
    )  # a worker is at it
    assert check(run, capsys) == (
        1,
        failed(
            f"CAMERAS file {cameras} does not exist",
            f"detector file {run.file(DETECTOR)} is still being written",
        ),
    )


async def test_unreadable_file(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run()
    write_all(run, skip={"PVCHANNELS"})
    pvs = run.file("PVCHANNELS")
    pvs.write_bytes(b"not HDF5 at all")
    status, lines = check(run, capsys)
    assert status == 1
    assert lines[:1] == ["Result of consistency check (summary) : False"]
    assert len(lines) == 2
    assert lines[1].startswith(f"    Reason : Can not read from PVCHANNELS file {pvs} : ")
    assert "file signature not found" in lines[1]
    # The same bytes while a worker rewrites the file (a redelivered job): being written.
    partial_path(Path(run.jobs["PVCHANNELS"].output_file), "worker").write_bytes(b"")
    assert check(run, capsys) == (1, failed(f"PVCHANNELS file {pvs} is still being written"))


async def test_disordered_and_implausible_timestamps(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run()
    write_all(run, skip={"BSDATA"})
    write_bsdata(run.jobs["BSDATA"], scale=1000)  # µs instead of ns
    low, high = (T0_NS - 10_000_000) // 1000, (T0_NS + 1_000_000_000) // 1000
    assert check(run, capsys) == (
        1,
        failed(
            f"{PROFILE} timestamps are not ns since the epoch : {low} .. {high}",
            f"{EVENTS} timestamps are not ns since the epoch : {low} .. {high}",
        ),
    )
    job = run.jobs["BSDATA"]
    pulse_ids = per_pulse(job)
    pulse_ids[[3, 4]] = pulse_ids[[4, 3]]
    rows = [ChannelRows(EVENTS, pulse_ids, timestamps(pulse_ids), np.zeros(pulse_ids.size))]
    write_channels(Path(job.output_file), provenance(job), rows)
    assert check(run, capsys) == (
        1,
        failed(
            f"channel {PROFILE} requested but not present in BSDATA file",
            f"{EVENTS} pulse_id are not monotonic",
            f"{EVENTS} timestamps are not increasing",
        ),
    )


async def test_pv_changed_in_interval_must_be_consistent(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run()
    write_all(run, skip={"PVCHANNELS"})
    write_pvs(run.jobs["PVCHANNELS"], changed=(True, False, True))
    assert check(run, capsys) == (
        1,
        failed(
            f"{PV} changed_in_interval is false for a value that is not the first",
            f"{PV} 1 values marked changed_in_interval are outside the interval {START}-{STOP}",
        ),
    )


async def test_file_of_another_run(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run()
    write_all(run, skip={"BSDATA"})
    write_bsdata(run.jobs["BSDATA"], attributes={"run_number": 7})
    assert check(run, capsys) == (1, failed(f"BSDATA file {run.file('BSDATA')} belongs to run 7"))


async def test_reduced_rate(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    """At 50 Hz the 100 Hz channels hold twice the rows: only the beam pulses count."""
    run = await make_run(rate=2)
    write_all(run)
    assert check(run, capsys) == (
        0,
        [
            "Result of consistency check (summary) : True",
            "    OK : all tests passed (4 sources, 50 beam pulses at rate 1/2)",
        ],
    )
    # Judged at 100 Hz instead, the detector lacks every other frame.
    assert check(run, capsys, "--frequency_reduction_factor", "1") == (
        1,
        failed(f"{DETECTOR} number of pulse_id is different from expected : 50 vs 100"),
    )


async def test_a_run_file_kept_elsewhere_is_checked_where_its_pgroup_is(
    make_run: Callable[..., Awaitable[Run]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    data_root: Path,
) -> None:
    """A copy of run_000001.json in a user's folder: the files are looked for in
    {data_root}/{beamline}/data/{pgroup}/raw, data_root from $SF_DAQ_DATA_ROOT (else /sf)."""
    run = await make_run()
    write_all(run, skip={"CAMERAS"})
    copy = tmp_path / "mine" / "run_000001.json"
    copy.parent.mkdir()
    copy.write_bytes(run.run_file.read_bytes())
    monkeypatch.setenv("SF_DAQ_DATA_ROOT", str(data_root))
    copied = Run(copy, run.jobs)
    assert check(copied, capsys) == (
        1,
        failed(f"CAMERAS file {run.file('CAMERAS')} does not exist"),
    )
    monkeypatch.delenv("SF_DAQ_DATA_ROOT")
    status, lines = check(copied, capsys)
    assert status == 1
    assert lines[1] == (
        "    Reason : BSDATA file /sf/bernina/data/p12345/raw/check/test/run_000001.BSDATA.h5 "
        "does not exist"
    )


async def test_a_temporary_file_of_any_writer_means_being_written(
    make_run: Callable[..., Awaitable[Run]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker loop's fixed temporary name and ``atomic_output``'s unique one alike."""
    run = await make_run()
    write_all(run, skip={DETECTOR})
    detector = run.file(DETECTOR)
    temporary_name(detector).write_bytes(b"\x89HDF")  # what atomic_output writes into
    assert check(run, capsys) == (1, failed(f"detector file {detector} is still being written"))


async def test_a_tagged_run_is_checked_under_its_tagged_names(
    make_run: Callable[..., Awaitable[Run]], raw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = await make_run(user_tag="dark", append_user_tag_to_data_dir=True)
    assert run.file("BSDATA") == raw_dir / "check/test/run_000001-dark.BSDATA.h5"
    write_all(run)
    assert check(run, capsys) == (
        0,
        [
            "Result of consistency check (summary) : True",
            "    OK : all tests passed (4 sources, 100 beam pulses at rate 1/1)",
        ],
    )


@pytest.mark.parametrize("factor", ["3", "-1", "200"])
def test_only_beam_rates_are_frequency_reduction_factors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], factor: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["-r", str(tmp_path / "run_000001.json"), "--frequency_reduction_factor", factor])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            "error: --frequency_reduction_factor must be one of the beam rates 1, 2, 4, 8, 10, 20, "
            f"40, 50, 100 (or 0: the run's own rate), got {factor}"
        )
    )


def test_run_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "run_000001.json"
    assert main(["-r", str(missing)]) == 1
    assert capsys.readouterr().out.splitlines() == failed(f"{missing} does not exist")
    assert main(["-r", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == failed(f"{tmp_path} is not a file")
    not_json = tmp_path / "run_000002.json"
    not_json.write_text("{")
    assert main(["-r", str(not_json)]) == 1
    assert capsys.readouterr().out.splitlines() == failed(
        f"Can't read provided run file {not_json}, may be not json? "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    )
    not_a_run = tmp_path / "run_000003.json"
    not_a_run.write_text('{"pgroup": "p12345", "run_number": 3, "start_pulseid": 1}')
    assert main(["-r", str(not_a_run)]) == 1
    assert capsys.readouterr().out.splitlines() == failed(
        f"{not_a_run} is not a run file: stop_pulseid is missing"
    )
    not_a_run.write_text(
        '{"pgroup": "p12345", "run_number": 3, "start_pulseid": "1", "stop_pulseid": 2}'
    )
    assert main(["-r", str(not_a_run)]) == 1
    assert capsys.readouterr().out.splitlines() == failed(
        f"{not_a_run} is not a run file: start_pulseid is '1'"
    )
    good = {"pgroup": "p12345", "run_number": 3, "start_pulseid": 5, "stop_pulseid": 9}
    for key, value, shown in [
        ("rate_multiplicator", 0, "rate_multiplicator is 0"),
        ("stop_pulseid", 4, "stop_pulseid is 4"),
        ("directory_name", 7, "directory_name is 7"),
        ("channels_list", "SAR-CVME-TIFALL5:EvtSet", "channels_list is not a list of names"),
        ("pv_list", [""], "pv_list is not a list of names"),
        ("detectors", ["JF13T01V01"], "detectors is not an object"),
    ]:
        not_a_run.write_text(json.dumps({**good, key: value}))
        assert main(["-r", str(not_a_run)]) == 1
        assert capsys.readouterr().out.splitlines() == failed(
            f"{not_a_run} is not a run file: {shown}"
        )
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2
