"""BSDATA/CAMERAS/PVCHANNELS writer: layout, dtypes, row selection, direct-chunk images."""

from __future__ import annotations

from pathlib import Path

import bitshuffle
import h5py
import hdf5plugin  # noqa: F401 - registers the bitshuffle filter for reading
import numpy as np

from sf_daq_broker.h5.channels import (
    ChannelRows,
    CompressedImages,
    keep_rows,
    select_rows,
    write_channels,
)


def test_select_rows_sorts_dedupes_and_clips() -> None:
    pulse_ids = np.array([105, 101, 103, 103, 99, 112, 101, 104], dtype=np.int64)
    selection = select_rows(pulse_ids, 100, 110)
    assert pulse_ids[selection.rows].tolist() == [101, 103, 104, 105]
    assert selection.rows.tolist() == [1, 2, 7, 0]  # the first of each repeated pulse id
    assert selection.duplicates_removed == 2


def blob(image: np.ndarray) -> bytes:
    header = np.array([image.nbytes], ">u8").tobytes() + np.array([8192], ">u4").tobytes()
    compressed = bitshuffle.compress_lz4(image, 8192 // image.itemsize)
    return header + compressed.tobytes()


def test_round_trip_of_every_kind_of_value(tmp_path: Path) -> None:
    images = np.arange(3 * 40 * 30, dtype=np.uint16).reshape(3, 40, 30)
    channels = [
        ChannelRows(
            "SAR:SCALAR",
            np.array([3, 1, 2, 2]),
            np.array([30, 10, 20, 21]),
            np.array([3.5, 1.5, 2.5, 9.9], dtype=">f8"),
        ),
        ChannelRows(
            "SAR:WAVE",
            np.array([1, 2]),
            np.array([10, 20]),
            np.arange(8, dtype=np.int32).reshape(2, 4),
        ),
        ChannelRows("SAR:TEXT", np.array([2, 1]), np.array([20, 10]), ["zwei", "eins ü"]),
        ChannelRows(
            "CAM:FPICTURE",
            np.array([1, 2, 3]),
            np.array([10, 20, 30]),
            CompressedImages([blob(image) for image in images], (40, 30), np.dtype(np.uint16)),
        ),
    ]
    selected = [keep_rows(ch, select_rows(ch.pulse_ids, 1, 3)) for ch in channels]
    target = tmp_path / "out.h5"
    write_channels(target, {"pgroup": "p12345", "run_number": 4}, selected)
    with h5py.File(target, "r") as file:
        assert dict(file.attrs) == {"pgroup": "p12345", "run_number": 4}
        assert sorted(file) == ["CAM:FPICTURE", "SAR:SCALAR", "SAR:TEXT", "SAR:WAVE"]
        scalar = file["SAR:SCALAR"]
        assert scalar["data"][:].tolist() == [1.5, 2.5, 3.5]
        assert scalar["data"].dtype == np.dtype(">f8")
        assert scalar["pulse_id"][:].tolist() == [1, 2, 3]
        assert scalar["pulse_id"].dtype == np.int64
        assert scalar["timestamp"][:].tolist() == [10, 20, 30]
        assert file["SAR:WAVE"]["data"].shape == (2, 4)
        assert file["SAR:TEXT"]["data"].asstr()[:].tolist() == ["eins ü", "zwei"]
        camera = file["CAM:FPICTURE"]["data"]
        assert (camera.shape, camera.chunks, camera.dtype) == ((3, 40, 30), (1, 40, 30), np.uint16)
        assert 32008 in [
            camera.id.get_create_plist().get_filter(i)[0]
            for i in range(camera.id.get_create_plist().get_nfilters())
        ]
        np.testing.assert_array_equal(camera[:], images)
        # The chunks are the buffer's blobs, byte for byte.
        assert camera.id.read_direct_chunk((1, 0, 0))[1] == blob(images[1])
