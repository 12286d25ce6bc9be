"""The BSDATA, CAMERAS and PVCHANNELS files (SPEC §5.1-§5.3): their layout and how rows get in.

One group per name at the file root, named exactly as the channel (colons kept), with
``data``, ``pulse_id`` and ``timestamp`` datasets (PVs add ``changed_in_interval``). Camera
images that arrive bitshuffle+LZ4 compressed are stored as they came, one chunk per image,
without ever being decompressed.

A ``ChannelFile`` is one open output file. Rows get in two ways:

- ``write(rows)``: a whole channel at once, rows as given, in contiguous datasets (PVs, whose
  few values follow time, not pulse id; tests and tools building files);
- ``streamed(name)``: a ``StreamedGroup`` whose resizable datasets grow batch by batch, so a
  channel of any length goes to disk as it arrives (the data buffer and image buffer jobs,
  through ``h5.sorted_channel.SortedChannel``, which keeps the rows sorted and unique). Chunks
  are ``CHUNK_BYTES`` of rows (one image per chunk for cameras).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt

from sf_daq_broker import __version__
from sf_daq_broker.h5.closing import abandon, close_flushed, create
from sf_daq_broker.jobs import Job

BITSHUFFLE_FILTER = 32008
STRING_DTYPE = h5py.string_dtype("utf-8")
#: Chunk size of streamed datasets: small enough that a sparse channel's last, partly filled
#: chunk wastes little (HDF5 stores whole chunks), large enough for few chunk-index entries.
CHUNK_BYTES = 1 << 16


def provenance(job: Job) -> dict[str, Any]:
    """Root attributes of every output file (SPEC §5)."""
    return {
        "pgroup": job.pgroup,
        "run_number": job.run_number,
        "beamline": job.beamline,
        "start_pulse_id": job.start_pulse_id,
        "stop_pulse_id": job.stop_pulse_id,
        "request_id": job.request_id,
        "software_version": __version__,
    }


@dataclass(frozen=True)
class CompressedImages:
    """Images as bitshuffle+LZ4 blobs (12-byte header included), exactly as the buffer sent them."""

    blobs: Sequence[bytes]
    shape: tuple[int, int]  # numpy (H, W)
    dtype: np.dtype[Any]
    block_size_bytes: int = 8192


Values = npt.NDArray[Any] | Sequence[str] | CompressedImages


def _take(values: Values, rows: npt.NDArray[np.intp]) -> Values:
    if isinstance(values, CompressedImages):
        return CompressedImages(
            [values.blobs[i] for i in rows], values.shape, values.dtype, values.block_size_bytes
        )
    if isinstance(values, np.ndarray):
        return values[rows]
    return [values[i] for i in rows]


def _slice(values: Values, begin: int, end: int) -> Values:
    if isinstance(values, CompressedImages):
        blobs = values.blobs[begin:end]
        return CompressedImages(blobs, values.shape, values.dtype, values.block_size_bytes)
    return values[begin:end]


def _concat(parts: Sequence[Values]) -> Values:
    first = parts[0]
    if isinstance(first, CompressedImages):
        blobs = [blob for part in parts for blob in part.blobs]  # type: ignore[union-attr]
        return CompressedImages(blobs, first.shape, first.dtype, first.block_size_bytes)
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)  # type: ignore[arg-type]
    return [value for part in parts for value in part]  # type: ignore[union-attr]


def _nbytes(values: Values) -> int:
    if isinstance(values, CompressedImages):
        return sum(len(blob) for blob in values.blobs)
    if isinstance(values, np.ndarray) and values.dtype.kind not in "OUS":
        return values.nbytes
    return 64 * len(values)  # strings: a Python object each, roughly


@dataclass
class ChannelRows:
    """Events of one name as fetched: maybe unsorted, repeated, or outside the range."""

    name: str
    pulse_ids: npt.NDArray[np.int64]
    timestamps: npt.NDArray[np.int64]
    values: Values
    extra: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pulse_ids)

    @property
    def nbytes(self) -> int:
        """Memory the rows hold, roughly (what a pipeline's budget counts)."""
        return 16 * len(self) + _nbytes(self.values)

    def take(self, rows: npt.NDArray[np.intp]) -> ChannelRows:
        """The rows at ``rows``, in that order."""
        return ChannelRows(
            self.name,
            self.pulse_ids[rows],
            self.timestamps[rows],
            _take(self.values, rows),
            {key: column[rows] for key, column in self.extra.items()},
        )

    def slice(self, begin: int, end: int) -> ChannelRows:
        """Rows ``begin:end`` (views where the values allow it)."""
        return ChannelRows(
            self.name,
            self.pulse_ids[begin:end],
            self.timestamps[begin:end],
            _slice(self.values, begin, end),
            {key: column[begin:end] for key, column in self.extra.items()},
        )

    @classmethod
    def concat(cls, parts: Sequence[ChannelRows]) -> ChannelRows:
        """The rows of ``parts`` one after another (at least one part)."""
        first = parts[0]
        return cls(
            first.name,
            np.concatenate([part.pulse_ids for part in parts]),
            np.concatenate([part.timestamps for part in parts]),
            _concat([part.values for part in parts]),
            {key: np.concatenate([part.extra[key] for part in parts]) for key in first.extra},
        )


@dataclass(frozen=True)
class Selection:
    """Which rows to keep, in which order, and how many repeated pulse ids were dropped."""

    rows: npt.NDArray[np.intp]
    duplicates_removed: int

    @property
    def pulse_count(self) -> int:
        return int(self.rows.size)


def select_rows(pulse_ids: npt.NDArray[np.int64], start: int, stop: int) -> Selection:
    """Rows with ``start <= pulse_id <= stop``, sorted by pulse id, the first of each repeat.

    The rule ``SortedChannel`` applies batch by batch to a stream; this is it on a whole array.
    """
    inside = np.flatnonzero((pulse_ids >= start) & (pulse_ids <= stop))
    order = inside[np.argsort(pulse_ids[inside], kind="stable")]
    sorted_ids = pulse_ids[order]
    first = np.ones(sorted_ids.size, dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return Selection(rows=order[first], duplicates_removed=int(np.count_nonzero(~first)))


def keep_rows(channel: ChannelRows, selection: Selection) -> ChannelRows:
    """The selected rows of a channel, in the selection's order."""
    return channel.take(selection.rows)


def _image_options(values: CompressedImages) -> dict[str, Any]:
    height, width = values.shape
    return {
        "dtype": values.dtype,
        "chunks": (1, height, width),
        **hdf5plugin.Bitshuffle(
            nelems=values.block_size_bytes // values.dtype.itemsize, cname="lz4"
        ),
    }


def _is_numeric(values: Values) -> bool:
    return isinstance(values, np.ndarray) and values.dtype.kind not in "OUS"


def _write_data(dataset: h5py.Dataset, at: int, values: Values) -> None:
    """``values`` into rows ``at:`` of an existing dataset."""
    if isinstance(values, CompressedImages):
        for index, blob in enumerate(values.blobs, start=at):
            dataset.id.write_direct_chunk((index, 0, 0), blob)
    elif len(values):
        if not _is_numeric(values):
            values = np.asarray(list(values), dtype=object)
        dataset[at : at + len(values)] = values


class StreamedGroup:
    """A channel's group whose datasets grow as rows arrive (resizable, chunked).

    Created from the first batch (its dtypes and shapes), even if that batch holds no row to
    keep: a channel with events gets a group, as when the whole run is written at once.
    """

    def __init__(self, file: h5py.File, name: str) -> None:
        self._file = file
        self.name = name
        self.rows = 0
        self._template: Values | None = None

    @property
    def created(self) -> bool:
        return self._template is not None

    def create(self, template: ChannelRows) -> None:
        """The group and its empty datasets, shaped after ``template``'s values."""
        if self._template is not None:
            return
        group = self._file.create_group(self.name)
        values = template.values
        options: dict[str, Any]
        if isinstance(values, CompressedImages):
            options = _image_options(values)
            row_shape: tuple[int, ...] = values.shape
        elif _is_numeric(values):
            assert isinstance(values, np.ndarray)
            row_shape = values.shape[1:]
            row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * values.dtype.itemsize)
            chunk_rows = max(1, CHUNK_BYTES // row_bytes)
            options = {"dtype": values.dtype, "chunks": (chunk_rows, *row_shape)}
        else:
            row_shape = ()
            options = {"dtype": STRING_DTYPE, "chunks": (CHUNK_BYTES // 64,)}
        group.create_dataset("data", shape=(0, *row_shape), maxshape=(None, *row_shape), **options)
        for key in ("pulse_id", "timestamp"):
            group.create_dataset(
                key, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(CHUNK_BYTES // 8,)
            )
        self._template = values

    @property
    def row_bytes(self) -> int:
        """Bytes of one row, roughly (an image counts as its uncompressed size)."""
        data = self._file[self.name]["data"]
        itemsize = int(data.dtype.itemsize)
        return 16 + int(np.prod(data.shape[1:], dtype=np.int64)) * max(itemsize, 8)

    def resize(self, rows: int) -> None:
        group = self._file[self.name]
        for key in ("data", "pulse_id", "timestamp"):
            group[key].resize(rows, axis=0)
        self.rows = rows

    def write_at(self, at: int, rows: ChannelRows) -> None:
        """``rows`` into rows ``at:`` (inside the current size)."""
        group = self._file[self.name]
        _write_data(group["data"], at, rows.values)
        group["pulse_id"][at : at + len(rows)] = rows.pulse_ids
        group["timestamp"][at : at + len(rows)] = rows.timestamps

    def append(self, rows: ChannelRows) -> None:
        self.create(rows)
        if len(rows):
            at = self.rows
            self.resize(at + len(rows))
            self.write_at(at, rows)

    def pulse_ids(self, begin: int = 0, end: int | None = None) -> npt.NDArray[np.int64]:
        if not self.rows:
            return np.empty(0, dtype=np.int64)
        return np.asarray(self._file[self.name]["pulse_id"][begin:end], dtype=np.int64)

    def read(self, begin: int, end: int) -> ChannelRows:
        """Rows ``begin:end`` as written (images as their chunks, strings as ``str``)."""
        group = self._file[self.name]
        data = group["data"]
        template = self._template
        values: Values
        if isinstance(template, CompressedImages):
            blobs = [data.id.read_direct_chunk((i, 0, 0))[1] for i in range(begin, end)]
            values = CompressedImages(
                blobs, template.shape, template.dtype, template.block_size_bytes
            )
        elif data.dtype.kind == "O":
            values = list(data.asstr()[begin:end])
        else:
            values = data[begin:end]
        return ChannelRows(
            self.name, group["pulse_id"][begin:end], group["timestamp"][begin:end], values
        )

    def remove(self) -> None:
        """Delete the group (a channel fetched again starts over)."""
        if self._template is not None:
            del self._file[self.name]
        self._template = None
        self.rows = 0


class ChannelFile:
    """One BSDATA, CAMERAS or PVCHANNELS file being written, opened at the path it is given.

    ``target`` is opened once, by that name, and never looked up again (the worker loop hands
    a temporary file it created; it publishes the file after ``close``).
    """

    def __init__(self, target: Path | str, attributes: Mapping[str, Any]) -> None:
        self._file = create(target)
        self._file.attrs.update(attributes)

    def write(self, channel: ChannelRows) -> None:
        """A whole channel, rows as given, in contiguous datasets."""
        group = self._file.create_group(channel.name)
        values = channel.values
        if isinstance(values, CompressedImages):
            count = len(values.blobs)
            dataset = group.create_dataset(
                "data", shape=(count, *values.shape), **_image_options(values)
            )
            _write_data(dataset, 0, values)
        elif _is_numeric(values):
            group.create_dataset("data", data=values)
        else:
            group.create_dataset(
                "data", data=np.asarray(list(values), dtype=object), dtype=STRING_DTYPE
            )
        group.create_dataset("pulse_id", data=np.asarray(channel.pulse_ids, dtype=np.int64))
        group.create_dataset("timestamp", data=np.asarray(channel.timestamps, dtype=np.int64))
        for key, column in channel.extra.items():
            group.create_dataset(key, data=column)

    def streamed(self, name: str) -> StreamedGroup:
        """A channel to be written batch by batch (its group appears with the first batch)."""
        return StreamedGroup(self._file, name)

    def close(self) -> None:
        """Finish the file (an ``OSError`` if the disk is full: the file is then abandoned)."""
        close_flushed(self._file)

    def discard(self) -> None:
        """Close a file that is thrown away, without writing anything more to its disk (which
        may be full: ``h5.closing``)."""
        abandon(self._file)

    def __enter__(self) -> ChannelFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_channels(
    target: Path, attributes: Mapping[str, Any], channels: Sequence[ChannelRows]
) -> None:
    """Write one file with a group per channel, rows as given (select them first to sort them
    and drop repeats: ``keep_rows(rows, select_rows(...))``)."""
    with ChannelFile(target, attributes) as file:
        for channel in channels:
            file.write(channel)
