"""Front-end throughput: accepted /retrieve_from_buffers requests per second.

Starts a real broker process (`sf-daq-broker serve`) on a temporary data root, then sends
requests from this process with a fixed concurrency. Every accepted request takes the pgroup
lock, writes LAST_RUN and the run JSON with fsync, creates the output directory and queues
its jobs. As a reference measured in the same run, `/health` on the same broker gives the
HTTP floor (no file work), so the ratio shows what the bookkeeping costs.

    .venv/bin/python bench/bench_frontend.py [--requests 2000] [--concurrency 1 10 50]
                                             [--amqp-url amqp://guest:guest@127.0.0.1:5672/]
                                             [--baseline-tree DIR --rounds 4]

With ``--baseline-tree`` the broker of another source tree (an older commit unpacked with
``git archive``) runs alternately with this one, in the same conditions, and the ratios of the
medians are printed.
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
from dataclasses import dataclass
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Measurement:
    health_rate: float
    health_p50: float
    rate: float
    p50: float
    p99: float
    cpu: float  # broker CPU seconds per request
    last_run: str


async def measure(
    requests: int, concurrency: int, amqp_url: str, tree: Path | None, show_log: bool
) -> Measurement:
    """One broker process (of ``tree``'s code when given) on a fresh data root."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bernina/data/p12345/raw").mkdir(parents=True)
        port = free_port()
        env = dict(
            os.environ,
            SF_DAQ_DATA_ROOT=str(root),
            SF_DAQ_LOCAL_BEAMLINE="bernina",
            SF_DAQ_AMQP_URL=amqp_url,
            SF_DAQ_AMQP_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
            SF_DAQ_STATE_DIR=str(root / "state"),
        )
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
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
            # Without buffers every request logs that its range was accepted unchecked.
            stderr=None if show_log else subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url)
            await hammer(url, "GET", "/health", 200, concurrency)  # warm-up
            health_rate, health_lat = await hammer(url, "GET", "/health", requests, concurrency)
            cpu_before = cpu_seconds(broker.pid)
            rate, latencies = await hammer(
                url, "POST", "/retrieve_from_buffers", requests, concurrency
            )
            cpu = (cpu_seconds(broker.pid) - cpu_before) / requests
        finally:
            broker.terminate()
            broker.wait(timeout=10)
            if amqp_url:
                await delete_topology(amqp_url, env["SF_DAQ_AMQP_PREFIX"])
        last_run = (root / "bernina/data/p12345/raw/run_info/LAST_RUN").read_text().strip()
    return Measurement(
        health_rate,
        statistics.median(health_lat),
        rate,
        statistics.median(latencies),
        percentile(latencies, 0.99),
        cpu,
        last_run,
    )


def show(label: str, m: Measurement, requests: int) -> None:
    print(
        f"  {label:<9} /retrieve_from_buffers {m.rate:6.0f} req/s  p50 {m.p50 * 1e3:7.2f} ms  "
        f"p99 {m.p99 * 1e3:7.2f} ms  cpu {m.cpu * 1e3:5.2f} ms/req | "
        f"/health {m.health_rate:6.0f} req/s  p50 {m.health_p50 * 1e3:6.2f} ms | "
        f"ratio {m.rate / m.health_rate:.3f} | "
        f"LAST_RUN {m.last_run} (expected {requests}) | load {os.getloadavg()[0]:.1f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[16], help="clients in flight (several)"
    )
    parser.add_argument("--amqp-url", default="", help="use RabbitMQ instead of the embedded queue")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run the broker of this source tree (e.g. `git archive` of an older commit), "
        "alternating with this one, and print the ratios",
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternations per concurrency")
    parser.add_argument("--broker-log", action="store_true", help="show the brokers' logs")
    args = parser.parse_args()

    transport = "rabbitmq" if args.amqp_url else "embedded"
    print(
        f"transport: {transport}, {args.requests} requests per measurement, "
        f"{os.cpu_count()} cores, 5 jobs per request"
    )
    trees: list[tuple[str, Path | None]] = [("this", None)]
    if args.baseline_tree is not None:
        trees = [("baseline", args.baseline_tree.resolve()), *trees]
    for concurrency in args.concurrency:
        print(f"concurrency {concurrency}:")
        results: dict[str, list[Measurement]] = {label: [] for label, _ in trees}
        for round_ in range(args.rounds):
            # Alternate which goes first, so a change of the machine's load hits both.
            order = trees if round_ % 2 == 0 else trees[::-1]
            for label, tree in order:
                m = await measure(args.requests, concurrency, args.amqp_url, tree, args.broker_log)
                results[label].append(m)
                show(label, m, args.requests)
        if len(trees) == 2:
            before, after = results["baseline"], results["this"]
            rate = statistics.median(m.rate for m in after) / statistics.median(
                m.rate for m in before
            )
            p50 = statistics.median(m.p50 for m in after) / statistics.median(m.p50 for m in before)
            p99 = statistics.median(m.p99 for m in after) / statistics.median(m.p99 for m in before)
            cpu = statistics.median(m.cpu for m in after) / statistics.median(m.cpu for m in before)
            print(
                f"  this/baseline (medians of {args.rounds}): req/s x{rate:.2f}, "
                f"p50 x{p50:.2f}, p99 x{p99:.2f}, broker cpu/req x{cpu:.2f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
