"""Front-end throughput: accepted /retrieve_from_buffers requests per second.

Starts a real broker process (`sf-daq-broker serve`) on a temporary data root, then sends
requests from this process with a fixed concurrency. Every accepted request takes the pgroup
lock, writes LAST_RUN and the run JSON with fsync, creates the output directory and queues
its jobs. As a reference measured in the same run, `/health` on the same broker gives the
HTTP floor (no file work), so the ratio shows what the bookkeeping costs.

    .venv/bin/python bench/bench_frontend.py [--requests 2000] [--concurrency 16]
                                             [--amqp-url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

REQUEST = {
    "pgroup": "p12345",
    "start_pulseid": 15_000_000_000,
    "stop_pulseid": 15_000_000_999,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet", "SAR-CVME-TIFALL4:EvtSet"],
    "camera_list": ["SARES11-SPEC125-M1:FPICTURE"],
    "pv_list": ["SARFE10-OAPU044:SPECTRUM_X"],
    "detectors": {"JF13T01V01": {}},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"broker at {url} did not become healthy")
            await asyncio.sleep(0.05)


async def hammer(
    url: str, method: str, path: str, count: int, concurrency: int
) -> tuple[float, list[float]]:
    """Send ``count`` requests; return requests/s and per-request latencies (s)."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            queue.get_nowait()
            started = time.perf_counter()
            kwargs = {"json": REQUEST} if method == "POST" else {}
            async with session.request(method, url + path, **kwargs) as response:
                body = await response.json()
                if response.status != 200:
                    raise SystemExit(f"{path} failed: {response.status} {body}")
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return count / elapsed, latencies


async def delete_topology(amqp_url: str, prefix: str) -> None:
    import aio_pika

    from sf_daq_broker.transport.amqp import Topology

    async with await aio_pika.connect(amqp_url) as connection:
        await Topology(prefix).delete(await connection.channel())


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--amqp-url", default="", help="use RabbitMQ instead of the embedded queue")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bernina/data/p12345/raw").mkdir(parents=True)
        port = free_port()
        env = dict(
            os.environ,
            SF_DAQ_DATA_ROOT=str(root),
            SF_DAQ_LOCAL_BEAMLINE="bernina",
            SF_DAQ_AMQP_URL=args.amqp_url,
            SF_DAQ_AMQP_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
        )
        broker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sf_daq_broker",
                "--log-level",
                "WARNING",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url)
            await hammer(url, "GET", "/health", 200, args.concurrency)  # warm-up
            health_rate, health_lat = await hammer(
                url, "GET", "/health", args.requests, args.concurrency
            )
            rate, latencies = await hammer(
                url, "POST", "/retrieve_from_buffers", args.requests, args.concurrency
            )
        finally:
            broker.terminate()
            broker.wait(timeout=10)
            if args.amqp_url:
                await delete_topology(args.amqp_url, env["SF_DAQ_AMQP_PREFIX"])
        last_run = (root / "bernina/data/p12345/raw/run_info/LAST_RUN").read_text().strip()

    transport = "rabbitmq" if args.amqp_url else "embedded"
    print(
        f"transport: {transport}, {args.requests} requests, concurrency {args.concurrency}, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"reference /health:      {health_rate:8.0f} req/s  "
        f"p50 {statistics.median(health_lat) * 1e3:6.2f} ms"
    )
    print(
        f"/retrieve_from_buffers: {rate:8.0f} req/s  "
        f"p50 {statistics.median(latencies) * 1e3:6.2f} ms  "
        f"p99 {percentile(latencies, 0.99) * 1e3:6.2f} ms  (5 jobs per request)"
    )
    print(f"ratio retrieve/health:  {rate / health_rate:8.3f}")
    print(f"last run number: {last_run} (expected {args.requests})")


if __name__ == "__main__":
    asyncio.run(main())
