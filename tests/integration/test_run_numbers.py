"""Run numbers across processes: two brokers on one pgroup, and processes killed mid-allocation."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import wait_until

ALLOCATION_LOOP = """
import sys
from pathlib import Path
from sf_daq_broker.bookkeeping.paths import PgroupDirs
from sf_daq_broker.bookkeeping.runs import allocate_run_number

dirs = PgroupDirs("bernina", "p12345", Path(sys.argv[1]))
limit = int(sys.argv[2])
for _ in range(limit):
    print(allocate_run_number(dirs), flush=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _up_or_exited(port: int, process: subprocess.Popen[bytes]) -> bool:
    """Stop waiting for a broker that is up, or that has died (its log says why)."""
    return broker_healthy(port) or process.poll() is not None


@pytest.fixture
def two_brokers(data_root: Path, tmp_path: Path) -> Iterator[list[int]]:
    env = dict(
        os.environ,
        SF_DAQ_DATA_ROOT=str(data_root),
        SF_DAQ_LOCAL_BEAMLINE="bernina",
        SF_DAQ_AMQP_URL="",
    )
    ports = [free_port(), free_port()]
    processes = []
    for index, port in enumerate(ports):
        log = open(tmp_path / f"broker{index}.log", "w")  # noqa: SIM115 - closed with the process
        processes.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "sf_daq_broker",
                        "serve",
                        "--port",
                        str(port),
                        "--host",
                        "127.0.0.1",
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    try:
        for port, (process, _) in zip(ports, processes, strict=True):
            wait_until(
                functools.partial(_up_or_exited, port, process),
                timeout=30,
                what=f"broker on port {port}",
            )
            assert process.poll() is None, (tmp_path / "broker0.log").read_text()
        yield ports
    finally:
        for process, log in processes:
            process.terminate()
            process.wait(timeout=10)
            log.close()


async def test_100_concurrent_requests_over_two_brokers(
    two_brokers: list[int], raw_dir: Path
) -> None:
    body = {
        "pgroup": "p12345",
        "start_pulseid": 1000,
        "stop_pulseid": 2000,
        "channels_list": ["A:B"],
    }

    async def send(session: aiohttp.ClientSession, index: int) -> tuple[int, int]:
        port = two_brokers[index % 2]
        async with session.post(f"http://127.0.0.1:{port}/retrieve_from_buffers", json=body) as r:
            reply = await r.json()
            assert r.status == 200, reply
            return index % 2, int(reply["run_number"])

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(send(session, i) for i in range(100)))
    numbers = sorted(number for _, number in results)
    assert numbers == list(range(1, 101))
    assert {broker for broker, _ in results} == {0, 1}
    assert (raw_dir / "run_info" / "LAST_RUN").read_text() == "100\n"
    for number in range(1, 101):
        record = json.loads(
            (raw_dir / "run_info" / "000000" / f"run_{number:06d}.json").read_text()
        )
        assert record["run_number"] == number


def test_two_processes_allocating_never_share_a_number(raw_dir: Path) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", ALLOCATION_LOOP, str(raw_dir), "300"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes)
    numbers = [int(line) for output in outputs for line in output.split()]
    assert sorted(numbers) == list(range(1, 601))
    for output in outputs:  # each process sees strictly increasing numbers
        own = [int(line) for line in output.split()]
        assert own == sorted(own)


def test_sigkill_during_allocation_never_corrupts_last_run(raw_dir: Path) -> None:
    last_run = raw_dir / "run_info" / "LAST_RUN"
    randomness = random.Random(20261121)
    highest_returned = 0
    for _round in range(12):
        process = subprocess.Popen(
            [sys.executable, "-c", ALLOCATION_LOOP, str(raw_dir), "1000000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        wanted = randomness.randint(1, 40)
        returned = [int(process.stdout.readline()) for _ in range(wanted)]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        returned += [int(line) for line in process.stdout.read().split()]
        process.stdout.close()
        # Numbers continue after the previous round's file state, never reused.
        assert returned[0] == highest_returned + 1
        assert returned == list(range(returned[0], returned[0] + len(returned)))
        text = last_run.read_text()
        assert text.endswith("\n") and text.strip().isdigit(), repr(text)
        on_disk = int(text)
        # Never behind a returned number; at most one allocated whose print was cut off.
        assert returned[-1] <= on_disk <= returned[-1] + 1
        highest_returned = on_disk
    leftovers = sorted(p.name for p in (raw_dir / "run_info").iterdir())
    assert set(leftovers) <= {".lock", "LAST_RUN", ".LAST_RUN.tmp"}
