"""Pedestal files (UPSTREAM_HEAD §4): every pedestal case of ``jungfrau_next`` byte for byte
through ``sf-daq-broker pedestal``, streaming, the "no good pixel" failure, the round trip into
a conversion, and the errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from sf_daq_broker.cli import main
from sf_daq_broker.config import load_settings
from sf_daq_broker.h5.detector import DetectorFileError
from sf_daq_broker.jungfrau import Calibration, ConversionError, Converter
from sf_daq_broker.jungfrau.errors import CalibrationError
from sf_daq_broker.jungfrau.pedestal import NoGoodPixel, compute_pedestal
from tests.jungfrau.next_vectors import NEXT, cases, digest, write_pedestal_inputs, write_raw_file
from tests.jungfrau.reference import reference_convert
from tests.jungfrau.support import random_calibration, require_testdata

DET = "JF13T01V01"


def _cli_arguments(case: dict[str, Any], raw_file: Path, mask_file: Path | None) -> list[str]:
    options = case["options"]
    argv = [
        "pedestal",
        str(raw_file),
        "--output",
        str(raw_file.parent / case["result_file_name"]),
        "--number-bad-modules",
        str(options["number_bad_modules"]),
        "--frames-average",
        str(options["frames_average"]),
    ]
    if mask_file is not None:
        argv += ["--pixel-mask", str(mask_file)]
    return argv


def _check_outputs(case: dict[str, Any], result_file: Path) -> None:
    directory = require_testdata(NEXT)
    with h5py.File(result_file, "r") as file:
        assert sorted(file) == ["gains", "gainsRMS", "pixel_mask"]
        assert dict(file.attrs) == {}
        for output in case["outputs"]:
            array = file[output["dataset"]][()]
            assert array.dtype == np.dtype(output["dtype"]), output["dataset"]
            assert list(array.shape) == output["shape"], output["dataset"]
            if digest(array) != output["sha256"] and "expected_array" in case:
                with np.load(directory / case["expected_array"]) as expected:
                    wanted = expected[output["expected_key"]]
                differing = np.flatnonzero(array.view(np.uint8) != wanted.view(np.uint8))
                pytest.fail(f"{output['dataset']}: {differing.size} bytes differ")
            assert digest(array) == output["sha256"], output["dataset"]


@pytest.mark.parametrize("case", cases("pedestal"))
def test_pedestal_vector_through_the_command(
    case: dict[str, Any] | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_testdata(NEXT)
    assert case is not None
    raw_file, mask_file = write_pedestal_inputs(case, tmp_path)
    status = main(_cli_arguments(case, raw_file, mask_file))
    result_file = tmp_path / case["result_file_name"]
    captured = capsys.readouterr()
    if "error" in case:
        assert status == 1
        assert case["error"] in captured.err
    else:
        assert status == 0, captured.err
        bad = case["summary"]["bad_pixels"]
        with h5py.File(result_file, "r") as file:
            pixels = file["pixel_mask"].size
        assert captured.out.startswith(f"{result_file}: {pixels - bad} of {pixels} pixels good (")
    _check_outputs(case, result_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [case["raw_file_name"], case["result_file_name"]] + (["pixel_mask.h5"] if mask_file else [])
    )


def test_one_frame_per_batch_gives_the_same_file(tmp_path: Path) -> None:
    """Batches split the moving average (frames_average 8 < frames per stage) anywhere."""
    require_testdata(NEXT)
    case = next(c.values[0] for c in cases("pedestal") if c.id == "ped_jf13_manual_avg8_addmask")
    raw_file, mask_file = write_pedestal_inputs(case, tmp_path)
    result_file = tmp_path / case["result_file_name"]
    summary = compute_pedestal(
        raw_file,
        result_file,
        frames_average=8,
        pixel_mask_file=mask_file,
        batch_bytes=512 * 1024 * 2,
    )
    _check_outputs(case, result_file)
    assert summary.detector == DET
    assert summary.frames == 85
    assert summary.good_frames == 83
    assert summary.stage_frames == {"G0": 30, "G1": 26, "G2": 24}
    assert summary.highgain_frames == 0
    assert summary.bad_pixels == case["summary"]["bad_pixels"]
    assert summary.pixels == 512 * 1024


def _stage_frames(rng: np.random.Generator, code: int, n: int) -> np.ndarray:
    adc = rng.integers(1000, 1100, (n, 512, 1024), dtype=np.uint16)
    return (np.uint16(code) << np.uint16(14)) | adc


def test_no_good_pixel_writes_the_file_then_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run without G2 frames: every pixel gets bit 12; the file exists, the command fails."""
    rng = np.random.default_rng(5)
    data = np.concatenate([_stage_frames(rng, 0, 3), _stage_frames(rng, 1, 3)])
    raw_file = tmp_path / "20261202_101010.JF13T01V01.h5"
    write_raw_file(
        raw_file,
        DET,
        data,
        pulse_id=np.arange(6) + 100,
        frame_index=np.arange(6),
        daq_rec=[0, 0, 0, 0x1000, 0x1000, 0x1000],
        is_good_frame=[1] * 6,
    )
    result_file = tmp_path / "20261202_101010.JF13T01V01.res.h5"
    with pytest.raises(NoGoodPixel) as raised:
        compute_pedestal(raw_file, result_file)
    assert isinstance(raised.value, ConversionError)
    assert str(raised.value) == (
        f"pedestal file {result_file} contains no good pixel (frames accepted per gain stage: "
        "G0 3, G1 3, G2 0; a stage without frames flags every pixel)"
    )
    with h5py.File(result_file, "r") as file:
        mask = file["pixel_mask"][()]
        gains = file["gains"][()]
    assert (mask & (1 << 12) != 0).all()
    np.testing.assert_array_equal(gains[2], 0.0)
    np.testing.assert_array_equal(gains[0], data[:3].astype(np.float64).sum(axis=0) / 3)

    result_file.unlink()
    status = main(["pedestal", str(raw_file), "--output", str(result_file), "--config", "/nope"])
    assert status == 1  # the configuration is needed for number_bad_modules
    assert "/nope does not exist" in capsys.readouterr().err
    assert not result_file.exists()
    status = main(
        ["pedestal", str(raw_file), "--output", str(result_file), "--number-bad-modules", "0"]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert err == f"sf-daq-broker pedestal: {raised.value}\n"
    assert result_file.is_file()


def test_result_is_a_pedestal_file_for_conversion(
    tmp_path: Path, write_calibration: Callable[..., tuple[Path, Path]]
) -> None:
    """Round trip: pedestal run -> pedestal file -> conversion of a run with it."""
    rng = np.random.default_rng(7)
    data = np.concatenate([_stage_frames(rng, c, 4) for c in (0, 1, 3)])
    data[:, 5, 7] = (data[:, 5, 7] & 0xC000) | 1234  # no noise in any stage: bad
    raw_file = tmp_path / "20261202_101010.JF13T01V01.h5"
    write_raw_file(
        raw_file,
        DET,
        data,
        pulse_id=np.arange(12),
        frame_index=np.arange(12),
        daq_rec=[0] * 4 + [0x1000] * 4 + [0x3000] * 4,
        is_good_frame=[1] * 12,
    )
    pedestal_file = tmp_path / "pedestal.res.h5"
    summary = compute_pedestal(raw_file, pedestal_file)
    assert summary.stage_frames == {"G0": 4, "G1": 4, "G2": 4}
    assert summary.bad_pixels == 1
    gain, _, _ = random_calibration(1)
    gain_file, _ = write_calibration(gain, np.zeros((3, 512, 1024)), np.zeros((512, 1024)))
    converter = Converter.from_files(DET, gain_file, pedestal_file)
    run = _stage_frames(rng, 0, 2)
    with h5py.File(pedestal_file, "r") as file:
        pedestal, mask = file["gains"][()], file["pixel_mask"][()]
    assert mask.dtype == np.int64 and mask[5, 7] == (1 << 9) | (1 << 10) | (1 << 12)
    np.testing.assert_array_equal(
        converter.convert(run), reference_convert(run, gain, pedestal, mask)
    )
    assert Calibration.from_arrays(gain, pedestal, mask).pedestal.dtype == np.float32


def test_number_bad_modules_lets_frames_with_a_wrong_module_through(tmp_path: Path) -> None:
    """Two modules, one stuck in G0 during the G1 stage: its frames count only with K=1."""
    rng = np.random.default_rng(9)
    g0 = np.concatenate([_stage_frames(rng, 0, 2)] * 2, axis=1)
    g1 = np.concatenate([_stage_frames(rng, 0, 2), _stage_frames(rng, 1, 2)], axis=1)
    raw_file = tmp_path / "run.JF06T02V01.h5"
    write_raw_file(
        raw_file,
        "JF06T02V01",
        np.concatenate([g0, g1]),
        pulse_id=np.arange(4),
        frame_index=np.arange(4),
        daq_rec=[0, 0, 0x1000, 0x1000],
        is_good_frame=[1] * 4,
    )
    with pytest.raises(NoGoodPixel):
        compute_pedestal(raw_file, tmp_path / "a.h5")
    with pytest.raises(NoGoodPixel):  # still no G2 stage; but G1 was accepted
        summary_file = tmp_path / "b.h5"
        compute_pedestal(raw_file, summary_file, number_bad_modules=1)
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        np.testing.assert_array_equal(a["gains"][1], 0.0)
        adc = (g1[:, 512:] & 0x3FFF).astype(np.float64)
        np.testing.assert_array_equal(b["gains"][1, 512:], (adc[0] + adc[1]) / 2)
        assert (b["pixel_mask"][:512] & 4 == 4).all()  # module 0 was not in G1 (bit 2)
        assert (b["pixel_mask"][512:] & 4 == 0).all()


def test_number_bad_modules_comes_from_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        '[beamlines.alvra]\nsubnets = ["10.0.0.0/24"]\n'
        '[detectors.JF13T01V01]\nbeamline = "alvra"\nnumber_bad_modules = 1\n'
    )
    assert load_settings(config).detectors[DET].number_bad_modules == 1
    rng = np.random.default_rng(3)
    data = _stage_frames(rng, 1, 2)  # says G0, all pixels in G1: accepted only with K=1
    raw_file = tmp_path / "run.JF13T01V01.h5"
    write_raw_file(
        raw_file,
        DET,
        data,
        pulse_id=[1, 2],
        frame_index=[0, 1],
        daq_rec=[0, 0],
        is_good_frame=[1, 1],
    )
    result = tmp_path / "res.h5"
    assert main(["pedestal", str(raw_file), "--output", str(result), "--config", str(config)]) == 1
    with h5py.File(result, "r") as file:
        assert (file["pixel_mask"][()] & 2 == 2).all()  # both frames used, all pixels in G1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"frames_average": 0}, ConversionError, "frames_average must be at least 1, not 0"),
        ({"number_bad_modules": -1}, ConversionError, "number_bad_modules must not be negative"),
        ({"pixel_mask_file": Path("/nonexistent.h5")}, CalibrationError, "does not exist"),
    ],
)
def test_bad_arguments_write_nothing(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    raw_file = tmp_path / "run.JF13T01V01.h5"
    write_raw_file(
        raw_file,
        DET,
        np.zeros((1, 512, 1024), np.uint16),
        pulse_id=[1],
        frame_index=[0],
        daq_rec=[0],
        is_good_frame=[1],
    )
    with pytest.raises(error, match=message):
        compute_pedestal(raw_file, tmp_path / "res.h5", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.JF13T01V01.h5"]


def test_a_site_mask_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    raw_file = tmp_path / "run.JF13T01V01.h5"
    write_raw_file(
        raw_file,
        DET,
        np.zeros((1, 512, 1024), np.uint16),
        pulse_id=[1],
        frame_index=[0],
        daq_rec=[0],
        is_good_frame=[1],
    )
    mask_file = tmp_path / "mask.h5"
    with h5py.File(mask_file, "w") as file:
        file["pixel_mask"] = np.zeros((256, 1024), np.uint8)
    with pytest.raises(CalibrationError, match=r"uint8 \(256, 1024\); a numeric \(512, 1024\)"):
        compute_pedestal(raw_file, tmp_path / "res.h5", pixel_mask_file=mask_file)
    with pytest.raises(DetectorFileError, match="does not exist"):
        compute_pedestal(tmp_path / "missing.h5", tmp_path / "res.h5")
