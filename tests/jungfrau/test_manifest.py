"""Every case of the reference vectors, byte for byte (sha256 of the C-order output)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest

from sf_daq_broker.jungfrau import Calibration, ConversionOptions, Converter
from tests.jungfrau.support import require_testdata, shared_testdata


def _cases() -> list[Any]:
    manifest = shared_testdata() / "manifest.json"
    if not manifest.is_file():
        return [pytest.param(None, id="manifest-missing")]
    cases = json.loads(manifest.read_text())
    return [
        pytest.param(case, id=f"{index}-{case['detector']}-{json.dumps(case['options'])}")
        for index, case in enumerate(cases)
    ]


@pytest.mark.parametrize("case", _cases())
def test_reference_vector(case: dict[str, Any] | None) -> None:
    directory = require_testdata()
    assert case is not None
    with np.load(directory / case["inputs"]) as inputs:
        raw, gain = inputs["raw"], inputs["gain"]
        pedestal, pixel_mask = inputs["pedestal"], inputs["pixel_mask"]
    mask_before = pixel_mask.copy()
    options = dict(case["options"])
    highgain = options.pop("highgain", False)
    converter = Converter(
        case["detector"],
        Calibration.from_arrays(gain, pedestal, pixel_mask),
        ConversionOptions.from_mapping(options),
        highgain=highgain,
    )
    out = converter.convert(raw)

    assert out.dtype == np.dtype(case["dtype"])
    assert list(out.shape) == case["shape"]
    digest = hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()
    if digest != case["sha256"] and "expected_array" in case:
        with np.load(directory / case["expected_array"]) as expected:
            differing = np.flatnonzero(out.view(np.uint8) != expected["out"].view(np.uint8))
        pytest.fail(f"{differing.size} bytes differ, first at byte {differing[:5].tolist()}")
    assert digest == case["sha256"]
    np.testing.assert_array_equal(pixel_mask, mask_before)  # inputs are never modified


def test_expected_arrays_match_their_digests() -> None:
    """The optional full arrays agree with the manifest (guards the test data itself)."""
    directory = require_testdata()
    for case in json.loads((directory / "manifest.json").read_text()):
        if "expected_array" in case:
            with np.load(directory / case["expected_array"]) as expected:
                digest = hashlib.sha256(expected["out"].tobytes()).hexdigest()
            assert digest == case["sha256"]
