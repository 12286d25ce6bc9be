"""docker-compose.yml and the Dockerfile, checked as far as this machine allows (no Docker engine).

Every command is parsed by the real ``sf-daq-broker`` parser, every configuration file it names
is loaded by the real loaders, every SF_DAQ_ variable is one the configuration knows, and the
paths and addresses the services share agree with each other.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from sf_daq_broker.cli import build_parser
from sf_daq_broker.config import CONFIG_ENV, ENV_OVERRIDES, Settings, load_settings
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.simulation.calibration import calibration_paths
from sf_daq_broker.simulation.config import SimulationConfig, load_simulation_config
from sf_daq_broker.workers.cli import SOURCE_CLASSES

REPO = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BUILT = {name: s for name, s in SERVICES.items() if "build" in s}
#: Where the Dockerfile puts the checkout.
APP = PurePosixPath("/app")
CONSOLE_SCRIPTS = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
#: Commands of one-shot services that are not ours (they must not restart).
ONE_SHOT_COMMANDS = {"mkdir"}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def in_repo(container_path: str) -> Path:
    """The checkout file a path inside the image comes from."""
    return REPO / PurePosixPath(container_path).relative_to(APP)


def settings_of(service: dict[str, Any]) -> Settings:
    environment = {k: str(v) for k, v in service["environment"].items()}
    return load_settings(in_repo(environment[CONFIG_ENV]), environ=environment)


def simulation() -> tuple[SimulationConfig, list[str]]:
    command = command_of(SERVICES["simulators"])
    return load_simulation_config(in_repo(option(command, "--config"))), command


def test_the_services_are_rabbitmq_simulators_broker_and_one_worker_per_kind() -> None:
    workers = {f"worker-{kind.value}" for kind in SourceKind}
    assert set(SERVICES) == {"rabbitmq", "simulators", "pgroup", "broker"} | workers
    rabbitmq = SERVICES["rabbitmq"]
    assert rabbitmq["image"] == "rabbitmq:3-management"
    assert {"5672:5672", "15672:15672"} <= set(rabbitmq["ports"])  # AMQP and management UI
    for kind in SourceKind:
        assert command_of(SERVICES[f"worker-{kind.value}"])[:3] == [
            "sf-daq-broker",
            "worker",
            kind.value,
        ]


@pytest.mark.parametrize("name", sorted(BUILT))
def test_every_command_is_a_console_command_the_real_parser_accepts(name: str) -> None:
    service = BUILT[name]
    command = command_of(service)
    if command[0] in ONE_SHOT_COMMANDS:
        assert service["restart"] == "no"
        return
    assert command[0] in CONSOLE_SCRIPTS
    assert command[0] == "sf-daq-broker"
    if command[1] == "worker" and SourceKind(command[2]) not in SOURCE_CLASSES:
        pytest.skip(f"the {command[2]} worker is not registered yet (workers/cli.py)")
    args = build_parser().parse_args(command[1:])  # SystemExit (a failure) if it does not parse
    assert callable(args.func)


@pytest.mark.parametrize("name", sorted(BUILT))
def test_configuration_files_exist_and_load_and_variables_are_known(name: str) -> None:
    service = BUILT[name]
    environment = service["environment"]
    known = set(ENV_OVERRIDES) | {CONFIG_ENV}
    assert {v for v in environment if v.startswith("SF_DAQ_")} <= known
    assert set(environment) <= known
    assert in_repo(environment[CONFIG_ENV]).is_file()
    settings = settings_of(service)  # every value valid, e.g. the port and the URL
    assert settings.uses_amqp
    assert urlparse(settings.amqp_url).hostname == "rabbitmq"
    command = command_of(service)
    if "--config" in command:
        assert in_repo(option(command, "--config")).is_file()


def test_every_service_has_a_healthcheck_except_one_shot_ones() -> None:
    for name, service in SERVICES.items():
        if service.get("restart") == "no":
            assert "healthcheck" not in service
            dependants = [s for s in SERVICES.values() if name in s.get("depends_on", {})]
            assert dependants
            for dependant in dependants:
                condition = dependant["depends_on"][name]["condition"]
                assert condition == "service_completed_successfully"
            continue
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert len(check["test"]) > 1 and check["interval"], name


def test_services_depend_on_healthy_services() -> None:
    for name in ("broker", *(f"worker-{kind.value}" for kind in SourceKind)):
        depends = SERVICES[name]["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy"
        assert depends["simulators"]["condition"] == "service_healthy"


def test_one_data_volume_is_shared_by_every_built_service() -> None:
    assert "data" in COMPOSE["volumes"]
    for name, service in BUILT.items():
        assert "data:/data" in service["volumes"], name
        settings = settings_of(service)
        assert PurePosixPath(settings.data_root).is_relative_to("/data")
        assert PurePosixPath(settings.state_dir).is_relative_to("/data")


def test_broker_workers_and_simulators_agree_on_addresses_and_files() -> None:
    config, command = simulation()
    assert option(command, "--host") == "0.0.0.0"
    settings = settings_of(SERVICES["broker"])
    for service, url in (
        ("databuffer", settings.buffers.databuffer_url),
        ("imagebuffer", settings.buffers.imagebuffer_url),
        ("archiver", settings.buffers.archiver_url),
    ):
        parsed = urlparse(url)
        assert parsed.hostname == "simulators"
        assert parsed.port == getattr(config, service).port
        assert f"{parsed.port}:{parsed.port}" in SERVICES["simulators"]["ports"]
    assert str(settings.buffers.jungfrau_root) == option(command, "--buffer-root")
    calibration_root = Path(option(command, "--calibration-root"))
    for detector in config.jungfrau.detectors:
        configured = settings.detectors[detector.name]
        assert configured.beamline == settings.local_beamline
        gain, pedestal = calibration_paths(calibration_root, detector.name)
        assert (configured.gain_file, configured.pedestal_file) == (gain, pedestal)
    pgroup = option(command_of(SERVICES["pgroup"]), "-p")
    assert settings.local_beamline is not None
    assert PurePosixPath(pgroup).is_relative_to(settings.data_root / settings.local_beamline)


def test_broker_port_healthcheck_and_published_port_agree() -> None:
    broker = SERVICES["broker"]
    port = int(option(command_of(broker), "--port"))
    assert f"{port}:{port}" in broker["ports"]
    assert f"http://127.0.0.1:{port}/health" in " ".join(broker["healthcheck"]["test"])


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [line.split()[1:-1] for line in dockerfile if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), source
            assert source not in ignored, source
    assert any(line.startswith("FROM python:3.11") for line in dockerfile)
    assert "configs" in {source for sources in copies for source in sources}
