"""`sf-daq-broker serve`: the broker's HTTP service."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from aiohttp import web

from sf_daq_broker.config import ConfigError, load_settings

log = logging.getLogger(__name__)


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sf_daq_broker.api.app import create_app

    try:
        settings = load_settings(args.config, rest_port=args.port)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    app = create_app(settings)
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
