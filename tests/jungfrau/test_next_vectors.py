"""Every convert case of ``jungfrau_next`` (and of ``jungfrau``) byte for byte through
``sf-daq-broker convert --options``: the files are built as the vectors' README says, the
options object is the case's (upstream names), and every ``data`` dataset of the output is
compared by dtype, shape and sha256; so is every ``meta`` dataset of the case's manifest, except
those listed in ``UNMATCHED_META`` with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - the outputs are bitshuffle+LZ4
import numpy as np
import pytest

from sf_daq_broker.cli import main
from tests.jungfrau.next_vectors import NEXT, cases, digest, write_convert_inputs
from tests.jungfrau.support import require_testdata, shared_testdata

#: Why a reference ``meta`` dataset is not compared: ("absent" | "differs", reason). Every other
#: one the manifest lists, in every convert case, must be in our file with the reference's
#: dtype, shape and bytes (and ``values``, where given).
INTERP_MASK = (
    "differs",
    "the reference's pixel mask after interpolating double pixels follows a rule UPSTREAM_HEAD "
    "does not document; ours leaves the gap pixels bad (the data matches)",
)
RAW_LAYOUT = (
    "absent",
    "adc_to_energy false gives the raw layout, which has no meta/ (whatever the selection); "
    "upstream runs its converter for selected_pulse_ids (UPSTREAM_HEAD §1), which writes them "
    "from the pedestal file's mask (§3 with both options keep; downsample [1, 1]), a file an "
    "unconverted retrieval does not load",
)
#: (case, dataset below ``data/<DET>[:ROI_<label>]/``) -> (how, why). An entry must really be
#: unmatched (absent from our file, or present and different), so a stale entry fails too. The
#: reference also writes ``meta/module_map`` and the option flags (``meta/conversion``,
#: ``meta/mask``, ...), but the manifest has no hash for them: they are outside this comparison.
UNMATCHED_META: dict[tuple[str, str], tuple[str, str]] = {
    **{
        (case, dataset): INTERP_MASK
        for case in ("jf13_dp_interp", "jf13_dp_interp_nomask_hg", "jf06_geometry_interp")
        for dataset in ("meta/pixel_mask", "meta/good_pixels_fraction")
    },
    **{
        ("jf13_selected_pulse_ids_raw", dataset): RAW_LAYOUT
        for dataset in (
            "meta/downsample",
            "meta/good_pixels_fraction",
            "meta/pixel_mask",
            "meta/pixel_mask_reasons",
        )
    },
}


def _convert(
    case: dict[str, Any], tmp_path: Path, options: dict[str, Any] | None, extra: list[str]
) -> Path:
    raw_file, gain_file, pedestal_file = write_convert_inputs(
        case, tmp_path, shared_testdata(NEXT if "kind" in case else "jungfrau")
    )
    out = tmp_path / "out.h5"
    argv = [
        "convert",
        str(raw_file),
        str(out),
        "--gain-file",
        str(gain_file),
        "--pedestal-file",
        str(pedestal_file),
        *extra,
    ]
    if options is not None:
        argv += ["--options", json.dumps(options)]
    assert main(argv) == 0
    return out


def _check(array: np.ndarray, entry: dict[str, Any], where: str) -> None:
    assert array.dtype == np.dtype(entry["dtype"]), where
    assert list(array.shape) == entry["shape"], where
    assert digest(array) == entry["sha256"], where


@pytest.mark.parametrize("case", cases("convert"))
def test_convert_vector_through_the_command(case: dict[str, Any] | None, tmp_path: Path) -> None:
    directory = require_testdata(NEXT)
    assert case is not None
    options = {k: v for k, v in case["options"].items() if k != "highgain"}
    selected = [str(pid) for pid in case.get("selected_pulse_ids", [])]
    extra = ["--selected-pulse-ids", *selected] if selected else []
    out = _convert(case, tmp_path, options, extra)
    with h5py.File(out) as file:
        datasets = sorted(f"data/{name}/data" for name in file["data"])
        assert datasets == [entry["dataset"] for entry in case["outputs"]]
        for entry in case["outputs"]:
            array = file[entry["dataset"]][()]
            if digest(array) != entry["sha256"] and "expected_array" in case:
                with np.load(directory / case["expected_array"]) as expected:
                    wanted = expected[entry["expected_key"]]
                differing = np.flatnonzero(array.view(np.uint8) != wanted.view(np.uint8))
                pytest.fail(f"{entry['dataset']}: {differing.size} bytes differ")
            _check(array, entry, entry["dataset"])
        _compare_meta(case, file)


def _compare_meta(case: dict[str, Any], file: h5py.File) -> None:
    """Every reference meta dataset of the case: equal, or listed in UNMATCHED_META (and then
    really absent, or of the same dtype and shape with different values)."""
    assert case["meta"], "a convert case without reference meta"
    for entry in case["meta"]:
        name = entry["dataset"]
        how, _ = UNMATCHED_META.get((case["name"], name.split("/", 2)[2]), ("compared", ""))
        if how == "absent":
            assert name not in file, f"{name} is written now: compare it"
            continue
        assert name in file, f"{name}: the reference writes it, we do not"
        value = np.asarray(file[name][()])
        if how == "differs":  # the layout still matches, only the values differ
            assert value.dtype == np.dtype(entry["dtype"]), name
            assert list(value.shape) == entry["shape"], name
            assert digest(value) != entry["sha256"], f"{name} matches now: compare it"
            continue
        _check(value, entry, name)
        if "values" in entry:
            assert value.reshape(-1).tolist() == entry["values"], name


def test_unmatched_meta_names_reference_datasets() -> None:
    """Each UNMATCHED_META entry is a meta dataset of a convert case (no stale names)."""
    require_testdata(NEXT)
    listed = {
        (case["name"], entry["dataset"].split("/", 2)[2])
        for param in cases("convert")
        for case in param.values
        for entry in case["meta"]
    }
    assert set(UNMATCHED_META) <= listed


def test_meta_datasets_written_for_converted_files(tmp_path: Path) -> None:
    """Which meta datasets a converted file has (the raw layout has none)."""
    require_testdata(NEXT)
    case = next(c.values[0] for c in cases("convert") if c.id == "jf13_downsample_2x2")
    out = _convert(case, tmp_path, case["options"], [])
    with h5py.File(out) as file:
        assert sorted(file["data/JF13T01V01/meta"]) == [
            "conversion",
            "conversion_factor",
            "double_pixels",
            "downsample",
            "gap_pixels",
            "geometry",
            "good_pixels_fraction",
            "mask",
            "module_edge_pixels",
            "pixel_mask",
            "pixel_mask_reasons",
        ]
        assert file["data/JF13T01V01/meta/mask"][()]  # forced by downsample


def _spec_cases() -> list[Any]:
    manifest = shared_testdata("jungfrau") / "manifest.json"
    if not manifest.is_file():
        return [pytest.param(None, id="manifest-missing")]
    return [
        pytest.param(case, id=f"{index}-{case['detector']}-{json.dumps(case['options'])}")
        for index, case in enumerate(json.loads(manifest.read_text()))
    ]


@pytest.mark.parametrize("case", _spec_cases())
def test_spec_vector_through_the_command(case: dict[str, Any] | None, tmp_path: Path) -> None:
    """The older vectors (SPEC names and defaults) through ``--options`` too. Their raw-copy
    case (adc_to_energy false, gaps applied) is the converter's own knob, the option flag
    ``--no-adc-to-energy``: a request's adc_to_energy false means the raw layout untouched."""
    require_testdata("jungfrau")
    assert case is not None
    options = {k: v for k, v in case["options"].items() if k != "highgain"}
    if options.get("adc_to_energy", True):
        out = _convert(case, tmp_path, options, [])
    else:
        out = _convert(case, tmp_path, None, ["--no-adc-to-energy"])
    with h5py.File(out) as file:
        array = file[f"data/{case['detector']}/data"][()]
    _check(array, case, case["detector"])
