"""Jungfrau detector files (SPEC §5.4): the raw layout and the converted layout.

Both layouts share ``/general/detector_name`` and, under ``/data/{DET}/``, one frame per chunk
in ``data`` plus one row per frame in ``pulse_id``, ``frame_index``, ``daq_rec``,
``is_good_frame`` and ``requested_pulse_id`` (the pulse asked for, so a row whose frame never
arrived, with ``pulse_id`` 0, can still be identified). A converted file adds ``pixel_mask``
(output geometry, True = good) and ``conversion_factor``. Frames that are not good are kept and
flagged, never dropped: users must see that the detector missed a pulse.

``DetectorFileWriter`` takes frames in batches (memory bounded by the batch, not the run), with
the frame count known up front; it compresses a batch on several threads (or, ``threads=0``, in
the calling thread: several pipeline workers writing batches at their own positions with
``write_at``) and writes each chunk directly. ``RawDetectorFile`` reads the raw layout back in
batches (the ``convert`` command).
"""

from __future__ import annotations

import threading
import types
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading)
import numpy as np
import numpy.typing as npt

from sf_daq_broker import openmp
from sf_daq_broker.h5 import bslz4
from sf_daq_broker.h5.closing import abandon, close_flushed, create

DETECTOR_NAME = "general/detector_name"
STRING = h5py.string_dtype("utf-8")

#: Per-frame datasets, each (N, 1), and their dtypes.
FRAME_COLUMNS: dict[str, np.dtype[Any]] = {
    "pulse_id": np.dtype(np.uint64),
    "frame_index": np.dtype(np.uint64),
    "daq_rec": np.dtype(np.uint32),
    "is_good_frame": np.dtype(np.uint8),
    "requested_pulse_id": np.dtype(np.uint64),
}
#: Columns a raw file written by the facility's own detector writer may lack.
OPTIONAL_COLUMNS = frozenset({"requested_pulse_id"})

COMPRESSION_THREADS = 2


def _compress_single_threaded(
    frame: npt.NDArray[Any], buffer: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """A pool thread's frame: the pool is the parallelism, so bitshuffle's OpenMP runs on this
    thread alone (no team per call spinning on the other cores; ``sf_daq_broker.openmp``)."""
    with openmp.single_threaded():
        return bslz4.compress_chunk_into(frame, buffer)


class DetectorFileError(Exception):
    """A file is not in the expected layout, or a writer is used wrongly."""


def data_group(detector: str) -> str:
    return f"data/{detector}"


@dataclass(frozen=True)
class FrameColumns:
    """The per-frame values of a batch, each of length N (1-D)."""

    pulse_id: npt.NDArray[np.uint64]
    frame_index: npt.NDArray[np.uint64]
    daq_rec: npt.NDArray[np.uint32]
    is_good_frame: npt.NDArray[np.uint8]
    requested_pulse_id: npt.NDArray[np.uint64]

    @classmethod
    def from_arrays(cls, **columns: npt.ArrayLike) -> FrameColumns:
        """Cast each column to its dataset dtype; (N,) and (N, 1) are both accepted."""
        values = {
            name: np.asarray(columns[name]).reshape(-1).astype(dtype, copy=False)
            for name, dtype in FRAME_COLUMNS.items()
        }
        lengths = {len(v) for v in values.values()}
        if len(lengths) != 1:
            raise DetectorFileError(f"frame columns differ in length: {sorted(lengths)}")
        return cls(**values)

    def __len__(self) -> int:
        return len(self.pulse_id)

    def take(self, rows: npt.NDArray[Any]) -> FrameColumns:
        """The rows selected by ``rows`` (a boolean mask or indices), in order."""
        return FrameColumns(
            **{name: getattr(self, name)[rows] for name in FRAME_COLUMNS},
        )


@dataclass(frozen=True)
class DataGroup:
    """One ``data/<name>`` group of a detector file: frames of one shape and dtype, the frame
    columns, and per-file datasets (``pixel_mask``, ``conversion_factor``, ``meta/…``).

    A file normally has one, named after the detector; with regions of interest it has one
    per region (``<DET>:ROI_<label>``), as the facility's converter writes them.
    """

    name: str
    frame_shape: tuple[int, int]
    dtype: np.dtype[Any]
    pixel_mask: npt.NDArray[np.bool_] | None = None
    conversion_factor: float | None = None
    #: Datasets under ``meta/`` (the reference's description of the conversion).
    meta: Mapping[str, Any] = field(default_factory=dict)


class DetectorFileWriter:
    """Writes one detector file; ``write`` batches in frame order, then ``close``.

    ``close`` refuses to finish a file with fewer frames than announced, so an interrupted job
    never produces a short file that looks complete. Use it as a context manager inside
    ``atomic_output`` (or the worker loop's temporary name): an exception closes the file without
    that check and the temporary file is discarded by the caller.

    One data group of ``frame_shape``/``dtype`` (with ``pixel_mask`` and ``conversion_factor``),
    or several given as ``groups``; ``write`` then takes one array of frames per group.
    """

    def __init__(
        self,
        path: Path | str,
        detector: str,
        n_frames: int,
        frame_shape: tuple[int, int] | None = None,
        dtype: npt.DTypeLike | None = None,
        *,
        compression: bool = True,
        attributes: Mapping[str, Any] | None = None,
        pixel_mask: npt.NDArray[np.bool_] | None = None,
        conversion_factor: float | None = None,
        groups: Sequence[DataGroup] | None = None,
        threads: int = COMPRESSION_THREADS,
    ) -> None:
        if groups is None:
            if frame_shape is None or dtype is None:
                raise DetectorFileError("give frame_shape and dtype, or groups")
            groups = [
                DataGroup(
                    detector,
                    (int(frame_shape[0]), int(frame_shape[1])),
                    np.dtype(dtype),
                    pixel_mask,
                    conversion_factor,
                )
            ]
        self.detector = detector
        self.n_frames = n_frames
        self.groups = list(groups)
        self.frame_shape = self.groups[0].frame_shape
        self.dtype = self.groups[0].dtype
        self.compression = compression
        self.frames_written = 0
        self._lock = threading.Lock()  # h5py calls and the count, from several workers
        self._local = threading.local()  # each thread's reusable chunk buffers
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="bslz4")
            if compression and threads > 0
            else None
        )
        self._file = create(path)
        try:
            self._file.attrs.update(attributes or {})
            self._file.create_dataset(DETECTOR_NAME, data=self.detector, dtype=STRING)
            self._data: list[h5py.Dataset] = []
            self._columns: list[dict[str, h5py.Dataset]] = []
            for group in self.groups:
                self._create(group)
        except BaseException:
            self._abandon()
            raise

    def _create(self, spec: DataGroup) -> None:
        group = self._file.create_group(data_group(spec.name))
        shape = (self.n_frames, *spec.frame_shape)
        chunks = (1, *spec.frame_shape)
        # A fixed-size dimension cannot be smaller than its chunk: an empty file is extensible.
        maxshape = (None, *spec.frame_shape) if self.n_frames == 0 else None
        if self.compression:
            data = bslz4.create_dataset(group, "data", shape, spec.dtype, chunks, maxshape)
        else:
            data = group.create_dataset(
                "data", shape=shape, dtype=spec.dtype, chunks=chunks, maxshape=maxshape
            )
        self._data.append(data)
        self._columns.append(
            {
                name: group.create_dataset(name, shape=(self.n_frames, 1), dtype=dtype)
                for name, dtype in FRAME_COLUMNS.items()
            }
        )
        if spec.pixel_mask is not None:
            if spec.pixel_mask.shape != spec.frame_shape:
                raise DetectorFileError(
                    f"pixel_mask is {spec.pixel_mask.shape}, frames are {spec.frame_shape}"
                )
            group.create_dataset("pixel_mask", data=np.asarray(spec.pixel_mask, dtype=bool))
        if spec.conversion_factor is not None:
            group.create_dataset("conversion_factor", data=np.float64(spec.conversion_factor))
        for name, value in spec.meta.items():
            if name == "pixel_mask" and spec.pixel_mask is not None:
                group[f"meta/{name}"] = group["pixel_mask"]  # a hard link: the same dataset
            elif isinstance(value, str):
                group.create_dataset(f"meta/{name}", data=value, dtype=STRING)
            else:
                group.create_dataset(f"meta/{name}", data=value)

    def write(
        self, frames: npt.NDArray[Any] | Sequence[npt.NDArray[Any]], columns: FrameColumns
    ) -> None:
        """Append a batch: ``frames`` (k, *frame_shape), one such array per group if there
        are several, and its k rows of frame columns."""
        self.write_at(self.frames_written, frames, columns)

    def write_at(
        self,
        start: int,
        frames: npt.NDArray[Any] | Sequence[npt.NDArray[Any]],
        columns: FrameColumns,
    ) -> None:
        """Write a batch at rows ``start..`` (the writer's rows are filled exactly once, in
        any order: pipeline workers finish their batches out of order). Thread-safe: the
        compression runs in the calling thread (``threads=0``) or on the pool, the HDF5 calls
        one thread at a time."""
        batches = [frames] if isinstance(frames, np.ndarray) else list(frames)
        if len(batches) != len(self.groups):
            raise DetectorFileError(
                f"{len(batches)} arrays of frames for {len(self.groups)} groups"
            )
        for spec, batch in zip(self.groups, batches, strict=True):
            if batch.shape[1:] != spec.frame_shape or batch.dtype != spec.dtype:
                raise DetectorFileError(
                    f"frames must be {spec.dtype} (k, {spec.frame_shape[0]}, "
                    f"{spec.frame_shape[1]}), not {batch.dtype} {batch.shape}"
                )
            if len(batch) != len(columns):
                raise DetectorFileError(
                    f"{len(batch)} frames but {len(columns)} rows of frame columns"
                )
        count = len(columns)
        if start < 0 or start + count > self.n_frames:
            raise DetectorFileError(
                f"{start + count} frames written, the file was created for {self.n_frames}"
            )
        for index, batch in enumerate(batches):
            chunks = self._chunks(index, np.ascontiguousarray(batch))
            offset = (0,) * (batch.ndim - 1)
            data = self._data[index]
            with self._lock:
                for position, chunk in enumerate(chunks, start):
                    data.id.write_direct_chunk((position, *offset), chunk)
                for name, dataset in self._columns[index].items():
                    dataset[start : start + count, 0] = getattr(columns, name)
        with self._lock:
            self.frames_written += count

    def _chunks(self, index: int, frames: npt.NDArray[Any]) -> Any:
        """The batch's chunks: compressed (on the pool, or here single-threaded in OpenMP:
        this thread is one of the pipeline's workers, one per core) or the frames' bytes."""
        if not self.compression:
            return frames  # an uncompressed chunk is the frame's bytes
        buffers = self._chunk_buffers(index, frames)
        if self._pool is not None:
            return self._pool.map(_compress_single_threaded, frames, buffers)
        with openmp.single_threaded():
            return [bslz4.compress_chunk_into(f, b) for f, b in zip(frames, buffers, strict=True)]

    def _chunk_buffers(self, index: int, frames: npt.NDArray[Any]) -> list[npt.NDArray[np.uint8]]:
        """Reusable output buffers, one per frame of a batch and per calling thread (fresh
        memory costs a page fault per 4 KiB on first touch); a pool's threads share the
        calling thread's, one frame each."""
        if len(frames) == 0:
            return []
        every: list[list[npt.NDArray[np.uint8]]] | None = getattr(self._local, "buffers", None)
        if every is None:
            every = self._local.buffers = [[] for _ in self.groups]
        buffers = every[index]
        bound = bslz4.chunk_bound(frames[0])
        while len(buffers) < len(frames):
            buffers.append(np.empty(bound, dtype=np.uint8))
        return buffers[: len(frames)]

    def close(self) -> None:
        """Finish the file; it must hold every announced frame."""
        if self.frames_written != self.n_frames:
            self._abandon()
            raise DetectorFileError(
                f"only {self.frames_written} of {self.n_frames} frames were written"
            )
        self._shutdown()
        close_flushed(self._file)

    def _abandon(self) -> None:
        """Close a file that is thrown away, writing nothing more to its disk (which may be
        full: ``h5.closing``)."""
        self._shutdown()
        abandon(self._file)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._local = threading.local()  # the chunk buffers go

    def __enter__(self) -> DetectorFileWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()


class RawDetectorFile:
    """A file in the raw layout, opened for reading in batches; refuses anything else."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DetectorFileError(f"{self.path} does not exist")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DetectorFileError(f"{self.path} is not an HDF5 file ({exc})") from exc
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> None:
        name = self._file.get(DETECTOR_NAME)
        if not isinstance(name, h5py.Dataset) or name.shape != () or name.dtype.kind not in "OS":
            raise DetectorFileError(
                f"{self.path} is not a raw Jungfrau file: no scalar string /{DETECTOR_NAME}"
            )
        value = name[()]
        self.detector: str = value.decode() if isinstance(value, bytes) else str(value)
        group = self._file.get(data_group(self.detector))
        data = group.get("data") if isinstance(group, h5py.Group) else None
        if not isinstance(data, h5py.Dataset):
            raise DetectorFileError(
                f"{self.path} is not a raw Jungfrau file: no /{data_group(self.detector)}/data"
            )
        if data.dtype != np.uint16 or data.ndim != 3:
            raise DetectorFileError(
                f"{self.path} is not a raw Jungfrau file: /{data_group(self.detector)}/data is "
                f"{data.dtype} {data.shape}, raw frames are uint16 (N, 512*n_modules, 1024)"
            )
        self.data = data
        self.n_frames: int = data.shape[0]
        self.frame_shape: tuple[int, int] = (data.shape[1], data.shape[2])
        self._columns: dict[str, h5py.Dataset] = {}
        for column in FRAME_COLUMNS:
            dataset = group.get(column)
            if dataset is None and column in OPTIONAL_COLUMNS:
                continue
            if not isinstance(dataset, h5py.Dataset) or dataset.shape[:1] != (self.n_frames,):
                raise DetectorFileError(
                    f"{self.path} is not a raw Jungfrau file: /{data_group(self.detector)}/"
                    f"{column} is missing or has not one row per frame"
                )
            self._columns[column] = dataset
        self.attributes: dict[str, Any] = dict(self._file.attrs)

    def read_frames(self, start: int, stop: int, out: npt.NDArray[np.uint16]) -> None:
        """Frames [start, stop) into ``out[: stop - start]`` without an intermediate copy."""
        self.data.read_direct(out, np.s_[start:stop], np.s_[0 : stop - start])

    def read_frames_at(self, indices: npt.NDArray[np.int64], out: npt.NDArray[np.uint16]) -> None:
        """Frames ``indices`` (increasing) into ``out[: len(indices)]``, one read per run of
        consecutive frames."""
        if len(indices) == 0:
            return
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        for run in np.split(np.arange(len(indices)), breaks):
            first, last = int(indices[run[0]]), int(indices[run[-1]]) + 1
            target = np.s_[int(run[0]) : int(run[-1]) + 1]
            self.data.read_direct(out, np.s_[first:last], target)

    def columns(self, start: int, stop: int) -> FrameColumns:
        """The frame columns of rows [start, stop); a missing requested_pulse_id is pulse_id."""
        values = {name: dataset[start:stop] for name, dataset in self._columns.items()}
        values.setdefault("requested_pulse_id", values["pulse_id"])
        return FrameColumns.from_arrays(**values)

    def column_rows(self, name: str, start: int, stop: int) -> npt.NDArray[Any]:
        """Rows [start, stop) of one frame column as stored, (k, m): a file written by the
        facility's writer may hold one value per module (m > 1)."""
        values: npt.NDArray[Any] = self._columns[name][start:stop]
        return values.reshape(len(values), -1) if values.size else values.reshape(len(values), 1)

    def highgain(self) -> bool:
        """High-gain mode: bit 0 of ``daq_rec`` of the first good frame (False if none is)."""
        good = np.flatnonzero(self._columns["is_good_frame"][:].reshape(-1))
        if good.size == 0:
            return False
        return bool(int(self._columns["daq_rec"][good[0]].reshape(-1)[0]) & 1)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RawDetectorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
