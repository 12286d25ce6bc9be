"""A private RabbitMQ node for the tests that stop, break or reconfigure RabbitMQ.

The shared server (``amqp_url``) is used by every test at once: a test must never stop it or
change its settings. A test that needs an outage (``stop_app``/``start_app``) or a server-wide
setting (``consumer_timeout``) gets its own node instead: a unique node name, free ports, its
own mnesia, log and configuration files (the system's ``/etc/rabbitmq`` files are not read: they
name the shared server's port) and its own Erlang cookie (``HOME`` points into the node's
directory), started with ``rabbitmq-server -detached`` and stopped and removed at teardown.

Without ``rabbitmq-server`` the tests that need a private node are skipped with the reason,
unless ``SF_DAQ_REQUIRE_RABBITMQ`` is set (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

#: Where Debian's packages keep the real scripts (``/usr/sbin``'s wrappers switch to the
#: rabbitmq user when run as root, which could not read the node's temporary directory).
DEBIAN_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _scripts() -> Path | None:
    if (DEBIAN_SCRIPTS / "rabbitmq-server").exists():
        return DEBIAN_SCRIPTS
    found = shutil.which("rabbitmq-server")
    return Path(found).resolve().parent if found else None


class PrivateRabbitMQ:
    """One RabbitMQ node of this test session (see the module docstring)."""

    def __init__(self, scripts: Path, base: Path) -> None:
        self.scripts = scripts
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.node = f"sfdaq-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "disk_free_limit.absolute = 1MB\n"
            "log.console = false\n"
        )
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": str(base),  # the node's own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n NODE args…``; its output, or RuntimeError with its error output."""
        done = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def start(self) -> None:
        subprocess.run(
            [str(self.scripts / "rabbitmq-server"), "-detached"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.await_startup()

    def await_startup(self) -> None:
        """Until the node runs RabbitMQ (``await_startup`` fails at once while the Erlang
        node itself is not up yet, so it is asked again until the deadline)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.ctl("await_startup", "--timeout", "60")
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)  # the next try of a command that failed at once, not a sync point

    def stop_app(self) -> None:
        """RabbitMQ stops (connections are closed, the port refuses), the Erlang node stays."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.await_startup()

    def stop(self) -> None:
        """Stop the node; if it does not stop, end it by its pid (ours alone)."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60)
        pid_file = self.base / "node.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)


def private_node_or_skip(base: Path) -> Generator[PrivateRabbitMQ, None, None]:
    """Start a private node in ``base`` for as long as the generator runs."""
    scripts = _scripts()
    if scripts is None:
        reason = "rabbitmq-server is not installed: no private RabbitMQ node for outage tests"
        if os.environ.get("SF_DAQ_REQUIRE_RABBITMQ"):
            pytest.fail(f"{reason}, but SF_DAQ_REQUIRE_RABBITMQ is set")
        pytest.skip(reason)
    node = PrivateRabbitMQ(scripts, base)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def private_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this session alone; a test that stops its app starts it again."""
    yield from private_node_or_skip(tmp_path_factory.mktemp("rabbitmq"))
