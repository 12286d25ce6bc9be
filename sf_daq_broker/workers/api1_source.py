"""Data buffer and image buffer sources: both speak api/1, only the files differ.

Readiness instead of a fixed delay: the job waits until the pulse map knows ``stop + 1`` (the
buffer has the whole range), fetches, and if a channel's data ends short of ``stop`` while the
ingestion window after the time of ``stop`` is still open, waits and fetches that channel again
(it starts over in the file); after the window it keeps what there is and the report names what
is missing.

Streaming, in memory independent of the run's length: the reply is decoded on the event loop
as it arrives, a channel's batches are gathered up to ``BATCH_BYTES`` and handed to the file
stage (``file_stage``: HDF5 on its own thread, a bounded queue), where ``SortedChannel`` writes
them sorted and unique. The two stages overlap on two cores; bitshuffle runs single-threaded
inside the decoding stage (``sf_daq_broker.openmp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from sf_daq_broker.buffers.api1 import Api1Client
from sf_daq_broker.buffers.api1_decoder import EventBatch
from sf_daq_broker.buffers.api1_format import ChannelHeader
from sf_daq_broker.buffers.errors import DataAgedOut
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.config import Settings
from sf_daq_broker.h5.channels import ChannelFile, ChannelRows, CompressedImages, provenance
from sf_daq_broker.h5.sorted_channel import SortedChannel
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.workers.file_stage import FileStage, open_channel_file
from sf_daq_broker.workers.loop import Progress, Source
from sf_daq_broker.workers.readiness import beyond_retention, range_when_ready
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses

READY_TIMEOUT = 120.0  # longest wait for the pulse map to know stop + 1 before a retry
INGESTION_WINDOW = 60.0  # seconds after the time of stop during which late data is awaited
POLL_SECONDS = 0.5
#: A channel's decoded events are handed to the file stage in batches of about this size.
BATCH_BYTES = 4 << 20
#: Pulse ids at the end of a channel from which its own spacing is judged.
SPACING_SAMPLE = 1024


class Api1Source(Source):
    name: ClassVar[str]
    keep_compressed: ClassVar[bool]
    waits_for_data = True

    def __init__(
        self,
        buffer_url: str,
        pulse_map_url: str,
        retention_pulses: int,
        ready_timeout: float = READY_TIMEOUT,
        ingestion_window: float = INGESTION_WINDOW,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.buffer_url = buffer_url
        self.pulse_map_url = pulse_map_url
        self.retention_pulses = retention_pulses
        self.ready_timeout = ready_timeout
        self.ingestion_window = ingestion_window
        self.poll_seconds = poll_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The buffer's ``{kind}_url`` and ``{kind}_retention_pulses``; the pulse map is the
        data buffer's (BUFFERS.md §1)."""
        buffers = settings.buffers
        return cls(
            getattr(buffers, f"{cls.kind.value}_url"),
            buffers.databuffer_url,
            getattr(buffers, f"{cls.kind.value}_retention_pulses"),
            ingestion_window=buffers.ingestion_window_s,
        )

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        async with (
            PulseMapClient(self.pulse_map_url) as pulse_map,
            Api1Client(self.buffer_url, name=self.name) as client,
        ):
            start_ns, end_ns = await range_when_ready(
                pulse_map, job, self.ready_timeout, self.poll_seconds, progress.waiting
            )
            aged_out = await beyond_retention(pulse_map, job, self.retention_pulses, self.name)
            await progress.ready()  # the wait above held no work slot: the fetch does
            async with open_channel_file(target, provenance(job)) as (stage, file):
                channels = _Channels(file, job, stage, progress)
                await channels.fetch(client, job.names, start_ns, end_ns, self.keep_compressed)
                if aged_out:
                    if not await stage.call(channels.received_any):
                        raise DataAgedOut(aged_out)
                    job_log.warning("%s, but it still has data: keeping what there is", aged_out)
                window_closes = end_ns / 1e9 + self.ingestion_window
                while (late := await stage.call(channels.short)) and time.time() < window_closes:
                    job_log.info("waiting for late data of %s", ", ".join(late))
                    await asyncio.sleep(self.poll_seconds)
                    await channels.fetch(
                        client, late, start_ns, end_ns, self.keep_compressed, again=True
                    )
                await progress.update(progress.total)
                return await stage.call(channels.report)


class _Channels:
    """The job's channels in its file: the stream goes in, the completeness report comes out.

    Methods without ``async`` run on the file stage's thread.
    """

    def __init__(self, file: ChannelFile, job: Job, stage: FileStage, progress: Progress) -> None:
        self._file = file
        self._job = job
        self._stage = stage
        self._progress = progress
        self._channels: dict[str, SortedChannel] = {}
        self._headers_seen = 0

    def _channel(self, name: str) -> SortedChannel:
        if name not in self._channels:
            job = self._job
            group = self._file.streamed(name)
            self._channels[name] = SortedChannel(group, job.start_pulse_id, job.stop_pulse_id)
        return self._channels[name]

    async def fetch(
        self,
        client: Api1Client,
        names: Sequence[str],
        start_ns: int,
        end_ns: int,
        keep_compressed: bool,
        again: bool = False,
    ) -> None:
        """Stream ``names`` into the file; ``again``: each channel starts over at its header."""
        wanted = set(self._job.names)
        started: set[str] = set()
        pending: list[EventBatch] = []
        pending_bytes = 0
        items = client.stream(names, start_ns, end_ns, decompress=not keep_compressed)
        async with contextlib.aclosing(items) as stream:
            async for item in stream:
                if isinstance(item, ChannelHeader):
                    await self._hand_over(pending)
                    pending_bytes = 0
                    self._headers_seen += 1
                    name = item.name
                    if again and item.has_data and name in wanted and name not in started:
                        started.add(name)
                        await self._stage.submit(0, self._channel(name).restart)
                elif item.header.name in wanted:
                    pending.append(item)
                    pending_bytes += _nbytes(item)
                    if pending_bytes >= BATCH_BYTES:
                        await self._hand_over(pending)
                        pending_bytes = 0
        await self._hand_over(pending)

    async def _hand_over(self, pending: list[EventBatch]) -> None:
        """The gathered batches of one channel to the file stage."""
        if not pending:
            return
        rows = _as_rows(pending)
        pending.clear()
        await self._stage.submit(rows.nbytes, self._channel(rows.name).append, rows)
        await self._progress.update(self._progress_done(int(rows.pulse_ids[-1])))

    def _progress_done(self, pulse_id: int) -> int:
        """Progress in the report's unit: channels stream one after another, each over the
        range, so the share is (channels before + the part of this one) / channels."""
        job, total = self._job, self._progress.total
        within = (pulse_id - job.start_pulse_id + 1) / (job.stop_pulse_id - job.start_pulse_id + 1)
        share = (self._headers_seen - 1 + min(max(within, 0.0), 1.0)) / max(1, len(job.names))
        return max(self._progress.done, min(int(total * share), total))

    def received_any(self) -> bool:
        return any(channel.received for channel in self._channels.values())

    def short(self) -> list[str]:
        """Channels whose events stop before ``stop`` by more than their own spacing."""
        late = []
        for name, channel in self._channels.items():
            if not channel.received or channel.newest is None:
                continue
            channel.finish()
            rows = channel.group.rows
            tail = channel.group.pulse_ids(max(0, rows - SPACING_SAMPLE), rows)
            spacing = int(np.median(np.diff(tail))) if tail.size > 1 else 1
            if channel.newest + max(spacing, 1) <= self._job.stop_pulse_id:
                late.append(name)
        return late

    def report(self) -> CompletenessReport:
        """Every channel complete in the file; what was expected, found and missing."""
        job = self._job
        expected = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        reports: list[NameReport] = []
        absent: list[str] = []
        for name in job.names:
            channel = self._channels.get(name)
            if channel is None or not channel.received:
                absent.append(name)
                continue
            channel.finish()
            pulse_ids = channel.group.pulse_ids()
            reports.append(NameReport.judge(name, expected, pulse_ids, channel.duplicates))
        return CompletenessReport(names=reports, absent=absent)


def _nbytes(batch: EventBatch) -> int:
    if batch.blobs is not None:
        return sum(len(blob) for blob in batch.blobs)
    return 16 * len(batch) + (batch.values.nbytes if batch.values is not None else 0)


def _as_rows(batches: Sequence[EventBatch]) -> ChannelRows:
    """Consecutive batches of one channel as rows (values, or blobs kept compressed)."""
    header = batches[0].header
    pulse_ids = np.concatenate([batch.pulse_id for batch in batches])
    timestamps = np.concatenate([batch.timestamp for batch in batches])
    values: np.ndarray | CompressedImages
    if batches[0].blobs is not None:
        blobs = [blob for batch in batches for blob in batch.blobs or ()]
        block = struct.unpack(">I", blobs[0][8:12])[0]
        height, width = header.shape[-2:]
        values = CompressedImages(blobs, (height, width), header.dtype, block)
    else:
        values = np.concatenate([batch.values for batch in batches if batch.values is not None])
    return ChannelRows(header.name, pulse_ids, timestamps, values)


class DataBufferSource(Api1Source):
    kind = SourceKind.DATABUFFER
    name = "data buffer"
    keep_compressed = False


class ImageBufferSource(Api1Source):
    kind = SourceKind.IMAGEBUFFER
    name = "image buffer"
    keep_compressed = True  # images go into the file as the buffer's blobs: no decompression
