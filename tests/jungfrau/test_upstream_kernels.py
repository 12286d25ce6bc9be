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
from tests.jungfrau.reference import reference_convert, reference_downsample, reference_interp
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
