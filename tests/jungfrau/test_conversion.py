"""Conversion semantics beyond the reference vectors: rounding, masks, gain modes, batches."""

from __future__ import annotations

import numpy as np
import pytest

from sf_daq_broker.jungfrau import Calibration, ConversionError, ConversionOptions, Converter
from tests.jungfrau.reference import reference_bad_pixels, reference_convert
from tests.jungfrau.support import random_calibration, random_raw

H, W = 512, 1024


def _single(gain: float, pedestal: float, factor: float | None, raws: list[int]) -> list[int]:
    """Convert a 1-module frame whose first pixels hold ``raws``; gain and pedestal uniform."""
    calibration = Calibration.from_arrays(
        np.full((4, H, W), gain), np.full((3, H, W), pedestal), np.zeros((H, W), np.int64)
    )
    options = ConversionOptions(factor=factor, gap_pixels=False, double_pixels="keep")
    raw = np.zeros((1, H, W), np.uint16)
    raw[0, 0, : len(raws)] = raws
    out = Converter("JF13T01V01", calibration, options).convert(raw)
    return out[0, 0, : len(raws)].tolist()


def test_rounding_is_half_to_even() -> None:
    # gain 1, pedestal 0, factor 1: the value is the ADC count, exact; factor 2 halves it.
    assert _single(1.0, 0.0, 2.0, [1, 3, 5, 7, 2]) == [0, 2, 2, 4, 1]


def test_int32_wraps_like_the_reference_and_nan_inf_become_zero() -> None:
    # gain 1e-6 ADU/keV: 16383 ADU -> 1.6383e10 keV, beyond int32, inside int64: wraps.
    values = _single(1e-6, 0.0, 1.0, [16383, 1000, 0])
    adc = np.array([16383, 1000, 0], dtype=np.float32)
    expected = np.rint((adc - np.float32(0)) * (np.float32(1) / np.float32(1e-6)))
    assert values == expected.astype(np.int64).astype(np.int32).tolist()
    assert values[0] != int(expected[0])  # it really wrapped
    # beyond int64 (gain 1e-30) and inf (gain 0) give 0, as does NaN (0 * inf)
    assert _single(1e-30, 0.0, 1.0, [16383]) == [0]
    assert _single(0.0, 0.0, 1.0, [5]) == [0]
    assert _single(0.0, 0.0, 1.0, [0]) == [0]


def test_float_special_values_are_kept() -> None:
    values = _single(0.0, 0.0, None, [5, 0])
    assert values[0] == np.inf and np.isnan(values[1])


def test_multiplication_by_the_reciprocal_not_division() -> None:
    rng = np.random.default_rng(3)
    gain = rng.uniform(30, 50, (4, H, W))
    pedestal = rng.uniform(1000, 3000, (3, H, W))
    raw = random_raw(1, 1)
    raw &= 0x3FFF  # all G0
    options = ConversionOptions(mask=False, gap_pixels=False)
    calibration = Calibration.from_arrays(gain, pedestal, np.zeros((H, W), np.int64))
    out = Converter("JF13T01V01", calibration, options).convert(raw)[0]
    g32, p32 = gain[0].astype(np.float32), pedestal[0].astype(np.float32)
    adc = raw[0].astype(np.float32)
    np.testing.assert_array_equal(out, (adc - p32) * (np.float32(1) / g32))
    assert (out != (adc - p32) / g32).any()  # dividing would differ


def test_gain_code_2_uses_g2_and_masked_pixels_are_positive_zero() -> None:
    gain = np.stack([np.full((H, W), v) for v in (10.0, 20.0, 40.0, 80.0)])
    pedestal = np.stack([np.full((H, W), v) for v in (100.0, 200.0, 300.0)])
    mask = np.zeros((H, W), np.int64)
    mask[0, 3] = 64
    calibration = Calibration.from_arrays(gain, pedestal, mask)
    raw = np.zeros((1, H, W), np.uint16)
    raw[0, 0, :4] = [(0 << 14) | 500, (1 << 14) | 500, (2 << 14) | 500, (3 << 14) | 500]
    opts = ConversionOptions(gap_pixels=False)
    out = Converter("JF13T01V01", calibration, opts).convert(raw)[0, 0, :4]
    assert out[:3].tolist() == [
        np.float32(400) * np.float32(1 / np.float32(10)),
        np.float32(300) * (np.float32(1) / np.float32(20)),
        np.float32(200) * (np.float32(1) / np.float32(40)),
    ]
    assert out[3] == 0 and not np.signbit(out[3])  # (500 - 300) would be positive anyway
    raw[0, 0, 3] = (3 << 14) | 0  # negative value, masked: still +0.0
    out = Converter("JF13T01V01", calibration, opts).convert(raw)[0, 0, 3]
    assert out == 0 and not np.signbit(out)


@pytest.mark.parametrize(("gain_slices", "pedestal_slices"), [(4, 3), (6, 3), (4, 4), (6, 4)])
def test_high_gain_mode(gain_slices: int, pedestal_slices: int) -> None:
    gain, pedestal, mask = random_calibration(1, 5, gain_slices, pedestal_slices)
    raw = random_raw(2, 1)
    converter = Converter(
        "JF13T01V01", Calibration.from_arrays(gain, pedestal, mask), highgain=True
    )
    expected = reference_convert(raw, gain, pedestal, mask, highgain=True)
    assert converter.convert(raw).tobytes() == expected.tobytes()


def test_bool_mask_ignores_mask_double_pixels() -> None:
    gain, pedestal, mask = random_calibration(1)
    raw = random_raw(1, 1)
    bool_mask = mask != 0
    out = Converter("JF13T01V01", Calibration.from_arrays(gain, pedestal, bool_mask)).convert(raw)
    expected = reference_convert(raw, gain, pedestal, bool_mask)
    assert out.tobytes() == expected.tobytes()
    assert out[0, 10, 255] != 0  # a double pixel, kept with a bool mask
    converter = Converter("JF13T01V01", Calibration.from_arrays(gain, pedestal, mask))
    assert converter.convert(raw)[0, 10, 255] == 0  # masked with the int64 mask


def test_pixel_mask_in_output_geometry() -> None:
    gain, pedestal, mask = random_calibration(4)
    calibration = Calibration.from_arrays(gain, pedestal, mask)
    converter = Converter(
        "JF06T04V01", calibration, ConversionOptions(geometry=True, disabled_modules=(2,))
    )
    pixel_mask = converter.pixel_mask
    assert pixel_mask.dtype == np.bool_ and pixel_mask.shape == converter.frame_shape
    raw = random_raw(1, 4) | np.uint16(0x0001)  # no pixel converts to exactly 0 ...
    out = converter.convert(raw)[0]
    # ... so the good pixels are exactly the nonzero output pixels
    np.testing.assert_array_equal(pixel_mask, out != 0)
    good_raw = ~reference_bad_pixels(mask, mask_double_pixels=True, mask_module_edges=False)
    assert pixel_mask.sum() == good_raw.reshape(4, -1)[[0, 1, 3]].sum()


def test_pixel_mask_does_not_depend_on_mask_option_except_double_pixels() -> None:
    gain, pedestal, mask = random_calibration(1)
    calibration = Calibration.from_arrays(gain, pedestal, mask)
    unmasked = Converter("JF13T01V01", calibration, ConversionOptions(mask=False)).pixel_mask
    plain = Converter("JF13T01V01", calibration, ConversionOptions(double_pixels="keep"))
    np.testing.assert_array_equal(unmasked, plain.pixel_mask)
    assert not unmasked[0, 256] and not unmasked[0, 773] and not unmasked[257, 0]  # gaps
    kept = ~reference_bad_pixels(mask, mask_double_pixels=False, mask_module_edges=False)
    assert unmasked[0, 255] == kept[0, 255]  # a double pixel, kept


def test_batches_and_dirty_output_buffers() -> None:
    gain, pedestal, mask = random_calibration(4)
    converter = Converter(
        "JF06T04V01",
        Calibration.from_arrays(gain, pedestal, mask),
        ConversionOptions(geometry=True),
    )
    raw = random_raw(5, 4)
    whole = converter.convert(raw)
    out = np.full(converter.output_shape(5), np.nan, np.float32)  # gaps must be overwritten
    converter.convert(raw[:2], out[:2])
    converter.convert(raw[2:], out[2:])
    assert out.tobytes() == whole.tobytes()
    assert converter.convert(raw[:0]).shape == (0, *converter.frame_shape)


def test_inputs_are_not_modified() -> None:
    gain, pedestal, mask = random_calibration(1)
    raw = random_raw(2, 1)
    copies = [a.copy() for a in (gain, pedestal, mask, raw)]
    converter = Converter("JF13T01V01", Calibration.from_arrays(gain, pedestal, mask))
    converter.convert(raw)
    for before, after in zip(copies, (gain, pedestal, mask, raw), strict=True):
        np.testing.assert_array_equal(before, after)


def test_wrong_raw_and_output_arrays() -> None:
    converter = Converter("JF13T01V01", Calibration.from_arrays(*random_calibration(1)))
    with pytest.raises(ConversionError) as error:
        converter.convert(np.zeros((1, 1024, 1024), np.uint16))
    assert str(error.value) == (
        "raw frames of JF13T01V01 must be uint16 (N, 512, 1024), not uint16 (1, 1024, 1024)"
    )
    with pytest.raises(ConversionError) as error:
        converter.convert(np.zeros((1, 512, 1024), np.int16))
    assert str(error.value) == (
        "raw frames of JF13T01V01 must be uint16 (N, 512, 1024), not int16 (1, 512, 1024)"
    )
    with pytest.raises(ConversionError) as error:
        converter.convert(np.zeros((1, 512, 1024), np.uint16), np.zeros((1, 514, 1030), np.int32))
    assert str(error.value) == "output must be float32 (1, 514, 1030), not int32 (1, 514, 1030)"
    with pytest.raises(ConversionError) as error:
        converter.convert(
            np.zeros((1, 512, 1024), np.uint16), np.zeros((1, 514, 2060), np.float32)[:, :, ::2]
        )
    assert str(error.value) == "output must be C-contiguous"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"factor": 0}, "factor must be a positive number, not 0"),
        ({"factor": float("nan")}, "factor must be a positive number, not nan"),
        ({"disabled_modules": [-1]}, "disabled_modules: negative module index in [-1]"),
        (
            {"disabled_modules": [4]},
            "disabled_modules: module 4 does not exist (the detector has 4 modules, 0..3)",
        ),
        (
            {"disabled_modules": [0, 1, 2, 3]},
            "disabled_modules: every module is disabled, nothing to convert",
        ),
        ({"gaps": True}, "unknown detector option 'gaps'"),
    ],
)
def test_option_errors(options: dict[str, object], message: str) -> None:
    calibration = Calibration.from_arrays(*random_calibration(4))
    with pytest.raises(ConversionError) as error:
        Converter("JF06T04V01", calibration, ConversionOptions.from_mapping(options))
    assert str(error.value) == message


def test_file_options_are_not_conversion_options() -> None:
    options = ConversionOptions.from_mapping({"compression": False, "keep_raw": True, "factor": 2})
    assert options == ConversionOptions(factor=2)


def test_output_dtypes_and_conversion_factor() -> None:
    calibration = Calibration.from_arrays(*random_calibration(1))
    kinds = [
        (ConversionOptions(), np.float32, 1.0),
        (ConversionOptions(factor=12.4), np.int32, 12.4),
        (ConversionOptions(adc_to_energy=False, factor=12.4), np.uint16, None),
    ]
    for options, dtype, factor in kinds:
        converter = Converter("JF13T01V01", calibration, options)
        assert converter.dtype == np.dtype(dtype)
        assert converter.conversion_factor == factor
