"""Functions the preview service's tests run in its child process.

They live in a module of their own, not in the test file: the child is spawned, so a function
reaches it by reference (module and name) and must be importable there as ``tests.web.…``.
Files are the signals between the test and the child: the child can open a path, while a
``multiprocessing.Event`` cannot travel through the pool's pipe.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from sf_daq_broker.web.render import PreviewSpec

#: How often the child looks for a file the test makes.
POLL_SECONDS = 0.01


def announce(started: str) -> None:
    """Make the file ``started`` holding the child's pid, whole (written, then renamed)."""
    part = Path(f"{started}.part")
    part.write_text(str(os.getpid()))
    part.rename(started)


def wait_forever(started: str) -> None:
    """A stuck preview (as on a hanging read): says that it started, then never returns."""
    announce(started)
    threading.Event().wait()


def wait_for_gate(started: str, gate: str) -> str:
    """Says that it started, then runs until the test makes the file ``gate``."""
    announce(started)
    while not Path(gate).exists():
        time.sleep(POLL_SECONDS)
    return "opened"


def run_for(seconds: float) -> float:
    """A preview that takes ``seconds`` of its own running time."""
    time.sleep(seconds)
    return seconds


def fail_to_start() -> None:
    """An initializer that fails: the pool cannot start a child."""
    raise RuntimeError("this child does not start")


def draw_forever(spec: PreviewSpec) -> bytes:
    """``render.draw`` stuck on its file, as on a hanging file system."""
    threading.Event().wait()
    raise AssertionError("never here")


def draw_and_die(spec: PreviewSpec) -> bytes:
    """``render.draw`` whose process dies under it, as on a crash."""
    os._exit(3)
