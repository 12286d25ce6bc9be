"""The one `sf-daq-broker` command: each sub-command lives in its own module.

A sub-command module exposes ``add_parser(subparsers)`` which adds its parser and sets
``func`` (a callable taking the parsed namespace and returning the exit status). Keeping the
registration next to the code it starts means this file never grows with the features.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from sf_daq_broker import __version__

# Order is the order shown in --help.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "sf_daq_broker.api.serve",
    "sf_daq_broker.workers.cli",
    "sf_daq_broker.simulation.cli",
    "sf_daq_broker.jungfrau.cli",
    "sf_daq_broker.jungfrau.pedestal_cli",
    "sf_daq_broker.demo.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sf-daq-broker",
        description="Retrieve-based data acquisition broker: HTTP API, workers, simulators.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    from sf_daq_broker.transport.failures import plain_log_lines

    plain_log_lines()  # no object reprs in the log, not even aio-pika's own lines
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
