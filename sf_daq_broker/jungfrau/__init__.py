"""Jungfrau conversion: raw ADC frames -> energy, bit-identical to the facility's reference.

    converter = Converter.from_files("JF06T04V02", gain_file, pedestal_file,
                                     ConversionOptions(geometry=True), highgain=False)
    out = converter.empty_output(n_frames)          # (N, *converter.frame_shape), converter.dtype
    converter.convert(raw_batch, out)               # raw_batch: (N, 512*n, 1024) uint16
    converter.pixel_mask                            # bool, output geometry, True = good

Modules: ``calibration`` (gain/pedestal files), ``tables`` (the §3 constants), ``geometry``
(placement table, configs/geometry.toml), ``layout`` (output index image), ``plan`` (the
kernel's schedule), ``kernel`` (numba), ``converter`` (ties them together), ``interp`` and
``downsample`` (the upstream options' kernels), ``export`` (what a file holds, batch by batch),
``pedestal`` (pedestal files from pedestal runs), ``cli`` / ``pedestal_cli`` (commands).

The names below are imported on first use: the broker validates detector options with
``options`` and must not pay for compiling or loading numba kernels it never runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sf_daq_broker.jungfrau.calibration import Calibration, load_calibration
    from sf_daq_broker.jungfrau.converter import Converter
    from sf_daq_broker.jungfrau.errors import (
        CalibrationError,
        ConversionError,
        DetectorError,
        GeometryConfigError,
    )
    from sf_daq_broker.jungfrau.geometry import GeometryTable, load_geometry_table
    from sf_daq_broker.jungfrau.options import ConversionOptions

_EXPORTS = {
    "Calibration": "calibration",
    "load_calibration": "calibration",
    "Converter": "converter",
    "CalibrationError": "errors",
    "ConversionError": "errors",
    "DetectorError": "errors",
    "GeometryConfigError": "errors",
    "GeometryTable": "geometry",
    "load_geometry_table": "geometry",
    "ConversionOptions": "options",
}

__all__ = [
    "Calibration",
    "CalibrationError",
    "ConversionError",
    "ConversionOptions",
    "Converter",
    "DetectorError",
    "GeometryConfigError",
    "GeometryTable",
    "load_calibration",
    "load_geometry_table",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
