"""Archiver source: the EPICS PVs of a run, into the PVCHANNELS file (SPEC §5.3).

PVs change rarely, so the file holds their *changes*: the last value before the run (so the
state at the start is known, ``changed_in_interval`` false) and every change inside
``[ts(start), ts(stop + 1))`` (true). Each value also gets the pulse at or before its time.
The pulse map is a service, not a formula (the machine rate drifts and timestamps carry the
pulse id in their sub-millisecond digits), so the pulse is found by asking the map: an estimate
from the run's own two timestamps, then stepping until ``ts(p) <= t < ts(p + 1)``. A value older
than the map still knows (hours before the run) keeps the estimate.

Readiness as for the other sources: the archiver is asked once the pulse map knows ``stop + 1``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sf_daq_broker.buffers.archiver import ArchiverClient, PvData
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.config import Settings
from sf_daq_broker.h5.channels import ChannelRows, provenance
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.workers.file_stage import open_channel_file
from sf_daq_broker.workers.loop import Progress, Source
from sf_daq_broker.workers.readiness import range_when_ready
from sf_daq_broker.workers.report import CompletenessReport, NameReport

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
POLL_SECONDS = 0.5
#: At most this many steps from the estimate to the exact pulse (a few suffice: drift is small).
MAX_STEPS = 50

NUMERIC_TYPES = {"float64", "float32", "int64", "int32", "int16", "int8", "uint64", "uint32"}
NUMERIC_TYPES |= {"uint16", "uint8", "bool"}


class PulseFinder:
    """The pulse at or before a time, from the pulse map, anchored on the run's range."""

    def __init__(self, pulse_map: PulseMapClient, job: Job, start_ns: int, end_ns: int) -> None:
        self._map = pulse_map
        self._start_pid = job.start_pulse_id
        self._start_ns = start_ns
        self._pulses = job.stop_pulse_id + 1 - job.start_pulse_id
        self._span_ns = max(end_ns - start_ns, 1)
        self._known: dict[int, int | None] = {job.start_pulse_id: start_ns}
        self._known[job.stop_pulse_id + 1] = end_ns

    def estimate(self, ns: int) -> int:
        return self._start_pid + (ns - self._start_ns) * self._pulses // self._span_ns

    async def _ts(self, pid: int) -> int | None:
        if pid not in self._known:
            self._known[pid] = await self._map.timestamp_ns(pid)
        return self._known[pid]

    async def pulse_at_or_before(self, ns: int) -> int:
        pid = self.estimate(ns)
        for _ in range(MAX_STEPS):
            here = await self._ts(pid)
            if here is None:
                return pid  # older than the map remembers: the estimate is the best there is
            if here > ns:
                pid -= 1
                continue
            after = await self._ts(pid + 1)
            if after is None or after > ns:
                return pid
            pid += 1
        log.warning(
            "pulse map: no pulse found at or before %d ns within %d steps of the estimate; "
            "keeping pulse %d",
            ns,
            MAX_STEPS,
            pid,
        )
        return pid


def pv_values(data: PvData) -> npt.NDArray[Any] | list[str]:
    """The values as an array of the archiver's type; strings (or a type that changes
    between samples) as a list of text."""
    types = {t for t in data.types if t is not None}
    if len(types) == 1 and (kind := types.pop()) in NUMERIC_TYPES:
        try:
            return np.asarray(data.values, dtype=kind)
        except (TypeError, ValueError, OverflowError):
            pass  # ragged waveforms or values that do not fit: keep them readable as text
    return [v if isinstance(v, str) else json.dumps(v) for v in data.values]


class ArchiverSource(Source):
    kind = SourceKind.ARCHIVER
    waits_for_data = True

    def __init__(
        self,
        archiver_url: str,
        pulse_map_url: str,
        ready_timeout: float = READY_TIMEOUT,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.archiver_url = archiver_url
        self.pulse_map_url = pulse_map_url
        self.ready_timeout = ready_timeout
        self.poll_seconds = poll_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> ArchiverSource:
        return cls(settings.buffers.archiver_url, settings.buffers.databuffer_url)

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        async with (
            PulseMapClient(self.pulse_map_url) as pulse_map,
            ArchiverClient(self.archiver_url) as archiver,
        ):
            start_ns, end_ns = await range_when_ready(
                pulse_map, job, self.ready_timeout, self.poll_seconds, progress.waiting
            )
            await progress.ready()  # the wait above held no work slot: the query does
            # end exclusive: a change at ts(stop + 1) belongs to the next run
            found = await archiver.query(job.names, start_ns, end_ns, end_inclusive=False)
            finder = PulseFinder(pulse_map, job, start_ns, end_ns)
            await progress.update(progress.total)  # all fetched; the rest is local work
            reports: list[NameReport] = []
            absent: list[str] = []
            async with open_channel_file(target, provenance(job)) as (stage, file):
                for name in job.names:
                    data = found.get(name)
                    if data is None or len(data) == 0:
                        absent.append(name)
                        continue
                    rows, changes = await _changes(data, finder, start_ns, end_ns)
                    await stage.submit(rows.nbytes, file.write, rows)  # one PV at a time
                    reports.append(
                        NameReport(
                            name,
                            expected=len(rows),
                            found=len(rows),
                            missing=0,
                            missing_pulse_ids=[],
                            extra={"changes in the run": changes},
                            unit="values",
                        )
                    )
                await stage.drain()
        if absent:
            job_log.warning("the archiver has no value for %s", ", ".join(absent))
        return CompletenessReport(names=reports, absent=absent)


async def _changes(
    data: PvData, finder: PulseFinder, start_ns: int, end_ns: int
) -> tuple[ChannelRows, int]:
    """A PV's rows for the file: the value in force at the start and every change inside
    ``[start_ns, end_ns)``, each with its pulse; and how many changes lie inside."""
    order = np.argsort(data.timestamps, kind="stable")
    times = data.timestamps[order]
    inside = (times >= start_ns) & (times < end_ns)
    keep = inside.copy()
    before = np.flatnonzero(times < start_ns)
    if before.size:
        keep[before[-1]] = True  # the value in force at the start
    data = _reordered(data, order[keep])
    inside = inside[keep]
    pulse_ids = np.array(
        [await finder.pulse_at_or_before(int(t)) for t in data.timestamps], dtype=np.int64
    )
    rows = ChannelRows(
        data.name,
        pulse_ids,
        data.timestamps,
        pv_values(data),
        extra={"changed_in_interval": inside},
    )
    return rows, int(inside.sum())


def _reordered(data: PvData, order: npt.NDArray[np.intp]) -> PvData:
    return PvData(
        data.name,
        data.timestamps[order],
        [data.values[i] for i in order],
        [data.types[i] for i in order],
        [data.shapes[i] for i in order],
    )
