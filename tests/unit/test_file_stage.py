"""FileStage: calls in order on one thread of their own, a bounded queue, errors and closing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sf_daq_broker.workers.file_stage import FileStage
from tests.support import PATIENCE


async def test_calls_run_in_order_on_one_thread_off_the_event_loop() -> None:
    stage = FileStage(budget=1 << 20)
    seen: list[tuple[int, str]] = []
    for index in range(20):
        await stage.submit(10, lambda i=index: seen.append((i, threading.current_thread().name)))
    assert await stage.call(lambda: "result") == "result"
    assert [index for index, _ in seen] == list(range(20))
    (thread,) = {name for _, name in seen}
    assert thread.startswith("h5-writer") and thread != threading.current_thread().name
    await stage.close()


async def test_a_producer_waits_while_the_budget_is_used() -> None:
    stage = FileStage(budget=15)
    started, release = threading.Event(), threading.Event()

    def blocking() -> None:
        started.set()
        release.wait(30)

    await stage.submit(10, blocking)  # within the budget: returns at once
    await asyncio.to_thread(started.wait, 30)
    second = asyncio.create_task(stage.submit(10, lambda: None))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not second.done()  # 20 bytes would wait: it waits for the first call
    release.set()
    await asyncio.wait_for(second, PATIENCE)
    await stage.close()


async def test_a_failed_call_fails_the_next_submit() -> None:
    stage = FileStage()

    def fail() -> None:
        raise OSError("disk full")

    await stage.submit(1, fail)
    with pytest.raises(OSError, match="disk full"):
        await stage.drain()
    await stage.close()


async def test_close_drops_what_has_not_started_and_runs_the_final_call_last() -> None:
    stage = FileStage()
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def running() -> None:
        started.set()
        release.wait(30)
        order.append("running")

    await stage.submit(1, running)
    await stage.submit(1, lambda: order.append("queued"))
    await asyncio.to_thread(started.wait, 30)
    closing = asyncio.create_task(stage.close(lambda: order.append("final")))
    for _ in range(10):
        await asyncio.sleep(0)
    closing.cancel()  # a job cancelled while its file is being closed
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert order == ["running", "final"]  # closed before the canceller went on
