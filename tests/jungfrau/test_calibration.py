"""Gain and pedestal files: what is accepted, and the exact message for what is not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from sf_daq_broker.jungfrau import (
    Calibration,
    CalibrationError,
    ConversionOptions,
    Converter,
    load_calibration,
)
from tests.jungfrau.support import random_calibration

WriteCalibration = Callable[..., tuple[Path, Path]]
H, W = 512, 1024


def test_files_are_read_and_cast_to_float32(write_calibration: WriteCalibration) -> None:
    gain, pedestal, mask = random_calibration(1, gain_slices=6, pedestal_slices=4)
    gain_file, pedestal_file = write_calibration(gain, pedestal, mask)
    calibration = load_calibration(gain_file, pedestal_file)
    assert calibration.gain.dtype == np.float32 and calibration.gain.shape == (6, H, W)
    assert calibration.pedestal.dtype == np.float32 and calibration.pedestal.shape == (4, H, W)
    np.testing.assert_array_equal(calibration.gain, gain.astype(np.float32))
    assert calibration.pixel_mask.dtype == np.int64
    assert calibration.n_modules == 1


def test_bool_mask_is_accepted(write_calibration: WriteCalibration) -> None:
    gain, pedestal, mask = random_calibration(1)
    calibration = load_calibration(*write_calibration(gain, pedestal, mask != 0))
    assert calibration.pixel_mask.dtype == np.bool_


def _message(gain_file: Path, pedestal_file: Path) -> str:
    with pytest.raises(CalibrationError) as error:
        load_calibration(gain_file, pedestal_file)
    return str(error.value)


GAIN_SLICES = (
    "4 (G0, G1, G2, HG0) or 6 (G0, G1, G2, HG0, HG1, HG2) are needed (a 3-slice gain map "
    "must be expanded to 6 by copying G0..G2 into HG0..HG2)"
)


def test_three_slice_gain_is_refused(write_calibration: WriteCalibration) -> None:
    _, pedestal, mask = random_calibration(1)
    gain_file, pedestal_file = write_calibration(np.ones((3, H, W)), pedestal, mask)
    assert _message(gain_file, pedestal_file) == (
        f"gain file {gain_file}: /gains has 3 slices; {GAIN_SLICES}"
    )


@pytest.mark.parametrize(
    ("gain_shape", "problem"),
    [
        ((4, 500, W), "has shape (4, 500, 1024); frames must be (512*n_modules, 1024)"),
        ((4, H, 1030), "has shape (4, 512, 1030); frames must be (512*n_modules, 1024)"),
        ((H, W), "has shape (512, 1024); (slices, 512*n_modules, 1024) is needed"),
    ],
)
def test_gain_shapes(
    write_calibration: WriteCalibration, gain_shape: tuple[int, ...], problem: str
) -> None:
    _, pedestal, mask = random_calibration(1)
    gain_file, pedestal_file = write_calibration(np.ones(gain_shape), pedestal, mask)
    assert _message(gain_file, pedestal_file) == f"gain file {gain_file}: /gains {problem}"


def test_integer_gain_is_refused(write_calibration: WriteCalibration) -> None:
    _, pedestal, mask = random_calibration(1)
    gain_file, pedestal_file = write_calibration(np.ones((4, H, W), np.int32), pedestal, mask)
    assert _message(gain_file, pedestal_file) == (
        f"gain file {gain_file}: /gains has dtype int32; a float dtype is needed"
    )


def test_pedestal_slices(write_calibration: WriteCalibration) -> None:
    gain, _, mask = random_calibration(1)
    gain_file, pedestal_file = write_calibration(gain, np.ones((5, H, W)), mask)
    assert _message(gain_file, pedestal_file) == (
        f"pedestal file {pedestal_file}: /gains has 5 slices; "
        "3 (G0, G1, G2) or 4 (G0, G1, G2, HG0) are needed"
    )


def test_pedestal_frames_must_match_gain(write_calibration: WriteCalibration) -> None:
    gain, _, mask = random_calibration(1)
    gain_file, pedestal_file = write_calibration(gain, np.ones((3, 2 * H, W)), mask)
    assert _message(gain_file, pedestal_file) == (
        f"pedestal file {pedestal_file}: /gains frames are (1024, 1024), the gain file's are "
        "(512, 1024)"
    )


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8, np.int16])
def test_mask_dtypes_other_than_int64_and_bool_are_refused(
    write_calibration: WriteCalibration, dtype: type
) -> None:
    gain, pedestal, _ = random_calibration(1)
    gain_file, pedestal_file = write_calibration(gain, pedestal, np.zeros((H, W), dtype))
    assert _message(gain_file, pedestal_file) == (
        f"pedestal file {pedestal_file}: /pixel_mask has dtype {np.dtype(dtype)}; "
        "int64 or bool is needed"
    )


def test_mask_shape(write_calibration: WriteCalibration) -> None:
    gain, pedestal, _ = random_calibration(1)
    gain_file, pedestal_file = write_calibration(gain, pedestal, np.zeros((H, 512), np.int64))
    assert _message(gain_file, pedestal_file) == (
        f"pedestal file {pedestal_file}: /pixel_mask has shape (512, 512); (512, 1024) is needed"
    )


def test_missing_files_and_datasets(write_calibration: WriteCalibration, tmp_path: Path) -> None:
    gain, pedestal, mask = random_calibration(1)
    gain_file, pedestal_file = write_calibration(gain, pedestal, mask)
    assert _message(tmp_path / "no.h5", pedestal_file) == (
        f"gain file {tmp_path / 'no.h5'} does not exist"
    )
    with h5py.File(pedestal_file, "a") as file:
        del file["pixel_mask"]
    assert _message(gain_file, pedestal_file) == (
        f"pedestal file {pedestal_file}: no dataset /pixel_mask"
    )
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    assert _message(text, pedestal_file).startswith(f"gain file {text} cannot be read as HDF5: ")


def test_calibration_must_cover_the_detector() -> None:
    calibration = Calibration.from_arrays(*random_calibration(1))
    with pytest.raises(CalibrationError) as error:
        Converter("JF06T04V01", calibration)
    assert str(error.value) == (
        "the calibration covers 1 modules (512 rows), detector JF06T04V01 has 4 (2048 rows)"
    )


def test_disabled_modules_still_need_the_whole_calibration() -> None:
    calibration = Calibration.from_arrays(*random_calibration(3))
    with pytest.raises(CalibrationError):
        Converter("JF06T04V01", calibration, ConversionOptions(disabled_modules=(3,)))
