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
files exist has aged out of the buffer's retention: ``DataAgedOut``. With ``missing="zeros"``
every missing record reads as zeros instead (marker 0, so the frame is flagged bad).
"""

from __future__ import annotations

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
        return (self.marker == fmt.MARKER_WRITTEN) & (self.n_recv_packets == fmt.PACKETS_PER_FRAME)

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
BeforeRead = Callable[[str, np.ndarray], None]


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
            # In "flag" mode a file is aged out only if the module closed a newer one.
            latest = self.latest_pulse_id(module) if missing == "flag" else None
            for positions, first in _group_by_file(pids):
                aged_out = missing == "raise" or (latest is not None and first <= latest)
                self._read_file(
                    module,
                    first,
                    pids,
                    positions,
                    data if pixels else None,
                    rows,
                    headers,
                    aged_out,
                )
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
        aged_out: bool,
    ) -> None:
        path = fmt.data_file(self.buffer_root, self.detector, module, first)
        try:
            records = np.memmap(
                path, dtype=fmt.RECORD_DTYPE, mode="r", shape=(fmt.PULSES_PER_FILE,)
            )
        except FileNotFoundError:
            if aged_out:
                raise DataAgedOut(
                    f"{self.detector} module {module}: {path} is gone: pulses {first}.."
                    f"{first + fmt.PULSES_PER_FILE - 1} aged out of the buffer (or were never "
                    "written)"
                ) from None
            if data is not None:
                data[positions, rows] = 0
            return
        except ValueError as exc:  # shorter than 1000 records
            raise CorruptStream(f"{self.detector} module {module}: {path}: {exc}") from exc
        slots = pids[positions] - first
        for name in fmt.HEADER_FIELDS:
            headers[name][positions, module] = records[name][slots]
        if data is None:
            del records
            return
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
