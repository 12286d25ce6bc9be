"""Poison messages on the real RabbitMQ: the row "poison job message" of the fault table.

A real broker (HTTP server on RabbitMQ, with its status follower) and two worker loops (each on
its own connection, as two worker processes would be; their source writes a real HDF5 file)
run while ``--attempts`` rounds are sent, each: an undecodable job message published straight
to the data-buffer queue, a valid retrieval request through the broker, an undecodable status
message published to the status exchange. The undecodable messages cycle through not JSON, an
empty object, a newer format version, a wrong type, a misrouted kind, garbage bytes, deep
nesting and an unknown key. Counted:

- accepted: requests the broker answered 200 (a run number given out);
- lost: accepted runs whose status never says what happened, plus undecodable messages that
  are neither in the dead-letter queue with their reason nor anywhere else;
- stuck: accepted runs not ``done`` within the timeout, plus messages left in the job queue,
  plus worker loops or the status follower that died;
- outside writes: files in the data root outside ``raw/`` (there are none to expect).

Uses the RabbitMQ at ``SF_DAQ_TEST_AMQP_URL`` (default the local guest one) with a unique
prefix, deleted afterwards.

    .venv/bin/python bench/bench_poison.py --attempts 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import h5py
import numpy as np
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sf_daq_broker.api.app import create_app
from sf_daq_broker.config import load_settings
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.transport.amqp import AmqpTransport, Topology
from sf_daq_broker.workers.loop import Progress, RetryPolicy, Source, Worker
from sf_daq_broker.workers.report import CompletenessReport, NameReport, beam_pulses

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REQUEST: dict[str, Any] = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 1009,
    "channels_list": ["A:B"],
}
A_JOB = {
    "job_id": "x",
    "request_id": "r",
    "kind": "databuffer",
    "source": "BSDATA",
    "names": ["A:B"],
    "start_pulse_id": 1,
    "stop_pulse_id": 2,
    "requested_start": 1,
    "requested_stop": 2,
    "rate_multiplicator": 1,
    "pgroup": "p12345",
    "beamline": "bernina",
    "run_number": 1,
    "output_file": "/elsewhere/run_000001.BSDATA.h5",
    "log_file": "/elsewhere/x.log",
    "run_info_file": "/elsewhere/x.json",
    "request_time": "",
}
AN_EVENT = {
    "action": "write_finished",
    "request_id": "r",
    "job_id": "x",
    "pgroup": "p12345",
    "run_number": 1,
    "source": "BSDATA",
    "file": "/elsewhere/run_000001.BSDATA.h5",
}


def poison(document: dict[str, Any], wrong: dict[str, Any], index: int) -> bytes:
    """The ``index``-th kind of undecodable message, made from a valid ``document`` (``wrong``:
    a change that makes it a message of the wrong kind)."""
    kinds: list[bytes] = [
        b"not json",
        b"{}",
        json.dumps(document | {"format_version": 99}).encode(),
        json.dumps(document | {"run_number": "x"}).encode(),
        json.dumps(document | wrong).encode(),
        bytes(range(256)),
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps(document | {"colour": "red"}).encode(),
    ]
    return kinds[index % len(kinds)]


class H5Source(Source):
    kind = SourceKind.DATABUFFER

    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        with h5py.File(target, "w") as file:
            file["A:B/data"] = np.arange(10)
        pulses = beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator)
        return CompletenessReport(names=[NameReport.judge("A:B", pulses, pulses)])


async def publish_raw(
    channel: aio_pika.abc.AbstractChannel, exchange: str, key: str, body: bytes
) -> None:
    target = await channel.get_exchange(exchange)
    await target.publish(aio_pika.Message(body), key, mandatory=True)


async def run_state(client: TestClient, run: int) -> str:
    response = await client.get("/run_status", params={"pgroup": "p12345", "run_number": run})
    return str((await response.json())["run_state"]) if response.status == 200 else "lost"


async def bench(root: Path, url: str, attempts: int, timeout: float) -> dict[str, int]:
    prefix = f"bench-poison-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix)
    raw = root / "sf" / "bernina" / "data" / "p12345" / "raw"
    raw.mkdir(parents=True)
    settings = load_settings(
        environ={},
        data_root=str(root / "sf"),
        local_beamline="bernina",
        state_dir=str(root / "state"),
        amqp_url=url,
        amqp_prefix=prefix,
    )
    broker_transport = AmqpTransport(url, prefix=prefix)
    client = TestClient(TestServer(create_app(settings, broker_transport)))
    await client.start_server()
    worker_transports = [AmqpTransport(url, prefix=prefix) for _ in range(2)]
    retry = RetryPolicy(attempts=2, first_delay=0.01)
    workers = [
        asyncio.create_task(Worker(transport, [H5Source()], retry).run())
        for transport in worker_transports
    ]
    connection = await aio_pika.connect(url)
    runs: list[int] = []
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        started = time.monotonic()
        for index in range(attempts):
            await publish_raw(
                channel,
                topology.jobs_exchange,
                "databuffer",
                poison(A_JOB, {"kind": "detector"}, index),
            )
            response = await client.post("/retrieve_from_buffers", json=REQUEST)
            if response.status == 200:
                runs.append(int((await response.json())["run_number"]))
            await publish_raw(
                channel, topology.status_exchange, "", poison(AN_EVENT, {"action": "x"}, index)
            )
        states = {run: "lost" for run in runs}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in runs:
                if states[run] != "done":
                    states[run] = await run_state(client, run)
            if all(state == "done" for state in states.values()):
                break
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        dead = []
        while len(dead) < 2 * attempts and time.monotonic() < deadline:
            dead.extend(await broker_transport.take_dead_letters())
            await asyncio.sleep(0.05)
        dead.extend(await broker_transport.take_dead_letters())
        # (getattr: the bench also runs against the code before dead letters had a reason)
        with_reason = [d for d in dead if getattr(d, "job", d) is None and getattr(d, "reason", "")]
        queue = await channel.declare_queue(topology.job_queue(SourceKind.DATABUFFER), passive=True)
        left = queue.declaration_result.message_count or 0
        died = sum(task.done() for task in workers)
        follower_alive = any(
            not task.done() and "follow_status" in repr(task.get_coro())
            for task in asyncio.all_tasks()
        )
        outside = [p for p in (root / "sf").rglob("*") if p.is_file() and raw not in p.parents]
        files = sorted(p.name for p in raw.glob("run_*.BSDATA.h5"))
        return {
            "attempts": attempts,
            "accepted": len(runs),
            "done": sum(state == "done" for state in states.values()),
            "files": len(files),
            "lost": sum(state == "lost" for state in states.values())
            + max(0, 2 * attempts - len(with_reason)),
            "stuck": sum(state not in ("done", "lost") for state in states.values())
            + left
            + died
            + (not follower_alive),
            "outside writes": len(outside),
            "dead letters with reason": len(with_reason),
            "refused (broker, workers)": sum(
                getattr(t, "refused_messages", 0) for t in [broker_transport, *worker_transports]
            ),
            "seconds": round(elapsed, 1),
        }
    finally:
        for task in workers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a loop that died
                await task
        for transport in worker_transports:
            await transport.close()
        await client.close()
        async with connection.channel() as cleanup:
            await topology.delete(cleanup)
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds")
    args = parser.parse_args()
    logging.getLogger().addHandler(logging.NullHandler())  # job logs still go to their files
    url = os.environ.get("SF_DAQ_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    print(f"load average {os.getloadavg()[0]:.2f} (2-core machine)")
    with tempfile.TemporaryDirectory(prefix="bench_poison_") as tmp:
        result = await bench(Path(tmp), url, args.attempts, args.timeout)
    for key, value in result.items():
        print(f"{key}: {value}")
    print("| fault | attempts | accepted | lost | stuck | outside writes |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| poison job and status messages | {result['attempts']} | {result['accepted']} | "
        f"{result['lost']} | {result['stuck']} | {result['outside writes']} |"
    )


if __name__ == "__main__":
    asyncio.run(main())
