"""The demo's running system: simulated buffers, the broker's HTTP API and the workers.

Everything runs on one asyncio loop in a background thread, so the main thread can act as a
user does — blocking HTTP calls, a progress bar, the consistency check — exactly with the
tools users have, and so that Ctrl-C (a KeyboardInterrupt in the main thread) can always stop
the loop in order: workers first (an unfinished job goes back to its queue and its temporary
file is removed), then the broker, then the buffers.

On the embedded transport the broker and the workers share one in-process queue; with an AMQP
URL they talk through RabbitMQ with separate connections, as separate processes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from sf_daq_broker.config import Settings, load_settings
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.simulation.clock import PULSE_PERIOD_NS
from sf_daq_broker.simulation.config import SimulationConfig
from sf_daq_broker.simulation.jungfrau_writer import DetectorSpec
from sf_daq_broker.simulation.runner import Simulation
from sf_daq_broker.transport import Transport, create_transport
from sf_daq_broker.workers.cli import SOURCE_CLASSES, make_source
from sf_daq_broker.workers.in_process import InProcessWorkers
from sf_daq_broker.workers.loop import Source

log = logging.getLogger(__name__)

#: The Jungfrau buffer keeps an hour, as the api/1 buffers do: in lazy mode its files are
#: sparse until read, and ``--stay`` keeps the system up for trying the API by hand.
JUNGFRAU_RETENTION_PULSES = 360_000
#: Pulses materialised per call: a Ctrl-C is honoured between two calls.
FILL_BATCH = 25
#: The demo's pedestals are short (3 x 100 frames, a few seconds), so trying one is quick.
PEDESTAL_FRAMES_PER_STAGE = 100


class DemoError(Exception):
    """The demo cannot go on; the message says why in one line."""


@dataclass(frozen=True)
class SystemOptions:
    workspace: Path  # simulated buffers, calibration files and the broker's state
    data_root: Path
    beamline: str
    clock_at_start: int  # pulse id the simulated clock shows at start-up
    amqp_url: str = ""
    amqp_prefix: str = "sf-daq"
    broker_host: str = "127.0.0.1"
    broker_port: int = 0  # 0: any free port
    buffer_delay: float = 0.0  # seconds each data/image buffer reply is delayed
    config: Path | None = None  # the broker's configuration file (beamlines, detectors)
    delete_topology: bool = False  # remove the RabbitMQ queues and exchanges at the end


def simulation_config(
    base: SimulationConfig, options: SystemOptions, detectors: tuple[str, ...]
) -> SimulationConfig:
    """The simulation of the demo: free ports, files in the workspace, the clock in the past.

    ``t0_ms`` is chosen so that the clock shows ``options.clock_at_start`` now: the run's range
    is history the moment the buffers start, as it is at the facility.
    """
    elapsed_ms = (options.clock_at_start - base.clock.start_pulse_id) * PULSE_PERIOD_NS // 10**6
    t0_ms = time.time_ns() // 10**6 - elapsed_ms
    free_port = {"host": "127.0.0.1", "port": 0}
    document: dict[str, Any] = base.model_dump()
    for service in ("databuffer", "imagebuffer", "archiver", "control"):
        document[service].update(free_port)
    document["clock"]["t0_ms"] = t0_ms
    document["jungfrau"].update(
        buffer_root=options.workspace / "buffers" / "jungfrau",
        calibration_root=options.workspace / "buffers" / "calibration",
        retention_pulses=JUNGFRAU_RETENTION_PULSES,
        mode="lazy",
        detectors=[DetectorSpec(name=name).model_dump() for name in detectors],
    )
    return SimulationConfig.model_validate({**document, "source": base.source})


def demo_settings(options: SystemOptions, simulation: Simulation) -> Settings:
    """The broker's and workers' settings: the shipped configuration pointed at the demo.

    Loopback clients belong to the demo's beamline; the simulated detectors are allowed for it
    and carry the simulation's gain and pedestal files, which the detector worker reads. The
    simulated detectors are controlled through the simulation; new pedestals, the PV lists and
    the DAP parameters live below the data root (``pedestals/``, ``service_configs/``,
    ``dap/config/``).
    """
    base = load_settings(options.config, environ={})
    detectors: dict[str, Any] = {
        name: detector.model_dump(mode="json") for name, detector in base.detectors.items()
    }
    for name, (gain, pedestal) in simulation.calibration_files.items():
        detectors[name] = {
            "beamline": options.beamline,
            "gain_file": str(gain),
            "pedestal_file": str(pedestal),
        }
    return load_settings(
        options.config,
        environ={},
        data_root=str(options.data_root),
        local_beamline=options.beamline,
        state_dir=str(options.workspace / "state"),
        amqp_url=options.amqp_url,
        amqp_prefix=options.amqp_prefix,
        rest_port=options.broker_port or base.rest_port,
        buffers={
            "databuffer_url": simulation.addresses["databuffer"],
            "imagebuffer_url": simulation.addresses["imagebuffer"],
            "archiver_url": simulation.addresses["archiver"],
            "jungfrau_root": str(simulation.jungfrau.buffer_root),
            **_control_url(base, simulation.addresses["control"]),
        },
        detectors=detectors,
        detector_control={"url": simulation.addresses["control"]},
        pedestals={
            "root": str(options.data_root / "pedestals"),
            "frames_per_stage": PEDESTAL_FRAMES_PER_STAGE,
        },
        service_files={
            "pv_list_dir": str(_made(options.data_root / "service_configs")),
            "dap_config_dir": str(_made(options.data_root / "dap" / "config")),
        },
    )


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _control_url(base: Settings, url: str) -> dict[str, str]:
    """The simulation's control endpoint for the detector worker, where the configuration
    knows the key (the lazy Jungfrau buffer writes the records a reader is about to read)."""
    return (
        {"jungfrau_control_url": url}
        if "jungfrau_control_url" in type(base.buffers).model_fields
        else {}
    )


class DemoSystem:
    """Start with ``start()`` (blocks until serving), stop with ``stop()`` (idempotent)."""

    def __init__(
        self,
        options: SystemOptions,
        simulation_config: SimulationConfig,
        source_classes: dict[SourceKind, str] | None = None,
    ) -> None:
        self.options = options
        self.simulation_config = simulation_config
        self.source_classes = SOURCE_CLASSES if source_classes is None else source_classes
        self.simulation: Simulation | None = None
        self.settings: Settings | None = None
        self.broker_url = ""
        #: Source kinds with a running worker, and why the others have none.
        self.workers: list[SourceKind] = []
        self.unavailable: dict[SourceKind, str] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self._lock = threading.Lock()  # _stopping, _loop and _stop between the two threads

    # --- the main thread's side -------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start everything in the background thread; raise DemoError if it does not come up."""
        self._thread = threading.Thread(target=self._run, name="sf-daq-demo", daemon=False)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise DemoError(f"the system did not start within {timeout:g} s")
        if self._error is not None:
            raise DemoError(str(self._error)) from self._error

    def stop(self) -> None:
        """Stop the workers, the broker and the buffers, and wait until they are gone."""
        with self._lock:
            self._stopping = True
            loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def fill_jungfrau(
        self,
        detectors: list[str],
        pulse_ids: list[int],
        progress: Callable[[int], None] = lambda n: None,
        timeout: float = 60.0,
    ) -> int:
        """Write the Jungfrau records of ``pulse_ids`` into the simulated buffer now.

        The simulated Jungfrau buffer runs in lazy mode (writing every frame as the clock
        passes is more than a disk sustains, see simulation/jungfrau_writer.py): files and
        LATEST follow the clock, records are written when asked for. The demo asks for the
        run's records before the request, so the detector worker reads a full buffer however
        it is wired. Returns the number of module records written.
        """
        assert self.simulation is not None
        writer = self.simulation.jungfrau
        deadline = time.monotonic() + timeout
        while writer.next_pulse_id <= max(pulse_ids, default=0):
            if time.monotonic() > deadline:
                raise DemoError("the simulated Jungfrau buffer did not reach the run's range")
            time.sleep(0.05)  # polling the writer's background task; bounded by the deadline
        written = 0
        for first in range(0, len(pulse_ids), FILL_BATCH):
            batch = pulse_ids[first : first + FILL_BATCH]
            for detector in detectors:
                written += writer.materialise(detector, batch)
            progress(len(batch))
        return written

    # --- the background thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start() or logged; the thread must end
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("the demo system stopped with an error")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        stop = asyncio.Event()
        with self._lock:
            self._loop, self._stop = asyncio.get_running_loop(), stop
            if self._stopping:  # stop() came before the loop existed
                stop.set()
        simulation = Simulation(self.simulation_config)
        self.simulation = simulation
        for buffer in (simulation.databuffer, simulation.imagebuffer):
            buffer.faults.reply_delay = self.options.buffer_delay
        runner: web.AppRunner | None = None
        workers: InProcessWorkers | None = None
        worker_transport: Transport | None = None
        connected = False  # to RabbitMQ: only then are there queues of ours to remove
        try:
            await simulation.start()
            settings = demo_settings(self.options, simulation)
            self.settings = settings
            broker_transport = create_transport(
                settings.amqp_url, settings.amqp_prefix, state_dir=settings.state_dir
            )
            if settings.uses_amqp:
                worker_transport = create_transport(settings.amqp_url, settings.amqp_prefix)
                await _connect(broker_transport, settings.amqp_url)
                connected = True
            else:
                worker_transport = broker_transport  # one in-process queue
            runner = await self._serve_broker(settings, broker_transport)
            sources = self._sources(settings)
            workers = InProcessWorkers(worker_transport, sources, name="demo-workers")
            workers.start()
            self._ready.set()
            await stop.wait()
        finally:
            if workers is not None:
                await workers.stop()  # every interrupted job released before the queue closes
            if runner is not None:
                await runner.cleanup()  # closes the broker's transport
            if worker_transport is not None and self.options.amqp_url:
                await worker_transport.close()
                if self.options.delete_topology and connected:
                    await _delete_topology(self.options.amqp_url, self.options.amqp_prefix)
            await simulation.stop()

    async def _serve_broker(self, settings: Settings, transport: Transport) -> web.AppRunner:
        from sf_daq_broker.api.app import create_app

        runner = web.AppRunner(
            create_app(settings, transport), access_log=None, handle_signals=False
        )
        await runner.setup()
        site = web.TCPSite(runner, self.options.broker_host, self.options.broker_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"{self.options.broker_host}:{self.options.broker_port}"
            raise DemoError(f"the broker cannot listen on {where}: {exc.strerror}") from exc
        host, port = runner.addresses[0][:2]
        self.broker_url = f"http://{host}:{port}"
        return runner

    def _sources(self, settings: Settings) -> list[Source]:
        """One source per registered kind; a kind whose source cannot be made is left out."""
        sources: list[Source] = []
        for kind in SourceKind:
            if kind not in self.source_classes:
                self.unavailable[kind] = f"no {kind.value} worker is registered yet"
                continue
            try:
                sources.append(make_source(kind, settings))
            except Exception as exc:
                log.exception("the %s worker cannot start", kind.value)
                self.unavailable[kind] = f"the {kind.value} worker cannot start: {exc}"
                continue
            self.workers.append(kind)
        return sources


async def _connect(transport: Transport, url: str) -> None:
    """Fail the demo at once when RabbitMQ does not answer (a broker would start anyway)."""
    try:
        await transport.connect()
    except Exception as exc:
        await transport.close()
        raise DemoError(f"RabbitMQ at {url} is not reachable: {exc}") from exc


async def _delete_topology(url: str, prefix: str) -> None:
    """Remove the queues and exchanges of a prefix the demo made up (best effort)."""
    import aio_pika

    from sf_daq_broker.transport.amqp import Topology

    try:
        async with await aio_pika.connect(url) as connection:
            await Topology(prefix).delete(await connection.channel())
    except Exception as exc:
        log.warning("the demo's RabbitMQ queues (prefix %s) could not be removed: %s", prefix, exc)
