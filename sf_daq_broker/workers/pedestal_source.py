"""The pedestal worker: one ``/take_pedestal`` from the detectors to the installed pedestal.

For the job's detectors, together: the gain-stage procedure (``pedestals.procedure``: the
detectors are switched through G0, G1, G2 — or pedestal mode — and always brought back to
their settings), then per detector:

1. the pedestal's range is retrieved from the Jungfrau buffer as a raw file
   ``<name>.<DET>.h5`` (the detector worker's own streaming, ``adc_to_energy`` false, the
   beam pulses of the range at the request's rate);
2. the pedestal file ``<name>.<DET>.res.h5`` is computed from it
   (``jungfrau.pedestal.compute_pedestal``; a result without a good pixel is written, then the
   job fails with the reason);
3. it is installed as the detector's newest pedestal (``pedestals.store``): runs accepted from
   then on convert with it.

The job's own file is ``<name>.json``: the request as the broker recorded it, with the
``result`` added (range, files, frames per gain stage, good pixels). Progress is announced per
step ("gain stage G1: 400 of 1000", "JF07T32V01: retrieving …", "… computing …").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.atomic import dump_json, partial_name
from sf_daq_broker.config import Settings
from sf_daq_broker.detector_control.connect import connector_from_settings
from sf_daq_broker.detector_control.interface import DetectorConnector, PedestalMode
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.pedestals.procedure import (
    PedestalError,
    Plan,
    Procedure,
    PulseIdSource,
    PulseMapPulseIds,
)
from sf_daq_broker.pedestals.request import read_record
from sf_daq_broker.pedestals.store import computing_name, install_pedestal
from sf_daq_broker.retrieval import DetectorOptions, beam_pulse_bounds
from sf_daq_broker.workers.detector_source import DetectorSource
from sf_daq_broker.workers.job_files import open_job_dir
from sf_daq_broker.workers.loop import Progress, Source
from sf_daq_broker.workers.report import CompletenessReport, NameReport


class _Stages:
    """The procedure's progress as the job's: one phase per gain stage."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._phases: dict[str, Progress] = {}

    async def stage(self, phase: str, done: int, total: int) -> None:
        if phase not in self._phases:
            self._phases[phase] = self._progress.for_phase(phase, total)
        await self._phases[phase].update(done)


class PedestalSource(Source):
    kind = SourceKind.PEDESTAL

    def __init__(
        self,
        detectors: DetectorSource,
        connector: DetectorConnector | None,
        pulse_ids: Callable[[], PulseIdSource],
        *,
        config_source: str = "the configuration",
        poll_s: float = 0.1,
    ) -> None:
        self.detectors = detectors
        self.connector = connector
        self.pulse_ids = pulse_ids
        self.config_source = config_source
        self.poll_s = poll_s

    @classmethod
    def from_settings(cls, settings: Settings) -> PedestalSource:
        url = settings.buffers.databuffer_url
        return cls(
            DetectorSource.from_settings(settings),
            connector_from_settings(settings),
            lambda: PulseMapPulseIds(url),
            config_source=settings.source,
        )

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        if self.connector is None:
            raise PedestalError(
                f"this worker has no detector control (detector_control.url in "
                f"{self.config_source}): it cannot take pedestals"
            )
        options = job.options
        plan = Plan(
            rate=job.rate_multiplicator,
            pedestalmode=bool(options["pedestalmode"]),
            frames_per_stage=int(options["frames_per_stage"]),
            mode=PedestalMode(int(options["mode_frames"]), int(options["mode_loops"])),
            settle_s=float(options["settle_s"]),
            poll_s=self.poll_s,
        )
        connector = self.connector
        controls = [connector(name) for name in job.names]
        job_log.info(
            "pedestal %s of %s (%s), rate 1/%d, %s",
            options["name"],
            ", ".join(job.names),
            job.pgroup,
            job.rate_multiplicator,
            "pedestal mode" if plan.pedestalmode else f"{plan.frames_per_stage} frames per stage",
        )
        procedure = Procedure(
            controls, self.pulse_ids(), plan, Path(options["pedestal_root"]), job_log
        )
        start, stop = await procedure.run(_Stages(progress))
        bounds = beam_pulse_bounds(start, stop, job.rate_multiplicator)
        if bounds is None:
            raise PedestalError(f"no beam pulse between {start} and {stop}")
        job_log.info("pedestal frames: pulses %d-%d", *bounds)
        reports: list[NameReport] = []
        results: dict[str, Any] = {}
        for detector in job.names:
            files = options["detectors"][detector]
            report = await self._retrieve_raw(job, detector, bounds, files, progress, job_log)
            summary = await self._compute_and_install(job, detector, files, progress, job_log)
            if procedure.mode_frames is not None:
                report = _judged_by_mode(report, procedure.mode_frames, summary["good_frames"])
            job_log.info("%s: pedestal installed as %s", detector, files["installed_file"])
            report.extra.update(
                pedestal=files["result_file"],
                frames_per_stage=summary["stage_frames"],
                good_pixels=summary["good_pixels"],
            )
            reports.append(report)
            results[detector] = {
                **{key: files[key] for key in ("raw_file", "result_file", "installed_file")},
                **summary,
            }
        record = await asyncio.to_thread(read_record, Path(job.run_info_file))
        record["result"] = {
            "start_pulse_id": bounds[0],
            "stop_pulse_id": bounds[1],
            "detectors": results,
        }
        await asyncio.to_thread(target.write_bytes, dump_json(record))
        return CompletenessReport(names=reports)

    async def _retrieve_raw(
        self,
        job: Job,
        detector: str,
        bounds: tuple[int, int],
        files: dict[str, Any],
        progress: Progress,
        job_log: logging.Logger,
    ) -> NameReport:
        """The pedestal's frames of one detector into its raw file (the detector worker's
        streaming, raw layout)."""
        raw_file = Path(files["raw_file"])
        frames = (bounds[1] - bounds[0]) // job.rate_multiplicator + 1
        sub_job = dataclasses.replace(
            job,
            kind=SourceKind.DETECTOR,
            source=detector,
            names=(detector,),
            start_pulse_id=bounds[0],
            stop_pulse_id=bounds[1],
            requested_start=bounds[0],
            requested_stop=bounds[1],
            output_file=str(raw_file),
            options=DetectorOptions(adc_to_energy=False, compression=True).to_json(),
            pedestal_file=None,
        )
        # JF_pedestals/ (made by the broker), reached without following symlinks out of raw/
        directory = await asyncio.to_thread(open_job_dir, job, raw_file.parent)
        try:
            temporary = await asyncio.to_thread(
                directory.new_file, partial_name(raw_file.name, uuid.uuid4().hex[:12])
            )
            try:
                phase = progress.for_phase(f"{detector}: retrieving", frames)
                report = await self.detectors.retrieve(sub_job, temporary.path, phase, job_log)
                await asyncio.to_thread(temporary.publish, raw_file.name)
            finally:
                await asyncio.to_thread(temporary.discard)  # nothing if it was published
        finally:
            directory.close()
        return report.names[0]

    async def _compute_and_install(
        self,
        job: Job,
        detector: str,
        files: dict[str, Any],
        progress: Progress,
        job_log: logging.Logger,
    ) -> dict[str, Any]:
        """Compute the pedestal beside its installed name (outside ``raw/``), copy it into
        ``JF_pedestals/`` (also when no pixel is good: the file shows why), then install it."""
        from sf_daq_broker.jungfrau.errors import NoGoodPixel
        from sf_daq_broker.jungfrau.pedestal import compute_pedestal

        loop = asyncio.get_running_loop()
        phase = progress.for_phase(f"{detector}: computing", 1)

        def report(done: int, total: int) -> None:
            asyncio.run_coroutine_threadsafe(phase.update(done, total), loop)

        installed = Path(files["installed_file"])
        computed = computing_name(installed)
        await asyncio.to_thread(computed.parent.mkdir, parents=True, exist_ok=True)
        failure: NoGoodPixel | None = None
        try:
            try:
                summary = await asyncio.to_thread(
                    compute_pedestal,
                    Path(files["raw_file"]),
                    computed,
                    number_bad_modules=int(files["number_bad_modules"]),
                    progress=report,
                )
            except NoGoodPixel as exc:
                failure = exc
            await asyncio.to_thread(_copy_into_raw, job, computed, Path(files["result_file"]))
            if failure is not None:
                # the reason, naming the file in JF_pedestals/ that shows it
                reason = str(failure).replace(str(computed), files["result_file"])
                raise PedestalError(f"{detector}: {reason}") from failure
            await asyncio.to_thread(install_pedestal, computed, installed)
        finally:
            await asyncio.to_thread(computed.unlink, missing_ok=True)
        job_log.info(
            "%s: pedestal %s: %d of %d pixels good, frames per stage %s",
            detector,
            files["result_file"],
            summary.good_pixels,
            summary.pixels,
            summary.stage_frames,
        )
        return {
            "frames": summary.frames,
            "good_frames": summary.good_frames,
            "stage_frames": dict(summary.stage_frames),
            "highgain_frames": summary.highgain_frames,
            "good_pixels": summary.good_pixels,
            "bad_pixels": summary.bad_pixels,
        }


def _copy_into_raw(job: Job, source: Path, final: Path) -> None:
    """``source`` (outside ``raw/``) as ``final`` below the job's ``raw/``, confined."""
    with (
        open_job_dir(job, final.parent) as directory,
        directory.new_file(partial_name(final.name, uuid.uuid4().hex[:12])) as temporary,
    ):
        with open(source, "rb") as reader, open(temporary.path, "wb") as writer:
            shutil.copyfileobj(reader, writer, 16 * 1024 * 1024)
        temporary.publish(final.name)


def _judged_by_mode(report: NameReport, taken: int, good: int) -> NameReport:
    """In pedestal mode the range also holds pulses before the detector started and after its
    last frame: completeness is the frames it took, found good."""
    found = min(taken, good)
    return dataclasses.replace(
        report,
        expected=taken,
        found=found,
        missing=taken - found,
        missing_pulse_ids=[],
        unit="pedestal-mode frames",
    )
