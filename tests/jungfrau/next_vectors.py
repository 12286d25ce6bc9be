"""The cases of ``testdata/jungfrau_next`` and their input files, built as its README says.

The files are written with plain h5py, the way the facility's own writer lays them out
(``general/detector_name``; ``data/<DET>/{data, pulse_id, frame_index, daq_rec,
is_good_frame}``, each column (N, 1)), independently of the package's writer, so a reader that
only understands our own files would fail here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import pytest

from tests.jungfrau.support import shared_testdata

NEXT = "jungfrau_next"


def cases(kind: str) -> list[Any]:
    """pytest params, one per case of ``kind`` ("convert" or "pedestal")."""
    manifest = shared_testdata(NEXT) / "manifest.json"
    if not manifest.is_file():
        return [pytest.param(None, id="manifest-missing")]
    return [
        pytest.param(case, id=case["name"])
        for case in json.loads(manifest.read_text())
        if case["kind"] == kind
    ]


def digest(array: npt.NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def write_raw_file(
    path: Path,
    detector: str,
    data: npt.NDArray[np.uint16],
    *,
    pulse_id: npt.ArrayLike,
    frame_index: npt.ArrayLike,
    daq_rec: npt.ArrayLike,
    is_good_frame: npt.ArrayLike,
) -> None:
    """A raw detector file in the facility's layout."""
    n = data.shape[0]
    with h5py.File(path, "w") as file:
        file["general/detector_name"] = detector
        group = file.create_group(f"data/{detector}")
        group.create_dataset("data", data=data, chunks=(1, *data.shape[1:]))
        columns = {
            "pulse_id": (pulse_id, np.uint64),
            "frame_index": (frame_index, np.uint64),
            "daq_rec": (daq_rec, np.uint32),
            "is_good_frame": (is_good_frame, np.uint8),
        }
        for name, (values, dtype) in columns.items():
            group[name] = np.asarray(values, dtype=dtype).reshape(n, 1)


def write_pedestal_inputs(case: dict[str, Any], directory: Path) -> tuple[Path, Path | None]:
    """The raw pedestal-run file of a pedestal case (and its site mask file, if used)."""
    with np.load(shared_testdata(NEXT) / case["inputs"]) as inputs:
        frames, sequence = inputs["frames"], inputs["sequence"]
        raw_file = directory / case["raw_file_name"]
        write_raw_file(
            raw_file,
            case["detector"],
            frames[sequence],
            pulse_id=inputs["pulse_id"],
            frame_index=np.arange(sequence.size),
            daq_rec=inputs["daq_rec"],
            is_good_frame=inputs["is_good_frame"],
        )
        mask_file = None
        if case["options"].get("add_pixel_mask"):
            mask_file = directory / "pixel_mask.h5"
            with h5py.File(mask_file, "w") as file:
                file["pixel_mask"] = inputs["add_pixel_mask"]
    return raw_file, mask_file


def write_convert_inputs(
    case: dict[str, Any], directory: Path, inputs_dir: Path | None = None
) -> tuple[Path, Path, Path]:
    """(raw file, gain file, pedestal file) of a convert case, as the README builds them.

    ``inputs_dir`` is where the inputs npz lives (``jungfrau_next`` by default; the older
    ``jungfrau`` vectors have the same arrays and the same defaults).
    """
    with np.load((inputs_dir or shared_testdata(NEXT)) / case["inputs"]) as inputs:
        raw, gain = inputs["raw"], inputs["gain"]
        pedestal, pixel_mask = inputs["pedestal"], inputs["pixel_mask"]
    n = raw.shape[0]
    overrides = case.get("raw", {})
    highgain = bool(case["options"].get("highgain", False))
    detector = case["detector"]
    raw_file = directory / f"{case.get('name', 'case')}.{detector}.raw.h5"
    write_raw_file(
        raw_file,
        detector,
        raw,
        pulse_id=15000000000 + np.arange(n),
        frame_index=7 + np.arange(n),
        daq_rec=overrides.get("daq_rec", [1 if highgain else 0] * n),
        is_good_frame=overrides.get("is_good_frame", [1] * n),
    )
    gain_file, pedestal_file = directory / "gain.h5", directory / "pedestal.h5"
    with h5py.File(gain_file, "w") as file:
        file["gains"] = gain
    with h5py.File(pedestal_file, "w") as file:
        file["gains"] = pedestal
        file["gainsRMS"] = np.ones_like(pedestal)
        file["pixel_mask"] = pixel_mask
    return raw_file, gain_file, pedestal_file
