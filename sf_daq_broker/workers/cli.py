"""`sf-daq-broker worker SOURCE…`: run workers for one or several source kinds in one process."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
from typing import TYPE_CHECKING, Any

from sf_daq_broker.config import ConfigError, Settings, load_settings
from sf_daq_broker.jobs import SourceKind

if TYPE_CHECKING:
    from sf_daq_broker.workers.loop import Source

log = logging.getLogger(__name__)

#: Where each source kind's implementation lives (imported only when that worker runs, so a
#: channel worker never loads the Jungfrau conversion; it loads numba only for its own kernels,
#: ``buffers.api1_kernels``, at the first compressed or string channel it reads).
SOURCE_CLASSES: dict[SourceKind, str] = {
    SourceKind.DATABUFFER: "sf_daq_broker.workers.api1_source:DataBufferSource",
    SourceKind.IMAGEBUFFER: "sf_daq_broker.workers.api1_source:ImageBufferSource",
    SourceKind.ARCHIVER: "sf_daq_broker.workers.archiver_source:ArchiverSource",
    SourceKind.DETECTOR: "sf_daq_broker.workers.detector_source:DetectorSource",
    SourceKind.PEDESTAL: "sf_daq_broker.workers.pedestal_source:PedestalSource",
}


def make_source(kind: SourceKind, settings: Settings) -> Source:
    module_name, class_name = SOURCE_CLASSES[kind].split(":")
    source_class = getattr(importlib.import_module(module_name), class_name)
    source: Source = source_class.from_settings(settings)
    return source


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run the workers of one or several sources",
        description="Consume retrieval jobs and write their files. Several sources may share "
        "one process (small setups); in production run one process per source.",
    )
    parser.add_argument(
        "sources",
        nargs="+",
        choices=[kind.value for kind in SOURCE_CLASSES] + ["all"],
        metavar="SOURCE",
        help=f"{', '.join(SOURCE_CLASSES)}, or all",
    )
    parser.add_argument("--config", help="configuration file (default: $SF_DAQ_CONFIG)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    kinds = list(SOURCE_CLASSES) if "all" in args.sources else [SourceKind(s) for s in args.sources]
    if not settings.uses_amqp:
        log.error(
            "a separate worker process needs RabbitMQ: set SF_DAQ_AMQP_URL (the embedded queue "
            "lives inside the broker's process)"
        )
        return 2
    return asyncio.run(_serve(settings, kinds))


async def _serve(settings: Settings, kinds: list[SourceKind]) -> int:
    from sf_daq_broker.transport import create_transport
    from sf_daq_broker.workers.loop import Worker

    # Status events RabbitMQ cannot take now wait in a file of the state directory, so they
    # outlive an outage and a crash of this process (``transport.outbox``).
    transport = create_transport(
        settings.amqp_url, settings.amqp_prefix, status_outbox=settings.state_dir / "outbox"
    )
    worker = Worker(transport, [make_source(kind, settings) for kind in kinds])
    task = asyncio.create_task(worker.run())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    log.info("workers for %s on %s", ", ".join(kinds), transport.name)
    try:
        await task
    except asyncio.CancelledError:
        log.info("workers stopped; unfinished jobs go back to the queue")
    finally:
        await transport.close()
    return 0
