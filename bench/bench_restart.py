"""Kill -9 and SIGTERM of `sf-daq-broker serve --workers all`, again and again: the fault table.

One data root and one state directory for the whole bench, a real api/1 data-buffer simulator
in this process (slowed down so that jobs are in the middle when the broker is stopped). Each
attempt starts the broker, sends ``--requests`` requests, waits a random 0.2-3 s and stops it
with the signal; the next attempt restarts it on the same state directory. At the end the
broker is started once more with a fast buffer and every accepted run is checked:

- accepted: the broker answered 200 (a run number was given out);
- lost: accepted, but /run_status has no job status for the run;
- stuck: accepted, and the run is not ``done`` within ``--timeout`` seconds of the last start;
- wrong: a run ``done`` whose file does not hold exactly the requested pulses and values;
- leftovers: temporary files and leases left in raw/ at the end;
- outside writes: files created below the data root but outside raw/;
- duplicates: run numbers given out twice;
- redeliveries: deliveries of a job that was delivered before (its worker was stopped while it
  held the job: running it, or holding it for a work slot).

    .venv/bin/python bench/bench_restart.py --attempts 10 --requests 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import h5py
import numpy as np
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.channels import ChannelSpec, expected_values
from sf_daq_broker.simulation.clock import ManualClock

START = 17_000_000_000
WAVE = ChannelSpec(name="ONE:WAVE", shape=(8,))
PGROUP = "p12345"


@dataclass
class Outcome:
    signal_name: str
    attempts: int = 0
    accepted: dict[int, tuple[int, int]] = field(default_factory=dict)
    duplicates: int = 0
    lost: int = 0
    stuck: int = 0
    wrong: int = 0
    leftovers: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    resumed: int = 0  # deliveries of jobs delivered before (held by a stopped worker)

    def row(self) -> str:
        return (
            f"| {self.signal_name} of serve --workers all mid-job | {self.attempts} | "
            f"{len(self.accepted)} | {self.lost} | {self.stuck} | {len(self.outside)} | "
            f"{self.wrong} | {len(self.leftovers)} | {self.duplicates} | {self.resumed} |"
        )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_broker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SF_DAQ_")}
    with log.open("a") as output:
        command = [sys.executable, "-m", "sf_daq_broker", "serve", "--config", str(config)]
        return subprocess.Popen(
            [*command, "--workers", "all"],
            env=env | {"SF_DAQ_CONFIG": str(config)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )


async def wait_healthy(session: aiohttp.ClientSession, base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base}/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("the broker did not answer")


async def retrieve(session: aiohttp.ClientSession, base: str, first: int, last: int) -> int | None:
    request = {
        "pgroup": PGROUP,
        "start_pulseid": first,
        "stop_pulseid": last,
        "channels_list": [WAVE.name],
    }
    try:
        async with session.post(f"{base}/retrieve_from_buffers", json=request) as response:
            reply: dict[str, Any] = await response.json()
            return int(reply["run_number"]) if response.status == 200 else None
    except aiohttp.ClientError:
        return None


async def run_state(session: aiohttp.ClientSession, base: str, run: int) -> str | None:
    params = {"pgroup": PGROUP, "run_number": str(run)}
    async with session.get(f"{base}/run_status", params=params) as response:
        reply = await response.json()
        return str(reply["run_state"]) if response.status == 200 else None


def file_is_right(raw: Path, run: int, first: int, last: int) -> bool:
    pulse_ids = np.arange(first - 1, last + 2)
    try:
        with h5py.File(raw / f"run_{run:06d}.BSDATA.h5") as file:
            return bool(
                file[f"{WAVE.name}/pulse_id"][:].tolist() == pulse_ids.tolist()
                and np.array_equal(file[f"{WAVE.name}/data"][:], expected_values(WAVE, pulse_ids))
            )
    except OSError:
        return False


async def bench(signum: int, args: argparse.Namespace, rng: random.Random) -> Outcome:
    outcome = Outcome("kill -9" if signum == signal.SIGKILL else "SIGTERM")
    work = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    data_root = work / "sf"
    raw = data_root / "bernina" / "data" / PGROUP / "raw"
    raw.mkdir(parents=True)
    clock = ManualClock(start_pulse_id=START, t0_ms=time.time_ns() // 1_000_000 - 3_600_000)
    clock.advance_to(START + 200_000)
    buffer = SimulatedApi1Buffer([WAVE], clock, batch_bytes=1)
    server = TestServer(create_api1_app(buffer))
    await server.start_server()
    port = free_port()
    config = work / "broker.toml"
    config.write_text(
        f'data_root = "{data_root}"\nlocal_beamline = "bernina"\nrest_port = {port}\n'
        f'state_dir = "{work / "state"}"\n[beamlines.bernina]\nsubnets = ["129.129.243.0/24"]\n'
        f'[buffers]\ndatabuffer_url = "{server.make_url("")}"\n'
    )
    base = f"http://127.0.0.1:{port}"
    log = work / "broker.log"
    next_first = START + 1
    async with aiohttp.ClientSession() as session:
        for _ in range(args.attempts):
            buffer.faults.batch_delay = 0.01
            process = start_broker(config, log)
            await wait_healthy(session, base)
            outcome.attempts += 1
            for _ in range(args.requests):
                first, last = next_first, next_first + rng.randrange(50, 400)
                next_first = last + 100
                run = await retrieve(session, base, first, last)
                if run is not None:
                    outcome.duplicates += run in outcome.accepted
                    outcome.accepted[run] = (first, last)
            await asyncio.sleep(rng.uniform(0.2, 3.0))  # a random moment: a bench, not a test
            process.send_signal(signum)
            await asyncio.to_thread(process.wait, 120)
        buffer.faults.batch_delay = 0.0
        process = start_broker(config, log)
        await wait_healthy(session, base)
        deadline = time.monotonic() + args.timeout
        states: dict[int, str | None] = {}
        while time.monotonic() < deadline:
            states = {run: await run_state(session, base, run) for run in outcome.accepted}
            if all(state == "done" for state in states.values()):
                break
            await asyncio.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 120)
    await server.close()
    for run, (first, last) in outcome.accepted.items():
        state = states.get(run)
        outcome.lost += state is None
        outcome.stuck += state is not None and state != "done"
        outcome.wrong += state == "done" and not file_is_right(raw, run, first, last)
    outcome.leftovers = sorted(
        p.name for p in raw.rglob("*") if p.name.endswith((".partial", ".lease"))
    )
    outcome.outside = sorted(
        str(p) for p in data_root.rglob("*") if p.is_file() and raw not in p.parents
    )
    outcome.resumed = sum(
        path.read_text().count(", delivered again")
        for path in raw.glob("run_info/*/run_*.BSDATA.log")
    )
    print(f"{outcome.signal_name}: work directory {work}", file=sys.stderr)
    return outcome


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=10, help="stops per signal")
    parser.add_argument("--requests", type=int, default=3, help="requests per attempt")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    outcomes = [await bench(signum, args, rng) for signum in (signal.SIGKILL, signal.SIGTERM)]
    print(
        "| fault | attempts | accepted | lost | stuck | outside writes | wrong files "
        "| leftovers in raw/ | run numbers twice | redeliveries |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for outcome in outcomes:
        print(outcome.row())


if __name__ == "__main__":
    asyncio.run(main())
