"""The confined handle: what it follows, what it refuses, and that h5py writes through it."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from sf_daq_broker.bookkeeping.confined import OutsideRaw, open_below, reach_below


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    (tmp_path / "raw" / "real" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return tmp_path / "raw"


def test_symlinks_that_stay_inside_are_followed_by_the_walk(raw: Path) -> None:
    os.symlink("real", raw / "relative")
    os.symlink(raw / "real" / "sub", raw / "absolute")
    os.symlink("../real", raw / "real" / "up")
    for link, resolved in [
        ("relative/sub", "real/sub"),
        ("absolute", "real/sub"),
        ("real/up/sub", "real/sub"),
    ]:
        with open_below(raw, link) as directory:
            assert str(directory.relative) == resolved
            directory.write_atomic("x.json", b"{}")
    assert (raw / "real" / "sub" / "x.json").read_bytes() == b"{}"


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("{outside}", "is a symlink to {outside}, outside {raw}"),
        ("../outside", "is above {raw}"),
        ("real/../../outside", "is above {raw}"),
    ],
)
def test_symlinks_that_lead_out_are_refused(raw: Path, target: str, why: str) -> None:
    outside = raw.parent / "outside"
    os.symlink(target.format(outside=outside), raw / "link")
    with pytest.raises(OutsideRaw) as error:
        open_below(raw, "link/new", create=True)
    assert why.format(outside=outside, raw=raw) in str(error.value)
    with pytest.raises(OutsideRaw):
        reach_below(raw, "link/not/yet/there")
    assert list(outside.iterdir()) == []


def test_a_file_in_the_way_and_a_missing_directory(raw: Path) -> None:
    (raw / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        open_below(raw, "file/sub", create=True)
    with pytest.raises(FileNotFoundError) as error:
        open_below(raw, "real/gone")
    assert error.value.filename == str(raw / "real" / "gone")
    reach_below(raw, "real/gone/deeper")  # inside as far as it exists: fine


def test_h5py_writes_the_created_file_and_publish_verifies_the_directory(raw: Path) -> None:
    with open_below(raw, "real/sub") as directory, directory.new_file(".f.partial") as temp:
        with h5py.File(temp.path, "w") as file:
            file["data"] = np.arange(5)
        temp.publish("f.h5")
    with h5py.File(raw / "real" / "sub" / "f.h5") as file:
        assert file["data"][:].tolist() == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(raw / "real" / "sub")) == ["f.h5"]

    # The directory is moved out and a symlink put in its place while the file is written.
    directory = open_below(raw, "real/sub")
    temp = directory.new_file(".g.partial")
    os.rename(raw / "real" / "sub", raw.parent / "outside" / "sub")
    os.symlink(raw.parent / "outside" / "sub", raw / "real" / "sub")
    with pytest.raises(OutsideRaw) as error:
        temp.publish("g.h5")
    assert str(error.value).startswith(f"{raw}/real/sub was replaced since the job started")
    temp.discard()
    directory.close()
    assert sorted(os.listdir(raw.parent / "outside" / "sub")) == ["f.h5"]


def test_file_names_are_never_followed(raw: Path) -> None:
    victim = raw.parent / "outside" / "victim"
    victim.write_bytes(b"mine")
    with open_below(raw, "real") as directory:
        os.symlink(victim, raw / "real" / "link")
        with pytest.raises(OSError, match="Too many levels of symbolic links"):
            directory.read_bytes("link")
        with pytest.raises(OSError, match="Too many levels of symbolic links"):
            directory.open_append("link")
        with pytest.raises(FileExistsError):
            directory.create_atomic("link", b"new")
        directory.touch("link")
        directory.write_atomic("link", b"new")  # replaces the symlink itself
    assert victim.read_bytes() == b"mine"
    assert (raw / "real" / "link").read_bytes() == b"new"
    with open_below(raw, "real") as directory, pytest.raises(ValueError, match="not a file name"):
        directory.write_atomic("a/b", b"")


def test_write_job_file_creates_directories_and_refuses_escapes(tmp_path: Path) -> None:
    from sf_daq_broker.jobs import Job, SourceKind
    from sf_daq_broker.workers.job_files import write_job_file

    raw = tmp_path / "raw"
    (raw / "run_info" / "000000").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    job = Job(
        job_id="j",
        request_id="r",
        kind=SourceKind.DETECTOR,
        source="JF01T03V01",
        names=("JF01T03V01",),
        start_pulse_id=1,
        stop_pulse_id=2,
        requested_start=1,
        requested_stop=2,
        rate_multiplicator=1,
        pgroup="p12345",
        beamline="bernina",
        run_number=1,
        output_file=str(raw / "d" / "run_000001.JF01T03V01.h5"),
        log_file=str(raw / "run_info" / "000000" / "run_000001.JF01T03V01.log"),
        run_info_file=str(raw / "run_info" / "000000" / "run_000001.json"),
        request_time="t",
    )
    write_job_file(job, raw / "d" / "lists" / "run_000001.lst", b"a\n")
    assert (raw / "d" / "lists" / "run_000001.lst").read_bytes() == b"a\n"
    os.symlink(tmp_path / "outside", raw / "JF_pedestals")
    with pytest.raises(OutsideRaw, match="is a symlink to"):
        write_job_file(job, "JF_pedestals/p.h5", b"x")
    with pytest.raises(OutsideRaw, match="is not below"):
        write_job_file(job, tmp_path / "outside" / "x", b"x")
    assert list((tmp_path / "outside").iterdir()) == []
