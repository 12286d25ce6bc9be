"""Gain and pedestal files of the simulated detectors (JUNGFRAU.md §2).

They hold exactly the constants the simulated frames were made with
(``jungfrau_frames.detector_calibration``), so converting a simulated run gives energies that
make sense (photons of 12.4 keV come out at 12.4 keV). Written to a temporary name and renamed,
because a worker may open them while the simulator starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py

from sf_daq_broker.buffers.jungfrau_format import n_modules
from sf_daq_broker.simulation.jungfrau_frames import detector_calibration

GAIN_FILE = "gains.h5"
PEDESTAL_FILE = "pedestal.h5"


def calibration_paths(directory: Path, detector: str) -> tuple[Path, Path]:
    """Where ``write_calibration_files`` puts the gain and pedestal files of ``detector``."""
    base = Path(directory) / detector
    return base / GAIN_FILE, base / PEDESTAL_FILE


def write_calibration_files(directory: Path, detector: str) -> tuple[Path, Path]:
    """Write ``{directory}/{DET}/gains.h5`` (``/gains`` (4, H, W) float32) and
    ``pedestal.h5`` (``/gains``, ``/gainsRMS`` (3, H, W) float32, ``/pixel_mask`` (H, W) int64);
    returns their paths."""
    gain_path, pedestal_path = calibration_paths(directory, detector)
    gain_path.parent.mkdir(parents=True, exist_ok=True)
    calibration = detector_calibration(detector, n_modules(detector))
    _write_atomically(gain_path, {"gains": calibration.gain})
    _write_atomically(
        pedestal_path,
        {
            "gains": calibration.pedestal,
            "gainsRMS": calibration.pedestal_rms,
            "pixel_mask": calibration.pixel_mask,
        },
    )
    return gain_path, pedestal_path


def _write_atomically(path: Path, datasets: dict[str, object]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(temporary, "w") as handle:
        for name, data in datasets.items():
            handle.create_dataset(name, data=data)
    os.replace(temporary, path)
