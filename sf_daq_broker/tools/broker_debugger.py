"""``broker_debugger``: watch the status exchange live, one line per event.

It listens through a private, auto-deleted queue (``AmqpTransport.subscribe_status()``), so
it never takes an event away from the broker's own status queue, acknowledges everything it
reads, and leaves nothing in RabbitMQ once it stops — by Ctrl-C or SIGTERM alike.

``--dead-letters`` lists the dead-letter queue instead, leaving it as it is: the jobs workers
rejected and the messages no one could decode, each with its reason.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TextIO

from sf_daq_broker.jobs import Action, StatusEvent
from sf_daq_broker.transport import DeadLetter, HandoverError
from sf_daq_broker.transport.amqp import AmqpTransport

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
AMQP_ENVIRONMENT = "SF_DAQ_AMQP_URL"

_RESET = "\033[0m"
COLOURS = {
    Action.WRITE_REQUEST: "\033[34m",  # blue: queued
    Action.WRITE_START: "\033[36m",  # cyan: a worker took it
    Action.WRITE_PROGRESS: "\033[2m",  # dim: many of them
    Action.WRITE_FINISHED: "\033[32m",  # green
    Action.WRITE_REJECTED: "\033[1;31m",  # bold red
}


def format_event(event: StatusEvent, colour: bool) -> str:
    """``time action source pgroup run file`` and what the event says beyond that."""
    when = datetime.fromtimestamp(event.timestamp).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    action = f"{event.action.value:<14}"
    if colour:
        action = f"{COLOURS[event.action]}{action}{_RESET}"
    # A pedestal has no run number: it is named by its file, JF_pedestals/<name>.json.
    pedestal = event.run_number == 0 and event.source == "pedestal"
    what = f"pedestal {Path(event.file).stem}" if pedestal else f"run {event.run_number}"
    line = f"{when} {action} {event.source:<12} {event.pgroup} {what} {event.file}"
    if event.action is Action.WRITE_REJECTED:
        line += f" reason: {event.message}"
    elif event.action is Action.WRITE_PROGRESS and (pedestal or "waiting" in event.details):
        # a pedestal's step ("gain stage G1: 400 of 1000"), or waiting for pulse X (the
        # buffers are at Y, about Z s)
        line += f" {event.message}"
    elif event.action is Action.WRITE_PROGRESS:
        line += f" {event.details.get('done')}/{event.details.get('total')}"
    elif event.action is Action.WRITE_FINISHED and event.message:
        line += f" {event.message}"
    return line


#: How much of an undecodable message's body a dead-letter line shows.
BODY_PREVIEW = 200


def format_dead_letter(dead: DeadLetter) -> str:
    """``origin: what: reason``, what being the job or the body as it came (shortened)."""
    if dead.job is not None:
        job = dead.job
        what = f"{job.source} {job.pgroup} run {job.run_number} {job.output_file}"
    else:
        body = repr(dead.body)
        what = f"body {body if len(body) <= BODY_PREVIEW else body[: BODY_PREVIEW - 1] + '…'}"
    return f"{dead.origin}: {what}: {dead.reason}"


async def list_dead_letters(url: str, prefix: str, out: TextIO) -> int:
    """Print the dead-letter queue, one line per message; returns how many there are."""
    transport = AmqpTransport(url, prefix=prefix, declare_topology=False)
    try:
        dead = await transport.peek_dead_letters()
    finally:
        await transport.close()
    for letter in dead:
        print(format_dead_letter(letter), file=out)
    print(
        f"{len(dead)} messages in {transport.topology.dead_letter} (left there)",
        file=sys.stderr,
    )
    return len(dead)


def format_json(event: StatusEvent) -> str:
    """The event as it travels (the body of the status message), on one line."""
    return event.to_json().decode()


async def watch(
    url: str, prefix: str, pgroup: str | None, as_json: bool, colour: bool, out: TextIO
) -> None:
    """Print events until SIGINT or SIGTERM, then close the queue and the connection."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    transport = AmqpTransport(url, prefix=prefix, declare_topology=False)
    try:
        async with await transport.subscribe_status() as events:
            exchange = transport.topology.status_exchange
            # The queue's name lets an operator see it is ours, and that it goes when we go.
            queue = getattr(events, "queue_name", None)
            through = f" through queue {queue}" if queue else ""
            print(f"listening to {exchange}{through} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            while True:
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    break
                except (ValueError, KeyError, TypeError) as exc:  # not a status event
                    print(f"unreadable status event skipped: {exc!r}", file=sys.stderr)
                    continue
                if pgroup is None or event.pgroup == pgroup:
                    print(format_json(event) if as_json else format_event(event, colour), file=out)
                    out.flush()
    except asyncio.CancelledError:
        pass  # a signal asked us to stop: leaving the block has deleted the queue
    finally:
        await transport.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker_debugger",
        description="Show the broker's status events live: one line per event.",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get(AMQP_ENVIRONMENT) or DEFAULT_AMQP_URL,
        help=f"RabbitMQ (default: ${AMQP_ENVIRONMENT}, else {DEFAULT_AMQP_URL})",
    )
    parser.add_argument(
        "--prefix", default="sf-daq", help="exchange name prefix of the installation (sf-daq)"
    )
    parser.add_argument("--pgroup", help="show only the events of this pgroup")
    parser.add_argument("--json", action="store_true", help="one JSON document per line")
    parser.add_argument("--no-color", action="store_true", help="no ANSI colours")
    parser.add_argument(
        "--verbose", action="store_true", help="also show the AMQP libraries' log (reconnects)"
    )
    parser.add_argument(
        "--dead-letters",
        action="store_true",
        help="list the dead-letter queue (rejected jobs, undecodable messages, with the reason)"
        " without taking anything from it, and exit",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The one-line error below says it all; aiormq would add its own traceback-like lines.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    colour = sys.stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ
    try:
        if args.dead_letters:
            asyncio.run(list_dead_letters(args.amqp_url, args.prefix, sys.stdout))
            return 0
        asyncio.run(watch(args.amqp_url, args.prefix, args.pgroup, args.json, colour, sys.stdout))
    except HandoverError as exc:  # what the transport raises when RabbitMQ cannot be reached
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
