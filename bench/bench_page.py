"""What the page costs the API: p99 of /retrieve_from_buffers without and with the page open.

    .venv/bin/python bench/bench_page.py [--runs 14] [--phase-seconds 10] [--rounds 4]
                                         [--rate 10] [--viewers 2]

1. Data: ``sf-daq-broker demo --stay`` writes ``--runs`` runs with real files (6 channels,
   a camera, 3 PVs, a 1-module and a 4-module Jungfrau, 100 pulses each) and is stopped.
2. The broker alone: ``sf-daq-broker serve`` on the demo's data root and status store (so the
   page knows the runs), without workers, so nothing but the broker runs on the machine.
3. Phases of ``--phase-seconds`` each, in one run, alternating: without the page, with the
   page, ``--rounds`` times, and a last one without (drift of the machine's load shows in
   both conditions alike). In every phase ``--rate`` requests per second are sent to
   /retrieve_from_buffers on a fixed schedule (open loop: a slow reply does not slow the
   schedule), each one channel: each is accepted (run number, run JSON with fsync, one job),
   and each new run is a row the live page receives. "With the page" means ``--viewers``
   simulated browsers (in a process of their own at the lowest priority: browsers run on other
   machines), each holding the live stream (Server-Sent Events) open, reloading the run
   list every 2 s and opening the runs' pages one after the other with every preview (PNG) and
   the PV table, as a browser does (6 requests in parallel). Each page phase opens runs not
   opened before, so their previews are not cached: they are computed during the phase (the
   preview process is busy most of it).

It prints p50/p99 of the retrievals per phase, with the CPU time the broker process and its
preview process used (from /proc: unlike latencies on a shared machine, this does not depend on
what else runs) and how many previews were computed; then p50/p99/max and the CPU used per
second per condition, and the ratio of the p99 with the page to the p99 without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from sf_daq_broker.web.render import init_preview_process

PGROUP = "p12345"
SERVE = [sys.executable, "-m", "sf_daq_broker", "--log-level", "ERROR", "serve"]
RETRIEVAL = {
    "pgroup": PGROUP,
    "start_pulseid": 15_000_001_000,
    "stop_pulseid": 15_000_001_099,
    "directory_name": "bench",
    "channels_list": ["SAROP11-PBPS117:INTENSITY"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- 1. the data -----------------------------------------------------------------------------


def make_runs(data_root: Path, runs: int) -> Path:
    """Runs with real files, written by the demo system; returns the demo's workspace."""
    port = free_port()
    command = [sys.executable, "-m", "sf_daq_broker", "demo", "--stay", "--keep"]
    command += ["--pulses", "100", "--data-root", str(data_root), "--broker-port", str(port)]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert demo.stdout is not None
    out = []
    for line in demo.stdout:
        out.append(line)
        if line.startswith("ready: "):
            break
    text = "".join(out)
    if "demo passed" not in text:
        demo.kill()
        raise SystemExit("the demo did not pass:\n" + text)
    workspace = Path(re.search(r"^workspace\s+(\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    run_json = data_root / "bernina/data" / PGROUP / "raw/run_info/000000/run_000001.json"
    request = json.loads(run_json.read_text())
    for key in ("beamline", "run_number", "request_id", "request_time"):
        request.pop(key)
    asyncio.run(_more_runs(url, request, runs - 1))
    demo.send_signal(signal.SIGINT)
    demo.communicate(timeout=120)
    return workspace


async def _more_runs(url: str, request: dict[str, Any], count: int) -> None:
    async with aiohttp.ClientSession() as session:
        numbers = []
        for _ in range(count):
            async with session.post(url + "/retrieve_from_buffers", json=request) as reply:
                numbers.append((await reply.json())["run_number"])
        for number in numbers:
            while True:
                params = {"pgroup": PGROUP, "run_number": number}
                async with session.get(url + "/run_status", params=params) as reply:
                    state = (await reply.json())["run_state"]
                if state in ("done", "failed"):
                    break
                await asyncio.sleep(0.5)
            print(f"  run {number}: {state}", flush=True)


# --- 3. the phases ---------------------------------------------------------------------------


async def retrievals(url: str, rate: float, seconds: float) -> list[float]:
    """Open-loop requests on a fixed schedule; the latency of each."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            started = time.perf_counter()
            async with session.post(url + "/retrieve_from_buffers", json=RETRIEVAL) as reply:
                await reply.read()
                if reply.status != 200:
                    raise SystemExit(f"retrieval refused: {reply.status} {await reply.text()}")
            latencies.append(time.perf_counter() - started)

        tasks = []
        began = time.perf_counter()
        for index in range(int(rate * seconds)):
            delay = began + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies


def page_load(url: str, runs: list[int], seconds: float, viewers: int, parts: str) -> Any:
    """The simulated browsers for ``seconds``, in their own process (so that their own work does
    not delay the retrievals' client); returns (page requests, {preview URL: (start, end)})."""
    return asyncio.run(_page_load(url, runs, seconds, viewers, parts.split(",")))


async def _page_load(
    url: str, runs: list[int], seconds: float, viewers: int, parts: list[str]
) -> tuple[int, dict[str, tuple[float, float]]]:
    previews: dict[str, tuple[float, float]] = {}
    counts = await asyncio.gather(
        *(viewer(url, runs, time.time() + seconds, parts, previews) for _ in range(viewers))
    )
    return sum(counts), previews


async def viewer(
    url: str,
    runs: list[int],
    until: float,
    parts: list[str],
    previews: dict[str, tuple[float, float]],
) -> int:
    """One browser: the live stream, the list reloaded every 2 s, the runs' pages in turn."""
    requests = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=6)) as session:

        async def stream() -> None:
            async with session.get(url + "/page/events", params={"pgroup": PGROUP}) as reply:
                async for _ in reply.content:
                    pass

        async def get(path: str) -> str:
            nonlocal requests
            started = time.time()
            async with session.get(url + path) as reply:
                body = await reply.read()
                requests += 1
                if reply.status != 200:
                    raise SystemExit(f"{path}: {reply.status} {body[:200]!r}")
            if path.startswith(("/page/preview.png", "/page/pvs")):
                previews.setdefault(path, (started, time.time()))
            return body.decode(errors="replace")

        async def reload_list() -> None:
            while time.time() < until:
                await get(f"/?pgroup={PGROUP}")
                await asyncio.sleep(2)

        async def open_runs() -> None:
            for number in runs:
                if time.time() >= until:
                    return
                html = await get(f"/page/run?pgroup={PGROUP}&run_number={number}")
                urls = re.findall(
                    r'(?:src|data-fragment)="(/page/(?:preview\.png|pvs)[^"]+)"', html
                )
                await asyncio.gather(*(get(u.replace("&amp;", "&")) for u in urls))

        live = asyncio.create_task(stream()) if "stream" in parts else None
        await asyncio.gather(
            *([reload_list()] if "list" in parts else []),
            *([open_runs()] if "runs" in parts else []),
            asyncio.sleep(max(0.0, until - time.time())),
        )
        if live is not None:
            live.cancel()
    return requests


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float:
    """CPU time of the process's living children (the broker's preview process)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    total += cpu_seconds(int(entry.name))
            except (OSError, ValueError):
                continue
    return total


async def measure(url: str, args: argparse.Namespace, runs: list[int], broker: int) -> None:
    """Phases without and with the page, alternating, ending without; latencies by condition,
    and the CPU time the broker (and its preview process) used in each."""
    results: dict[str, list[float]] = {"without page": [], "with page": []}
    cpu: dict[str, list[float]] = {"without page": [0.0, 0.0, 0.0], "with page": [0.0, 0.0, 0.0]}
    opened: set[str] = set()
    runs_left = list(runs)
    phases = ["without page", "with page"] * args.rounds + ["without page"]
    loop = asyncio.get_running_loop()
    # The browsers stand for machines elsewhere: at the lowest priority (as the broker's preview
    # process runs), their own CPU time takes as little as possible from the broker here.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, spawn, initializer=init_preview_process) as browsers:
        await loop.run_in_executor(browsers, time.sleep, 0)  # started before the first phase
        for number, phase in enumerate(phases, 1):
            page = None
            if phase == "with page":
                page = loop.run_in_executor(
                    browsers,
                    page_load,
                    url,
                    runs_left,
                    args.phase_seconds,
                    args.viewers,
                    args.parts,
                )
            began = time.time()
            broker_cpu, preview_cpu = cpu_seconds(broker), children_cpu_seconds(broker)
            latencies = await retrievals(url, args.rate, args.phase_seconds)
            results[phase] += latencies
            # CPU over the retrievals' window only (the browsers may finish a page after it).
            used = (cpu_seconds(broker) - broker_cpu, children_cpu_seconds(broker) - preview_cpu)
            window = time.time() - began
            cpu[phase] = [a + b for a, b in zip(cpu[phase], (*used, window), strict=True)]
            if page is not None:
                requests, previews = await page
            line = (
                f"  phase {number} {phase:<13} p50 {statistics.median(latencies) * 1e3:7.2f} ms"
                f"  p99 {percentile(latencies, 0.99) * 1e3:7.2f} ms  broker CPU {used[0]:5.2f} s,"
                f" preview process {used[1]:5.2f} s"
            )
            if page is not None:
                fresh = {u: t for u, t in previews.items() if u not in opened}
                busy = max((end for _, end in fresh.values()), default=began) - max(
                    began, min((start for start, _ in fresh.values()), default=began)
                )
                line += (
                    f"  ({requests} page requests; {len(fresh)} previews computed, the preview "
                    f"process busy {busy:.1f} of {time.time() - began:.1f} s)"
                )
                opened |= set(fresh)
                # The next page phase opens runs not opened yet: their previews are not cached.
                seen = {int(u.split("run_number=")[1].split("&")[0]) for u in opened}
                runs_left = [r for r in runs_left if r not in seen] or runs_left
            print(line, flush=True)

    without, with_page = results["without page"], results["with page"]
    print(f"\n/retrieve_from_buffers, {args.rate:g} requests/s, {args.phase_seconds:g} s phases")
    for phase, latencies in results.items():
        print(
            f"  {phase:<13} n={len(latencies):4d}  p50 {statistics.median(latencies) * 1e3:7.2f} ms"
            f"  p99 {percentile(latencies, 0.99) * 1e3:7.2f} ms  max {max(latencies) * 1e3:7.2f} ms"
        )
    for phase, (broker_cpu, preview_cpu, seconds) in cpu.items():
        print(
            f"  {phase:<13} CPU per second: broker {broker_cpu / seconds * 100:5.1f} %,"
            f" preview process {preview_cpu / seconds * 100:5.1f} % (of one core)"
        )
    ratio = percentile(with_page, 0.99) / percentile(without, 0.99)
    print(f"  p99 ratio with/without the page: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=14, help="runs with files (default 14)")
    parser.add_argument("--phase-seconds", type=float, default=10.0)
    parser.add_argument(
        "--rounds", type=int, default=4, help="pairs of phases without/with the page (default 4)"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="retrievals per second")
    parser.add_argument("--viewers", type=int, default=2, help="simulated browsers")
    parser.add_argument(
        "--parts",
        default="stream,list,runs",
        help="what the browsers do: the live stream, reloading the list, opening runs' pages",
    )
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp:
        data_root = Path(tmp) / "sf"
        print(f"writing {args.runs} runs with the demo system", flush=True)
        workspace = make_runs(data_root, args.runs)
        port = free_port()
        env = dict(
            os.environ,
            SF_DAQ_DATA_ROOT=str(data_root),
            SF_DAQ_STATE_DIR=str(workspace / "state"),
            SF_DAQ_LOCAL_BEAMLINE="bernina",
            SF_DAQ_AMQP_URL="",
        )
        broker = subprocess.Popen(
            [*SERVE, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(_wait_and_measure(url, args, broker.pid))
        finally:
            broker.terminate()
            broker.wait(timeout=60)
            subprocess.run(["rm", "-rf", str(workspace)], check=False)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


async def _wait_and_measure(url: str, args: argparse.Namespace, broker: int) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/health") as reply:
                    if reply.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the broker at {url} did not start")
            await asyncio.sleep(0.1)
    await measure(url, args, list(range(args.runs, 0, -1)), broker)


if __name__ == "__main__":
    main()
