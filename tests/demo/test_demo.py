"""``sf-daq-broker demo`` as a newcomer runs it: a real process, its exit status and its report.

Small runs (200 pulses) keep these fast; the default run is the same code with more pulses.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sf_daq_broker.jobs import FILE_SUFFIX, SourceKind
from sf_daq_broker.workers.cli import SOURCE_CLASSES
from tests.support import PATIENCE, wait_until

REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "sf_daq_broker", "demo"]
pytestmark = pytest.mark.slow


def run_demo(*options: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEMO, *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def workspace_of(stdout: str) -> Path:
    match = re.search(r"^workspace\s+(\S+)$", stdout, re.MULTILINE)
    assert match, stdout
    return Path(match.group(1))


def expected_files() -> list[str]:
    """The data files a small default run writes, given the workers registered today."""
    files = [
        f"demo/run_000001.{FILE_SUFFIX[kind]}.h5" for kind in FILE_SUFFIX if kind in SOURCE_CLASSES
    ]
    if SourceKind.DETECTOR in SOURCE_CLASSES:
        files += ["demo/run_000001.JF13T01V01.h5", "demo/run_000001.JF06T04V02.h5"]
    return files


def assert_passing_report(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "accepted    run 1 (request_id " in out
    assert "    Result of consistency check (summary) : True" in out
    assert out.rstrip().endswith("demo passed")
    for name in expected_files():
        assert re.search(rf"^    {re.escape(name)}\s+\d", out, re.MULTILINE), (name, out)
    sources = re.findall(r"^    (\S+)\s+done\s+complete: ", out, re.MULTILINE)
    assert len(sources) == len(expected_files())
    for kind in SourceKind:
        if kind not in SOURCE_CLASSES:
            assert f"no {kind.value} worker is registered yet" in out
    assert re.search(r"^time taken: \d+\.\d s \(start-up ", out, re.MULTILINE)


def test_small_run_passes_on_the_embedded_queue() -> None:
    result = run_demo("--pulses", "200")
    assert_passing_report(result)
    assert "(embedded queue)" in result.stdout
    assert not workspace_of(result.stdout).exists()  # the temporary directory is gone


@pytest.mark.rabbitmq
def test_small_run_passes_on_rabbitmq(amqp_url: str, amqp_prefix: str) -> None:
    result = run_demo("--pulses", "200", "--amqp-url", amqp_url, "--amqp-prefix", amqp_prefix)
    assert_passing_report(result)
    assert f"(RabbitMQ at {amqp_url})" in result.stdout


def test_bad_options_exit_2_before_starting_anything() -> None:
    result = run_demo("--pulses", "0", timeout=60)
    assert result.returncode == 2
    assert "--pulses must be between 1 and 60000" in result.stderr
    assert "workspace" not in result.stdout


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def test_ctrl_c_mid_run_stops_everything(tmp_path: Path) -> None:
    # The buffers answer a minute late: the run is certainly still going when Ctrl-C comes.
    with subprocess.Popen(
        [*DEMO, "--pulses", "200", "--buffer-delay", "60", "--no-detectors"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        lines: queue.Queue[str] = queue.Queue()
        seen: list[str] = []
        assert process.stdout is not None
        stdout = process.stdout
        reader = threading.Thread(target=lambda: list(map(lines.put, stdout)))
        reader.start()

        def accepted() -> bool:
            while not lines.empty():
                seen.append(lines.get())
            return any(line.startswith("accepted    run 1") for line in seen)

        try:
            wait_until(accepted, timeout=2 * PATIENCE, what="the demo's run to be accepted")
            children = _children(process.pid)
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):  # checked below, with the output
                process.wait(timeout=2 * PATIENCE)
            status = process.poll()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join()
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert status == 130, f"exit status {status} {2 * PATIENCE} s after Ctrl-C; output:\n{out}"
    assert "interrupted: stopping the workers, the broker and the buffers" in out
    assert "demo passed" not in out
    assert "Traceback" not in out
    assert not workspace_of(out).exists()
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_dead_rabbitmq_is_said_once(tmp_path: Path) -> None:
    """Only the cause: no warning about queues that were never made."""
    url = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    result = run_demo("--pulses", "20", "--no-detectors", "--amqp-url", url, timeout=120)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()  # one line: no library log, no cleanup warning
    assert line.startswith(f"demo failed: RabbitMQ at {url} is not reachable: ")
    assert "could not be removed" not in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("kept ")


def test_ctrl_c_on_an_idle_stay_exits_130() -> None:
    with subprocess.Popen(
        [*DEMO, "--pulses", "20", "--no-detectors", "--no-cameras", "--stay"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        lines: queue.Queue[str] = queue.Queue()
        seen: list[str] = []
        assert process.stdout is not None
        stdout = process.stdout
        reader = threading.Thread(target=lambda: list(map(lines.put, stdout)))
        reader.start()

        def ready() -> bool:
            while not lines.empty():
                seen.append(lines.get())
            return any(line.startswith("ready: ") for line in seen)

        try:
            wait_until(ready, timeout=2 * PATIENCE, what="the demo to stay ready")
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=2 * PATIENCE) == 130
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join()
    while not lines.empty():
        seen.append(lines.get())
    assert "demo passed\n" in seen
    assert seen[-1] == "stopping (Ctrl-C)\n"
