"""Jungfrau detector source: buffer files → conversion → bitshuffle+LZ4 chunks, in one pass.

A detector run is large (a 32-module detector makes 6.4 GB of raw frames per second of beam),
so the job never holds the run: it streams bounded batches through a pipeline of workers, one
per core (at most ``MAX_WORKERS``), each of which carries its batch all the way:

    read the batch from the buffer files (numpy memmap, one copy), convert it (numba kernel,
    nogil, on this thread), compress each frame (bitshuffle+LZ4, single-threaded in OpenMP)
    and write the chunks directly at the batch's rows of the file,

so memory is one batch per worker plus the calibration, whatever the run's length, and every
core works on its own batch: no stage waits for another, no OpenMP team spins on a core
another stage needs. (The former two stages, read+convert in one thread and compress+write in
another, each with two-thread teams inside, kept the job at ~0.5x of compression alone.) The
event loop only coordinates, publishes progress and keeps the job's lease alive.

Readiness (BUFFERS.md §4): the job waits until every module's ``LATEST`` has passed ``stop``.
A module without a buffer at all is missing: it is not waited for, its rows read as zeros and
every frame is flagged (``is_good_frame`` 0), never dropped. A module that stopped writing is
waited for until the ingestion window after the time of ``stop`` closes (the time of a pulse is
estimated from the freshest module's ``LATEST``: its mtime is when the file ending at its
newest pulse closed); what it never wrote is then flagged. A stop pulse whose estimated time is
more than ``max_wait_ahead`` (300 s) in the future is surely a mistake (a typo in
``stop_pulseid``): the job fails at once (``StopTooFarAhead``) rather than block the worker.

Retention deletes a module's oldest files first, so a missing file older than the module's
oldest surviving file has aged out: the job fails at once with that reason (``DataAgedOut``),
also when it happens while streaming. A missing file newer than that is a gap (the module was
stopped or restarted for a while): its frames are zeros for that module and flagged, never
dropped, and the completeness report counts them.

Rows follow BUFFERS.md §4: one per beam pulse of the detector range; ``is_good_frame`` only if
every module's record is complete and all agree on pulse id and frame index; ``pulse_id``,
``frame_index`` and ``daq_rec`` from the first complete module (0 if none is);
``requested_pulse_id`` always. High-gain mode is bit 0 of ``daq_rec`` of the first good frame,
found from the record headers before anything is converted.

With ``adc_to_energy`` false the file is the raw layout: the buffer's bytes, all modules, and
the conversion options are ignored (SPEC §5.4). ``keep_raw`` writes that raw file as well, in
the same pass, under ``raw/RAW_DATA/{directory_name}/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
import urllib.error
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import numpy.typing as npt

from sf_daq_broker.bookkeeping.atomic import partial_name
from sf_daq_broker.bookkeeping.confined import ConfinedDir, ConfinedFile
from sf_daq_broker.bookkeeping.ledger import RAW_DATA
from sf_daq_broker.buffers import jungfrau_format as fmt
from sf_daq_broker.buffers.errors import (
    BufferUnavailable,
    DataAgedOut,
    ModuleMissing,
    StopTooFarAhead,
)
from sf_daq_broker.buffers.horizon import Waiting, seconds_between
from sf_daq_broker.buffers.jungfrau_buffer import BeforeRead, DetectorFrames, JungfrauBufferReader
from sf_daq_broker.config import Settings
from sf_daq_broker.h5.channels import provenance
from sf_daq_broker.h5.detector import DetectorFileWriter, FrameColumns
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.jungfrau.converter import Converter
from sf_daq_broker.jungfrau.errors import CalibrationError
from sf_daq_broker.jungfrau.events import kept_frames, selects, write_crystfel_lists
from sf_daq_broker.jungfrau.export import Export
from sf_daq_broker.retrieval import DetectorOptions
from sf_daq_broker.workers.job_files import job_raw_dir, open_job_dir, write_job_file
from sf_daq_broker.workers.loop import Progress, Source
from sf_daq_broker.workers.readiness import ANNOUNCE_EVERY
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses

#: Raw bytes per batch: 8 frames of an 8-module detector. One batch per worker is in flight,
#: each with its converted copy (up to 2x) and compressed chunks: ~0.5 GB for 8 modules and
#: two workers.
BATCH_BYTES = 64 * 1024 * 1024
#: Pipeline workers (threads that each carry a batch from the buffer into the file): one per
#: core, at most this many (memory grows with them); the cores beyond go to each worker's
#: conversion kernel.
MAX_WORKERS = 4
INGESTION_WINDOW = 60.0  # seconds after the time of stop during which late frames are awaited
#: A stop pulse estimated further ahead than this (seconds) is a mistake, not a run to wait for
#: (from the settings: ``max_pulses_ahead``, which the broker checks at the door too).
MAX_WAIT_AHEAD = 300.0
POLL_SECONDS = 0.5
PULSE_RATE_HZ = 100.0


@dataclass(frozen=True)
class CalibrationFiles:
    gain_file: Path | None
    pedestal_file: Path | None


@dataclass
class _Batch:
    """One batch on its way through the pipeline."""

    count: int
    raw: npt.NDArray[np.uint16]  # (count, n*512, 1024), a view of a reused buffer
    converted: list[npt.NDArray[Any]]  # one array per data group of the file (kept rows)
    columns: FrameColumns  # every row read
    kept_columns: FrameColumns  # the rows of ``converted``
    incomplete: npt.NDArray[np.int64]  # (n_modules,) records not complete in this batch


@dataclass
class _Selection:
    """A selection's outcome over the whole range, from the record headers."""

    keep: npt.NDArray[np.bool_]
    good: npt.NDArray[np.bool_]
    incomplete: npt.NDArray[np.int64]  # per module


@dataclass
class _StreamPlan:
    """What the pipeline reads (every row if the raw file is kept, else the kept rows) and
    where it writes."""

    pulse_ids: npt.NDArray[np.int64]
    keep: npt.NDArray[np.bool_] | None  # None: every row
    export: Export
    target: Path
    raw_target: Path | None
    compression: bool
    lists: bool = False  # keep the written rows' daq_rec and is_good_frame

    @property
    def read_ids(self) -> npt.NDArray[np.int64]:
        if self.keep is None or self.raw_target is not None:
            return self.pulse_ids
        return self.pulse_ids[self.keep]

    @property
    def read_kept(self) -> npt.NDArray[np.bool_]:
        """For each row read, whether the file keeps it."""
        if self.keep is None or self.raw_target is None:
            return np.ones(self.read_ids.size, dtype=bool)
        return self.keep


@dataclass
class _Streamed:
    """What the pipeline saw: completeness of the rows read, columns of the rows written."""

    all_good: npt.NDArray[np.bool_]
    incomplete: npt.NDArray[np.int64]
    daq_rec: npt.NDArray[Any]
    good: npt.NDArray[Any]

    @classmethod
    def empty(cls, rows: int, n_modules: int) -> _Streamed:
        return cls(
            np.zeros(rows, dtype=bool),
            np.zeros(n_modules, dtype=np.int64),
            np.zeros(0, dtype=np.uint32),
            np.zeros(0, dtype=np.uint8),
        )


class DetectorSource(Source):
    kind = SourceKind.DETECTOR
    waits_for_data = True

    def __init__(
        self,
        buffer_root: Path | str,
        calibration: Mapping[str, CalibrationFiles],
        *,
        before_read: BeforeRead | None = None,
        ingestion_window: float = INGESTION_WINDOW,
        max_wait_ahead: float = MAX_WAIT_AHEAD,
        poll_seconds: float = POLL_SECONDS,
        batch_bytes: int = BATCH_BYTES,
        config_source: str = "the configuration",
        workers: int | None = None,
    ) -> None:
        self.buffer_root = Path(buffer_root)
        self.calibration = dict(calibration)
        self.before_read = before_read
        self.ingestion_window = ingestion_window
        self.max_wait_ahead = max_wait_ahead
        self.poll_seconds = poll_seconds
        self.batch_bytes = batch_bytes
        self.config_source = config_source
        cores = len(os.sched_getaffinity(0))
        #: Batches carried at once (one thread each), and numba threads of each one's kernel.
        self.workers = workers or max(1, min(cores, MAX_WORKERS))
        available = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        self.kernel_threads = max(1, min(available, cores // self.workers))

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectorSource:
        buffers = settings.buffers
        before_read = None
        if buffers.jungfrau_control_url:
            from sf_daq_broker.simulation.control import http_materialiser

            before_read = http_materialiser(buffers.jungfrau_control_url)
        return cls(
            buffers.jungfrau_root,
            {
                name: CalibrationFiles(detector.gain_file, detector.pedestal_file)
                for name, detector in settings.detectors.items()
            },
            before_read=before_read,
            ingestion_window=buffers.ingestion_window_s,
            max_wait_ahead=seconds_between(0, settings.max_pulses_ahead),
            config_source=settings.source,
        )

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        detector = job.source
        options = DetectorOptions.from_json(job.options)
        reader = JungfrauBufferReader(self.buffer_root, detector, before_read=self._hook)
        # The detector range starts and stops on beam pulses (SPEC §3).
        pulse_ids = np.arange(
            job.start_pulse_id, job.stop_pulse_id + 1, job.rate_multiplicator, dtype=np.int64
        )
        missing_modules = await self._wait_until_ready(reader, job, job_log, progress)
        await progress.ready()  # the wait above held no work slot: the conversion does
        if missing_modules:
            job_log.warning(
                "%s: modules %s have no buffer (no LATEST in %s): their rows are zeros and "
                "every frame is flagged not good",
                detector,
                ", ".join(map(str, missing_modules)),
                self.buffer_root / detector,
            )
        await asyncio.to_thread(self._check_retention, reader, job, missing_modules)
        selection = None
        if selects(options.selected_pulse_ids, options.save_ppicker_events_only):
            selection = await asyncio.to_thread(self._select, reader, pulse_ids, options)
            _log_selection(job_log, detector, options, pulse_ids, selection)
        converter = None
        if options.adc_to_energy:
            converter = await asyncio.to_thread(
                self._converter, reader, pulse_ids, options, job.pedestal_file
            )
        export = Export(detector, _raw_shape(reader), converter)
        if converter is not None:
            job_log.info(
                "%s: converting to %s, %s",
                detector,
                _describe(converter, export),
                "bitshuffle+LZ4" if options.compression else "uncompressed",
            )
        kept = int(selection.keep.sum()) if selection is not None else int(pulse_ids.size)
        # The raw file is kept if asked (or if the selection kept nothing: nothing is lost);
        # without conversion or selection the file is the raw file already.
        raw_differs = converter is not None or selection is not None
        keep_raw = (options.keep_raw or kept == 0) and raw_differs
        if options.keep_raw and not raw_differs:
            job_log.info("keep_raw: the file is the raw file already (adc_to_energy false)")
        raw_final = raw_data_file(job) if keep_raw else None
        started = time.monotonic()
        raw_dir: ConfinedDir | None = None
        raw_temp: ConfinedFile | None = None
        try:
            if raw_final is not None:
                # Created below raw/ without following symlinks: a RAW_DATA that leads out
                # fails the job (OutsideRaw) instead of receiving the file.
                raw_dir = await asyncio.to_thread(open_job_dir, job, raw_final.parent, create=True)
                raw_temp = await asyncio.to_thread(
                    raw_dir.new_file, partial_name(raw_final.name, uuid.uuid4().hex[:12])
                )
            plan = _StreamPlan(
                pulse_ids,
                None if selection is None else selection.keep,
                export,
                target,
                raw_temp.path if raw_temp is not None else None,
                options.compression,
                options.crystfel_lists_laser,
            )
            streamed = await self._stream(reader, job, plan, progress)
            if raw_final is not None and raw_temp is not None:
                # fsync of gigabytes and a rename: not on the event loop
                await asyncio.to_thread(raw_temp.publish, raw_final.name)
        finally:
            if raw_temp is not None:
                raw_temp.discard()  # nothing if it was published
            if raw_dir is not None:
                raw_dir.close()
        elapsed = time.monotonic() - started
        raw_bytes = plan.read_ids.size * _raw_frame_bytes(reader)
        job_log.info(
            "%s: %d frames read, %d written in %.1f s (%.0f frames/s, %.2f GB/s of raw frames)%s",
            detector,
            plan.read_ids.size,
            kept,
            elapsed,
            plan.read_ids.size / max(elapsed, 1e-9),
            raw_bytes / max(elapsed, 1e-9) / 1e9,
            f", raw file kept as {raw_final}" if raw_final is not None else "",
        )
        if options.crystfel_lists_laser:
            lists = await asyncio.to_thread(
                write_crystfel_lists,
                Path(job.output_file),
                streamed.daq_rec,
                streamed.good,
                functools.partial(write_job_file, job),
            )
            job_log.info("%s: CrystFEL lists %s", detector, ", ".join(map(str, lists)) or "none")
        incomplete, good = (
            (selection.incomplete, selection.good)
            if selection is not None
            else (streamed.incomplete, streamed.all_good)
        )
        expected = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        report = NameReport.judge(
            detector,
            expected,
            pulse_ids[good],
            frames_written=kept,
            bad_frames=int(pulse_ids.size - np.count_nonzero(good)),
            bad_frames_per_module=[int(n) for n in incomplete],
            missing_modules=missing_modules,
        )
        return CompletenessReport(names=[report])

    def _select(
        self,
        reader: JungfrauBufferReader,
        pulse_ids: npt.NDArray[np.int64],
        options: DetectorOptions,
    ) -> _Selection:
        """Which rows a selection keeps, from the record headers of the whole range (also the
        completeness of the rows that will not be read again)."""
        step = max(1, self.batch_bytes // _raw_frame_bytes(reader))
        keep = np.zeros(pulse_ids.size, dtype=bool)
        good = np.zeros(pulse_ids.size, dtype=bool)
        incomplete = np.zeros(reader.n_modules, dtype=np.int64)
        for first in range(0, pulse_ids.size, step):
            headers = reader.read(pulse_ids[first : first + step], missing="flag", pixels=False)
            columns = frame_columns(headers)
            rows = slice(first, first + len(headers))
            good[rows] = headers.is_good_frame()
            incomplete += (~headers.complete()).sum(axis=0)
            keep[rows] = kept_frames(
                columns.pulse_id,
                columns.daq_rec,
                columns.is_good_frame,
                selected_pulse_ids=options.selected_pulse_ids,
                ppicker_only=options.save_ppicker_events_only,
            )
        return _Selection(keep, good, incomplete)

    def _hook(self, detector: str, pulse_ids: np.ndarray) -> None:
        """The configured ``before_read``, with its failures as transient buffer errors."""
        if self.before_read is None:
            return
        try:
            self.before_read(detector, pulse_ids)
        except (urllib.error.URLError, OSError) as exc:
            raise BufferUnavailable(
                f"{detector}: the simulated Jungfrau buffer did not write pulses "
                f"{int(pulse_ids[0])}..{int(pulse_ids[-1])}: {exc}"
            ) from exc

    async def _wait_until_ready(
        self, reader: JungfrauBufferReader, job: Job, job_log: logging.Logger, progress: Progress
    ) -> list[int]:
        """Wait until every module with a buffer has passed ``stop`` or the ingestion window
        closed; returns the modules without a buffer. Fails at once if ``stop`` is more than
        ``max_wait_ahead`` seconds in the future. While waiting, says so (``progress``)."""
        stop = job.stop_pulse_id
        announced = False
        last_announced = -math.inf
        while True:
            state = await asyncio.to_thread(_module_state, reader)
            missing = [m for m, (latest, _) in enumerate(state) if latest is None]
            present = [
                (m, latest, mtime) for m, (latest, mtime) in enumerate(state) if latest is not None
            ]
            if not present:
                raise ModuleMissing(
                    f"{job.source}: no module has a buffer in {self.buffer_root / job.source} "
                    "(no LATEST file): is the detector running?"
                )
            behind = [m for m, latest, _ in present if latest < stop]
            if not behind:
                return missing
            # When stop happened, by the freshest module's clock.
            time_of_stop = max(
                mtime + (stop - latest) / PULSE_RATE_HZ for _, latest, mtime in present
            )
            now = time.time()
            if time_of_stop - now > self.max_wait_ahead:
                newest = max(latest for _, latest, _ in present)
                raise StopTooFarAhead(
                    f"{job.source}: stop pulse {stop} is about {time_of_stop - now:.0f} s in the "
                    f"future (newest pulse in the buffer: {newest}); not waiting for it (the "
                    f"limit is {self.max_wait_ahead:.0f} s: is stop_pulseid a typo?)"
                )
            if now > time_of_stop + self.ingestion_window:
                job_log.warning(
                    "%s: modules %s did not reach pulse %d within the ingestion window of %.0f s;"
                    " the frames they did not write are flagged",
                    job.source,
                    ", ".join(map(str, behind)),
                    stop,
                    self.ingestion_window,
                )
                return missing
            if not announced:
                job_log.info(
                    "%s: waiting for modules %s to pass pulse %d",
                    job.source,
                    ", ".join(map(str, behind)),
                    stop,
                )
                announced = True
            if time.monotonic() - last_announced >= ANNOUNCE_EVERY:
                last_announced = time.monotonic()
                newest = max(latest for _, latest, _ in present)
                await progress.waiting(Waiting(stop, newest, max(time_of_stop - now, 0.0)))
            await asyncio.sleep(self.poll_seconds)

    def _check_retention(
        self, reader: JungfrauBufferReader, job: Job, missing_modules: list[int]
    ) -> None:
        """Fail at once if the first pulse's file of a module is gone and older than the
        module's oldest surviving file (retention deletes the oldest files first). A missing
        file that is newer is a gap, flagged while streaming. The module's files are listed
        only if the first file is missing."""
        start = job.start_pulse_id
        first = fmt.file_first_pulse(start)
        for module in range(reader.n_modules):
            if module in missing_modules:
                continue
            path = reader.data_file(module, start)
            if path.exists():
                continue
            horizon = reader.retention_horizon(module)
            if horizon is not None and first < horizon:
                raise DataAgedOut(
                    f"{job.source}: pulses {start}-{job.stop_pulse_id} aged out of the Jungfrau "
                    f"buffer: module {module}'s file {path} is gone and its oldest file starts "
                    f"at pulse {horizon} (the buffer keeps only its newest files; or the module "
                    "was not writing yet); retrieve sooner after the run"
                )

    def _converter(
        self,
        reader: JungfrauBufferReader,
        pulse_ids: npt.NDArray[np.int64],
        options: DetectorOptions,
        pedestal_file: str | None = None,
    ) -> Converter:
        """``pedestal_file`` is the job's (the one the run JSON records: the newest pedestal
        taken when the run was accepted); without one, the configured one."""
        detector = reader.detector
        files = self.calibration.get(detector)
        pedestal = Path(pedestal_file) if pedestal_file else None
        if pedestal is None and files is not None:
            pedestal = files.pedestal_file
        if files is None or files.gain_file is None or pedestal is None:
            raise CalibrationError(
                f"{detector}: no gain_file and pedestal_file configured in {self.config_source} "
                "(detectors section): cannot convert; ask for adc_to_energy false to get raw data"
            )
        return Converter.from_files(
            detector,
            files.gain_file,
            pedestal,
            options.conversion(),
            highgain=self._highgain(reader, pulse_ids),
        )

    def _highgain(self, reader: JungfrauBufferReader, pulse_ids: npt.NDArray[np.int64]) -> bool:
        """Bit 0 of ``daq_rec`` of the first good frame (headers only; False if none is)."""
        step = max(1, self.batch_bytes // _raw_frame_bytes(reader))
        for first in range(0, pulse_ids.size, step):
            headers = reader.read(pulse_ids[first : first + step], missing="flag", pixels=False)
            good = np.flatnonzero(headers.is_good_frame())
            if good.size:
                return bool(int(headers.daq_rec[good[0], 0]) & 1)
        return False

    async def _stream(
        self, reader: JungfrauBufferReader, job: Job, plan: _StreamPlan, progress: Progress
    ) -> _Streamed:
        """The pipeline over the rows to read: the kept ones go through ``plan.export``
        into ``plan.target``, all of them into ``plan.raw_target`` if given.

        ``workers`` threads each take the next batch and carry it all the way: read, convert
        (numba on this thread), compress (bitshuffle single-threaded) and write at its rows
        of the file. Every core does the whole job for its own batches, so no stage waits for
        another and no OpenMP team spins on a core another stage needs (measured in
        ``bench/README.md``); memory is one batch per worker, whatever the run's length.
        """
        read_ids, read_kept, export = plan.read_ids, plan.read_kept, plan.export
        count = int(read_ids.size)
        raw_shape = _raw_shape(reader)
        batch = max(1, min(count, self.batch_bytes // _raw_frame_bytes(reader)))
        n_batches = -(-count // batch)
        workers = max(1, min(self.workers, n_batches))
        free_slots = list(range(workers))
        raw_buffers = [np.empty((batch, *raw_shape), dtype=np.uint16) for _ in range(workers)]
        out_buffers = [export.buffers(batch) for _ in range(workers)]
        # The file row of each batch's first kept frame: batches finish out of order.
        kept_before = np.concatenate([[0], np.cumsum(read_kept)]).astype(np.int64)
        streamed = _Streamed.empty(count, reader.n_modules)
        written: dict[int, FrameColumns] = {}
        attributes = provenance(job)

        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(
                DetectorFileWriter(
                    plan.target,
                    job.source,
                    int(read_kept.sum()),
                    groups=export.groups,
                    compression=plan.compression,
                    attributes=attributes,
                    threads=0,
                )
            )
            raw_writer = None
            if plan.raw_target is not None:
                raw_writer = stack.enter_context(
                    DetectorFileWriter(
                        plan.raw_target,
                        job.source,
                        count,
                        raw_shape,
                        np.uint16,
                        compression=plan.compression,
                        attributes=attributes,
                        threads=0,
                    )
                )

            def carry(index: int, slot: int) -> _Batch:
                """One batch from the buffer into the file(s), on a worker thread."""
                numba.set_num_threads(self.kernel_threads)  # this thread's kernel calls
                first = index * batch
                pids = read_ids[first : first + batch]
                frames = reader.read(pids, out=raw_buffers[slot], missing="flag")
                streamed.all_good[first : first + len(pids)] = frames.is_good_frame()
                columns = frame_columns(frames)
                kept = read_kept[first : first + len(pids)]
                rows = frames.data if kept.all() else frames.data[kept]
                item = _Batch(
                    len(pids),
                    frames.data,
                    export.process(rows, out_buffers[slot]),
                    columns,
                    columns.take(np.flatnonzero(kept)),
                    (~frames.complete()).sum(axis=0),
                )
                writer.write_at(int(kept_before[first]), item.converted, item.kept_columns)
                if raw_writer is not None:
                    raw_writer.write_at(first, item.raw, item.columns)
                return item

            loop = asyncio.get_running_loop()
            pool = stack.enter_context(
                ThreadPoolExecutor(workers, thread_name_prefix=f"{job.source}-batch")
            )
            running: dict[asyncio.Future[_Batch], tuple[int, int]] = {}
            next_index = done = 0
            try:
                while next_index < n_batches or running:
                    while free_slots and next_index < n_batches:
                        slot = free_slots.pop()
                        future = loop.run_in_executor(pool, carry, next_index, slot)
                        running[future] = (next_index, slot)
                        next_index += 1
                    finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for future in finished:
                        index, slot = running.pop(future)
                        item = future.result()
                        free_slots.append(slot)
                        streamed.incomplete += item.incomplete
                        if plan.lists:  # the CrystFEL lists need the written rows' event bits
                            written[index] = item.kept_columns
                        done += item.count
                    await progress.update(done)
            finally:
                if running:  # let the workers finish before the buffers and files go
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(asyncio.wait(running))
        if written:
            ordered = [written[index] for index in sorted(written)]
            streamed.daq_rec = np.concatenate([c.daq_rec for c in ordered])
            streamed.good = np.concatenate([c.is_good_frame for c in ordered])
        return streamed


def frame_columns(frames: DetectorFrames) -> FrameColumns:
    """The rows of BUFFERS.md §4: values of the first complete module, 0 if none is."""
    complete = frames.complete()
    some = complete.any(axis=1)
    first = complete.argmax(axis=1)
    rows = np.arange(len(frames))

    def pick(values: np.ndarray) -> np.ndarray:
        return np.where(some, values[rows, first], 0)

    return FrameColumns.from_arrays(
        pulse_id=pick(frames.pulse_id),
        frame_index=pick(frames.frame_index),
        daq_rec=pick(frames.daq_rec),
        is_good_frame=frames.is_good_frame(),
        requested_pulse_id=frames.requested_pulse_id,
    )


def raw_data_file(job: Job) -> Path:
    """``raw/RAW_DATA/{directory_name}/run_NNNNNN.{DET}.h5`` (SPEC §5.4 ``keep_raw``).

    The raw directory is the one above ``run_info`` (the job's bookkeeping JSON lives in
    ``raw/run_info/NNN000/``), ``directory_name`` the output file's place below it.
    """
    raw_dir = job_raw_dir(job)
    relative = Path(job.output_file).relative_to(raw_dir)
    return raw_dir / RAW_DATA / relative


def _raw_shape(reader: JungfrauBufferReader) -> tuple[int, int]:
    return (reader.n_modules * fmt.MODULE_ROWS, fmt.MODULE_COLS)


def _describe(converter: Converter, export: Export) -> str:
    text = ", ".join(f"{g.name} {g.dtype} {g.frame_shape}" for g in export.groups)
    if converter.highgain:
        text += ", high-gain mode"
    if converter.options.double_pixels == "interp":
        text += ", double pixels interpolated"
    if converter.options.downsample:
        n, m = converter.options.downsample
        text += f", downsampled {n}x{m} from {converter.frame_shape}"
    return text


def _log_selection(
    job_log: logging.Logger,
    detector: str,
    options: DetectorOptions,
    pulse_ids: npt.NDArray[np.int64],
    selection: _Selection,
) -> None:
    kept = int(selection.keep.sum())
    reasons = []
    if options.selected_pulse_ids:
        inside = np.isin(np.asarray(options.selected_pulse_ids), pulse_ids).sum()
        reasons.append(
            f"{len(options.selected_pulse_ids)} selected pulse ids ({inside} in the range)"
        )
    if options.save_ppicker_events_only:
        reasons.append("pulse-picker events only")
    job_log.info(
        "%s: keeping %d of %d frames (good frames, %s)",
        detector,
        kept,
        pulse_ids.size,
        " and ".join(reasons),
    )
    if kept == 0:
        job_log.warning(
            "%s: the selection keeps no frame: the file is empty and the raw file is kept",
            detector,
        )


def _raw_frame_bytes(reader: JungfrauBufferReader) -> int:
    return reader.n_modules * fmt.MODULE_ROWS * fmt.MODULE_COLS * 2


def _module_state(reader: JungfrauBufferReader) -> list[tuple[int | None, float]]:
    """Per module: the newest pulse of its closed files (None: no buffer) and LATEST's mtime."""
    state: list[tuple[int | None, float]] = []
    for module in range(reader.n_modules):
        latest = reader.latest_pulse_id(module)
        try:
            mtime = fmt.latest_file(reader.buffer_root, reader.detector, module).stat().st_mtime
        except FileNotFoundError:
            latest, mtime = None, 0.0
        state.append((latest, mtime))
    return state
