"""`sf-daq-broker convert --options` beyond the vectors: frame selection by pulse id and by the
pulse picker, CrystFEL lists, the raw layout, and the one-line errors of bad options."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401
import pytest

from sf_daq_broker.cli import main
from tests.jungfrau.next_vectors import write_raw_file
from tests.jungfrau.reference import reference_convert
from tests.jungfrau.support import random_calibration, random_raw

DET = "JF13T01V01"
LASER, DARKSHOT, PPICKER = 1 << 16, 1 << 17, 1 << 19


@pytest.fixture
def files(tmp_path: Path, write_calibration: Callable[..., tuple[Path, Path]]) -> dict[str, Any]:
    gain, pedestal, mask = random_calibration(1)
    gain_file, pedestal_file = write_calibration(gain, pedestal, mask)
    raw = random_raw(6, 1)
    raw_file = tmp_path / f"run_000007.{DET}.raw.h5"
    write_raw_file(
        raw_file,
        DET,
        raw,
        pulse_id=[100, 0, 102, 103, 104, 105],
        frame_index=range(6),
        # frame 1 never arrived; laser on 0, 2 (with darkshot), 4; pulse picker on 2, 3, 4
        daq_rec=[LASER, 0, LASER | DARKSHOT | PPICKER, PPICKER, LASER | PPICKER, 0],
        is_good_frame=[1, 0, 1, 1, 1, 1],
    )
    return {
        "raw": raw,
        "calibration": (gain, pedestal, mask),
        "raw_file": raw_file,
        "out": tmp_path / f"run_000007.{DET}.h5",
        "cal": ["--gain-file", str(gain_file), "--pedestal-file", str(pedestal_file)],
    }


def convert(files: dict[str, Any], *argv: str) -> int:
    return main(["convert", str(files["raw_file"]), str(files["out"]), *files["cal"], *argv])


def test_selection_and_crystfel_lists(files: dict[str, Any]) -> None:
    options = {"save_ppicker_events_only": True, "crystfel_lists_laser": True, "factor": 2.0}
    status = convert(
        files, "--options", json.dumps(options), "--selected-pulse-ids", "100", "101", "102", "104"
    )
    assert status == 0
    kept = [2, 4]  # selected, good and with the pulse picker's bit (frame 1 is not good)
    gain, pedestal, mask = files["calibration"]
    expected = reference_convert(files["raw"][kept], gain, pedestal, mask, factor=2.0)
    out = files["out"]
    with h5py.File(out) as file:
        group = file[f"data/{DET}"]
        assert group["data"][()].tobytes() == expected.tobytes()
        assert group["pulse_id"][:, 0].tolist() == [102, 104]
        assert group["frame_index"][:, 0].tolist() == kept
    dark = out.with_name(f"run_000007.{DET}.dark.lst")
    light = out.with_name(f"run_000007.{DET}.light.lst")
    assert dark.read_text() == f"{out} //0\n"  # laser with darkshot: dark
    assert light.read_text() == f"{out} //1\n"


def test_request_semantics_of_adc_to_energy_false(files: dict[str, Any]) -> None:
    """A request's adc_to_energy false is the raw layout (conversion options ignored);
    without a selection every frame is kept, the bad one flagged."""
    options = {"adc_to_energy": False, "geometry": True, "crystfel_lists_laser": True}
    assert convert(files, "--options", json.dumps(options)) == 0
    with h5py.File(files["out"]) as file:
        group = file[f"data/{DET}"]
        assert group["data"][()].tobytes() == files["raw"].tobytes()
        assert sorted(group) == [
            "daq_rec",
            "data",
            "frame_index",
            "is_good_frame",
            "pulse_id",
            "requested_pulse_id",
        ]
    out = files["out"]
    # good frames only: 0, 2 (darkshot), 3, 5 dark; 0 and 4 light
    assert out.with_name(f"run_000007.{DET}.dark.lst").read_text() == "".join(
        f"{out} //{i}\n" for i in (2, 3, 5)
    )
    assert out.with_name(f"run_000007.{DET}.light.lst").read_text() == "".join(
        f"{out} //{i}\n" for i in (0, 4)
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--options", "{roi"], "--options is not JSON: Expecting property name enclosed in "),
        (
            ["--options", "{}", "--factor", "2", "--no-mask"],
            "--options replaces the option flags; drop --mask, --factor",
        ),
        (
            ["--options", '{"roi": [0, 10, 0, 10]}'],
            f"detectors.{DET}.roi must be an object of label: [y1, y2, x1, x2] or a list of such "
            "lists, got [0, 10, 0, 10] (one region is [[y1, y2, x1, x2]])",
        ),
        (
            ["--options", '{"double_pixels_action": "interp", "gap_pixels": false}'],
            f"detectors.{DET}: double_pixels_action 'interp' needs gap_pixels: the interpolated "
            "values are spread into the gap pixels",
        ),
        (["--options", "[]"], f"detectors.{DET} must be an object of options, got []"),
    ],
)
def test_bad_options_are_one_line_errors(
    files: dict[str, Any], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert convert(files, *argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sf-daq-broker convert: {message}")
    assert err.count("\n") == 1
    assert not files["out"].exists()
