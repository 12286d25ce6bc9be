"""Shared fixtures: settings on a temporary data root, the broker app, and a real RabbitMQ.

RabbitMQ is found through ``SF_DAQ_TEST_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``);
if nothing answers there and a Docker engine exists, a testcontainers RabbitMQ is started;
otherwise the tests that need it are skipped with the reason — unless ``SF_DAQ_REQUIRE_RABBITMQ``
is set (CI sets it), which turns the skip into a failure so a green CI always means RabbitMQ
was really exercised.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from sf_daq_broker.config import Settings, load_settings

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PGROUP = "p12345"
BEAMLINE = "bernina"


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_reaches_child_processes() -> None:
    """Several tests press Ctrl-C in a child process (SIGINT). A process started in the
    background of a non-interactive shell (``script &`` in a script, as some CI runners and
    load tests start the suite) has SIGINT ignored, and children inherit an ignored signal:
    the tests would wait for a reaction that cannot come. A person's terminal never does this,
    so the suite restores Python's own handler, which children do not inherit as ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "sf"
    (root / BEAMLINE / "data" / PGROUP / "raw").mkdir(parents=True)
    return root


@pytest.fixture
def raw_dir(data_root: Path) -> Path:
    return data_root / BEAMLINE / "data" / PGROUP / "raw"


#: Where nothing listens: the shipped configuration points at the simulators' default ports,
#: where someone may run ``sf-daq-broker simulate`` by hand; a test must not ask those.
NO_BUFFER = "http://127.0.0.1:1"


@pytest.fixture
def make_settings(data_root: Path) -> Callable[..., Settings]:
    """Settings of the shipped configuration on the temporary data root; loopback = bernina;
    the buffers' addresses lead nowhere unless a test gives its own ``buffers``."""
    nowhere = dict.fromkeys(("databuffer_url", "imagebuffer_url", "archiver_url"), NO_BUFFER)
    shipped_buffers = load_settings(environ={}).buffers.model_dump(mode="json")

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_root": str(data_root),
            "local_beamline": BEAMLINE,
            "state_dir": str(data_root.parent / "state"),
            "buffers": shipped_buffers | nowhere,
            "detector_control": {"url": NO_BUFFER},  # the simulators' control port, likewise
        }
        if "buffers" in overrides:  # the addresses a test does not give lead nowhere too
            overrides = {**overrides, "buffers": nowhere | overrides["buffers"]}
        values.update(overrides)
        return load_settings(environ={}, **values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _docker_engine_available() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("SF_DAQ_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    parsed = urlparse(url)
    if _port_open(parsed.hostname or "127.0.0.1", parsed.port or 5672):
        yield url
        return
    if _docker_engine_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    reason = f"no RabbitMQ at {url} and no Docker engine for testcontainers"
    if os.environ.get("SF_DAQ_REQUIRE_RABBITMQ"):
        pytest.fail(f"{reason}, but SF_DAQ_REQUIRE_RABBITMQ is set")
    pytest.skip(reason)


@pytest.fixture
def amqp_prefix(amqp_url: str) -> Iterator[str]:
    """A unique exchange/queue prefix per test, deleted afterwards, so tests never share queues."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    asyncio.run(_delete_topology(amqp_url, prefix))


async def _delete_topology(amqp_url: str, prefix: str) -> None:
    import aio_pika

    from sf_daq_broker.transport.amqp import Topology

    async with await aio_pika.connect(amqp_url) as connection:
        await Topology(prefix).delete(await connection.channel())
