"""RabbitMQ outages against a real broker and worker: rows of the fault table.

A private RabbitMQ node (``tests/private_rabbitmq.py``: own node name, free ports, temporary
directories; never the shared server) carries the jobs and status events of a broker (the HTTP
application) and a worker loop whose source writes real HDF5 files. Faults:

- ``stop_app`` after the first quarter of a burst of ``--attempts`` requests (from
  ``--clients`` concurrent clients), ``start_app`` after the first half;
- RabbitMQ's app stopped for a whole burst, started after the last reply.

Counted as in ``bench_faults.py``: accepted (200), of them failed, lost (no job status), stuck
(not done/failed within ``--timeout`` after RabbitMQ is back), outside writes (files anywhere
in the temporary root but ``raw/`` and the state directories), 5xx, and replies whose message
shows an object repr.

    .venv/bin/python bench/bench_rabbitmq_outage.py --attempts 200
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_faults import BASE, H5Source, Row, table

from sf_daq_broker.api.app import create_app
from sf_daq_broker.config import load_settings
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.workers.loop import RetryPolicy, Worker
from tests.private_rabbitmq import private_node_or_skip

REPR = re.compile(r"object at 0x[0-9a-f]+")
OUTBOXES = "status_outbox" in inspect.signature(AmqpTransport).parameters


async def burst(
    root: Path, node: Any, name: str, attempts: int, clients: int, timeout: float, whole: bool
) -> tuple[Row, int]:
    """One burst through an outage; the row and the number of replies showing a repr."""
    row = Row(name)
    raw = root / "sf" / "bernina" / "data" / "p12345" / "raw"
    raw.mkdir(parents=True)
    settings = load_settings(
        environ={},
        data_root=str(root / "sf"),
        local_beamline="bernina",
        state_dir=str(root / "state"),
    )
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    client = TestClient(TestServer(create_app(settings, AmqpTransport(node.url, prefix=prefix))))
    await client.start_server()
    # (the code from before the outboxes runs too: before/after on the same bench)
    outbox: dict[str, Any] = {"status_outbox": root / "worker"} if OUTBOXES else {}
    worker_transport = AmqpTransport(node.url, prefix=prefix, **outbox)
    worker = asyncio.create_task(
        Worker(worker_transport, [H5Source()], RetryPolicy(attempts=2, first_delay=0.01)).run()
    )
    runs: list[int] = []
    reprs = 0
    if whole:
        await asyncio.to_thread(node.stop_app)

    async def requests(count: int) -> None:
        nonlocal reprs
        for _ in range(count):
            response = await client.post("/retrieve_from_buffers", json=BASE)
            body = await response.json()
            row.count(response.status)
            reprs += bool(REPR.search(str(body)))
            if response.status == 200:
                runs.append(body["run_number"])

    async def outage() -> None:
        while row.attempts < attempts // 4:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(node.stop_app)
        while row.attempts < attempts // 2:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(node.start_app)

    started = time.monotonic()
    per_client = attempts // clients
    tasks = [requests(per_client) for _ in range(clients)]
    await asyncio.gather(*tasks, *([] if whole else [outage()]))
    if whole:
        await asyncio.to_thread(node.start_app)
    print(f"  {name}: {row.attempts} replies in {time.monotonic() - started:.1f} s")
    await count_outcomes(client, row, runs, timeout)
    files = {p for p in root.rglob("*") if p.is_file()}
    allowed = (raw, root / "state", root / "worker")
    row.outside = sum(1 for p in files if not any(a in p.parents for a in allowed))
    worker.cancel()
    await asyncio.gather(worker, return_exceptions=True)
    await worker_transport.close()
    await client.close()
    return row, reprs


async def count_outcomes(
    client: TestClient[Any, Any], row: Row, runs: list[int], timeout: float
) -> None:
    """Failed, stuck (not ended within ``timeout``) and lost (no job status) runs."""
    deadline = time.monotonic() + timeout
    pending = set(runs)
    while pending and time.monotonic() < deadline:
        for run in sorted(pending):
            response = await client.get(
                "/run_status", params={"pgroup": "p12345", "run_number": run}
            )
            state = (await response.json()).get("run_state") if response.status == 200 else None
            if state in ("done", "failed"):
                pending.discard(run)
                row.failed += state == "failed"
        await asyncio.sleep(0.2)
    for run in pending:
        response = await client.get("/run_status", params={"pgroup": "p12345", "run_number": run})
        if response.status == 200:
            row.stuck += 1
        else:
            row.lost += 1


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0, help="for all runs to end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"load average {os.getloadavg()[0]:.2f} (2-core machine)")
    with tempfile.TemporaryDirectory(prefix="bench_outage_") as tmp:
        nodes = private_node_or_skip(Path(tmp) / "rabbitmq")
        node = next(nodes)
        rows = []
        try:
            for index, (name, whole) in enumerate(
                [
                    (f"RabbitMQ stop_app/start_app during a {args.attempts}-request burst", False),
                    (f"RabbitMQ stopped for a whole {args.attempts}-request burst", True),
                ]
            ):
                row, reprs = await burst(
                    Path(tmp) / f"b{index}",
                    node,
                    name,
                    args.attempts,
                    args.clients,
                    args.timeout,
                    whole,
                )
                print(f"  replies showing an object repr: {reprs}")
                rows.append(row)
        finally:
            nodes.close()
    print(table(rows))
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
