"""Simulated Jungfrau detector buffer: module files, LATEST, as the pulse clock advances.

Two modes, because measurement ruled out writing everything at the clock's pace by default:

- ``eager``: every record is written as the clock passes. Faithful for any reader, and what
  tests use (``catch_up()`` after advancing a ``ManualClock``, small ranges).
- ``lazy`` (the ``simulate`` default): as the clock passes, each file is created (full size,
  sparse) and LATEST advances at every file boundary exactly as in eager mode — so liveness
  (``/get_running_detectors``) and "newest pulse" behave as at the facility — but a record is
  written only when asked: ``materialise(detector, pulse_ids)``, called in-process or through
  ``POST /jungfrau/materialise`` of the control endpoint (``JungfrauBufferReader(before_read=
  simulation.control.http_materialiser(url))``). Records already written are skipped, so the
  call is idempotent, and the bytes are identical to eager mode's.

Why (``bench/bench_jungfrau_buffer.py`` on the 2-core development machine, see bench/README.md):
making a frame costs 0.4-0.6 ms (a cached pedestal+noise frame copied into a reusable buffer,
~4000 hit pixels and a small spot scattered into it — ``jungfrau_frames``), but putting 1 MB
of new pages into the page cache costs more: backfilling fresh files reaches ~300 module
frames/s on the ext4 disk (sys-bound, then throttled by writeback at ~170 MB/s) and ~700-1200
on tmpfs; following a 100 Hz wall clock with the default 4 modules (400 frames/s, 400 MB/s)
fell 700-840 pulses behind within 20 s on both. Eager mode at 100 Hz is fine for one module
or on a faster disk; it would also fill the disk at 1.4 TB/hour without retention.

Detectors with a control (``attach_detectors``: the simulated detectors of
``jungfrau_detector``) write only the frames their state makes, in the gain their state says:
a module that is stopped or powered off writes nothing, and a file in which it made no frame
is never created, so its ``LATEST`` stops like a real module's.

A record is written pixels and header first, the marker byte last, so a reader never sees the
marker of a half-written record. Files whose pulses are older than ``retention_pulses`` are
deleted as new files close; ``age_out(pid)`` deletes earlier ones on demand (the fault "files
aged out of retention").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sf_daq_broker.buffers import jungfrau_format as fmt
from sf_daq_broker.simulation.clock import PulseClock
from sf_daq_broker.simulation.faults import JungfrauFaults, ModuleKey
from sf_daq_broker.simulation.jungfrau_detector import FrameKind, SimulatedJungfrau
from sf_daq_broker.simulation.jungfrau_frames import GAIN_CODE, frame_into, module_seed
from sf_daq_broker.simulation.noise import hash_grid

log = logging.getLogger(__name__)

DEFAULT_RETENTION_PULSES = 3000
_LOST_PACKET_SALT = 0x10_57_9AC4E7
_LOST_PACKET_STEP = 37  # coprime with 128: successive lost packets are distinct


class DetectorSpec(BaseModel):
    """A simulated detector: ``JFxxTyyVzz`` (yy = modules), optionally in high-gain mode
    (``daq_rec`` bit 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^JF\d\dT\d\dV\d\d$")
    highgain: bool = False

    @property
    def n_modules(self) -> int:
        return fmt.n_modules(self.name)


def daq_rec(kind: FrameKind) -> int:
    """The ``daq_rec`` of a frame: bits 12-13 the forced gain stage's code (0 when dynamic),
    bit 0 high gain."""
    code = GAIN_CODE[kind.stage] if kind.stage is not None else 0
    return code << 12 | int(kind.high_gain)


def lost_packets(detector: str, module: int, pid: int, count: int) -> np.ndarray:
    """Indices of the ``count`` packets an incomplete frame lost (rows ``4q .. 4q+3``)."""
    h = int(hash_grid(module_seed(detector, module) ^ _LOST_PACKET_SALT, [pid], 1)[0, 0])
    first = h % fmt.PACKETS_PER_FRAME
    return (first + _LOST_PACKET_STEP * np.arange(count)) % fmt.PACKETS_PER_FRAME


class JungfrauBufferWriter:
    """Writes ``{buffer_root}/{DET}/M{mm}/…/*.bin`` and ``LATEST`` for the configured detectors."""

    def __init__(
        self,
        buffer_root: Path,
        detectors: Iterable[DetectorSpec | str],
        clock: PulseClock,
        *,
        retention_pulses: int = DEFAULT_RETENTION_PULSES,
        start_pulse_id: int | None = None,
        mode: Literal["eager", "lazy"] = "eager",
    ) -> None:
        self.mode = mode
        self.buffer_root = Path(buffer_root).absolute()
        self.detectors = [
            d if isinstance(d, DetectorSpec) else DetectorSpec(name=d) for d in detectors
        ]
        self.clock = clock
        self.retention_pulses = retention_pulses
        self.next_pulse_id = clock.start_pulse_id if start_pulse_id is None else start_pulse_id
        #: ``frame_index = pid - frame_index_origin``: the first frame written has index 1.
        self.frame_index_origin = self.next_pulse_id - 1
        self.faults = JungfrauFaults()
        self.frames_written = 0
        self._highgain = {d.name: d.highgain for d in self.detectors}
        self._control: dict[str, SimulatedJungfrau] = {}
        self._modules: list[ModuleKey] = [
            (d.name, m) for d in self.detectors for m in range(d.n_modules)
        ]
        self._open: dict[ModuleKey, tuple[int, int]] = {}  # module → (first pulse, fd)
        # Header and pixels in separate, aligned buffers: filling an unaligned record field
        # costs more than a third pwrite.
        self._header = np.zeros(1, dtype=fmt.HEADER_DTYPE)
        self._header_bytes: memoryview = self._header.view(np.uint8).data
        self._frame = np.zeros((fmt.MODULE_ROWS, fmt.MODULE_COLS), dtype="<u2")
        self._lock = threading.Lock()

    @property
    def modules(self) -> list[ModuleKey]:
        return list(self._modules)

    def attach_detectors(self, detectors: Iterable[SimulatedJungfrau]) -> None:
        """From now on these detectors' states decide which frames exist and their gains."""
        with self._lock:
            self._control.update({detector.name: detector for detector in detectors})

    def frame_kind(self, key: ModuleKey, pid: int) -> FrameKind | None:
        """The frame a module makes at ``pid`` (None: none); a detector without a control
        runs for ever in dynamic gain, illuminated."""
        control = self._control.get(key[0])
        if control is None:
            return FrameKind(None, self._highgain[key[0]], True)
        return control.frame_kind(key[1], pid)

    def _produces_frames(self, key: ModuleKey, first: int, last: int) -> bool:
        control = self._control.get(key[0])
        return control is None or control.produces_frames(key[1], first, last)

    def catch_up(self, until: int | None = None, max_pulses: int | None = None) -> int:
        """Follow the clock from ``next_pulse_id`` up to its current pulse (or ``until`` if
        earlier), at most ``max_pulses`` pulses: eager mode writes their records, lazy mode
        only creates the files and advances LATEST. Returns the number of pulses passed."""
        with self._lock:
            target = self.clock.current_pulse_id()
            if until is not None:
                target = min(target, until)
            if max_pulses is not None:
                target = min(target, self.next_pulse_id + max_pulses - 1)
            first = self.next_pulse_id
            if target < first:
                return 0
            if self.mode == "lazy":
                self._pass_files(first, target)
            else:
                for pid in range(first, target + 1):
                    self._write_pulse(pid)
                    self.next_pulse_id = pid + 1
            self.next_pulse_id = target + 1
            return target + 1 - first

    def materialise(self, detector: str, pulse_ids: Iterable[int]) -> int:
        """Write the records of ``pulse_ids`` for every module of ``detector`` that are not
        written yet (lazy mode's on-demand step; harmless in eager mode). Pulses the writer has
        not passed yet, and pulses whose files are gone, are skipped. Returns records written."""
        with self._lock:
            horizon = self.next_pulse_id - 1
            wanted = sorted({int(p) for p in pulse_ids if self.frame_index_origin < p <= horizon})
            written = 0
            for key in self._modules:
                if key[0] != detector or key in self.faults.missing_modules:
                    continue
                written += self._materialise_module(key, wanted)
            return written

    def _materialise_module(self, key: ModuleKey, pulse_ids: list[int]) -> int:
        written = 0
        files: dict[int, int] = {}
        try:
            for pid in pulse_ids:
                first = fmt.file_first_pulse(pid)
                fd = files.get(first)
                if fd is None:
                    current = self._open.get(key)
                    if current is not None and current[0] == first:
                        fd = current[1]
                    else:
                        try:
                            fd = os.open(fmt.data_file(self.buffer_root, *key, pid), os.O_RDWR)
                        except FileNotFoundError:
                            continue  # aged out
                        files[first] = fd
                if os.pread(fd, 1, fmt.record_offset(pid)) == bytes([fmt.MARKER_WRITTEN]):
                    continue
                kind = self.frame_kind(key, pid)
                if kind is not None:
                    written += self._write_record(fd, key, pid, kind)
        finally:
            for fd in files.values():
                os.close(fd)
        return written

    async def run(self, interval: float = 0.02, step: int = 25) -> None:
        """Keep up with a wall clock until cancelled (writing happens in a worker thread)."""
        try:
            while True:
                written = await asyncio.to_thread(self.catch_up, None, step)
                if written < step:
                    await asyncio.sleep(interval)
        finally:
            self.close()

    def expected_record(self, detector: str, module: int, pid: int) -> np.ndarray | None:
        """The record the file must hold for ``pid`` (a 1-element RECORD_DTYPE array), or None
        when the current faults leave the slot unwritten."""
        key = (detector, module)
        dropped = self.faults.dropped_for(key)
        if key in self.faults.missing_modules or (dropped is not None and pid in dropped):
            return None
        kind = self.frame_kind(key, pid)
        if kind is None:
            return None
        header = np.zeros(1, dtype=fmt.HEADER_DTYPE)
        data = np.zeros((fmt.MODULE_ROWS, fmt.MODULE_COLS), dtype="<u2")
        self._fill(header, data, detector, module, pid, kind)
        record = np.zeros(1, dtype=fmt.RECORD_DTYPE)
        for name in fmt.HEADER_FIELDS:
            record[name] = header[name]
        record["data"] = data
        return record

    def age_out(self, before_pid: int) -> list[Path]:
        """Delete every file whose pulses are all older than ``before_pid`` (the disk filled
        up); returns the deleted paths."""
        with self._lock:
            removed: list[Path] = []
            for detector, module in self._modules:
                removed += self._remove_old_files(detector, module, before_pid)
            return removed

    def close(self) -> None:
        """Close the open files (not marking them as closed in LATEST: they are incomplete)."""
        with self._lock:
            for _first, fd in self._open.values():
                os.close(fd)
            self._open.clear()

    def _write_pulse(self, pid: int) -> None:
        for key in self._modules:
            if key in self.faults.missing_modules:
                continue
            kind = self.frame_kind(key, pid)
            if kind is not None:
                self._write_record(self._file_for(key, pid), key, pid, kind)
            if (pid + 1) % fmt.PULSES_PER_FILE == 0:
                self._close_file_of(key, fmt.file_first_pulse(pid))

    def _pass_files(self, first: int, last: int) -> None:
        """Lazy mode: create the files of ``[first, last]`` in which a module makes frames,
        and close those the range completes."""
        pid = first
        while pid <= last:
            file_first = fmt.file_first_pulse(pid)
            file_last = file_first + fmt.PULSES_PER_FILE - 1
            for key in self._modules:
                if key in self.faults.missing_modules:
                    continue
                if self._produces_frames(key, pid, min(last, file_last)):
                    self._file_for(key, pid)
                if last >= file_last:
                    self._close_file_of(key, file_first)
            pid = file_last + 1

    def _close_file_of(self, key: ModuleKey, first: int) -> None:
        """Close the module's file starting at ``first`` if it is the open one."""
        current = self._open.get(key)
        if current is not None and current[0] == first:
            self._close_file(key)

    def _write_record(self, fd: int, key: ModuleKey, pid: int, kind: FrameKind) -> int:
        """Write one record (unless the faults drop it); returns the number written."""
        dropped = self.faults.dropped_for(key)
        if dropped is not None and pid in dropped:
            return 0
        self._fill(self._header, self._frame, key[0], key[1], pid, kind)
        offset = fmt.record_offset(pid)
        # Pixels and header first, the marker last: a reader that sees the marker sees a whole
        # record.
        os.pwrite(fd, self._frame.data, offset + fmt.HEADER_DTYPE.itemsize)
        os.pwrite(fd, self._header_bytes[1:], offset + 1)
        os.pwrite(fd, self._header_bytes[:1], offset)
        self.frames_written += 1
        return 1

    def _fill(
        self,
        header: np.ndarray,
        data: np.ndarray,
        detector: str,
        module: int,
        pid: int,
        kind: FrameKind,
    ) -> None:
        frame_into(data, detector, module, pid, stage=kind.stage, illuminated=kind.illuminated)
        packets = fmt.PACKETS_PER_FRAME
        incomplete = self.faults.incomplete_for((detector, module))
        if incomplete is not None and pid in incomplete:
            lost = lost_packets(detector, module, pid, self.faults.lost_packets)
            for packet in lost.tolist():
                data[packet * fmt.ROWS_PER_PACKET : (packet + 1) * fmt.ROWS_PER_PACKET] = 0
            packets -= len(lost)
        header["marker"] = fmt.MARKER_WRITTEN
        header["pulse_id"] = pid
        header["frame_index"] = pid - self.frame_index_origin
        header["daq_rec"] = daq_rec(kind)
        header["daq_rec"] |= self.faults.event_bits_for(pid)
        header["n_recv_packets"] = packets
        header["module_id"] = module

    def _file_for(self, key: ModuleKey, pid: int) -> int:
        first = fmt.file_first_pulse(pid)
        current = self._open.get(key)
        if current is not None:
            if current[0] == first:
                return current[1]
            self._close_file(key)
        path = fmt.data_file(self.buffer_root, key[0], key[1], pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size < fmt.FILE_BYTES:
            os.ftruncate(fd, fmt.FILE_BYTES)  # full size, sparse: unwritten slots read as zero
        self._open[key] = (first, fd)
        return fd

    def _close_file(self, key: ModuleKey) -> None:
        first, fd = self._open.pop(key)
        os.close(fd)
        detector, module = key
        path = fmt.data_file(self.buffer_root, detector, module, first)
        latest = fmt.latest_file(self.buffer_root, detector, module)
        temporary = latest.with_name(f".{fmt.LATEST_NAME}.tmp")
        temporary.write_text(f"{path}\n")
        os.replace(temporary, latest)
        newest = first + fmt.PULSES_PER_FILE - 1
        self._remove_old_files(detector, module, newest - self.retention_pulses + 1)

    def _remove_old_files(self, detector: str, module: int, before_pid: int) -> list[Path]:
        key = (detector, module)
        open_first = self._open[key][0] if key in self._open else None
        root = fmt.module_dir(self.buffer_root, detector, module)
        removed: list[Path] = []
        folders = root.iterdir() if root.is_dir() else iter(())
        for folder in folders:
            if not folder.name.isdigit() or int(folder.name) >= before_pid:
                continue
            for path in folder.glob("*.bin"):
                first = fmt.first_pulse_of_file(path)
                if first + fmt.PULSES_PER_FILE <= before_pid and first != open_first:
                    path.unlink(missing_ok=True)
                    removed.append(path)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds once the folder is empty
        return removed
