"""api/1 throughput: simulated buffer (own process) → HTTP → Api1Client, events/s and MB/s.

    .venv/bin/python bench/bench_api1.py                 # all scenarios
    .venv/bin/python bench/bench_api1.py --scenario images --pulses 2000

The server runs in a child process (as in production, the buffer is not the worker's process),
with a manual clock far enough ahead that every requested pulse is there. Each scenario
streams one query and decodes every frame; the figure is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from sf_daq_broker.buffers.api1 import Api1Client
from sf_daq_broker.buffers.api1_decoder import EventBatch
from sf_daq_broker.simulation.channels import ChannelSpec

P0 = 15_000_000_000
T0_MS = 1_629_205_200_000
MAX_PULSES = 200_000


@dataclass(frozen=True)
class Scenario:
    channels: list[ChannelSpec]
    pulses: int
    decompress: bool = True


SCALAR_TYPES = ["float64", "float32", "int64", "int32", "int16", "uint8", "bool", "uint64"]
SCENARIOS = {
    "scalars": Scenario(
        [ChannelSpec(name=f"SCALAR:{i}", type=t) for i, t in enumerate(SCALAR_TYPES * 2)], 60_000
    ),
    "waveforms": Scenario(
        [ChannelSpec(name="WAVE:F32", type="float32", shape=(2048,), byte_order="LITTLE_ENDIAN")],
        20_000,
    ),
    "images": Scenario(
        [
            ChannelSpec(
                name="CAM:FPICTURE", type="uint16", shape=(512, 1024), compression="bitshuffle_lz4"
            )
        ],
        1000,
        decompress=False,
    ),
    "images-decoded": Scenario(
        [
            ChannelSpec(
                name="CAM:FPICTURE", type="uint16", shape=(512, 1024), compression="bitshuffle_lz4"
            )
        ],
        1000,
    ),
}


def serve(port: int) -> None:
    """Child process: every scenario's channels on one simulated buffer."""
    from aiohttp import web

    from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
    from sf_daq_broker.simulation.clock import ManualClock

    clock = ManualClock(P0, T0_MS)
    clock.advance_to(P0 + MAX_PULSES)
    channels = {spec.name: spec for s in SCENARIOS.values() for spec in s.channels}
    app = create_api1_app(SimulatedApi1Buffer(channels.values(), clock))
    web.run_app(app, host="127.0.0.1", port=port, print=lambda _: print("ready", flush=True))


async def measure(url: str, scenario: Scenario) -> tuple[int, int, float]:
    """(events, body bytes, seconds) of one streamed query."""
    from sf_daq_broker.simulation.clock import PulseTiming

    timing = PulseTiming(P0, T0_MS)
    names = [spec.name for spec in scenario.channels]
    events = 0
    async with Api1Client(url, read_timeout=300) as client:
        begin = time.perf_counter()
        async with client.query(
            names,
            timing.ts_ns(P0),
            timing.ts_ns(P0 + scenario.pulses),
            decompress=scenario.decompress,
        ) as reply:
            async for item in reply:
                if isinstance(item, EventBatch):
                    events += len(item)
        elapsed = time.perf_counter() - begin
        return events, reply.bytes_received, elapsed


def decode_only(scenario: Scenario) -> tuple[int, int, float]:
    """(events, bytes, seconds) of the client's decoder alone on a pre-encoded body."""
    from sf_daq_broker.buffers.api1_decoder import FrameDecoder
    from sf_daq_broker.buffers.api1_format import header_frame
    from sf_daq_broker.simulation.api1_server import encode_events
    from sf_daq_broker.simulation.channels import channel_pulse_ids
    from sf_daq_broker.simulation.clock import PulseTiming

    timing = PulseTiming(P0, T0_MS)
    parts = []
    for spec in scenario.channels:
        parts.append(header_frame(spec.header))
        parts.append(
            encode_events(spec, channel_pulse_ids(spec, P0, P0 + scenario.pulses - 1), timing)
        )
    body = b"".join(parts)
    decoder = FrameDecoder(decompress=scenario.decompress)
    events = 0
    begin = time.perf_counter()
    for offset in range(0, len(body), 1 << 20):
        for item in decoder.feed(body[offset : offset + (1 << 20)]):
            if isinstance(item, EventBatch):
                events += len(item)
    decoder.finish()
    return events, len(body), time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--pulses", type=int, help="pulses per query (default per scenario)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--port", type=int, default=8391)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return
    print("client decoder alone (pre-encoded body, 1 MiB chunks):")
    report(args, lambda scenario: decode_only(scenario))
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--port", str(args.port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the benchmark server did not start")
        url = f"http://127.0.0.1:{args.port}"
        print("server process -> HTTP -> client (streamed query, every frame decoded):")
        report(args, lambda scenario: asyncio.run(measure(url, scenario)))
    finally:
        server.terminate()
        server.wait(timeout=10)


def report(args: argparse.Namespace, run: Callable[[Scenario], tuple[int, int, float]]) -> None:
    print(f"  {'scenario':16} {'events':>9} {'MB':>9} {'s':>7} {'events/s':>11} {'MB/s':>8}")
    for name in args.scenario or list(SCENARIOS):
        scenario = SCENARIOS[name]
        if args.pulses:
            pulses = min(args.pulses, MAX_PULSES)
            scenario = Scenario(scenario.channels, pulses, scenario.decompress)
        events, nbytes, seconds = min(
            (run(scenario) for _ in range(args.repeat)), key=lambda r: r[2]
        )
        print(
            f"  {name:16} {events:9d} {nbytes / 1e6:9.1f} {seconds:7.2f} "
            f"{events / seconds:11.0f} {nbytes / 1e6 / seconds:8.1f}"
        )


if __name__ == "__main__":
    main()
