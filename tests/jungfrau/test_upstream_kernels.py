"""The kernels of the upstream options against slow numpy implementations written from the
text (tests/jungfrau/reference.py), on inputs the vectors do not cover: odd shapes, partial
blocks, NaN and huge values, several modules, disabled modules."""

from __future__ import annotations

import numpy as np
import pytest

from sf_daq_broker.jungfrau import Calibration, ConversionOptions, Converter
from sf_daq_broker.jungfrau.downsample import downsample, downsampled_mask, good_counts
from sf_daq_broker.jungfrau.errors import ConversionError
from sf_daq_broker.jungfrau.tables import bad_pixels, reserved_reasons
from tests.jungfrau.reference import (
    reference_bad_pixels,
    reference_convert,
    reference_downsample,
    reference_interp,
    reference_places,
)
from tests.jungfrau.support import random_calibration, random_raw


def nasty_image(shape: tuple[int, int, int], seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 50, shape).astype(np.float32)
    image.reshape(-1)[::97] = np.nan
    image.reshape(-1)[::101] = np.inf
    image.reshape(-1)[::89] = -0.0
    image.reshape(-1)[::113] = 3e12  # beyond int32 after scaling: wraps like the reference
    return image


@pytest.mark.parametrize(
    ("n", "m", "factor"), [(2, 2, None), (3, 4, None), (5, 7, 0.37), (37, 53, 2.0), (1, 3, 1.5)]
)
def test_downsample_matches_the_reference(n: int, m: int, factor: float | None) -> None:
    image = nasty_image((3, 37, 53))
    good = np.random.default_rng(4).random((37, 53)) > 0.2
    good[:n, :m] = False  # a block without a good pixel: 0
    counts = good_counts(good, (n, m))
    expected = reference_downsample(image, good, n, m, factor)
    out = np.empty(expected.shape, expected.dtype)
    downsample(image, counts, n, m, float(factor or 0.0), out)
    assert out.tobytes() == expected.tobytes()
    mask = downsampled_mask(good, (n, m))
    assert mask.shape == expected.shape[1:]
    assert not mask[0, 0]
    if 37 % n:
        assert not mask[-1].any()  # partial blocks are never good


def test_interpolation_of_several_modules_matches_the_reference() -> None:
    gain, pedestal, mask = random_calibration(3)
    raw = random_raw(2, 3)
    calibration = Calibration.from_arrays(gain, pedestal, mask)
    for disabled in [(), (1,)]:
        options = ConversionOptions(double_pixels="interp", disabled_modules=disabled)
        converted = Converter("JF77T03V01", calibration, options).convert(raw)
        plain = reference_convert(
            raw, gain, pedestal, mask, mask_double_pixels=False, disabled_modules=disabled
        )
        assert converted.tobytes() == reference_interp(plain).tobytes()


def test_reserved_bits_count_only_with_their_option() -> None:
    mask = np.zeros((512, 1024), np.int64)
    mask[10, 10] = 1 << 21  # an ordinary pixel marked "double pixel" only
    mask[20, 20] = (1 << 22) | 1
    mask[30, 30] = 1 << 22
    before = mask.copy()
    keep = bad_pixels(mask, double_pixels="keep", module_edge_pixels="keep")
    assert not keep[10, 10] and keep[20, 20] and not keep[30, 30]
    assert not keep[0, 5] and not keep[100, 255]  # edge and double pixels are good
    masked = bad_pixels(mask, double_pixels="mask", module_edge_pixels="mask")
    assert masked[10, 10] and masked[30, 30] and masked[0, 5] and masked[100, 255]
    assert masked[511, 1023] and masked[5, 0] and not masked[5, 5]
    np.testing.assert_array_equal(mask, before)  # never modified
    boolean = bad_pixels(mask != 0, double_pixels="mask", module_edge_pixels="mask")
    assert not boolean[0, 5] and not boolean[100, 255]  # a bool mask gets no bits
    reasons = reserved_reasons(mask)
    assert reasons[0, 255] == (1 << 21) | (1 << 22) and reasons[10, 10] == 1 << 21


def _gapped(good: np.ndarray) -> np.ndarray:
    """Stacked modules (512·n, 1024) in the gap layout (514·n, 1030), gap pixels False."""
    out = np.zeros((514 * (good.shape[0] // 512), 1030), dtype=bool)
    for m in range(good.shape[0] // 512):
        for cy in range(2):
            for cx in range(4):
                y, x = 514 * m + 258 * cy, 258 * cx
                out[y : y + 256, x : x + 256] = good[
                    512 * m + 256 * cy : 512 * m + 256 * cy + 256, 256 * cx : 256 * cx + 256
                ]
    return out


def _kinds(stored: np.ndarray) -> dict[str, int]:
    """How many pixels of each kind the random mask has: values of bits 21/22 alone on
    ordinary, double-pixel and module-edge pixels, and mixtures with a low bit."""
    double_pixel, edge = reference_places(stored.shape)
    places = {"ordinary": ~double_pixel & ~edge, "double": double_pixel, "edge": edge}
    values = {"21": 1 << 21, "22": 1 << 22, "21+22": 3 << 21}
    counts = {
        f"{value_name} {place_name}": int((place & (stored == value)).sum())
        for place_name, place in places.items()
        for value_name, value in values.items()
    }
    counts["mixed"] = int(((stored & 0xFF != 0) & (stored >> 21 != 0)).sum())
    return counts


@pytest.mark.parametrize("module_edge_pixels", ["keep", "mask"])
@pytest.mark.parametrize("double_pixels", ["mask", "keep", "interp"])
def test_reserved_bits_of_random_masks(double_pixels: str, module_edge_pixels: str) -> None:
    """UPSTREAM_HEAD §3 on random masks holding bits 21/22 alone and mixed, for each option
    pair: the bad pixels, the converter's pixel mask and the converted values, with masking
    and without (no double-pixel or edge masking then), and with a bool mask (no bits)."""
    gain, pedestal, stored = random_calibration(2, seed=7)
    assert min(_kinds(stored).values()) > 10  # every kind is exercised
    raw = random_raw(1, 2, seed=8)
    calibration = Calibration.from_arrays(gain, pedestal, stored)
    masks_dp, masks_edge = double_pixels == "mask", module_edge_pixels == "mask"
    expected_bad = reference_bad_pixels(
        stored, mask_double_pixels=masks_dp, mask_module_edges=masks_edge
    )
    # The same rule, read the other way: a low bit is bad; bit 21 or a double pixel is bad
    # only with double_pixels "mask"; bit 22 or a module edge only with module_edge_pixels
    # "mask". So a value of bits 21/22 alone on an ordinary pixel is good unless masked.
    double_pixel, edge = reference_places(stored.shape)
    low = stored & ~np.int64(3 << 21) != 0
    bit21, bit22 = stored & (1 << 21) != 0, stored & (1 << 22) != 0
    np.testing.assert_array_equal(
        expected_bad, low | (masks_dp & (bit21 | double_pixel)) | (masks_edge & (bit22 | edge))
    )
    options = {"double_pixels": double_pixels, "module_edge_pixels": module_edge_pixels}
    np.testing.assert_array_equal(bad_pixels(stored, **options), expected_bad)
    bool_mask = stored != 0
    np.testing.assert_array_equal(bad_pixels(bool_mask, **options), bool_mask)

    for mask in (True, False):
        conversion = ConversionOptions(
            mask=mask, double_pixels=double_pixels, module_edge_pixels=module_edge_pixels
        )
        converter = Converter("JF13T02V01", calibration, conversion)
        bad = (
            expected_bad
            if mask
            else reference_bad_pixels(stored, mask_double_pixels=False, mask_module_edges=False)
        )
        np.testing.assert_array_equal(converter.pixel_mask, _gapped(~bad))
        expected = reference_convert(
            raw,
            gain,
            pedestal,
            stored,
            mask=mask,
            mask_double_pixels=masks_dp,
            mask_module_edges=masks_edge,
        )
        if double_pixels == "interp":
            expected = reference_interp(expected)
        assert converter.convert(raw).tobytes() == expected.tobytes(), f"mask={mask}"


def test_option_combinations_refused_by_the_converter() -> None:
    with pytest.raises(ConversionError, match="needs gap_pixels"):
        ConversionOptions(double_pixels="interp", gap_pixels=False)
    with pytest.raises(ConversionError, match="cannot be combined with factor"):
        ConversionOptions(double_pixels="interp", factor=2.0)
    assert ConversionOptions(double_pixels="interp", factor=2.0, downsample=(2, 2)).factor == 2.0
    assert ConversionOptions(downsample=(1, 1)).downsample is None
    with pytest.raises(ConversionError, match="roi and downsample"):
        ConversionOptions(roi=(("a", (0, 1, 0, 1)),), downsample=(2, 2))
    with pytest.raises(ConversionError, match="double_pixels_action must be one of"):
        ConversionOptions(double_pixels="smear")
    # adc_to_energy false: the conversion options are not combined
    assert ConversionOptions(adc_to_energy=False, double_pixels="interp", gap_pixels=False)
