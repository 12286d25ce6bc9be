"""Gain and pedestal files (JUNGFRAU.md §2): read, check, and refuse what would convert wrongly.

Every refusal names the file, the dataset and what was expected, because the person who sees it
is usually at a beamline with a freshly produced pedestal file and must fix that file, not our
code. A 3-slice gain map is refused outright: silently treating it as 4 slices would read past
the end or convert high-gain runs with the wrong constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from sf_daq_broker.jungfrau.detectors import MODULE_COLUMNS, MODULE_ROWS
from sf_daq_broker.jungfrau.errors import CalibrationError

GAIN_SLICES = (4, 6)  # G0 G1 G2 HG0 [HG1 HG2]
PEDESTAL_SLICES = (3, 4)  # G0 G1 G2 [HG0]
MASK_DTYPES = (np.dtype(np.int64), np.dtype(np.bool_))
_GAIN_HINT = (
    "4 (G0, G1, G2, HG0) or 6 (G0, G1, G2, HG0, HG1, HG2) are needed "
    "(a 3-slice gain map must be expanded to 6 by copying G0..G2 into HG0..HG2)"
)
_PEDESTAL_HINT = "3 (G0, G1, G2) or 4 (G0, G1, G2, HG0) are needed"


@dataclass(frozen=True)
class Calibration:
    """Checked calibration of one detector: float32 gain and pedestal, the pixel mask as stored."""

    gain: npt.NDArray[np.float32]  # (4|6, H, W), ADU per keV
    pedestal: npt.NDArray[np.float32]  # (3|4, H, W), ADU
    pixel_mask: npt.NDArray[Any]  # (H, W) int64 or bool, nonzero = bad

    @property
    def n_modules(self) -> int:
        return int(self.pixel_mask.shape[0]) // MODULE_ROWS

    @classmethod
    def from_arrays(
        cls,
        gain: npt.ArrayLike,
        pedestal: npt.ArrayLike,
        pixel_mask: npt.ArrayLike,
        *,
        gain_name: str = "gain",
        pedestal_name: str = "pedestal",
    ) -> Calibration:
        """Check shapes and dtypes and cast to float32; the names appear in the messages."""
        gain = np.asarray(gain)
        pedestal = np.asarray(pedestal)
        mask = np.asarray(pixel_mask)
        _check_stack(gain, f"{gain_name}: /gains", GAIN_SLICES, _GAIN_HINT)
        _check_stack(pedestal, f"{pedestal_name}: /gains", PEDESTAL_SLICES, _PEDESTAL_HINT)
        if mask.dtype not in MASK_DTYPES:
            raise CalibrationError(
                f"{pedestal_name}: /pixel_mask has dtype {mask.dtype}; int64 or bool is needed"
            )
        frame = gain.shape[1:]
        if pedestal.shape[1:] != frame:
            raise CalibrationError(
                f"{pedestal_name}: /gains frames are {_shape(pedestal.shape[1:])}, the gain "
                f"file's are {_shape(frame)}"
            )
        if mask.shape != frame:
            raise CalibrationError(
                f"{pedestal_name}: /pixel_mask has shape {_shape(mask.shape)}; "
                f"{_shape(frame)} is needed"
            )
        return cls(
            gain=gain.astype(np.float32, copy=False),
            pedestal=pedestal.astype(np.float32, copy=False),
            pixel_mask=mask,
        )


def load_calibration(gain_file: Path | str, pedestal_file: Path | str) -> Calibration:
    """Read ``/gains`` of the gain file, ``/gains`` and ``/pixel_mask`` of the pedestal file."""
    gain = _read(Path(gain_file), "gain file", "gains")
    pedestal = _read(Path(pedestal_file), "pedestal file", "gains")
    mask = _read(Path(pedestal_file), "pedestal file", "pixel_mask")
    return Calibration.from_arrays(
        gain,
        pedestal,
        mask,
        gain_name=f"gain file {gain_file}",
        pedestal_name=f"pedestal file {pedestal_file}",
    )


def check_modules(calibration: Calibration, detector: str, n_modules: int) -> None:
    """The calibration must cover the whole detector, disabled modules included."""
    rows = calibration.pixel_mask.shape[0]
    if rows != n_modules * MODULE_ROWS:
        raise CalibrationError(
            f"the calibration covers {rows // MODULE_ROWS} modules ({rows} rows), detector "
            f"{detector} has {n_modules} ({n_modules * MODULE_ROWS} rows)"
        )


def _read(path: Path, what: str, dataset: str) -> npt.NDArray[Any]:
    if not path.is_file():
        raise CalibrationError(f"{what} {path} does not exist")
    try:
        with h5py.File(path, "r") as file:
            if dataset not in file or not isinstance(file[dataset], h5py.Dataset):
                raise CalibrationError(f"{what} {path}: no dataset /{dataset}")
            data: npt.NDArray[Any] = file[dataset][()]
            return data
    except OSError as exc:
        raise CalibrationError(f"{what} {path} cannot be read as HDF5: {exc}") from exc


def _check_stack(array: npt.NDArray[Any], where: str, slices: tuple[int, ...], hint: str) -> None:
    if array.dtype.kind != "f":
        raise CalibrationError(f"{where} has dtype {array.dtype}; a float dtype is needed")
    if array.ndim != 3:
        raise CalibrationError(
            f"{where} has shape {_shape(array.shape)}; (slices, 512*n_modules, 1024) is needed"
        )
    if array.shape[0] not in slices:
        raise CalibrationError(f"{where} has {array.shape[0]} slices; {hint}")
    height, width = array.shape[1:]
    if width != MODULE_COLUMNS or height == 0 or height % MODULE_ROWS:
        raise CalibrationError(
            f"{where} has shape {_shape(array.shape)}; frames must be (512*n_modules, 1024)"
        )


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"
