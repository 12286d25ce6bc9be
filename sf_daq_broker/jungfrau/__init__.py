"""Jungfrau conversion: raw ADC frames -> energy, bit-identical to the facility's reference.

    converter = Converter.from_files("JF06T04V02", gain_file, pedestal_file,
                                     ConversionOptions(geometry=True), highgain=False)
    out = converter.empty_output(n_frames)          # (N, *converter.frame_shape), converter.dtype
    converter.convert(raw_batch, out)               # raw_batch: (N, 512*n, 1024) uint16
    converter.pixel_mask                            # bool, output geometry, True = good

Modules: ``calibration`` (gain/pedestal files), ``tables`` (the §3 constants), ``geometry``
(placement table, configs/geometry.toml), ``layout`` (output index image), ``plan`` (the
kernel's schedule), ``kernel`` (numba), ``converter`` (ties them together), ``cli`` (convert).
"""

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
