"""`sf-daq-broker convert` end to end: options, streaming, flags, and every error message."""

from __future__ import annotations

import argparse
import errno
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest

from sf_daq_broker import __version__
from sf_daq_broker.cli import main
from sf_daq_broker.h5.detector import DetectorFileWriter, FrameColumns
from sf_daq_broker.jungfrau import Converter, convert_command
from sf_daq_broker.jungfrau import cli as convert_cli
from tests.jungfrau.reference import reference_convert
from tests.jungfrau.support import random_calibration, random_raw

DET = "JF13T01V01"
ATTRIBUTES = {"pgroup": "p12345", "run_number": 3, "software_version": "0.0.1"}


def run_convert(argv: list[str]) -> int:
    """The convert sub-command alone (independent of the other sub-commands' imports)."""
    parser = argparse.ArgumentParser(prog="sf-daq-broker")
    convert_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", *argv])
    status: int = args.func(args)
    return status


def write_raw(
    path: Path,
    raw: np.ndarray,
    detector: str = DET,
    good: list[int] | None = None,
    daq_rec: list[int] | None = None,
) -> None:
    n = raw.shape[0]
    good = good if good is not None else [1] * n
    pulse_ids = [1000 + 10 * i if good[i] else 0 for i in range(n)]
    columns = FrameColumns.from_arrays(
        pulse_id=pulse_ids,
        frame_index=[7 + i if good[i] else 0 for i in range(n)],
        daq_rec=daq_rec or [0] * n,
        is_good_frame=good,
        requested_pulse_id=[1000 + 10 * i for i in range(n)],
    )
    with DetectorFileWriter(
        path, detector, n, raw.shape[1:], np.uint16, attributes=ATTRIBUTES
    ) as writer:
        writer.write(raw, columns)


@pytest.fixture
def setup(tmp_path: Path, write_calibration: Callable[..., tuple[Path, Path]]) -> dict[str, Any]:
    gain, pedestal, mask = random_calibration(1)
    gain_file, pedestal_file = write_calibration(gain, pedestal, mask)
    raw = random_raw(4, 1)
    raw[1] = 0  # the frame that never arrived
    raw_file = tmp_path / "run_000003.JF13T01V01.raw.h5"
    write_raw(raw_file, raw, good=[1, 0, 1, 1])
    return {
        "raw": raw,
        "gain": gain,
        "pedestal": pedestal,
        "mask": mask,
        "raw_file": raw_file,
        "out": tmp_path / "run_000003.JF13T01V01.h5",
        "cal": ["--gain-file", str(gain_file), "--pedestal-file", str(pedestal_file)],
    }


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {}),
        (["--factor", "2.5"], {"factor": 2.5}),
        (["--no-mask"], {"mask": False}),
        (["--no-mask-double-pixels"], {"mask_double_pixels": False}),
        (["--no-gap-pixels", "--geometry"], {"gap_pixels": False, "geometry": (0, [0], [0], [0])}),
        (["--no-adc-to-energy"], {"adc_to_energy": False}),
        (["--no-compression", "--factor", "3"], {"factor": 3.0}),
    ],
)
def test_convert_end_to_end(
    setup: dict[str, Any], flags: list[str], expected: dict[str, Any]
) -> None:
    status = run_convert([str(setup["raw_file"]), str(setup["out"]), *setup["cal"], *flags])
    assert status == 0
    reference = reference_convert(
        setup["raw"], setup["gain"], setup["pedestal"], setup["mask"], **expected
    )
    with h5py.File(setup["out"]) as file:
        assert dict(file.attrs) == {**ATTRIBUTES, "software_version": __version__}
        assert file["general/detector_name"][()] == DET.encode()
        group = file[f"data/{DET}"]
        data = group["data"]
        assert data.dtype == reference.dtype and data.chunks == (1, *reference.shape[1:])
        assert data[()].tobytes() == reference.tobytes()
        assert group["is_good_frame"][:, 0].tolist() == [1, 0, 1, 1]  # the bad frame is kept
        assert group["pulse_id"][:, 0].tolist() == [1000, 0, 1020, 1030]
        assert group["requested_pulse_id"][:, 0].tolist() == [1000, 1010, 1020, 1030]
        assert group["frame_index"][:, 0].tolist() == [7, 0, 9, 10]
        assert group["pixel_mask"].shape == reference.shape[1:]
        if expected.get("adc_to_energy", True):
            assert group["conversion_factor"][()] == expected.get("factor", 1.0)
        else:
            assert "conversion_factor" not in group
        filters = data.id.get_create_plist().get_nfilters()
        assert filters == (0 if "--no-compression" in flags else 1)
    leftovers = [p.name for p in setup["out"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary file stays behind


def test_disabled_modules_and_high_gain_from_first_good_frame(
    tmp_path: Path, write_calibration: Callable[..., tuple[Path, Path]]
) -> None:
    gain, pedestal, mask = random_calibration(2, gain_slices=6)
    gain_file, pedestal_file = write_calibration(gain, pedestal, mask)
    raw = random_raw(3, 2)
    raw_file = tmp_path / "raw.h5"
    # frame 0 is bad and says normal mode; the first good frame (1) says high gain
    write_raw(raw_file, raw, "JF77T02V01", good=[0, 1, 1], daq_rec=[0, 1, 0])
    out = tmp_path / "out.h5"
    status = run_convert(
        [
            str(raw_file),
            str(out),
            "--gain-file",
            str(gain_file),
            "--pedestal-file",
            str(pedestal_file),
            "--disabled-modules",
            "0",
        ]
    )
    assert status == 0
    expected = reference_convert(raw, gain, pedestal, mask, highgain=True, disabled_modules=(0,))
    with h5py.File(out) as file:
        assert file["data/JF77T02V01/data"][()].tobytes() == expected.tobytes()


def test_streams_in_batches(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    run_convert([str(setup["raw_file"]), str(setup["out"]), *setup["cal"]])
    with h5py.File(setup["out"]) as file:
        whole = file[f"data/{DET}/data"][()]
    batches: list[int] = []
    original = Converter.convert

    def counting(self: Converter, raw: np.ndarray, out: Any = None) -> Any:
        batches.append(raw.shape[0])
        return original(self, raw, out)

    monkeypatch.setattr(Converter, "convert", counting)
    monkeypatch.setattr(convert_command, "BATCH_BYTES", 3 * 512 * 1024 * 2)  # 3 frames
    assert run_convert([str(setup["raw_file"]), str(setup["out"]), *setup["cal"]]) == 0
    assert batches == [3, 1]
    with h5py.File(setup["out"]) as file:
        assert file[f"data/{DET}/data"][()].tobytes() == whole.tobytes()


def test_failure_mid_way_leaves_no_file(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []
    original = Converter.convert

    def failing(self: Converter, raw: np.ndarray, out: Any = None) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(setup["out"]))
        return original(self, raw, out)

    monkeypatch.setattr(Converter, "convert", failing)
    monkeypatch.setattr(convert_command, "BATCH_BYTES", 2 * 512 * 1024 * 2)
    assert run_convert([str(setup["raw_file"]), str(setup["out"]), *setup["cal"]]) == 1
    assert capsys.readouterr().err == (
        f"sf-daq-broker convert: No space left on device: {setup['out']}\n"
    )
    assert [p.name for p in setup["out"].parent.iterdir() if "JF13" in p.name] == [
        setup["raw_file"].name
    ]


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert run_convert(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1
    return captured.err.removeprefix("sf-daq-broker convert: ").rstrip("\n")


def test_error_missing_and_foreign_files(
    setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(setup["out"])
    missing = tmp_path / "missing.h5"
    assert _error([str(missing), out, *setup["cal"]], capsys) == f"{missing} does not exist"

    text = tmp_path / "notes.h5"
    text.write_text("hello")
    assert _error([str(text), out, *setup["cal"]], capsys).startswith(
        f"{text} is not an HDF5 file ("
    )

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as file:
        file["data"] = np.zeros(3)
    assert _error([str(foreign), out, *setup["cal"]], capsys) == (
        f"{foreign} is not a raw Jungfrau file: no scalar string /general/detector_name"
    )

    converted = tmp_path / "converted.h5"
    with DetectorFileWriter(converted, DET, 1, (512, 1024), np.float32) as writer:
        writer.write(np.zeros((1, 512, 1024), np.float32), _one_row())
    assert _error([str(converted), out, *setup["cal"]], capsys) == (
        f"{converted} is not a raw Jungfrau file: /data/{DET}/data is float32 (1, 512, 1024), "
        "raw frames are uint16 (N, 512*n_modules, 1024)"
    )
    assert not setup["out"].exists()


def _one_row() -> FrameColumns:
    return FrameColumns.from_arrays(
        pulse_id=[1], frame_index=[1], daq_rec=[0], is_good_frame=[1], requested_pulse_id=[1]
    )


def test_error_calibration(
    setup: dict[str, Any],
    write_calibration: Callable[..., tuple[Path, Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    gain_file, pedestal_file = write_calibration(
        np.ones((3, 512, 1024)), setup["pedestal"], setup["mask"], name="three"
    )
    argv = [str(setup["raw_file"]), str(setup["out"]), "--gain-file", str(gain_file)]
    assert _error([*argv, "--pedestal-file", str(pedestal_file)], capsys) == (
        f"gain file {gain_file}: /gains has 3 slices; 4 (G0, G1, G2, HG0) or 6 (G0, G1, G2, "
        "HG0, HG1, HG2) are needed (a 3-slice gain map must be expanded to 6 by copying "
        "G0..G2 into HG0..HG2)"
    )
    gain_file, pedestal_file = write_calibration(
        setup["gain"], setup["pedestal"], np.zeros((512, 1024), np.float32), name="fmask"
    )
    argv = [str(setup["raw_file"]), str(setup["out"]), "--gain-file", str(gain_file)]
    assert _error([*argv, "--pedestal-file", str(pedestal_file)], capsys) == (
        f"pedestal file {pedestal_file}: /pixel_mask has dtype float32; int64 or bool is needed"
    )
    gain_file, pedestal_file = write_calibration(*random_calibration(2), name="two")
    argv = [str(setup["raw_file"]), str(setup["out"]), "--gain-file", str(gain_file)]
    assert _error([*argv, "--pedestal-file", str(pedestal_file)], capsys) == (
        "the calibration covers 2 modules (1024 rows), detector JF13T01V01 has 1 (512 rows)"
    )


def test_error_strip_detector(
    setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strip = tmp_path / "strip.h5"
    write_raw(strip, setup["raw"][:1], "JF05T01V01")
    assert _error([str(strip), str(setup["out"]), *setup["cal"]], capsys) == (
        "JF05T01V01 has strip sensors, whose pixel remapping is not supported; it cannot be "
        "converted (retrieve it with adc_to_energy false)"
    )


def test_error_frames_do_not_match_detector_name(
    tmp_path: Path,
    write_calibration: Callable[..., tuple[Path, Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    gain_file, pedestal_file = write_calibration(*random_calibration(2))
    raw_file = tmp_path / "raw.h5"
    write_raw(raw_file, random_raw(1, 1), "JF77T02V01")
    argv = [str(raw_file), str(tmp_path / "o.h5"), "--gain-file", str(gain_file)]
    assert _error([*argv, "--pedestal-file", str(pedestal_file)], capsys) == (
        f"{raw_file}: frames are (512, 1024), detector JF77T02V01 has (1024, 1024)"
    )


def test_error_options_and_output(
    setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, out = str(setup["raw_file"]), str(setup["out"])
    assert _error([raw, out, *setup["cal"], "--disabled-modules", "0,x"], capsys) == (
        "disabled modules must be comma-separated integers, not '0,x'"
    )
    assert _error([raw, out, *setup["cal"], "--disabled-modules", "1"], capsys) == (
        "disabled_modules: module 1 does not exist (the detector has 1 modules, 0..0)"
    )
    assert _error([raw, out, *setup["cal"], "--factor", "-1"], capsys) == (
        "factor must be a positive number, not -1.0"
    )
    assert _error([raw, raw, *setup["cal"]], capsys) == (
        f"{raw} is the input file; choose another output file"
    )
    nowhere = tmp_path / "no" / "out.h5"
    assert _error([raw, str(nowhere), *setup["cal"]], capsys) == (
        f"output directory {nowhere.parent} does not exist"
    )
    assert not setup["out"].exists()


def test_registered_in_the_main_command(setup: dict[str, Any]) -> None:
    assert main(["convert", str(setup["raw_file"]), str(setup["out"]), *setup["cal"]]) == 0
    assert setup["out"].is_file()


def test_console_command_prints_one_line(setup: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "missing.h5"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sf_daq_broker",
            "convert",
            str(missing),
            str(setup["out"]),
            *setup["cal"],
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == f"sf-daq-broker convert: {missing} does not exist\n"
