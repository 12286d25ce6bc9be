"""The durable outbox and its sender: order, retries, one process per file, adoption."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sf_daq_broker.transport.outbox import Entry, Outbox
from sf_daq_broker.transport.outbox_sender import OutboxSender, RetryTiming
from tests.support import async_wait_until

QUICK = RetryTiming(first=0.01, factor=2, longest=0.05)


def test_entries_come_out_in_the_order_they_went_in(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite")
    outbox.put([("a", b"1"), ("b", b"2")])
    outbox.put([("a", b"3")])
    entries = outbox.head()
    assert [(e.key, e.body) for e in entries] == [("a", b"1"), ("b", b"2"), ("a", b"3")]
    outbox.remove([entries[0].seq])
    backlog = outbox.backlog()
    assert (outbox.count, backlog.count, outbox.keys()) == (2, 2, {"a", "b"})
    assert backlog.oldest_added_at == entries[1].added_at
    outbox.close()
    reopened = Outbox(tmp_path / "o.sqlite")  # what a restart finds
    assert [(e.key, e.body) for e in reopened.head()] == [("b", b"2"), ("a", b"3")]
    reopened.close()


def test_an_empty_outbox_has_no_oldest_entry() -> None:
    outbox = Outbox()
    assert (outbox.backlog().count, outbox.backlog().oldest_age()) == (0, None)
    outbox.close()


def test_each_process_claims_its_own_file_and_adopts_abandoned_ones(tmp_path: Path) -> None:
    first = Outbox.claim(tmp_path, "status")
    second = Outbox.claim(tmp_path, "status")
    assert (first.path, second.path) == (tmp_path / "status.0.sqlite", tmp_path / "status.1.sqlite")
    second.put([("job", b"late event 1"), ("job", b"late event 2")])
    second.close()  # its process is gone: the file is free
    first.close()
    third = Outbox.claim(tmp_path, "status")
    assert third.path == tmp_path / "status.0.sqlite"
    assert [e.body for e in third.head()] == [b"late event 1", b"late event 2"]
    assert sorted(p.name for p in tmp_path.glob("*.sqlite")) == ["status.0.sqlite"]
    third.close()


async def test_the_sender_retries_until_confirmed_in_order() -> None:
    outbox = Outbox()
    outbox.put([(f"k{n}", str(n).encode()) for n in range(5)])
    sent: list[bytes] = []
    confirmed: list[bytes] = []
    failures = iter([True, False, False, True, True])  # RabbitMQ away now and then

    async def send(entry: Entry) -> None:
        if next(failures, False):
            raise ConnectionError("connection lost")
        sent.append(entry.body)

    async def on_confirmed(entries: list[Entry]) -> None:
        confirmed.extend(entry.body for entry in entries)

    sender = OutboxSender(outbox, send, "things", str, on_confirmed, QUICK)
    sender.wake()
    await async_wait_until(lambda: outbox.count == 0, what="the outbox empty")
    assert sent == confirmed == [b"0", b"1", b"2", b"3", b"4"]
    await sender.close()
    outbox.close()


async def test_entries_put_while_the_sender_waits_are_sent_too() -> None:
    outbox = Outbox()
    gate = asyncio.Event()
    sent: list[bytes] = []

    async def send(entry: Entry) -> None:
        if not gate.is_set():
            raise ConnectionError("connection refused")
        sent.append(entry.body)

    sender = OutboxSender(outbox, send, "things", str, timing=QUICK)
    outbox.put([("a", b"1")])
    sender.wake()
    await async_wait_until(lambda: sender.failing, what="a failed try")
    outbox.put([("a", b"2")])
    sender.wake()
    gate.set()
    await async_wait_until(lambda: outbox.count == 0, what="the outbox empty")
    assert sent == [b"1", b"2"]
    await sender.close()
    outbox.close()
