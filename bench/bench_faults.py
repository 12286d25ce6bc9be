"""Hostile input and a hostile file system against a real broker and worker: the fault table.

For each fault, ``--attempts`` requests are sent to a broker (HTTP server, embedded queue) with a
worker loop whose source writes real HDF5 files, and the outcome is counted:

- accepted: the broker answered 200 (a run number was given out); of them failed: the run
  ended ``failed`` (with the reason in /run_status);
- lost: accepted, but the run's status never says what happened (no job status at all);
- stuck: accepted, and the run is not ``done``/``failed`` within the timeout;
- outside writes: files created or changed in a directory outside raw/ that the planted
  symlinks point to;
- 5xx: replies with a server error (must be 0).

Faults: symlinks planted in raw/ (a directory swapped after acceptance, the job log, the
temporary file's name while it is written, the lease, LAST_RUN's temporary name, the scan
JSON), fuzzed bad input (random mutations of a valid request: huge integers, NaN, lone
surrogates, deep nesting, long path components, wrong types, garbage bytes) and a full disk (a
tmpfs, needs root). Prints a markdown table.

    .venv/bin/python bench/bench_faults.py --attempts 20 --fuzz 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sf_daq_broker.api.app import create_app
from sf_daq_broker.config import Settings, load_settings
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.loop import Progress, RetryPolicy, Source, Worker
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses

BASE: dict[str, Any] = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 1009,
    "channels_list": ["A:B"],
}


class H5Source(Source):
    kind = SourceKind.DATABUFFER

    def __init__(self) -> None:
        self.during_write: Callable[[Job], None] | None = None

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        with h5py.File(target, "w") as file:
            file["A:B/data"] = np.arange(10)
        if self.during_write is not None:
            self.during_write(job)
        pulses = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        return CompletenessReport(names=[NameReport.judge("A:B", pulses, pulses)])


@dataclass
class Row:
    fault: str
    attempts: int = 0
    accepted: int = 0
    failed: int = 0
    lost: int = 0
    stuck: int = 0
    outside: int = 0
    server_errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def count(self, status: int) -> None:
        self.attempts += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.accepted += status == 200
        self.server_errors += status >= 500 and status != 507  # 507 is the disk-full answer


class Setup:
    def __init__(self, root: Path, **settings: Any) -> None:
        self.raw = root / "sf" / "bernina" / "data" / "p12345" / "raw"
        self.raw.mkdir(parents=True, exist_ok=True)
        self.outside = root / "outside"
        self.outside.mkdir(exist_ok=True)
        self.settings = load_settings(
            environ={},
            data_root=str(root / "sf"),
            local_beamline="bernina",
            state_dir=str(root / "state"),
            **settings,
        )
        self.transport = EmbeddedTransport()
        self.source = H5Source()
        #: Files outside that the tampering itself created, with their state then.
        self.planted: dict[str, tuple[int, float]] = {}

    def plant(self, victim: Path, content: bytes) -> Path:
        victim.write_bytes(content)
        self.planted[str(victim)] = (victim.lstat().st_size, victim.lstat().st_mtime)
        return victim

    async def __aenter__(self) -> Setup:
        self.client = TestClient(TestServer(create_app(self.settings, self.transport)))
        await self.client.start_server()
        self.worker: asyncio.Task[None] | None = None
        return self

    def start_worker(self) -> None:
        """The worker starts after the tampering: the job waited in the queue meanwhile."""
        retry = RetryPolicy(attempts=2, first_delay=0.01)
        self.worker = asyncio.create_task(Worker(self.transport, [self.source], retry).run())

    async def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
            self.worker = None

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_worker()
        await self.client.close()

    def outside_state(self) -> dict[str, tuple[int, float]]:
        return {str(p): (p.lstat().st_size, p.lstat().st_mtime) for p in self.outside.rglob("*")}

    async def outcome(self, run: int, timeout: float) -> str:
        """'done', 'failed', 'lost' (no job status ever) or 'stuck'."""
        deadline = time.monotonic() + timeout
        state = "lost"
        while time.monotonic() < deadline:
            response = await self.client.get(
                "/run_status", params={"pgroup": "p12345", "run_number": run}
            )
            if response.status == 200:
                state = (await response.json())["run_state"]
                if state in ("done", "failed"):
                    return str(state)
                state = "stuck"
            await asyncio.sleep(0.02)
        return state


def _swap_directory(setup: Setup, index: int) -> dict[str, Any]:
    name = f"d{index}"

    def tamper() -> None:
        shutil.rmtree(setup.raw / name)
        (setup.outside / name / "e").mkdir(parents=True)
        for directory in (setup.outside / name, setup.outside / name / "e"):
            setup.planted[str(directory)] = (directory.lstat().st_size, directory.lstat().st_mtime)
        os.symlink(setup.outside / name, setup.raw / name)

    return {"body": {"directory_name": f"{name}/e"}, "after_accept": tamper}


def _job_log(setup: Setup, index: int) -> dict[str, Any]:
    def tamper(run: int) -> None:
        victim = setup.plant(setup.outside / f"log{run}", b"")
        os.symlink(victim, setup.raw / "run_info" / "000000" / f"run_{run:06d}.BSDATA.log")

    return {"after_accept_run": tamper}


def _temporary_name(setup: Setup, index: int) -> dict[str, Any]:
    def during_write(job: Job) -> None:
        name = Path(job.output_file).name
        for partial in setup.raw.glob(f".{name}.*.partial"):
            victim = setup.plant(setup.outside / f"{partial.name}.victim", b"precious")
            partial.unlink()
            os.symlink(victim, partial)

    return {"during_write": during_write}


def _lease(setup: Setup, index: int) -> dict[str, Any]:
    def tamper(run: int) -> None:
        victim = setup.plant(setup.outside / f"lease{run}", b"{}")
        lease = setup.raw / f".run_{run:06d}.BSDATA.h5.lease"
        os.symlink(victim, lease)
        old = time.time() - 3600
        os.utime(lease, (old, old), follow_symlinks=False)

    return {"after_accept_run": tamper}


def _last_run_temporary(setup: Setup, index: int) -> dict[str, Any]:
    def before() -> None:
        link = setup.raw / "run_info" / ".LAST_RUN.tmp"
        victim = setup.plant(setup.outside / f"last_run{index}", b"7\n")
        link.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.symlink(victim, link)

    return {"before": before}


def _scan_json(setup: Setup, index: int) -> dict[str, Any]:
    def before() -> None:
        link = setup.raw / "scan_info" / f"scan{index}.json"
        victim = setup.plant(setup.outside / f"scan{index}.json", b"{}\n")
        link.parent.mkdir(exist_ok=True)
        os.symlink(victim, link)

    return {"before": before, "body": {"scan_info": {"scan_name": f"scan{index}"}}}


SYMLINK_FAULTS: dict[str, Callable[[Setup, int], dict[str, Any]]] = {
    "directory swapped for a symlink after acceptance": _swap_directory,
    "symlink at the job log": _job_log,
    "symlink at the temporary file while written": _temporary_name,
    "symlink at the lease": _lease,
    "symlink at LAST_RUN's temporary name": _last_run_temporary,
    "symlink at the scan JSON": _scan_json,
}


async def symlink_fault(root: Path, name: str, attempts: int, timeout: float) -> Row:
    row = Row(name)
    async with Setup(root) as setup:
        for index in range(attempts):
            plan = SYMLINK_FAULTS[name](setup, index)
            setup.source.during_write = plan.get("during_write")
            if "before" in plan:
                plan["before"]()
            response = await setup.client.post(
                "/retrieve_from_buffers", json={**BASE, **plan.get("body", {})}
            )
            row.count(response.status)
            if response.status != 200:
                continue
            run = (await response.json())["run_number"]
            if "after_accept" in plan:
                plan["after_accept"]()
            if "after_accept_run" in plan:
                plan["after_accept_run"](run)
            setup.start_worker()
            state = await setup.outcome(run, timeout)
            await setup.stop_worker()
            row.failed += state == "failed"
            row.lost += state == "lost"
            row.stuck += state == "stuck"
        after = setup.outside_state()
        row.outside = sum(1 for path, st in after.items() if setup.planted.get(path) != st)
    return row


JUNK: list[Any] = [
    2**63,
    2**64,
    -(2**63) - 1,
    float("nan"),
    float("inf"),
    "\ud800",
    "x" * 300,
    "é" * 150,
    "a/" + "b" * 250,
    [],
    {},
    None,
    True,
    "9" * 5000,
    "../../etc",
    "/abs",
    "JF99T99V99",
]


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def fuzzed_body(rng: random.Random) -> bytes:
    body: dict[str, Any] = dict(BASE)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(
            [
                *BASE,
                "directory_name",
                "rate_multiplicator",
                "detectors",
                "scan_info",
                "run_number",
                "camera_list",
                "pv_list",
                "extra",
            ]
        )
        roll = rng.random()
        if roll < 0.1:
            body[key] = _deep(rng.choice([40, 2000, 200_000]))
        elif roll < 0.2:
            body[key] = {"JF07T32V01": {rng.choice(["factor", "keep_raw", "x"]): rng.choice(JUNK)}}
        else:
            body[key] = rng.choice(JUNK)
    if rng.random() < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    try:
        return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    except RecursionError:
        depth = 200_000
        return b'{"pgroup": "p12345", "x": ' + b"[" * depth + b"]" * depth + b"}"


async def fuzz(root: Path, count: int, seed: int) -> Row:
    row = Row(f"fuzzed bad input (seed {seed})")
    rng = random.Random(seed)
    async with Setup(root) as setup:
        setup.start_worker()
        for _ in range(count):
            response = await setup.client.post(
                "/retrieve_from_buffers",
                data=fuzzed_body(rng),
                headers={"Content-Type": "application/json"},
            )
            row.count(response.status)
            if response.status == 200:
                run = (await response.json())["run_number"]
                state = await setup.outcome(run, 10)
                row.failed += state == "failed"
                row.lost += state == "lost"
                row.stuck += state == "stuck"
        last_run = setup.raw / "run_info" / "LAST_RUN"
        spent = int(last_run.read_text()) if last_run.exists() else 0
        if spent != row.accepted:
            print(f"  !! {spent} run numbers spent for {row.accepted} accepted requests")
    return row


async def disk_full(root: Path, attempts: int) -> Row | None:
    disk = root / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        print(f"disk full: skipped (cannot mount a tmpfs: {mount.stderr.strip()})")
        return None
    try:
        row = Row("disk 100 % full (tmpfs)")
        # (a broker from before min_free_bytes existed runs with its defaults: before/after)
        limits = {"min_free_bytes": 65536} if "min_free_bytes" in Settings.model_fields else {}
        async with Setup(disk, **limits) as setup:
            for index in range(10_000):
                try:
                    (disk / f"filler{index}").write_bytes(b"x" * 65536)
                except OSError:
                    break
            for _ in range(attempts):
                response = await setup.client.post("/retrieve_from_buffers", json=BASE)
                row.count(response.status)
            health = await (await setup.client.get("/health")).json()
            print(f"  /health on the full disk: {health['message']}")
            row.outside = 0
        return row
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def table(rows: list[Row]) -> str:
    lines = [
        "| fault | attempts | accepted | of them failed | lost | stuck | outside writes "
        "| 5xx (not 507) | replies |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        replies = ", ".join(f"{s}: {n}" for s, n in sorted(row.statuses.items()))
        lines.append(
            f"| {row.fault} | {row.attempts} | {row.accepted} | {row.failed} | {row.lost} | "
            f"{row.stuck} | "
            f"{row.outside} | {row.server_errors} | {replies} |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=20, help="per symlink fault")
    parser.add_argument("--fuzz", type=int, default=2000, help="fuzzed requests")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--timeout", type=float, default=20.0, help="per run, seconds")
    args = parser.parse_args()
    logging.getLogger().addHandler(logging.NullHandler())  # job logs still go to their files
    print(f"load average {os.getloadavg()[0]:.2f} (2-core machine)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        for index, name in enumerate(SYMLINK_FAULTS):
            rows.append(
                await symlink_fault(Path(tmp) / f"s{index}", name, args.attempts, args.timeout)
            )
            print(f"  {name}: done")
        rows.append(await fuzz(Path(tmp) / "fuzz", args.fuzz, args.seed))
        full = await disk_full(Path(tmp), args.attempts)
        if full is not None:
            rows.append(full)
    print(table(rows))
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
