"""The detector file writer: layouts, direct chunks, compression, atomic publishing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pytest

from sf_daq_broker.h5 import bslz4
from sf_daq_broker.h5.atomic import atomic_output
from sf_daq_broker.h5.detector import (
    DetectorFileError,
    DetectorFileWriter,
    FrameColumns,
    RawDetectorFile,
)

ATTRIBUTES = {
    "pgroup": "p12345",
    "run_number": 12,
    "beamline": "bernina",
    "start_pulse_id": 1000,
    "stop_pulse_id": 1090,
    "request_id": "2c5d6f0e-0000-4000-8000-000000000000",
    "software_version": "0.1.0",
}


def _columns(n: int, first: int = 0) -> FrameColumns:
    rows = np.arange(first, first + n)
    return FrameColumns.from_arrays(
        pulse_id=1000 + 10 * rows,
        frame_index=5 + rows,
        daq_rec=rows % 2,
        is_good_frame=(rows % 3 != 1),
        requested_pulse_id=1000 + 10 * rows,
    )


def _frames(n: int, shape: tuple[int, int], dtype: Any) -> np.ndarray:
    rng = np.random.default_rng(7)
    if np.dtype(dtype).kind == "f":
        return rng.normal(3.0, 2.0, (n, *shape)).astype(dtype)
    return rng.integers(0, 60, (n, *shape)).astype(dtype)


@pytest.mark.parametrize(
    ("dtype", "compression"),
    [(np.float32, True), (np.int32, True), (np.uint16, True), (np.float32, False)],
)
def test_round_trip(tmp_path: Path, dtype: Any, compression: bool) -> None:
    shape = (514, 1030)
    frames = _frames(5, shape, dtype)
    mask = np.ones(shape, bool)
    mask[:, 256:258] = False
    path = tmp_path / "run_000012.JF13T01V01.h5"
    with DetectorFileWriter(
        path,
        "JF13T01V01",
        5,
        shape,
        dtype,
        compression=compression,
        attributes=ATTRIBUTES,
        pixel_mask=mask,
        conversion_factor=12.4,
    ) as writer:
        writer.write(frames[:2], _columns(2))  # in batches
        writer.write(frames[2:], _columns(3, first=2))

    with h5py.File(path, "r") as file:
        assert dict(file.attrs) == ATTRIBUTES
        assert file["general/detector_name"][()] == b"JF13T01V01"
        assert file["general/detector_name"].shape == ()
        group = file["data/JF13T01V01"]
        data = group["data"]
        assert data.dtype == dtype and data.shape == (5, *shape) and data.chunks == (1, *shape)
        np.testing.assert_array_equal(data[()], frames)
        expected = _columns(5)
        for name, dtype_ in [
            ("pulse_id", np.uint64),
            ("frame_index", np.uint64),
            ("daq_rec", np.uint32),
            ("is_good_frame", np.uint8),
            ("requested_pulse_id", np.uint64),
        ]:
            assert group[name].dtype == dtype_ and group[name].shape == (5, 1)
            np.testing.assert_array_equal(group[name][:, 0], getattr(expected, name))
        assert group["is_good_frame"][:, 0].tolist() == [1, 0, 1, 1, 0]
        assert group["pixel_mask"].dtype == np.bool_
        np.testing.assert_array_equal(group["pixel_mask"][()], mask)
        assert group["conversion_factor"][()] == 12.4
        plist = data.id.get_create_plist()
        if compression:
            assert plist.get_nfilters() == 1
            filter_id, _, values, _ = plist.get_filter(0)
            assert filter_id == 32008
            assert values == (0, 5, np.dtype(dtype).itemsize, 32768, 2)
        else:
            assert plist.get_nfilters() == 0


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (np.float32, (514, 1030)),
        (np.int32, (2136, 1132)),
        (np.uint16, (512, 1024)),
        (np.float32, (3, 7)),
    ],
)
def test_direct_chunks_equal_hdf5plugin_chunks(
    tmp_path: Path, dtype: Any, shape: tuple[int, int]
) -> None:
    frames = _frames(2, shape, dtype)
    with DetectorFileWriter(tmp_path / "ours.h5", "JF13T01V01", 2, shape, dtype) as writer:
        writer.write(frames, _columns(2))
    with h5py.File(tmp_path / "theirs.h5", "w") as file:
        file.create_dataset(
            "data",
            data=frames,
            chunks=(1, *shape),
            **hdf5plugin.Bitshuffle(nelems=32768, cname="lz4"),
        )
    with h5py.File(tmp_path / "ours.h5") as ours, h5py.File(tmp_path / "theirs.h5") as theirs:
        for index in range(2):
            mine = ours["data/JF13T01V01/data"].id.read_direct_chunk((index, 0, 0))
            reference = theirs["data"].id.read_direct_chunk((index, 0, 0))
            assert mine == reference
            assert mine[1] == bytes(bslz4.compress_chunk(frames[index]))


def test_filter_fallback_keeps_data_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bslz4, "_filter_swap", lambda: None)
    frames = _frames(1, (16, 32), np.float32)
    with DetectorFileWriter(tmp_path / "f.h5", "JF13T01V01", 1, (16, 32), np.float32) as writer:
        writer.write(frames, _columns(1))
    with h5py.File(tmp_path / "f.h5") as file:
        data = file["data/JF13T01V01/data"]
        assert data.id.get_create_plist().get_filter(0)[0] == 32008
        np.testing.assert_array_equal(data[()], frames)


def test_other_bitshuffle_datasets_are_unaffected(tmp_path: Path) -> None:
    """The filter swap is undone: hdf5plugin datasets created afterwards work as usual."""
    frames = _frames(1, (16, 32), np.float32)
    with h5py.File(tmp_path / "open.h5", "w") as other:
        opened = other.create_dataset(
            "x", data=frames, chunks=(1, 16, 32), **hdf5plugin.Bitshuffle(nelems=32768, cname="lz4")
        )
        with DetectorFileWriter(tmp_path / "f.h5", "JF13T01V01", 1, (16, 32), np.float32) as w:
            w.write(frames, _columns(1))
        later = other.create_dataset(
            "y", data=frames, chunks=(1, 16, 32), **hdf5plugin.Bitshuffle(nelems=32768, cname="lz4")
        )
        np.testing.assert_array_equal(opened[()], frames)
        np.testing.assert_array_equal(later[()], frames)


def test_raw_layout_without_conversion_datasets(tmp_path: Path) -> None:
    frames = _frames(2, (1024, 1024), np.uint16)
    with DetectorFileWriter(tmp_path / "raw.h5", "JF07T02V01", 2, (1024, 1024), np.uint16) as w:
        w.write(frames, _columns(2))
    with h5py.File(tmp_path / "raw.h5") as file:
        assert set(file["data/JF07T02V01"]) == {
            "data",
            "pulse_id",
            "frame_index",
            "daq_rec",
            "is_good_frame",
            "requested_pulse_id",
        }
    with RawDetectorFile(tmp_path / "raw.h5") as raw:
        assert raw.detector == "JF07T02V01" and raw.n_frames == 2
        out = np.empty((2, 1024, 1024), np.uint16)
        raw.read_frames(0, 2, out)
        np.testing.assert_array_equal(out, frames)
        assert raw.columns(1, 2).pulse_id.tolist() == [1010]
        assert raw.highgain() is False  # first good frame (row 0) has daq_rec 0


def test_empty_file(tmp_path: Path) -> None:
    with DetectorFileWriter(tmp_path / "e.h5", "JF13T01V01", 0, (514, 1030), np.float32):
        pass
    with h5py.File(tmp_path / "e.h5") as file:
        assert file["data/JF13T01V01/data"].shape == (0, 514, 1030)
        assert file["data/JF13T01V01/pulse_id"].shape == (0, 1)


def test_writer_refuses_misuse(tmp_path: Path) -> None:
    writer = DetectorFileWriter(tmp_path / "m.h5", "JF13T01V01", 2, (8, 8), np.float32)
    with pytest.raises(DetectorFileError) as error:
        writer.write(np.zeros((1, 8, 8), np.int32), _columns(1))
    assert str(error.value) == "frames must be float32 (k, 8, 8), not int32 (1, 8, 8)"
    with pytest.raises(DetectorFileError) as error:
        writer.write(np.zeros((2, 8, 8), np.float32), _columns(1))
    assert str(error.value) == "2 frames but 1 rows of frame columns"
    with pytest.raises(DetectorFileError) as error:
        writer.write(np.zeros((3, 8, 8), np.float32), _columns(3))
    assert str(error.value) == "3 frames written, the file was created for 2"
    writer.write(np.zeros((1, 8, 8), np.float32), _columns(1))
    with pytest.raises(DetectorFileError) as error:
        writer.close()
    assert str(error.value) == "only 1 of 2 frames were written"


def test_atomic_output_publishes_complete_files_only(tmp_path: Path) -> None:
    final = tmp_path / "run_000001.JF13T01V01.h5"
    with atomic_output(final) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".")
        temporary.write_bytes(b"complete")
        assert not final.exists()
    assert final.read_bytes() == b"complete"
    assert list(tmp_path.iterdir()) == [final]

    with pytest.raises(RuntimeError), atomic_output(final) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("disk gone")
    assert final.read_bytes() == b"complete"  # the old file survives a failed rewrite
    assert list(tmp_path.iterdir()) == [final]


def test_writer_failure_mid_way_leaves_no_file(tmp_path: Path) -> None:
    final = tmp_path / "run_000002.JF13T01V01.h5"
    with (
        pytest.raises(ValueError, match="buffer broke"),
        atomic_output(final) as temporary,
        DetectorFileWriter(temporary, "JF13T01V01", 4, (8, 8), np.float32) as writer,
    ):
        writer.write(np.zeros((2, 8, 8), np.float32), _columns(2))
        raise ValueError("buffer broke")
    assert list(tmp_path.iterdir()) == []

    with (
        pytest.raises(DetectorFileError),
        atomic_output(final) as temporary,
        DetectorFileWriter(temporary, "JF13T01V01", 4, (8, 8), np.float32) as writer,
    ):
        writer.write(np.zeros((2, 8, 8), np.float32), _columns(2))  # short: close refuses
    assert list(tmp_path.iterdir()) == []
