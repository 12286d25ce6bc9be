"""``sf-daq-broker demo``: one command that shows the whole system doing its main job.

Starts the simulated buffers, the broker and the workers (``system``), asks for a run over
HTTP like a user, follows it with progress bars, checks the files and prints a report. Exit
status 0 only when every source was written and the consistency check passes; 1 otherwise;
2 for bad options; 130 after Ctrl-C, which stops everything before the command returns.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from sf_daq_broker.config import DETECTOR_NAME
from sf_daq_broker.demo import (
    DEFAULT_CAMERAS,
    DEFAULT_CHANNELS,
    DEFAULT_DETECTORS,
    DEFAULT_PULSES,
    DEFAULT_PVS,
    DEFAULT_RATE_MULTIPLICATOR,
)

log = logging.getLogger(__name__)

ALLOWED_RATES = (1, 2, 4, 8, 10, 20, 40, 50, 100)
DEFAULT_PGROUP = "p12345"
DEFAULT_BEAMLINE = "bernina"
DEFAULT_DIRECTORY = "demo"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole system on one machine: buffers, broker, workers, one run, checked",
        description="Start simulated buffers, the broker and one worker per source (embedded "
        "queue, no RabbitMQ needed), retrieve one run through the HTTP API, follow it, check "
        "its files with the consistency check and print a report. Exit status 0 only when the "
        "check passes.",
    )
    what = parser.add_argument_group("what the run asks for")
    what.add_argument(
        "--pulses", type=int, default=DEFAULT_PULSES, help="pulses in the run (default %(default)s)"
    )
    what.add_argument(
        "--rate-multiplicator",
        type=int,
        default=DEFAULT_RATE_MULTIPLICATOR,
        choices=ALLOWED_RATES,
        metavar="R",
        help="beam rate 100 Hz / R, one of 1 2 4 8 10 20 40 50 100 (default %(default)s)",
    )
    what.add_argument(
        "--channels",
        type=int,
        default=DEFAULT_CHANNELS,
        metavar="N",
        help="beam-synchronous channels, of different types and rates (default %(default)s)",
    )
    what.add_argument(
        "--cameras",
        type=int,
        default=DEFAULT_CAMERAS,
        metavar="N",
        help="cameras (default %(default)s)",
    )
    what.add_argument(
        "--pvs", type=int, default=DEFAULT_PVS, metavar="N", help="EPICS PVs (default %(default)s)"
    )
    what.add_argument(
        "--detectors",
        default=",".join(DEFAULT_DETECTORS),
        metavar="NAMES",
        help="Jungfrau detectors, converted to energy, comma-separated (default %(default)s)",
    )
    what.add_argument("--no-channels", dest="channels", action="store_const", const=0)
    what.add_argument("--no-cameras", dest="cameras", action="store_const", const=0)
    what.add_argument("--no-pvs", dest="pvs", action="store_const", const=0)
    what.add_argument("--no-detectors", dest="detectors", action="store_const", const="")
    where = parser.add_argument_group("where it runs")
    where.add_argument(
        "--data-root",
        type=Path,
        help="data root to write into (default: a temporary directory, removed at the end)",
    )
    where.add_argument("--pgroup", default=DEFAULT_PGROUP, help="pgroup (default %(default)s)")
    where.add_argument(
        "--beamline", default=DEFAULT_BEAMLINE, help="beamline of the pgroup (default %(default)s)"
    )
    where.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (data, simulated buffers, logs) at the end",
    )
    where.add_argument(
        "--broker-port", type=int, default=0, help="HTTP port of the broker (default: a free one)"
    )
    where.add_argument(
        "--amqp-url",
        default="",
        help="run the jobs through this RabbitMQ (default: the embedded in-process queue)",
    )
    where.add_argument(
        "--amqp-prefix",
        help="exchange/queue prefix on RabbitMQ (default: a fresh one, removed at the end)",
    )
    where.add_argument(
        "--stay",
        action="store_true",
        help="after the run, keep everything running until Ctrl-C, to try the API by hand",
    )
    where.add_argument(
        "--buffer-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="the simulated data and image buffers answer S seconds late (a slow buffer)",
    )
    where.add_argument(
        "--verbose", action="store_true", help="show the components' log on the terminal"
    )
    parser.set_defaults(func=run)


def _check_options(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, or None."""
    if not 1 <= args.pulses <= 60_000:
        return "--pulses must be between 1 and 60000 (the broker's longest run)"
    for option in ("channels", "cameras", "pvs"):
        if getattr(args, option) < 0:
            return f"--{option} cannot be negative"
    for name in _detectors(args):
        if not DETECTOR_NAME.match(name):
            return f"--detectors: {name!r} is not a Jungfrau name (JFxxTyyVzz)"
    if args.buffer_delay < 0:
        return "--buffer-delay cannot be negative"
    return None


def _detectors(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip() for n in args.detectors.split(",") if n.strip()))


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: stop everything in order."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _not_from_amqp_libraries(record: logging.LogRecord) -> bool:
    """The demo says in its own words that RabbitMQ is not reachable; the AMQP libraries'
    own log lines about it (an ERROR with a repr) would only confuse on the terminal."""
    return not record.name.startswith(("aiormq", "aio_pika"))


@contextlib.contextmanager
def _quiet_console(log_file: Path, verbose: bool) -> Iterator[None]:
    """The full log goes to ``log_file``; the terminal shows warnings only (unless verbose),
    so the progress bars and the report stay readable."""
    root = logging.getLogger()
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    previous = {h: h.level for h in root.handlers}
    if not verbose:
        for existing in root.handlers:
            existing.setLevel(max(existing.level, logging.WARNING))
            existing.addFilter(_not_from_amqp_libraries)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for existing, level in previous.items():
            existing.setLevel(level)
            existing.removeFilter(_not_from_amqp_libraries)


def run(args: argparse.Namespace) -> int:
    problem = _check_options(args)
    if problem:
        print(f"sf-daq-broker demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    workspace = Path(tempfile.mkdtemp(prefix="sf-daq-demo-"))
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    # Started in the background by a script (`&`), SIGINT arrives ignored; the demo always
    # stops on it, as it does on Ctrl-C in a terminal.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    status = EXIT_FAILED
    try:
        with _quiet_console(workspace / "demo.log", args.verbose):
            status = _run_in(workspace, args)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        if args.keep or status not in (EXIT_OK, EXIT_INTERRUPTED):
            print(f"kept {workspace} (data, simulated buffers, demo.log)", flush=True)
        else:
            shutil.rmtree(workspace, ignore_errors=True)
    return status


def _run_in(workspace: Path, args: argparse.Namespace) -> int:
    from sf_daq_broker.demo.plan import Content, PulseRange
    from sf_daq_broker.demo.system import DemoError, DemoSystem, SystemOptions, simulation_config
    from sf_daq_broker.simulation.config import load_simulation_config

    content = Content(
        pulses=args.pulses,
        rate_multiplicator=args.rate_multiplicator,
        channels=args.channels,
        cameras=args.cameras,
        pvs=args.pvs,
        detectors=_detectors(args),
    )
    base = load_simulation_config()
    pulses = PulseRange.for_run(base.clock.start_pulse_id, content.pulses)
    data_root = (args.data_root or workspace / "sf").absolute()
    prefix = args.amqp_prefix or f"sf-daq-demo-{uuid.uuid4().hex[:8]}"
    options = SystemOptions(
        workspace=workspace,
        data_root=data_root,
        beamline=args.beamline,
        clock_at_start=pulses.clock_at_start,
        amqp_url=args.amqp_url,
        amqp_prefix=prefix,
        broker_port=args.broker_port,
        buffer_delay=args.buffer_delay,
        delete_topology=bool(args.amqp_url) and args.amqp_prefix is None,
    )
    system = DemoSystem(options, simulation_config(base, options, content.detectors))
    try:
        return _demo(system, content, pulses, args)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the workers, the broker and the buffers", flush=True)
        return EXIT_INTERRUPTED
    finally:
        # A second Ctrl-C while stopping quits at once: nothing outlives the process.
        previous_int = signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
        try:
            system.stop()
        finally:
            signal.signal(signal.SIGINT, previous_int)


def _say(line: str = "") -> None:
    print(line, flush=True)


def _demo(system: Any, content: Any, pulses: Any, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sf_daq_broker.bookkeeping.paths import PgroupDirs
    from sf_daq_broker.demo.plan import build_plan
    from sf_daq_broker.demo.report import Timings, report_lines
    from sf_daq_broker.demo.system import DemoError
    from sf_daq_broker.tools.consistency import check_run
    from sf_daq_broker.tools.daq_client import (
        BrokerRefused,
        ClientError,
        ProgressBars,
        RemoteBroker,
        follow_run,
    )

    began = time.monotonic()
    timings = Timings()
    options = system.options
    transport = "RabbitMQ at " + options.amqp_url if options.amqp_url else "embedded queue"
    _say(f"sf-daq-broker demo: the whole system on one machine ({transport})")
    _say(f"workspace   {options.workspace}")
    raw = options.data_root / options.beamline / "data" / args.pgroup / "raw"
    raw.mkdir(parents=True, exist_ok=True)  # the pgroup: the broker never creates one
    _say(f"pgroup      {args.pgroup} of {options.beamline}: {raw}")

    system.start()
    timings.add("start-up", time.monotonic() - began)
    simulation = system.simulation
    _say(
        "buffers     data {databuffer}, image {imagebuffer}, archiver {archiver}, "
        "control {control}".format(**simulation.addresses)
    )
    _say(f"            Jungfrau {simulation.jungfrau.buffer_root}")
    _say(f"broker      {system.broker_url}")
    _say(f"page        {system.broker_url}/  (runs, live progress and previews in a browser)")
    _say(f"workers     {', '.join(kind.value for kind in system.workers) or 'none'}")

    plan = build_plan(
        simulation.config,
        content,
        system.workers,
        args.pgroup,
        pulses,
        DEFAULT_DIRECTORY,
        why_not=system.unavailable,
    )
    if plan.detectors:
        step = time.monotonic()
        beam = pulses.beam_pulses(content.rate_multiplicator)
        with tqdm(
            total=len(beam), desc="Jungfrau buffer", unit="pulse", file=sys.stderr, leave=False
        ) as bar:
            frames = system.fill_jungfrau(plan.detectors, beam, bar.update)
        timings.add(f"simulated Jungfrau buffer ({frames} module frames)", time.monotonic() - step)

    broker = RemoteBroker(system.broker_url, timeout=30)
    try:
        newest = broker.current_pulse_id()
        ago = (newest - pulses.stop) / 100
        _say(
            f"request     POST /retrieve_from_buffers: pulses {pulses.start}-{pulses.stop} "
            f"({content.pulses} pulses, rate 1/{content.rate_multiplicator}, up to {ago:.0f} s "
            f"ago), {plan.summary()}"
        )
        for reason in plan.left_out:
            _say(f"            left out: {reason}")
        step = time.monotonic()
        try:
            accepted = broker.retrieve(plan.request)
        except BrokerRefused as exc:
            raise DemoError(f"the broker refused the request: {exc}") from exc
        _say(f"accepted    run {accepted.run_number} (request_id {accepted.request_id})")
        result = follow_run(broker, args.pgroup, accepted.run_number, bars=ProgressBars(sys.stderr))
        timings.add("retrieval", time.monotonic() - step)
    except ClientError as exc:
        raise DemoError(str(exc)) from exc
    finally:
        broker.close()

    step = time.monotonic()
    dirs = PgroupDirs(options.beamline, args.pgroup, raw)
    run_file = dirs.run_json(accepted.run_number)
    check = check_run(run_file)
    timings.add("check", time.monotonic() - step)

    _say()
    _say(
        f"run {accepted.run_number} of {args.pgroup} ({options.beamline}): pulses "
        f"{pulses.start}-{pulses.stop} ({content.pulses} pulses), beam at "
        f"{100 / content.rate_multiplicator:g} Hz (rate_multiplicator {content.rate_multiplicator})"
    )
    lines = report_lines(
        raw=raw,
        run=result,
        run_file=run_file,
        data_files=[Path(name) for name in accepted.files],
        check=check,
        left_out=plan.left_out,
    )
    for line in lines:
        _say(line)
    _say(timings.line(time.monotonic() - began))
    passed = result.ok and check.ok
    _say(f"demo {'passed' if passed else 'FAILED'}")
    if args.stay:
        _say(
            f"ready: the broker at {system.broker_url} keeps serving (data root "
            f"{options.data_root}); Ctrl-C stops everything"
        )
        _say(f"page:  open {system.broker_url}/ in a browser")
        try:
            signal.pause()
        except KeyboardInterrupt:
            _say("stopping (Ctrl-C)")
            return EXIT_INTERRUPTED
    return EXIT_OK if passed else EXIT_FAILED
