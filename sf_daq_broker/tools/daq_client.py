"""``daq_client``: ask the broker to retrieve a pulse range, as the facility's users always have.

The options and the output lines are those of the facility's original daq_client.py (users
have them in their scripts and logbooks): ``success: run number(request_id) is N`` on
acceptance, ``Error, reason : …`` with the broker's reason on refusal. New: ``--broker``,
``--timeout`` and ``--wait``, which follows the run with a progress bar per source; the run
options ``--user-tag`` (with ``--append-user-tag``) and ``--run-log-level``; and
``--take-pedestal DET …`` (with ``-r``, ``--pedestalmode``, ``--run-log-level``, ``--wait``),
which takes a pedestal instead of retrieving a range.

Exit status: 0 accepted (with ``--wait``: every source written), 1 refused or a source failed,
2 a bad command line or input file, 3 the broker not reachable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sf_daq_broker.tools.follow import follow_run
from sf_daq_broker.tools.pedestal import follow_pedestal, pedestal_request
from sf_daq_broker.tools.remote import (
    DEFAULT_TIMEOUT,
    Accepted,
    BrokerRefused,
    BrokerUnreachable,
    RemoteBroker,
)
from sf_daq_broker.tools.request import InputFileError, RequestTemplate

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="test broker",
        epilog=(
            "exit status: 0 accepted (with --wait: every source written), 1 refused or a source "
            "failed, 2 bad arguments or input file, 3 broker not reachable"
        ),
    )
    parser.add_argument("-p", "--pgroup", help="pgroup, example p12345")
    parser.add_argument(
        "-d",
        "--output_directory",
        help="output directory for the data, relative path to the raw directory in the pgroup",
    )
    parser.add_argument("-c", "--channels_file", help="TXT file with list channels")
    parser.add_argument("-e", "--epics_file", help="TXT file with list of epics channels to save")
    parser.add_argument("-f", "--file_detectors", help="JSON file with the detector list")
    parser.add_argument(
        "-r",
        "--rate_multiplicator",
        type=int,
        default=1,
        help="rate multiplicator (1(default): 100Hz, 2: 50Hz,)",
    )
    parser.add_argument("-s", "--scan_step_file", help="JSON file with the scan step information")
    parser.add_argument("--start_pulseid", type=int, help="start pulseid")
    parser.add_argument("--stop_pulseid", type=int, help="stop pulseid")
    parser.add_argument(
        "--broker",
        help="broker address (default: $SF_DAQ_BROKER, else http://localhost:10002)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for each reply of the broker (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="follow the run (or pedestal) until every source is written; exit 1 if one failed",
    )
    run = parser.add_argument_group("run options")
    run.add_argument("--user-tag", metavar="TAG", help="a tag kept in the run's JSON")
    run.add_argument(
        "--append-user-tag",
        action="store_true",
        help="also put the tag into the run's file names (run_NNNNNN-TAG.*.h5)",
    )
    run.add_argument(
        "--run-log-level",
        metavar="LEVEL",
        help="level of the run's (or pedestal's) job logs: DEBUG, INFO (default), WARNING, …",
    )
    pedestal = parser.add_argument_group("pedestal")
    pedestal.add_argument(
        "--take-pedestal",
        nargs="+",
        metavar="DET",
        help="take a pedestal of these detectors (at the rate of -r) instead of a retrieval",
    )
    pedestal.add_argument(
        "--pedestalmode",
        action="store_true",
        help="with --take-pedestal: use the detectors' pedestal mode",
    )
    return parser


def retrieve(
    pgroup: str,
    start_pulseid: int,
    stop_pulseid: int,
    *,
    output_directory: str | None = None,
    channels_file: str | Path | None = None,
    epics_file: str | Path | None = None,
    detectors_file: str | Path | None = None,
    scan_step_file: str | Path | None = None,
    rate_multiplicator: int = 1,
    broker: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Accepted:
    """For scripts: read the files, send the request, return the accepted run.

    Raises InputFileError (a file), BrokerRefused (with the broker's reason) or
    BrokerUnreachable.
    """
    template = RequestTemplate.from_files(
        pgroup,
        output_directory=output_directory,
        channels_file=channels_file,
        epics_file=epics_file,
        detectors_file=detectors_file,
        scan_step_file=scan_step_file,
        rate_multiplicator=rate_multiplicator,
    )
    remote = RemoteBroker(broker, timeout)
    try:
        return remote.retrieve(template.request(start_pulseid, stop_pulseid))
    finally:
        remote.close()


def submit(remote: RemoteBroker, request: dict[str, Any]) -> Accepted | None:
    """Send a request and tell the user the outcome in the facility's words.

    Returns None when refused; BrokerUnreachable is left to the caller, who knows whether the
    request can be sent again.
    """
    try:
        accepted = remote.retrieve(request)
    except BrokerRefused as exc:
        print(f"Error, reason : {exc}", file=sys.stderr)
        return None
    print(f"success: run number(request_id) is {accepted.run_number}", flush=True)
    return accepted


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run option keys of the request, as the command line gives them."""
    options: dict[str, Any] = {}
    if args.user_tag is not None:
        options["user_tag"] = args.user_tag
    if args.append_user_tag:
        options["append_user_tag_to_data_dir"] = True
    if args.run_log_level is not None:
        options["run_log_level"] = args.run_log_level
    return options


def take_pedestal(args: argparse.Namespace) -> int:
    """``--take-pedestal``: request it, then (``--wait``) follow it to its result."""
    remote = RemoteBroker(args.broker, args.timeout)
    body = pedestal_request(
        args.pgroup,
        args.take_pedestal,
        args.rate_multiplicator,
        args.pedestalmode,
        args.run_log_level,
    )
    try:
        try:
            reply = remote.take_pedestal(body)
        except BrokerRefused as exc:
            print(f"Error, reason : {exc}", file=sys.stderr)
            return EXIT_FAILED
        name = str(reply.get("pedestal"))
        print(f"success: pedestal {name}: {reply['message']}", flush=True)
        if not args.wait:
            return EXIT_OK
        try:
            result = follow_pedestal(remote, args.pgroup, name)
        except KeyboardInterrupt:
            print(f"stopped following pedestal {name}; the broker goes on with it", file=sys.stderr)
            return 130
        for line in result.lines():
            print(line)
        return EXIT_OK if result.ok else EXIT_FAILED
    except (BrokerUnreachable, BrokerRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE if isinstance(exc, BrokerUnreachable) else EXIT_FAILED
    finally:
        remote.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pgroup is None:
        parser.error("a pgroup is needed (-p/--pgroup)")
    if args.take_pedestal:
        return take_pedestal(args)
    if args.start_pulseid is None or args.stop_pulseid is None:
        parser.error("the pulse range is needed (--start_pulseid and --stop_pulseid)")
    try:
        template = RequestTemplate.from_files(
            args.pgroup,
            output_directory=args.output_directory,
            channels_file=args.channels_file,
            epics_file=args.epics_file,
            detectors_file=args.file_detectors,
            scan_step_file=args.scan_step_file,
            rate_multiplicator=args.rate_multiplicator,
            run_options=run_options(args),
        )
    except InputFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    remote = RemoteBroker(args.broker, args.timeout)
    try:
        accepted = submit(remote, template.request(args.start_pulseid, args.stop_pulseid))
        if accepted is None:
            return EXIT_FAILED
        if not args.wait:
            return EXIT_OK
        return wait_for(remote, args.pgroup, accepted.run_number)
    except BrokerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        remote.close()


def wait_for(remote: RemoteBroker, pgroup: str, run_number: int) -> int:
    """``--wait``: follow the run, then list each source's file and outcome."""
    try:
        result = follow_run(remote, pgroup, run_number)
    except BrokerRefused as exc:  # the broker does not know the run it has just accepted
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"stopped following run {run_number}; the broker goes on with it", file=sys.stderr)
        return 130
    for line in result.lines():
        print(line)
    return EXIT_OK if result.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
