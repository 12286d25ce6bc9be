"""``sf-daq-broker simulate``: run the simulated buffers until Ctrl-C.

Prints one line per service with its address, then ``ready`` — scripts and tests wait for that
line rather than for a fixed time. Fault switches apply from start-up; tests that need to turn
faults on and off use the Python API (``Simulation.databuffer.faults`` etc.).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sf_daq_broker.defaults import SIMULATION_CONFIG, default_config

if TYPE_CHECKING:
    from sf_daq_broker.simulation.config import SimulationConfig
    from sf_daq_broker.simulation.runner import Simulation

log = logging.getLogger(__name__)
# Imports of the simulators happen when the command runs: every `sf-daq-broker` invocation
# loads this module to build its --help, and should not pay for numpy, h5py and aiohttp here.
DEFAULT_CONFIG = default_config(SIMULATION_CONFIG)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run the simulated buffers (data, image, archiver, Jungfrau)",
        description="Run simulated facility buffers that speak the real protocols "
        "(BUFFERS.md), from a configuration file, until Ctrl-C.",
    )
    parser.add_argument("--config", help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("--host", help="listen address of every service (default from config)")
    for service in ("databuffer", "imagebuffer", "archiver", "control"):
        parser.add_argument(
            f"--{service}-port", type=int, help=f"port of the {service} (0 = any free port)"
        )
    parser.add_argument("--start-pulse-id", type=int, help="pulse id at start-up")
    parser.add_argument("--buffer-root", type=Path, help="root of the Jungfrau buffer files")
    parser.add_argument("--calibration-root", type=Path, help="where gain/pedestal files go")
    parser.add_argument(
        "--jungfrau-mode",
        choices=["eager", "lazy"],
        help="write every Jungfrau record as the clock passes, or on demand",
    )
    parser.add_argument(
        "--jungfrau-retention", type=int, help="Jungfrau retention in pulses (>= 1000)"
    )

    faults = parser.add_argument_group("fault injection (data and image buffer)")
    faults.add_argument("--gap-every", type=int, metavar="K", help="drop pulses with pid %% K == 0")
    faults.add_argument(
        "--duplicate-every", type=int, metavar="K", help="send pulses with pid %% K == 1 twice"
    )
    faults.add_argument(
        "--missing-channel",
        action="append",
        default=[],
        metavar="NAME",
        help="answer this channel as unknown (repeatable)",
    )
    faults.add_argument(
        "--http-errors",
        type=int,
        metavar="N",
        help="HTTP 500 for the first N queries of each buffer (data, image, archiver)",
    )
    faults.add_argument(
        "--cut-after-bytes", type=int, metavar="B", help="cut the first reply after B bytes"
    )
    faults.add_argument("--reply-delay", type=float, metavar="S", help="wait S seconds per reply")
    jf_faults = parser.add_argument_group("fault injection (Jungfrau buffer)")
    jf_faults.add_argument(
        "--missing-module",
        action="append",
        default=[],
        metavar="DET:M",
        help="module M of DET writes nothing (repeatable)",
    )
    jf_faults.add_argument(
        "--incomplete-every",
        type=int,
        metavar="K",
        help="frames with pid %% K == 0 lose packets (all modules)",
    )
    jf_faults.add_argument(
        "--dropped-every",
        type=int,
        metavar="K",
        help="frames with pid %% K == 1 are never written (all modules)",
    )
    parser.set_defaults(func=run)


def _configure(args: argparse.Namespace) -> SimulationConfig:
    """The configuration file with the command-line overrides applied."""
    from sf_daq_broker.simulation.config import SimulationConfig, load_simulation_config

    config = load_simulation_config(args.config)
    changes: dict[str, Any] = {}
    for service in ("databuffer", "imagebuffer", "archiver", "control"):
        server = getattr(config, service)
        update: dict[str, Any] = {}
        if args.host:
            update["host"] = args.host
        port = getattr(args, f"{service}_port")
        if port is not None:
            update["port"] = port
        if update:
            changes[service] = server.model_copy(update=update)
    if args.start_pulse_id is not None:
        changes["clock"] = config.clock.model_copy(update={"start_pulse_id": args.start_pulse_id})
    jungfrau: dict[str, Any] = {}
    for option, key in (
        ("buffer_root", "buffer_root"),
        ("calibration_root", "calibration_root"),
        ("jungfrau_mode", "mode"),
        ("jungfrau_retention", "retention_pulses"),
    ):
        if getattr(args, option) is not None:
            jungfrau[key] = getattr(args, option)
    if jungfrau:
        changes["jungfrau"] = config.jungfrau.model_copy(update=jungfrau)
    # Re-validate: model_copy does not.
    merged = config.model_copy(update=changes)
    return SimulationConfig.model_validate({**merged.model_dump(), "source": config.source})


def _apply_faults(args: argparse.Namespace, simulation: Simulation) -> None:
    from sf_daq_broker.simulation.faults import ALL, PulseSelection

    for buffer in (simulation.databuffer, simulation.imagebuffer):
        faults = buffer.faults
        if args.gap_every:
            faults.gaps[ALL] = PulseSelection(every=args.gap_every, phase=0)
        if args.duplicate_every:
            faults.duplicates[ALL] = PulseSelection(every=args.duplicate_every, phase=1)
        faults.missing_channels.update(args.missing_channel)
        if args.reply_delay:
            faults.reply_delay = args.reply_delay
    if args.http_errors:
        simulation.databuffer.faults.http_errors = args.http_errors
        simulation.imagebuffer.faults.http_errors = args.http_errors
        simulation.archiver.faults.http_errors = args.http_errors
    if args.cut_after_bytes:
        simulation.databuffer.faults.cut_after_bytes = args.cut_after_bytes
        simulation.imagebuffer.faults.cut_after_bytes = args.cut_after_bytes
    jf = simulation.jungfrau.faults
    for item in args.missing_module:
        detector, _, module = item.partition(":")
        jf.missing_modules.add((detector, int(module)))
    if args.incomplete_every:
        jf.incomplete_frames[(ALL, -1)] = PulseSelection(every=args.incomplete_every, phase=0)
    if args.dropped_every:
        jf.dropped_frames[(ALL, -1)] = PulseSelection(every=args.dropped_every, phase=1)


def run(args: argparse.Namespace) -> int:
    from sf_daq_broker.simulation.config import SimulationConfigError

    try:
        config = _configure(args)
    except SimulationConfigError as exc:
        log.error("%s", exc)
        return 2
    except ValueError as exc:  # pydantic ValidationError of an override
        log.error("invalid option: %s", exc)
        return 2
    asyncio.run(_serve(config, args))
    return 0


async def _serve(config: SimulationConfig, args: argparse.Namespace) -> None:
    from sf_daq_broker.simulation.runner import Simulation

    simulation = Simulation(config)
    _apply_faults(args, simulation)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await simulation.start()
        _print_banner(simulation)
        await stop.wait()
    finally:
        await simulation.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    print("stopped", flush=True)


def _print_banner(simulation: Simulation) -> None:
    config = simulation.config
    clock = simulation.clock
    lines = [
        f"configuration  {config.source}",
        f"pulse clock    start pulse {clock.start_pulse_id} at t0_ms {clock.timing.t0_ms}, 100 Hz",
        f"databuffer     {simulation.addresses['databuffer']}  "
        f"({len(config.databuffer.channels)} channels)",
        f"imagebuffer    {simulation.addresses['imagebuffer']}  "
        f"({len(config.imagebuffer.channels)} cameras)",
        f"archiver       {simulation.addresses['archiver']}  ({len(config.archiver.pvs)} PVs)",
        f"control        {simulation.addresses['control']}  (GET /status)",
        f"jungfrau       {simulation.jungfrau.buffer_root}  ({config.jungfrau.mode}: "
        + ", ".join(f"{d.name} {d.n_modules} module(s)" for d in config.jungfrau.detectors)
        + ")",
    ]
    for name, (gain, pedestal) in simulation.calibration_files.items():
        lines.append(f"calibration    {name}: gain {gain}, pedestal {pedestal}")
    lines.append("ready")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
