"""All simulated buffers of one configuration, started and stopped together.

Used by ``sf-daq-broker simulate`` and by anything that wants the whole set in-process (a demo,
an end-to-end test): ``async with Simulation(config) as sim: sim.addresses``. With a
``ManualClock`` nothing moves until the caller advances the clock (and calls
``sim.jungfrau.catch_up()``); with the default wall clock a background task keeps the Jungfrau
buffer up with time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.archiver import SimulatedArchiver, create_archiver_app
from sf_daq_broker.simulation.calibration import write_calibration_files
from sf_daq_broker.simulation.clock import PulseClock, WallClock
from sf_daq_broker.simulation.config import Api1Config, SimulationConfig
from sf_daq_broker.simulation.control import create_control_app
from sf_daq_broker.simulation.jungfrau_detector import SimulatedJungfrau
from sf_daq_broker.simulation.jungfrau_writer import JungfrauBufferWriter

log = logging.getLogger(__name__)

#: Seconds a stopping server gives the replies in progress before it cancels them. aiohttp's
#: default (60 s, per server) is for real services; the simulated buffers' replies may be
#: delayed on purpose (``reply_delay``), and a demo's Ctrl-C must not wait for them.
SHUTDOWN_TIMEOUT = 1.0


def _api1_buffer(config: Api1Config, clock: PulseClock, name: str) -> SimulatedApi1Buffer:
    return SimulatedApi1Buffer(
        config.channels,
        clock,
        name=name,
        ingestion_lag_pulses=config.ingestion_lag_pulses,
        retention_pulses=config.retention_pulses,
    )


class Simulation:
    """The data buffer, image buffer, archiver, Jungfrau buffer and control endpoint."""

    def __init__(self, config: SimulationConfig, clock: PulseClock | None = None) -> None:
        self.config = config
        self.clock: PulseClock = clock or WallClock(
            config.clock.start_pulse_id, config.clock.t0_ms, speed=config.clock.speed
        )
        self.databuffer = _api1_buffer(config.databuffer, self.clock, "data buffer")
        self.imagebuffer = _api1_buffer(config.imagebuffer, self.clock, "image buffer")
        self.archiver = SimulatedArchiver(
            config.archiver.pvs, self.clock, pv_list_dir=config.archiver.pv_list_dir
        )
        self.jungfrau = JungfrauBufferWriter(
            config.jungfrau.buffer_root,
            config.jungfrau.detectors,
            self.clock,
            retention_pulses=config.jungfrau.retention_pulses,
            mode=config.jungfrau.mode,
        )
        #: The simulated detectors (their control decides the Jungfrau frames), by name.
        self.detectors = {
            spec.name: SimulatedJungfrau(spec.name, self.clock, high_gain=spec.highgain)
            for spec in config.jungfrau.detectors
        }
        self.jungfrau.attach_detectors(self.detectors.values())
        #: Service name → base URL, filled by ``start``.
        self.addresses: dict[str, str] = {}
        #: Detector name → (gain file, pedestal file), filled by ``start``.
        self.calibration_files: dict[str, tuple[Path, Path]] = {}
        self._runners: list[web.AppRunner] = []
        self._writer_task: asyncio.Task[None] | None = None

    async def start(self, *, follow_clock: bool | None = None) -> None:
        """Write the calibration files, start the servers, and (for a wall clock, or when
        ``follow_clock``) the task that keeps the Jungfrau buffer up with the clock."""
        config = self.config
        for detector in config.jungfrau.detectors:
            self.calibration_files[detector.name] = await asyncio.to_thread(
                write_calibration_files, config.jungfrau.calibration_root, detector.name
            )
        services = {
            "databuffer": (create_api1_app(self.databuffer), config.databuffer),
            "imagebuffer": (create_api1_app(self.imagebuffer), config.imagebuffer),
            "archiver": (create_archiver_app(self.archiver), config.archiver),
            "control": (
                create_control_app(self.jungfrau, self.status, self.detectors),
                config.control,
            ),
        }
        try:
            for name, (app, server) in services.items():
                self.addresses[name] = await self._serve(app, server.host, server.port)
        except BaseException:
            await self.stop()
            raise
        if follow_clock if follow_clock is not None else isinstance(self.clock, WallClock):
            self._writer_task = asyncio.create_task(self.jungfrau.run(), name="jungfrau-writer")

    async def _serve(self, app: web.Application, host: str, port: int) -> str:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        return f"http://{bound_host}:{bound_port}"

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` of the control endpoint answers."""
        return {
            "current_pulse_id": self.clock.current_pulse_id(),
            "start_pulse_id": self.clock.start_pulse_id,
            "t0_ms": self.clock.timing.t0_ms,
            "addresses": self.addresses,
            "jungfrau": {
                "buffer_root": str(self.jungfrau.buffer_root),
                "mode": self.jungfrau.mode,
                "next_pulse_id": self.jungfrau.next_pulse_id,
                "frames_written": self.jungfrau.frames_written,
                "detectors": {
                    name: {"gain_file": str(gain), "pedestal_file": str(pedestal)}
                    for name, (gain, pedestal) in self.calibration_files.items()
                },
            },
        }

    async def stop(self) -> None:
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self.jungfrau.close()

    async def __aenter__(self) -> Simulation:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
