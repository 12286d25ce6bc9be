"""Helpers for tests: wait for a condition with a timeout instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from aiohttp.test_utils import TestClient

    from sf_daq_broker.transport import DeadLetter, Transport

#: How long a test waits for a condition by default: generous, so that a loaded machine (two
#: cores, several test runs at once) is slow but never fails; a passing test does not wait it.
PATIENCE = 60.0


def wait_until(
    condition: Callable[[], Any], timeout: float = PATIENCE, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def async_wait_until(
    condition: Callable[[], Any], timeout: float = PATIENCE, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def simulation_config(
    tmp_path: Any, detectors: list[Any], *, speed: float = 1.0, **jungfrau: Any
) -> Any:
    """A simulation with every service on a free port and its Jungfrau buffer and calibration
    files in ``tmp_path`` (``detectors``: names or DetectorSpec; ``jungfrau``: more keys of
    its [jungfrau] table)."""
    from sf_daq_broker.simulation.config import (
        Api1Config,
        ArchiverConfig,
        ClockConfig,
        JungfrauConfig,
        ServerConfig,
        SimulationConfig,
    )
    from sf_daq_broker.simulation.jungfrau_writer import DetectorSpec

    specs = [d if isinstance(d, DetectorSpec) else DetectorSpec(name=d) for d in detectors]
    return SimulationConfig(
        clock=ClockConfig(speed=speed),
        databuffer=Api1Config(port=0),
        imagebuffer=Api1Config(port=0),
        archiver=ArchiverConfig(port=0),
        control=ServerConfig(port=0),
        jungfrau=JungfrauConfig(
            buffer_root=tmp_path / "buffer",
            calibration_root=tmp_path / "calibration",
            detectors=specs,
            **jungfrau,
        ),
    )


def dead_owner() -> str:
    """The owner of a job lease whose process is gone (what a SIGKILLed worker leaves)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:12345:dead"


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``where`` (created if missing; an existing directory is hidden
    under it) with mount ``options`` (e.g. ``size=1m``), unmounted on leaving, whatever
    happened. Mounting needs root: without it the test is skipped, but fails when ``CI`` is
    set, so that a green CI means a full disk was really exercised."""
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set")
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory: Path) -> None:
    """Write files until the file system refuses (bytes or inodes)."""
    for index in range(100_000):
        try:
            with open(directory / f"filler{index}", "wb") as handle:
                handle.write(b"x" * 65536)
        except OSError:
            return
    raise AssertionError("the file system never filled up")


async def dead_letters(
    transport: Transport, what: str = "the job in the dead-letter queue"
) -> list[DeadLetter]:
    """The transport's dead letters, once there is one."""
    dead: list[DeadLetter] = []

    async def dead_lettered() -> bool:
        dead.extend(await transport.take_dead_letters())
        return bool(dead)

    await async_wait_until(dead_lettered, what=what)
    return dead


async def ended_run_status(
    client: TestClient[Any, Any], run: int, pgroup: str = "p12345"
) -> dict[str, Any] | None:
    """The run's /run_status if the run has ended (done, failed or incomplete), else None: a
    condition for ``async_wait_until``."""
    response = await client.get("/run_status", params={"pgroup": pgroup, "run_number": run})
    document: dict[str, Any] = await response.json()
    ended = document.get("run_state") in ("done", "failed", "incomplete")
    return document if response.status == 200 and ended else None
