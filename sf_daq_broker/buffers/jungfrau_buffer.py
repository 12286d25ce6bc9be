"""Reader of the Jungfrau detector buffer files (BUFFERS.md §4).

``read(pulse_ids)`` returns the frames of all modules stacked vertically (module i in rows
``i*512 … i*512+511``, the raw layout of SPEC §5.4) plus each module's record header. Pixels
are copied once, straight from the page cache (numpy memmap) into the output array — which the
caller may pass in, so a worker streaming bounded batches reuses one buffer. Runs of pulses
that are evenly spaced in a file (a whole range, or every k-th pulse) are copied as one strided
slice; anything else frame by frame.

Before reading, the reader makes sure the data can be there: a module without a buffer at all
is ``ModuleMissing``; a pulse newer than the module's last closed file (``LATEST``) is
``DataNotYetAvailable`` (transient: wait and retry); a pulse whose file is gone although newer
files exist has aged out of the buffer's retention (or was never written): ``DataAgedOut``.
With ``missing="zeros"`` every missing record reads as zeros instead (marker 0, so the frame
is flagged bad).

``missing="flag"`` (the detector worker's mode) tells the two apart: retention deletes a
module's oldest files first, so a missing file is aged out (``DataAgedOut``) only if it is
older than the module's oldest surviving file (``retention_horizon``); a missing file newer
than that is a gap — the module was stopped or restarted for a while, or has not written it
(yet) — and its records read as zeros, flagged. The horizon comes from listing the module's
folders (and the files of the oldest non-empty one), only when a file is missing, and is
cached: it is listed again at most once per ``read`` and module, when a file newer than the
cached horizon is missing (retention may have moved on meanwhile).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sf_daq_broker.buffers import jungfrau_format as fmt
from sf_daq_broker.buffers.errors import (
    CorruptStream,
    DataAgedOut,
    DataNotYetAvailable,
    ModuleMissing,
)


@dataclass
class DetectorFrames:
    """Frames of the requested pulses.

    ``requested_pulse_id`` (N,) int64; ``data`` (N, n_modules*512, 1024) uint16; per module
    ``marker`` (N, M) uint8 and ``pulse_id``, ``frame_index``, ``daq_rec``,
    ``n_recv_packets``, ``module_id`` (N, M) uint64, exactly as in the records (zeros for
    records never written).
    """

    requested_pulse_id: np.ndarray
    data: np.ndarray
    marker: np.ndarray
    pulse_id: np.ndarray
    frame_index: np.ndarray
    daq_rec: np.ndarray
    n_recv_packets: np.ndarray
    module_id: np.ndarray

    def __len__(self) -> int:
        return len(self.requested_pulse_id)

    def complete(self) -> np.ndarray:
        """(N, M) bool: the module's record is written and has all its packets."""
        complete: np.ndarray = (self.marker == fmt.MARKER_WRITTEN) & (
            self.n_recv_packets == fmt.PACKETS_PER_FRAME
        )
        return complete

    def is_good_frame(self) -> np.ndarray:
        """(N,) bool: every module complete and all modules agree on pulse id and frame
        index (BUFFERS.md §4)."""
        agree = (self.pulse_id == self.pulse_id[:, :1]).all(axis=1) & (
            self.frame_index == self.frame_index[:, :1]
        ).all(axis=1)
        return np.asarray(self.complete().all(axis=1) & agree)


#: What ``read`` does about records that are not there (see the module docstring).
Missing = Literal["raise", "zeros", "flag"]

#: Called with (detector, pulse ids) before they are read; see ``JungfrauBufferReader``.
BeforeRead = Callable[[str, np.ndarray], object]  # what it returns is ignored


class JungfrauBufferReader:
    """Reads one detector's buffer under ``buffer_root``.

    ``before_read`` is a hook called with the pulse ids about to be read — the place where a
    simulated buffer in lazy mode is asked to write them (``simulation.control``); production
    leaves it None.
    """

    def __init__(
        self,
        buffer_root: Path | str,
        detector: str,
        *,
        before_read: BeforeRead | None = None,
    ) -> None:
        self.buffer_root = Path(buffer_root)
        self.detector = detector
        self.n_modules = fmt.n_modules(detector)
        self.before_read = before_read
        #: Per module, the last ``retention_horizon`` listed (see ``retention_horizon``).
        self._horizon: dict[int, int | None] = {}

    def data_file(self, module: int, pid: int) -> Path:
        return fmt.data_file(self.buffer_root, self.detector, module, pid)

    def latest_file(self, module: int) -> Path | None:
        """The module's last closed file (from LATEST), None if the module has none."""
        try:
            text = fmt.latest_file(self.buffer_root, self.detector, module).read_text()
        except FileNotFoundError:
            return None
        return Path(text.strip()) if text.strip() else None

    def latest_pulse_id(self, module: int) -> int | None:
        """The newest pulse in the module's closed files, None if the module has none."""
        path = self.latest_file(module)
        if path is None:
            return None
        return fmt.first_pulse_of_file(path) + fmt.PULSES_PER_FILE - 1

    def latest_age(self, module: int, now: float | None = None) -> float | None:
        """Seconds since LATEST last changed (stale > 30 s = module not running)."""
        try:
            mtime = fmt.latest_file(self.buffer_root, self.detector, module).stat().st_mtime
        except FileNotFoundError:
            return None
        return (time.time() if now is None else now) - mtime

    def newest_pulse_id(self) -> int | None:
        """The newest pulse every module has in a closed file (None if a module has none)."""
        latest = [self.latest_pulse_id(m) for m in range(self.n_modules)]
        if any(pid is None for pid in latest):
            return None
        return min(pid for pid in latest if pid is not None)

    def oldest_file_pulse(self, module: int) -> int | None:
        """First pulse of the module's oldest data file on disk, None if it has none.

        Lists the module's folders and the files of the oldest folder that has any: a few
        directory entries, however long the buffer.
        """
        root = fmt.module_dir(self.buffer_root, self.detector, module)
        try:
            with os.scandir(root) as entries:
                folders = sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return None
        for folder in folders:
            try:
                with os.scandir(root / str(folder)) as entries:
                    firsts = [
                        int(e.name[: -len(".bin")])
                        for e in entries
                        if e.name.endswith(".bin") and e.name[: -len(".bin")].isdigit()
                    ]
            except FileNotFoundError:  # retention removed the folder meanwhile
                continue
            if firsts:
                return min(firsts)
        return None

    def retention_horizon(self, module: int, *, refresh: bool = True) -> int | None:
        """The first pulse the module's buffer still holds files for: files of older pulses
        have aged out. That is the first pulse of its oldest surviving file; if none survives
        although the module closed files (LATEST), the pulse after its last closed file. None
        for a module without a buffer at all (nothing of it ages out: it was never written).

        Without ``refresh`` the value listed last is returned (listed now if there is none).
        """
        if refresh or module not in self._horizon:
            horizon = self.oldest_file_pulse(module)
            if horizon is None:
                latest = self.latest_pulse_id(module)
                horizon = None if latest is None else latest + 1
            self._horizon[module] = horizon
        return self._horizon[module]

    def read(
        self,
        pulse_ids: Sequence[int] | np.ndarray | range,
        *,
        out: np.ndarray | None = None,
        missing: Missing = "raise",
        pixels: bool = True,
    ) -> DetectorFrames:
        """Frames and headers of ``pulse_ids`` (in the order given) for all modules.

        ``out``, when given, receives the pixels: uint16 C-contiguous with at least
        ``len(pulse_ids)`` frames of ``(n_modules*512, 1024)``. Without ``pixels`` the frames'
        ``data`` is empty, ``(N, 0, 1024)``.
        """
        pids = np.asarray(pulse_ids, dtype=np.int64).reshape(-1)
        count, n_mod = len(pids), self.n_modules
        shape = (count, n_mod * fmt.MODULE_ROWS, fmt.MODULE_COLS)
        if not pixels:
            data = np.empty((count, 0, fmt.MODULE_COLS), dtype=np.uint16)
        elif out is None:
            data = np.empty(shape, dtype=np.uint16)
        else:
            if out.dtype != np.uint16 or out.shape[1:] != shape[1:] or len(out) < count:
                raise ValueError(f"out must be uint16 with at least shape {shape}")
            data = out[:count]
        headers = {
            name: np.zeros((count, n_mod), fmt.HEADER_DTYPE[name]) for name in fmt.HEADER_FIELDS
        }
        if missing == "raise":
            self._check_available(pids)
        if self.before_read is not None and count:
            self.before_read(self.detector, pids)
        for module in range(n_mod):
            rows = slice(module * fmt.MODULE_ROWS, (module + 1) * fmt.MODULE_ROWS)
            listed = False  # the retention horizon was listed during this read
            for positions, first in _group_by_file(pids):
                found = self._read_file(
                    module, first, pids, positions, data if pixels else None, rows, headers
                )
                if found or missing == "zeros":
                    continue
                path = self.data_file(module, first)
                span = f"pulses {first}..{first + fmt.PULSES_PER_FILE - 1}"
                if missing == "raise":
                    raise DataAgedOut(
                        f"{self.detector} module {module}: {path} is gone: {span} aged out of "
                        "the buffer (or were never written)"
                    )
                # "flag": aged out only if older than the oldest surviving file. A file newer
                # than the horizon listed before may have aged out since: list again, once.
                known = self._horizon.get(module)
                if not listed and (known is None or first >= known):
                    self.retention_horizon(module)
                    listed = True
                horizon = self._horizon[module]
                if horizon is not None and first < horizon:
                    raise DataAgedOut(
                        f"{self.detector} module {module}: {path} is gone: {span} aged out of "
                        f"the buffer (its oldest file now starts at pulse {horizon})"
                    )
                # A gap (or never written): the records stay zeros (headers are zeros
                # already, marker 0), so the frames are flagged, never dropped.
        return DetectorFrames(pids, data, **headers)

    def _check_available(self, pids: np.ndarray) -> None:
        if len(pids) == 0:
            return
        for module in range(self.n_modules):
            latest = self.latest_pulse_id(module)
            if latest is None:
                raise ModuleMissing(
                    f"{self.detector} module {module}: no buffer in "
                    f"{fmt.module_dir(self.buffer_root, self.detector, module)} (no LATEST)"
                )
            newest = int(pids.max())
            if newest > latest:
                raise DataNotYetAvailable(
                    f"{self.detector} module {module}: pulse {newest} is not in the buffer yet "
                    f"(last closed file ends at {latest})"
                )

    def _read_file(
        self,
        module: int,
        first: int,
        pids: np.ndarray,
        positions: np.ndarray,
        data: np.ndarray | None,
        rows: slice,
        headers: dict[str, np.ndarray],
    ) -> bool:
        """Copy the records of one file; False (pixels zeroed) if the file does not exist."""
        path = fmt.data_file(self.buffer_root, self.detector, module, first)
        try:
            records = np.memmap(
                path, dtype=fmt.RECORD_DTYPE, mode="r", shape=(fmt.PULSES_PER_FILE,)
            )
        except FileNotFoundError:
            if data is not None:
                data[positions, rows] = 0
            return False
        except ValueError as exc:  # shorter than 1000 records
            raise CorruptStream(f"{self.detector} module {module}: {path}: {exc}") from exc
        slots = pids[positions] - first
        for name in fmt.HEADER_FIELDS:
            headers[name][positions, module] = records[name][slots]
        if data is None:
            del records
            return True
        pixels = records["data"]
        step = _even_step(slots)
        if step is not None and _even_step(positions) == 1:
            # One strided copy from the page cache into the output: no temporary.
            stop = int(slots[-1]) + 1
            data[positions[0] : positions[-1] + 1, rows] = pixels[int(slots[0]) : stop : step]
        else:
            for position, slot in zip(positions.tolist(), slots.tolist(), strict=True):
                data[position, rows] = pixels[slot]
        del records, pixels  # unmap now rather than at garbage collection
        return True


def _group_by_file(pids: np.ndarray) -> Iterable[tuple[np.ndarray, int]]:
    """(positions in ``pids``, first pulse of the file) for each file the pulses touch."""
    files = pids // fmt.PULSES_PER_FILE * fmt.PULSES_PER_FILE
    for first in np.unique(files).tolist():
        yield np.flatnonzero(files == first), first


def _even_step(values: np.ndarray) -> int | None:
    """The common positive difference of ``values`` (1 for a single value), else None."""
    if len(values) == 1:
        return 1
    steps = np.diff(values)
    if steps[0] > 0 and bool((steps == steps[0]).all()):
        return int(steps[0])
    return None
