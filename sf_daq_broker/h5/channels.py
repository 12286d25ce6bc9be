"""Writers of the BSDATA, CAMERAS and PVCHANNELS files (SPEC §5.1-§5.3).

One group per name at the file root, named exactly as the channel (colons kept), with
``data``, ``pulse_id`` and ``timestamp`` datasets. Rows are those inside the job's pulse range,
sorted by pulse id, each pulse id once — users' analysis tools index by pulse id and must not
meet a repeated or out-of-order one. Camera images that arrive bitshuffle+LZ4 compressed are
stored as they came, one chunk per image, without ever being decompressed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt

from sf_daq_broker import __version__
from sf_daq_broker.jobs import Job

BITSHUFFLE_FILTER = 32008
STRING_DTYPE = h5py.string_dtype("utf-8")


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


@dataclass
class ChannelRows:
    """Events of one name as fetched: maybe unsorted, repeated, or outside the range."""

    name: str
    pulse_ids: npt.NDArray[np.int64]
    timestamps: npt.NDArray[np.int64]
    values: Values
    extra: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """Which rows to keep, in which order, and how many repeated pulse ids were dropped."""

    rows: npt.NDArray[np.intp]
    duplicates_removed: int

    @property
    def pulse_count(self) -> int:
        return int(self.rows.size)


def select_rows(pulse_ids: npt.NDArray[np.int64], start: int, stop: int) -> Selection:
    """Rows with ``start <= pulse_id <= stop``, sorted by pulse id, the first of each repeat."""
    inside = np.flatnonzero((pulse_ids >= start) & (pulse_ids <= stop))
    order = inside[np.argsort(pulse_ids[inside], kind="stable")]
    sorted_ids = pulse_ids[order]
    first = np.ones(sorted_ids.size, dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return Selection(rows=order[first], duplicates_removed=int(np.count_nonzero(~first)))


def _take(values: Values, rows: npt.NDArray[np.intp]) -> Values:
    if isinstance(values, CompressedImages):
        return CompressedImages(
            [values.blobs[i] for i in rows], values.shape, values.dtype, values.block_size_bytes
        )
    if isinstance(values, np.ndarray):
        return values[rows]
    return [values[i] for i in rows]


def _write_values(group: h5py.Group, values: Values) -> None:
    if isinstance(values, CompressedImages):
        count = len(values.blobs)
        height, width = values.shape
        dataset = group.create_dataset(
            "data",
            shape=(count, height, width),
            dtype=values.dtype,
            chunks=(1, height, width),
            **hdf5plugin.Bitshuffle(
                nelems=values.block_size_bytes // values.dtype.itemsize, cname="lz4"
            ),
        )
        for index, blob in enumerate(values.blobs):
            dataset.id.write_direct_chunk((index, 0, 0), blob)
    elif isinstance(values, np.ndarray) and values.dtype.kind not in "OUS":
        group.create_dataset("data", data=values)
    else:
        group.create_dataset(
            "data", data=np.asarray(list(values), dtype=object), dtype=STRING_DTYPE
        )


def write_channels(
    target: Path, attributes: Mapping[str, Any], channels: Sequence[ChannelRows]
) -> None:
    """Write one file with a group per channel. Rows must already be selected (select_rows)."""
    with h5py.File(target, "w") as file:
        file.attrs.update(attributes)
        for channel in channels:
            group = file.create_group(channel.name)
            _write_values(group, channel.values)
            group.create_dataset("pulse_id", data=np.asarray(channel.pulse_ids, dtype=np.int64))
            group.create_dataset("timestamp", data=np.asarray(channel.timestamps, dtype=np.int64))
            for key, column in channel.extra.items():
                group.create_dataset(key, data=column)


def keep_rows(channel: ChannelRows, selection: Selection) -> ChannelRows:
    """The selected rows of a channel, in the selection's order."""
    rows = selection.rows
    return ChannelRows(
        name=channel.name,
        pulse_ids=channel.pulse_ids[rows],
        timestamps=channel.timestamps[rows],
        values=_take(channel.values, rows),
        extra={key: column[rows] for key, column in channel.extra.items()},
    )
