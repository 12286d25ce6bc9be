"""A whole retrieval, request to files: 10 channels, 1 camera, 5 PVs over 1000 pulses.

    .venv/bin/python bench/bench_retrieval.py
    .venv/bin/python bench/bench_retrieval.py --amqp-url amqp://guest:guest@127.0.0.1:5672/
    .venv/bin/python bench/bench_retrieval.py --pulses 6000 --camera-shape 1024x1024

The simulated data buffer, image buffer and archiver run in a child process (in production the
buffers are other machines), with a clock already past the run, as when a user asks for a run
that just ended. The broker (HTTP on a free port) and one worker per source run in this
process, on the embedded queue or on RabbitMQ. The clock starts at the request; each job's
phases come from its own status events:

- queue: request sent → ``write_start`` (the reply, the run's bookkeeping, the hand-over);
- fetch: ``write_start`` → the source's "all fetched" progress event (``done == total``:
  readiness check, the buffer's reply streamed, decoded and written into the file as it
  arrives);
- write: → ``write_finished`` (what is left: rows that came late merged in, the completeness
  report, fsync, rename).

The reference measured in the same run is the api/1 fetch alone of the same channels with
the same client (no broker, no queue, no file): both buffers' fetches at once, as the
retrieval does them (one simulator process serves both), and, as before, the slower of the
two fetched one after the other. The ratio shows what the system adds. Both sides are warmed
up first (numba kernels, the simulator's camera image), and the process's CPU seconds for the
retrieval and for the reference are printed too: CPU does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

from sf_daq_broker.api.app import create_app
from sf_daq_broker.buffers.api1 import Api1Client
from sf_daq_broker.buffers.pulse_map import PulseMapClient
from sf_daq_broker.config import load_settings
from sf_daq_broker.jobs import Action
from sf_daq_broker.transport import Transport
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.api1_source import DataBufferSource, ImageBufferSource
from sf_daq_broker.workers.archiver_source import ArchiverSource
from sf_daq_broker.workers.loop import Worker

P0 = 15_000_000_000
T0_MS = 1_629_205_200_000
TYPES = ["float64", "float32", "int64", "int32", "int16", "uint8", "bool", "string"]


def channel_specs(camera_shape: tuple[int, int]) -> dict[str, list[dict[str, Any]]]:
    """The benchmark's sources: 10 channels of several types and rates, 1 camera, 5 PVs."""
    channels: list[dict[str, Any]] = [
        {"name": f"BENCH:SCALAR-{i}", "type": t, "rate_divisor": 1 + i % 2}
        for i, t in enumerate(TYPES)
    ]
    channels.append({"name": "BENCH:WAVE-F32", "type": "float32", "shape": [2048]})
    channels.append(
        {
            "name": "BENCH:WAVE-U16",
            "type": "uint16",
            "shape": [512],
            "compression": "bitshuffle_lz4",
        }
    )
    camera = {
        "name": "BENCH-CAM:FPICTURE",
        "type": "uint16",
        "shape": list(camera_shape),
        "compression": "bitshuffle_lz4",
    }
    pvs = [
        {"name": f"BENCH:PV-{i}", "type": t, "period_s": p}
        for i, (t, p) in enumerate(
            [("float64", 1.0), ("int32", 2.0), ("string", 3.0), ("float32", 0.5), ("int64", 7.0)]
        )
    ]
    return {"channels": channels, "cameras": [camera], "pvs": pvs}


def serve(spec_json: str, pulses: int) -> None:
    """Child process: the three simulated buffers, each on a free port."""
    from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
    from sf_daq_broker.simulation.archiver import PvSpec, SimulatedArchiver, create_archiver_app
    from sf_daq_broker.simulation.channels import ChannelSpec
    from sf_daq_broker.simulation.clock import ManualClock

    spec = json.loads(spec_json)
    clock = ManualClock(P0, T0_MS)
    clock.advance_to(P0 + pulses + 100)
    apps = [
        create_api1_app(SimulatedApi1Buffer([ChannelSpec(**c) for c in spec["channels"]], clock)),
        create_api1_app(
            SimulatedApi1Buffer(
                [ChannelSpec(**c) for c in spec["cameras"]], clock, name="image buffer"
            )
        ),
        create_archiver_app(SimulatedArchiver([PvSpec(**p) for p in spec["pvs"]], clock)),
    ]

    async def run() -> None:
        urls = []
        for app in apps:
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            urls.append(f"http://127.0.0.1:{port}")
        print(json.dumps(urls), flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


async def fetch_alone(url: str, names: list[str], pulses: int, decompress: bool) -> float:
    """Seconds for the reference: the pulse map lookup plus one streamed api/1 fetch."""
    begin = time.perf_counter()
    async with PulseMapClient(url) as pulse_map, Api1Client(url) as client:
        start_ns, end_ns = await pulse_map.range_ns(P0 + 1, P0 + pulses)
        await client.fetch(names, start_ns, end_ns, decompress=decompress)
    return time.perf_counter() - begin


async def retrieval(args: argparse.Namespace, urls: list[str], spec: dict[str, Any]) -> None:
    """One retrieval in a temporary data root, removed afterwards (the files are ~250 MB)."""
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        await retrieve_into(Path(tmp), args, urls, spec)


async def retrieve_into(
    root: Path, args: argparse.Namespace, urls: list[str], spec: dict[str, Any]
) -> None:
    raw = root / "bernina" / "data" / "p12345" / "raw"
    raw.mkdir(parents=True)
    settings = load_settings(
        environ={},
        data_root=str(root),
        local_beamline="bernina",
        state_dir=str(root / "state"),
        buffers={"databuffer_url": urls[0], "imagebuffer_url": urls[1], "archiver_url": urls[2]},
    )
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    transport: Transport
    worker_transport: Transport
    if args.amqp_url:
        transport = AmqpTransport(args.amqp_url, prefix=prefix)
        worker_transport = AmqpTransport(args.amqp_url, prefix=prefix)
    else:
        transport = worker_transport = EmbeddedTransport()
    runner = web.AppRunner(create_app(settings, transport))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sources = [
        DataBufferSource.from_settings(settings),
        ImageBufferSource.from_settings(settings),
        ArchiverSource.from_settings(settings),
    ]
    worker = asyncio.create_task(Worker(worker_transport, sources).run())
    events = await transport.subscribe_status()
    request = {
        "pgroup": "p12345",
        "start_pulseid": P0 + 1,
        "stop_pulseid": P0 + args.pulses,
        "channels_list": [c["name"] for c in spec["channels"]],
        "camera_list": [c["name"] for c in spec["cameras"]],
        "pv_list": [p["name"] for p in spec["pvs"]],
    }
    times: dict[str, dict[str, float]] = {}
    # Warm up both sides first (numba kernels loaded from their cache, the simulator's camera
    # base image), as the reference after the retrieval finds them.
    await fetch_alone(urls[0], request["channels_list"], 10, True)
    await fetch_alone(urls[1], request["camera_list"], 10, False)
    cpu_begin = cpu_seconds()
    begin = time.perf_counter()
    async with (
        ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/retrieve_from_buffers", json=request) as response,
    ):
        reply = await response.json()
        assert response.status == 200, reply
    replied = time.perf_counter() - begin
    async with asyncio.timeout(600):
        while sum("finished" in t for t in times.values()) < 3:
            event = await events.__anext__()
            now = time.perf_counter() - begin
            phases = times.setdefault(event.source, {})
            if event.action is Action.WRITE_START:
                phases["start"] = now
            elif event.action is Action.WRITE_PROGRESS and event.details.get(
                "done"
            ) == event.details.get("total"):
                phases["fetched"] = now
            elif event.action is Action.WRITE_FINISHED:
                phases["finished"] = now
            elif event.action is Action.WRITE_REJECTED:
                raise SystemExit(f"{event.source} failed: {event.message}")
    total = max(t["finished"] for t in times.values())
    cpu_retrieval = cpu_seconds() - cpu_begin
    # Stop the workers only once every job is settled (acknowledged, its lease removed).
    async with asyncio.timeout(60):
        while list(raw.glob(".*.lease")):
            await asyncio.sleep(0.01)
    worker.cancel()
    await asyncio.gather(worker, return_exceptions=True)
    await events.close()
    await runner.cleanup()
    await transport.close()
    if worker_transport is not transport:
        await worker_transport.close()
    if isinstance(transport, AmqpTransport):
        await delete_queues(args.amqp_url, prefix)

    sizes = {p.name: p.stat().st_size for p in raw.glob("run_000001.*.h5")}
    print(f"request → reply: {replied * 1000:.0f} ms (run {reply['run_number']})")
    print(f"  {'source':11} {'queue':>7} {'fetch':>7} {'write':>7} {'done at':>8} {'file MB':>8}")
    for source, t in sorted(times.items()):
        fetched = t.get("fetched", t["finished"])
        size = sizes.get(f"run_000001.{source}.h5", 0) / 1e6
        print(
            f"  {source:11} {t['start']:7.2f} {fetched - t['start']:7.2f} "
            f"{t['finished'] - fetched:7.2f} {t['finished']:8.2f} {size:8.1f}"
        )
    print(f"request → all three files: {total:.2f} s ({args.transport_name})")
    cpu_begin = cpu_seconds()
    started = time.perf_counter()
    await asyncio.gather(
        fetch_alone(urls[0], request["channels_list"], args.pulses, True),
        fetch_alone(urls[1], request["camera_list"], args.pulses, False),
    )
    together = time.perf_counter() - started
    cpu_reference = cpu_seconds() - cpu_begin
    slower = max(
        await fetch_alone(urls[0], request["channels_list"], args.pulses, True),
        await fetch_alone(urls[1], request["camera_list"], args.pulses, False),
    )
    print(
        f"reference, both api/1 fetches at once (no broker, queue or file): {together:.2f} s; "
        f"ratio {total / together:.2f}"
    )
    print(f"            the slower api/1 fetch alone: {slower:.2f} s; ratio {total / slower:.2f}")
    print(
        f"CPU of this process: {cpu_retrieval:.2f} s for the retrieval, {cpu_reference:.2f} s "
        f"for both fetches; load average {os.getloadavg()[0]:.2f}"
    )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def delete_queues(url: str, prefix: str) -> None:
    import aio_pika

    from sf_daq_broker.transport.amqp import Topology

    connection = await aio_pika.connect(url)
    async with connection:
        await Topology(prefix).delete(await connection.channel())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pulses", type=int, default=1000)
    parser.add_argument("--camera-shape", default="512x512", help="HEIGHTxWIDTH (uint16)")
    parser.add_argument("--amqp-url", help="RabbitMQ URL (default: the embedded queue)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.pulses)
        return
    height, width = (int(n) for n in args.camera_shape.lower().split("x"))
    spec = channel_specs((height, width))
    args.transport_name = "RabbitMQ" if args.amqp_url else "embedded queue"
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", json.dumps(spec), "--pulses", str(args.pulses)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        urls = json.loads(server.stdout.readline())
        asyncio.run(retrieval(args, urls, spec))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
