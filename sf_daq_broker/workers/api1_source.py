"""Data buffer and image buffer sources: both speak api/1, only the files differ.

Readiness instead of a fixed delay: the job waits until the pulse map knows ``stop + 1`` (the
buffer has the whole range), fetches, and if a channel's data ends short of ``stop`` while the
ingestion window after the time of ``stop`` is still open, waits and fetches that channel again;
after the window it keeps what there is and the report names what is missing.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from sf_daq_broker.buffers.api1 import Api1Client, ChannelData
from sf_daq_broker.buffers.errors import DataAgedOut
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.config import Settings
from sf_daq_broker.h5.channels import (
    ChannelRows,
    CompressedImages,
    keep_rows,
    provenance,
    select_rows,
    write_channels,
)
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.workers.loop import Progress, Source
from sf_daq_broker.workers.readiness import beyond_retention, range_when_ready
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses

READY_TIMEOUT = 120.0  # longest wait for the pulse map to know stop + 1 before a retry
INGESTION_WINDOW = 60.0  # seconds after the time of stop during which late data is awaited
POLL_SECONDS = 0.5


class Api1Source(Source):
    name: ClassVar[str]
    keep_compressed: ClassVar[bool]

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

    def _short(self, data: ChannelData, job: Job) -> bool:
        """True if the channel's events stop before ``stop`` by more than their own spacing."""
        if len(data) == 0:
            return False
        pulses = np.unique(data.pulse_id)
        spacing = int(np.median(np.diff(pulses))) if pulses.size > 1 else 1
        return int(pulses[-1]) + max(spacing, 1) <= job.stop_pulse_id

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
            decompress = not self.keep_compressed
            result = await client.fetch(job.names, start_ns, end_ns, decompress=decompress)
            channels = dict(result.channels)
            if aged_out:
                if not any(len(data) for data in channels.values()):
                    raise DataAgedOut(aged_out)
                job_log.warning("%s, but it still has data: keeping what there is", aged_out)
            window_closes = end_ns / 1e9 + self.ingestion_window
            while (late := [n for n, d in channels.items() if self._short(d, job)]) and (
                time.time() < window_closes
            ):
                job_log.info("waiting for late data of %s", ", ".join(late))
                await asyncio.sleep(self.poll_seconds)
                again = await client.fetch(late, start_ns, end_ns, decompress=decompress)
                channels.update(again.channels)
        await progress.update(progress.total)

        expected = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        rows: list[ChannelRows] = []
        reports: list[NameReport] = []
        for name in job.names:
            data = channels.get(name)
            if data is None or len(data) == 0:
                continue
            selection = select_rows(data.pulse_id, job.start_pulse_id, job.stop_pulse_id)
            rows.append(keep_rows(_as_rows(data), selection))
            reports.append(
                NameReport.judge(
                    name, expected, data.pulse_id[selection.rows], selection.duplicates_removed
                )
            )
        absent = [name for name in job.names if name not in {row.name for row in rows}]
        await asyncio.to_thread(write_channels, target, provenance(job), rows)
        return CompletenessReport(names=reports, absent=absent)


def _as_rows(data: ChannelData) -> ChannelRows:
    values: np.ndarray | CompressedImages
    if data.blobs is not None:
        header = data.header
        block = struct.unpack(">I", data.blobs[0][8:12])[0] if data.blobs else 8192
        height, width = header.shape[-2:]
        values = CompressedImages(data.blobs, (height, width), header.dtype, block)
    else:
        assert data.values is not None
        values = data.values
    return ChannelRows(data.header.name, data.pulse_id, data.timestamp, values)


class DataBufferSource(Api1Source):
    kind = SourceKind.DATABUFFER
    name = "data buffer"
    keep_compressed = False


class ImageBufferSource(Api1Source):
    kind = SourceKind.IMAGEBUFFER
    name = "image buffer"
    keep_compressed = True  # images go into the file as the buffer's blobs: no decompression
