"""SortedChannel: a stream of batches in, the file holds exactly ``select_rows`` of the whole run.

Every value encodes its arrival index, so "the first received of each repeated pulse id" is
checked, not only the pulse ids. Small late budgets and merge blocks force mid-stream merges
and multi-block rewrites; real HDF5 files throughout.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import bitshuffle
import h5py
import hdf5plugin  # noqa: F401 - camera chunks are bitshuffle+LZ4
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sf_daq_broker.h5 import sorted_channel
from sf_daq_broker.h5.channels import (
    ChannelFile,
    ChannelRows,
    CompressedImages,
    keep_rows,
    select_rows,
)
from sf_daq_broker.h5.sorted_channel import SortedChannel

START, STOP = 100, 160
IMAGE = (3, 4)


def blob(image: np.ndarray) -> bytes:
    header = np.array([image.nbytes], ">u8").tobytes() + np.array([8192], ">u4").tobytes()
    return header + bitshuffle.compress_lz4(image, 8192 // image.itemsize).tobytes()


def arrivals(pulse_ids: list[int], kind: str) -> ChannelRows:
    """The whole stream as one table; value ``i`` is the ``i``-th arrival's."""
    ids = np.array(pulse_ids, dtype=np.int64)
    order = np.arange(ids.size)
    values: np.ndarray | list[str] | CompressedImages
    if kind == "numbers":
        values = np.stack([order, ids], axis=1).astype(np.float64)  # a (N, 2) waveform
    elif kind == "strings":
        values = [f"arrival {i} of pulse {p} ü" for i, p in enumerate(pulse_ids)]
    else:
        images = [np.full(IMAGE, i, dtype=np.uint16) for i in order]
        values = CompressedImages([blob(image) for image in images], IMAGE, np.dtype(np.uint16))
    return ChannelRows("CH:X", ids, ids * 10 + 1, values)


def stream(path: Path, table: ChannelRows, cuts: list[int], late_budget: int) -> SortedChannel:
    with ChannelFile(path, {"run_number": 1}) as file:
        channel = SortedChannel(file.streamed("CH:X"), START, STOP, late_budget=late_budget)
        bounds = [0, *sorted(c for c in cuts if 0 < c < len(table)), len(table)]
        for begin, end in itertools.pairwise(bounds):
            channel.append(table.slice(begin, end))
        channel.finish()
    return channel


def assert_file_holds(path: Path, expected: ChannelRows, kind: str) -> None:
    with h5py.File(path) as file:
        group = file["CH:X"]
        assert group["pulse_id"][:].tolist() == expected.pulse_ids.tolist()
        assert group["pulse_id"].dtype == np.int64
        assert group["timestamp"][:].tolist() == expected.timestamps.tolist()
        data = group["data"]
        if kind == "numbers":
            assert isinstance(expected.values, np.ndarray)
            np.testing.assert_array_equal(data[:], expected.values)
            assert data.dtype == np.float64 and data.shape == (len(expected), 2)
        elif kind == "strings":
            assert data.asstr()[:].tolist() == list(expected.values)  # type: ignore[arg-type]
        else:
            assert isinstance(expected.values, CompressedImages)
            assert data.shape == (len(expected), *IMAGE) and data.chunks == (1, *IMAGE)
            chunks = [data.id.read_direct_chunk((i, 0, 0))[1] for i in range(len(expected))]
            assert chunks == list(expected.values.blobs)


@pytest.mark.parametrize("kind", ["numbers", "strings", "images"])
def test_out_of_order_and_duplicates_across_batch_boundaries(tmp_path: Path, kind: str) -> None:
    # batches: [101 102 103 | 103 105 104 | 102 107 | 99 106 106 170 | 101 108]
    pulse_ids = [101, 102, 103, 103, 105, 104, 102, 107, 99, 106, 106, 170, 101, 108]
    cuts = [3, 6, 8, 12]
    table = arrivals(pulse_ids, kind)
    channel = stream(tmp_path / "x.h5", table, cuts, late_budget=1 << 20)
    expected = keep_rows(table, select_rows(table.pulse_ids, START, STOP))
    assert expected.pulse_ids.tolist() == [101, 102, 103, 104, 105, 106, 107, 108]
    assert_file_holds(tmp_path / "x.h5", expected, kind)
    # 103 again right after 103, 102 again (late), 106 twice in a batch, 101 again (late)
    assert channel.duplicates == 4
    assert channel.received == 14 and channel.newest == 170


def test_a_late_row_older_than_everything_written_goes_first(tmp_path: Path) -> None:
    table = arrivals([105, 106, 107, 101, 100], "numbers")
    stream(tmp_path / "x.h5", table, [1, 2, 3, 4], late_budget=1 << 20)
    expected = keep_rows(table, select_rows(table.pulse_ids, START, STOP))
    assert expected.pulse_ids.tolist() == [100, 101, 105, 106, 107]
    assert_file_holds(tmp_path / "x.h5", expected, "numbers")


def test_a_channel_with_events_only_outside_the_range_gets_an_empty_group(tmp_path: Path) -> None:
    table = arrivals([90, 91, 200], "numbers")
    channel = stream(tmp_path / "x.h5", table, [1], late_budget=1 << 20)
    with h5py.File(tmp_path / "x.h5") as file:
        assert file["CH:X/data"].shape == (0, 2)
        assert file["CH:X/pulse_id"].shape == (0,)
    assert channel.received == 3 and channel.duplicates == 0


def test_restart_drops_what_was_written(tmp_path: Path) -> None:
    first, again = arrivals([101, 102], "numbers"), arrivals([101, 102, 103], "strings")
    path = tmp_path / "x.h5"
    with ChannelFile(path, {}) as file:
        channel = SortedChannel(file.streamed("CH:X"), START, STOP)
        channel.append(first)
        channel.restart()
        assert channel.received == 0 and channel.newest is None
        channel.append(again)
        channel.finish()
    with h5py.File(path) as file:
        assert file["CH:X/pulse_id"][:].tolist() == [101, 102, 103]
        assert file["CH:X/data"].asstr()[:].tolist() == list(again.values)  # type: ignore[arg-type]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pulse_ids=st.lists(st.integers(START - 5, STOP + 5), min_size=20, max_size=120),
    cuts=st.lists(st.integers(1, 119), min_size=2, max_size=12),
    late_budget=st.sampled_from([0, 200, 1 << 20]),
    block_bytes=st.sampled_from([1, 100, 1 << 20]),
    kind=st.sampled_from(["numbers", "strings", "images"]),
)
def test_any_stream_gives_select_rows_of_the_whole_run(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    pulse_ids: list[int],
    cuts: list[int],
    late_budget: int,
    block_bytes: int,
    kind: str,
) -> None:
    monkeypatch.setattr(sorted_channel, "MERGE_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(sorted_channel, "SCAN_ROWS", 7)
    path = tmp_path_factory.mktemp("sorted") / "x.h5"
    table = arrivals(pulse_ids, kind)
    channel = stream(path, table, cuts, late_budget)
    selection = select_rows(table.pulse_ids, START, STOP)
    assert_file_holds(path, keep_rows(table, selection), kind)
    assert channel.duplicates == selection.duplicates_removed
    assert channel.received == len(pulse_ids)
