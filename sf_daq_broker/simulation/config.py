"""Configuration of ``sf-daq-broker simulate``: one TOML file (configs/simulation.toml).

Configuration is data: channels, cameras, PVs and detectors are listed in the file, so a test
or a demo that needs another channel adds a table, not code. Unknown keys are errors — a typo
must not silently give a channel another type.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sf_daq_broker.defaults import SIMULATION_CONFIG, default_config
from sf_daq_broker.simulation.api1_server import DEFAULT_RETENTION_PULSES as API1_RETENTION
from sf_daq_broker.simulation.archiver import PvSpec
from sf_daq_broker.simulation.channels import ChannelSpec
from sf_daq_broker.simulation.clock import DEFAULT_START_PULSE_ID
from sf_daq_broker.simulation.jungfrau_writer import (
    DEFAULT_RETENTION_PULSES as JUNGFRAU_RETENTION,
)
from sf_daq_broker.simulation.jungfrau_writer import DetectorSpec

DEFAULT_CONFIG = default_config(SIMULATION_CONFIG)


class SimulationConfigError(Exception):
    """The simulation configuration cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClockConfig(_Strict):
    start_pulse_id: int = Field(default=DEFAULT_START_PULSE_ID, ge=0)
    #: Epoch milliseconds of the start pulse; None = the wall-clock time at start-up.
    t0_ms: int | None = None
    #: How much faster than real time the pulses come (1 = 100 Hz); tests that wait for
    #: buffer files to close use more. Timestamps keep their 10 ms per pulse.
    speed: float = Field(default=1.0, gt=0, le=1000)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)


class Api1Config(ServerConfig):
    ingestion_lag_pulses: int = Field(default=0, ge=0)
    retention_pulses: int = Field(default=API1_RETENTION, ge=1)
    channels: list[ChannelSpec] = []


class ArchiverConfig(ServerConfig):
    pvs: list[PvSpec] = []
    #: Record exactly the PVs of the EPICS buffer's lists in this directory
    #: (``sf.{beamline}.epics_buffer.json``, written by the broker's /set_pvlist).
    pv_list_dir: Path | None = None


class JungfrauConfig(_Strict):
    buffer_root: Path = Path("/tmp/sf-daq-sim/jungfrau")
    calibration_root: Path = Path("/tmp/sf-daq-sim/calibration")
    retention_pulses: int = Field(default=JUNGFRAU_RETENTION, ge=1000)
    mode: Literal["eager", "lazy"] = "lazy"
    detectors: list[DetectorSpec] = []


class SimulationConfig(_Strict):
    clock: ClockConfig = ClockConfig()
    databuffer: Api1Config = Api1Config(port=8371)
    imagebuffer: Api1Config = Api1Config(port=8372)
    archiver: ArchiverConfig = ArchiverConfig(port=8373)
    control: ServerConfig = ServerConfig(port=8374)
    jungfrau: JungfrauConfig = JungfrauConfig()
    #: The file these settings came from (for messages).
    source: str = Field(default="<defaults>", exclude=True)


def load_simulation_config(path: str | Path | None = None) -> SimulationConfig:
    """Read ``path`` (default configs/simulation.toml of the source tree)."""
    config_path = Path(path) if path else DEFAULT_CONFIG
    try:
        with config_path.open("rb") as handle:
            raw: dict[str, Any] = tomllib.load(handle)
    except OSError as exc:
        raise SimulationConfigError(f"cannot read {config_path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SimulationConfigError(f"{config_path}: not valid TOML: {exc}") from exc
    try:
        return SimulationConfig(**raw, source=str(config_path))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in exc.errors()
        )
        raise SimulationConfigError(f"{config_path}: {problems}") from exc
