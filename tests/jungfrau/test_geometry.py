"""Geometry: the shipped placement table, output shapes, every rotation, configuration errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sf_daq_broker.jungfrau import (
    Calibration,
    ConversionOptions,
    Converter,
    DetectorError,
    GeometryConfigError,
    load_geometry_table,
)
from sf_daq_broker.jungfrau.geometry import DEFAULT_GEOMETRY_FILE, default_geometry_table
from sf_daq_broker.jungfrau.layout import build_layout
from tests.jungfrau.reference import Geometry, reference_convert
from tests.jungfrau.support import random_calibration, random_raw


@pytest.mark.parametrize(
    ("detector", "gap_pixels", "shape"),
    [
        ("JF07T03", True, (1614, 1030)),
        ("JF06T04", True, (2136, 1132)),
        ("JF06T08", True, (2136, 2232)),
        ("JF06T32", True, (4214, 4982)),
        ("JF07T32", True, (4432, 4215)),
        ("JF15T08", True, (2312, 2215)),
        ("JF06T04", False, (2130, 1130)),
    ],
)
def test_output_shapes_with_geometry(
    detector: str, gap_pixels: bool, shape: tuple[int, int]
) -> None:
    entry = default_geometry_table().lookup(detector)
    assert entry is not None
    n_modules = int(detector[-2:])
    layout = build_layout(n_modules, list(range(n_modules)), gap_pixels=gap_pixels, geometry=entry)
    assert layout.shape == shape
    # every raw pixel appears exactly once, nothing else does
    shown = np.bincount(layout.source[layout.source >= 0], minlength=n_modules * 512 * 1024)
    assert shown.size == n_modules * 512 * 1024
    assert (shown == 1).all()


@pytest.mark.parametrize(
    ("n_modules", "disabled", "gap_pixels", "shape"),
    [(4, (), True, (2056, 1030)), (4, (1, 3), True, (1028, 1030)), (3, (), False, (1536, 1024))],
)
def test_stacked_shapes(
    n_modules: int, disabled: tuple[int, ...], gap_pixels: bool, shape: tuple[int, int]
) -> None:
    active = [m for m in range(n_modules) if m not in disabled]
    assert build_layout(n_modules, active, gap_pixels=gap_pixels, geometry=None).shape == shape


def _table(detector: str) -> Geometry:
    entry = default_geometry_table().lookup(detector)
    assert entry is not None
    return (entry.det_rot90, list(entry.origin_y), list(entry.origin_x), list(entry.mod_rot90))


MIXED_ROTATIONS = """
[detectors.JF90T04]
det_rot90 = 1
origin_y = [0, 1630, 2214, 0]
origin_x = [0, 1100, 1030, 2214]
mod_rot90 = [0, 1, 2, 3]
"""


@pytest.mark.parametrize(
    ("detector", "options"),
    [
        ("JF22T01V01", {}),  # detector turned 3 times
        ("JF02T01V01", {"factor": 0.7}),  # half turn: reversed rows
        ("JF06T04V01", {}),  # quarter turn, blocks of raw columns
        ("JF06T04V01", {"gap_pixels": False, "disabled_modules": [1]}),
        ("JF06T04V01", {"adc_to_energy": False}),
        ("JF07T03V01", {"mask": False}),
        ("JF90T04V01", {}),  # every module rotation, from a test table
        ("JF90T04V01", {"gap_pixels": False, "factor": 2.5}),
    ],
)
def test_kernel_matches_reference_for_every_rotation(
    detector: str, options: dict[str, object], tmp_path: Path
) -> None:
    custom = tmp_path / "geometry.toml"
    custom.write_text(MIXED_ROTATIONS)
    table = load_geometry_table(custom if detector.startswith("JF90") else None)
    entry = table.lookup(detector[:7])
    assert entry is not None
    geometry = (entry.det_rot90, list(entry.origin_y), list(entry.origin_x), list(entry.mod_rot90))
    n_modules = int(detector[5:7])
    gain, pedestal, mask = random_calibration(n_modules)
    raw = random_raw(2, n_modules)
    opts = ConversionOptions.from_mapping({**options, "geometry": True})
    converter = Converter(
        detector, Calibration.from_arrays(gain, pedestal, mask), opts, geometry_table=table
    )
    expected = reference_convert(
        raw,
        gain,
        pedestal,
        mask,
        adc_to_energy=opts.adc_to_energy,
        mask=opts.mask,
        gap_pixels=opts.gap_pixels,
        geometry=geometry,
        factor=opts.factor,
        disabled_modules=opts.disabled_modules,
    )
    out = converter.convert(raw)
    assert out.shape == expected.shape
    assert out.tobytes() == expected.tobytes()


def test_every_shipped_entry_builds() -> None:
    table = load_geometry_table(DEFAULT_GEOMETRY_FILE)
    for name, entry in table.entries.items():
        if not entry.is_strip:
            n = int(name[-2:])
            assert build_layout(n, list(range(n)), gap_pixels=True, geometry=entry).shape


@pytest.mark.parametrize(
    "detector", ["JF05T01V01", "JF10T01V01", "JF11T04V01", "JF12T04V01", "JF18T01V02"]
)
@pytest.mark.parametrize("geometry", [False, True])
def test_strip_detectors_are_refused(detector: str, geometry: bool) -> None:
    n = int(detector[5:7])
    calibration = Calibration.from_arrays(*random_calibration(n))
    with pytest.raises(DetectorError) as error:
        Converter(detector, calibration, ConversionOptions(geometry=geometry))
    assert str(error.value) == (
        f"{detector} has strip sensors, whose pixel remapping is not supported; it cannot be "
        "converted (retrieve it with adc_to_energy false)"
    )


def test_unknown_detector_converts_stacked_but_not_with_geometry() -> None:
    calibration = Calibration.from_arrays(*random_calibration(2))
    assert Converter("JF77T02V01", calibration).frame_shape == (1028, 1030)
    with pytest.raises(DetectorError) as error:
        Converter("JF77T02V01", calibration, ConversionOptions(geometry=True))
    assert str(error.value) == f"no geometry for JF77T02 in {DEFAULT_GEOMETRY_FILE}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[detectors.JF01T02]\norigin_y = [0]\norigin_x = [0, 0]\n",
            "detectors.JF01T02.origin_y: has 1 entries, the detector has 2 modules",
        ),
        (
            "[detectors.JF01T01]\norigin_y = [0]\norigin_x = [0]\ndet_rot90 = 4\n",
            "detectors.JF01T01.det_rot90: must be 0, 1, 2 or 3 quarter turns, not 4",
        ),
        (
            "[detectors.JF01T01]\norigin_y = [0]\norigin_x = [0]\nmod_rot90 = [5]\n",
            "detectors.JF01T01.mod_rot90: must be 0, 1, 2 or 3 quarter turns, not 5",
        ),
        (
            "[detectors.JF01T01]\norigin_y = [0]\norigin_x = [0]\nrotation = 1\n",
            "detectors.JF01T01: unknown key 'rotation'",
        ),
        (
            "[detectors.JF01T01V01]\norigin_y = [0]\norigin_x = [0]\n",
            "detectors.JF01T01V01: name must look like JF06T04 (no version)",
        ),
        (
            "[detectors.JF01T01]\norigin_y = [-1]\norigin_x = [0]\n",
            "detectors.JF01T01: origins must not be negative",
        ),
        (
            "[detectors.JF01T01]\norigin_y = [0.5]\norigin_x = [0]\n",
            "detectors.JF01T01.origin_y: must be a list of 1 integers",
        ),
        (
            "[detectors.JF01T01]\nsensor = 'cmos'\n",
            "detectors.JF01T01.sensor: must be 'pixel' or 'strip', not 'cmos'",
        ),
        ("[geometry]\n", "unknown key 'geometry'"),
    ],
)
def test_malformed_geometry_files(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "geometry.toml"
    path.write_text(text)
    with pytest.raises(GeometryConfigError) as error:
        load_geometry_table(path)
    assert str(error.value) == f"geometry file {path}: {message}"


def test_missing_geometry_file(tmp_path: Path) -> None:
    with pytest.raises(GeometryConfigError) as error:
        load_geometry_table(tmp_path / "none.toml")
    assert str(error.value) == f"geometry file {tmp_path / 'none.toml'}: No such file or directory"


def test_geometry_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "geometry.toml"
    path.write_text(MIXED_ROTATIONS)
    monkeypatch.setenv("SF_DAQ_GEOMETRY_FILE", str(path))
    assert list(load_geometry_table().entries) == ["JF90T04"]


def test_overlapping_modules_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "geometry.toml"
    path.write_text("[detectors.JF91T02]\norigin_y = [0, 100]\norigin_x = [0, 0]\n")
    calibration = Calibration.from_arrays(*random_calibration(2))
    with pytest.raises(DetectorError) as error:
        Converter(
            "JF91T02V01",
            calibration,
            ConversionOptions(geometry=True),
            geometry_table=load_geometry_table(path),
        )
    assert str(error.value) == "the geometry places module 1 over another module"
