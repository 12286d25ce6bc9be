"""`sf-daq-broker serve`: the broker's HTTP service."""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from sf_daq_broker.config import ConfigError, load_settings
from sf_daq_broker.jobs import SourceKind

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)
# aiohttp and the application are imported when the broker runs: every `sf-daq-broker`
# command loads this module to build its --help.


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the broker's HTTP API",
        description="Run the broker: validates retrieval requests, numbers runs, queues jobs.",
    )
    parser.add_argument(
        "--config",
        help="configuration file (default: $SF_DAQ_CONFIG, else configs/sf-daq-broker.toml)",
    )
    parser.add_argument(
        "--port",
        type=int,
        help="HTTP port (default: $SF_DAQ_REST_PORT, else rest_port of the configuration)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument(
        "--workers",
        nargs="+",
        metavar="SOURCE",
        default=[],
        help="also run the workers of these sources in this process (databuffer, imagebuffer, "
        "archiver, detector, pedestal, or all): a single-machine setup; needed with the "
        "embedded queue, whose jobs no other process can see",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from sf_daq_broker.api.app import create_app

    try:
        settings = load_settings(args.config, rest_port=args.port)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    app = create_app(settings)
    try:
        kinds = source_kinds(args.workers)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if kinds:
        app.cleanup_ctx.append(workers_in_process(kinds))
    elif not settings.uses_amqp:
        log.warning(
            "embedded queue and no --workers: jobs will wait for ever (add --workers all, or set "
            "SF_DAQ_AMQP_URL and run `sf-daq-broker worker` processes)"
        )
    transport = "RabbitMQ" if settings.uses_amqp else "embedded (in-process, no RabbitMQ)"
    log.info(
        "sf-daq-broker serving on %s:%d, data root %s, transport %s, configuration %s",
        args.host,
        settings.rest_port,
        settings.data_root,
        transport,
        settings.source,
    )
    web.run_app(app, host=args.host, port=settings.rest_port, print=None)
    return 0


def source_kinds(names: list[str]) -> list[SourceKind]:
    """The source kinds of ``--workers`` ("all" = every kind that has a worker)."""
    from sf_daq_broker.workers.cli import SOURCE_CLASSES

    if "all" in names:
        return list(SOURCE_CLASSES)
    unknown = [name for name in names if name not in SOURCE_CLASSES]
    if unknown:
        raise ValueError(
            f"--workers: unknown source {', '.join(unknown)}; "
            f"known: {', '.join(SOURCE_CLASSES)}, all"
        )
    return [SourceKind(name) for name in names]


def workers_in_process(
    kinds: list[SourceKind],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running the workers on the broker's own transport and loop; they
    are stopped (each interrupted job released) before the transport closes."""
    from sf_daq_broker.api.state import SETTINGS, TRANSPORT
    from sf_daq_broker.workers.cli import make_source
    from sf_daq_broker.workers.in_process import InProcessWorkers

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        sources = [make_source(kind, app[SETTINGS]) for kind in kinds]
        workers = InProcessWorkers(app[TRANSPORT], sources)
        workers.start()
        log.info("workers for %s run in the broker's process", ", ".join(kinds))
        yield
        await workers.stop()

    return lifetime
