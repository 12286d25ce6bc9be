"""The reconciler on the embedded queue: a job that no queue holds and no worker leases ends.

On the single-machine queue the status events live in the process's memory: a kill -9 between
a job's acknowledgement (committed to the queue's SQLite file) and the broker applying its final
event leaves the job ``running`` in the status store, with nothing left to deliver after the
restart. The reconciler judges such a job as on RabbitMQ, from the embedded queue's own store.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from sf_daq_broker.api.app import create_app
from sf_daq_broker.api.state import HANDOVER, STATUS
from sf_daq_broker.bookkeeping.atomic import partial_files
from sf_daq_broker.config import Settings
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.status.reconcile import ReconcilePolicy, Reconciler
from sf_daq_broker.transport.amqp import BROKER_STATUS_QUEUE
from sf_daq_broker.transport.embedded import EmbeddedTransport
from sf_daq_broker.workers.lease import lease_path
from tests.support import dead_owner

REQUEST = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 1009,
    "channels_list": ["A:B"],
}
#: The app's own background reconciler never judges within the test.
PATIENT = ReconcilePolicy(interval=0.5, grace=3600)


async def test_an_acknowledged_job_without_its_final_event_ends_on_the_embedded_queue(
    settings: Settings, raw_dir: Path, tmp_path: Path, aiohttp_client: Any
) -> None:
    transport = EmbeddedTransport(tmp_path / "queue.sqlite")
    client = await aiohttp_client(create_app(settings, transport, PATIENT))
    for _ in range(2):
        assert (await client.post("/retrieve_from_buffers", json=REQUEST)).status == 200
    app = client.app
    reconciler = Reconciler(
        transport,
        app[STATUS],
        app[HANDOVER].waiting_job_ids,
        BROKER_STATUS_QUEUE,
        ReconcilePolicy(grace=0),  # judged on the second look
    )
    assert await transport.job_queue_depths() == {
        kind: (2 if kind is SourceKind.DATABUFFER else 0, 0) for kind in SourceKind
    }
    for _ in range(3):
        assert await reconciler.check() == []  # both wait in the queue: alive
    consumer = transport.consume_jobs(SourceKind.DATABUFFER, prefetch=2)
    taken = [await asyncio.wait_for(consumer.__anext__(), 60) for _ in range(2)]
    for delivery in taken:  # acknowledged, then the process was killed: events lost
        await delivery.ack()
    await consumer.aclose()
    first, second = (delivery.job for delivery in taken)
    owner = dead_owner()
    killed = {"job_id": first.job_id, "owner": owner, "state": "running", "reason": ""}
    lease_path(first).write_text(json.dumps(killed))
    partial = Path(first.output_file).with_name(f".{Path(first.output_file).name}.x.partial")
    partial.write_bytes(b"half a file")
    Path(second.output_file).write_bytes(b"run 2")  # published; its final event never came

    assert await reconciler.check() == []  # first look: suspects
    assert sorted(await reconciler.check()) == sorted([first.job_id, second.job_id])

    store = app[STATUS]
    (one,) = store.run_status("p12345", 1)
    assert one["state"] == "failed"
    assert one["error"].startswith(f"lost: its worker {owner} is gone (lease ")
    assert one["error"].endswith(
        "s old) and the databuffer queue does not hold it; no file was written, "
        "send the request again"
    )
    assert not lease_path(first).exists()
    assert partial_files(Path(first.output_file)) == []
    (two,) = store.run_status("p12345", 2)
    assert (two["state"], two["message"]) == (
        "done",
        f"written ({second.output_file}), but its worker's final status never arrived: "
        "completeness not known",
    )
