"""Settings: one TOML file (configs/sf-daq-broker.toml) overridden by environment variables.

Configuration is data: beamlines and their subnets, detectors and the beamline each belongs to,
buffer addresses and the data root live in the file, never in code. A broken file stops start-up
with a message naming the file and the key, because a broker that starts with a half-understood
configuration could write runs into the wrong place.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)

from sf_daq_broker.defaults import BROKER_CONFIG, default_config

IPNetwork = IPvAnyNetwork

DETECTOR_NAME = re.compile(r"^JF(\d\d)T(\d\d)V(\d\d)$")
#: The largest pulse id the buffers can hold: their pulse ids are signed 64-bit, and a channel
#: job's range is widened by one pulse (SPEC §3), which must still fit.
PULSE_ID_LIMIT = 2**63 - 2

#: Environment variables that override the file, with the key each one sets.
ENV_OVERRIDES: dict[str, str] = {
    "SF_DAQ_DATA_ROOT": "data_root",
    "SF_DAQ_AMQP_URL": "amqp_url",
    "SF_DAQ_REST_PORT": "rest_port",
    "SF_DAQ_LOCAL_BEAMLINE": "local_beamline",
    "SF_DAQ_AMQP_PREFIX": "amqp_prefix",
    "SF_DAQ_STATE_DIR": "state_dir",
}
CONFIG_ENV = "SF_DAQ_CONFIG"
DEFAULT_CONFIG = default_config(BROKER_CONFIG)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    # A typo in a key must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BeamlineConfig(_Strict):
    subnets: list[IPNetwork] = Field(min_length=1)


class DetectorConfig(_Strict):
    beamline: str
    gain_file: Path | None = None
    #: The pedestal used until one is taken with /take_pedestal (see PedestalConfig).
    pedestal_file: Path | None = None
    #: Shown by /get_allowed_detectors (upstream's ``descriptions``, ``visualisation_address``).
    description: str = ""
    visualisation_address: str = ""
    #: Modules allowed to be in the wrong gain in a pedestal frame that is still used (a
    #: detector with broken modules would otherwise have every frame dropped; UPSTREAM_HEAD §4).
    number_bad_modules: int = Field(default=0, ge=0)


class BufferConfig(_Strict):
    databuffer_url: str = "http://127.0.0.1:8371"
    imagebuffer_url: str = "http://127.0.0.1:8372"
    archiver_url: str = "http://127.0.0.1:8373"
    jungfrau_root: Path = Path("/gpfs/photonics/swissfel/buffer")
    #: Control endpoint of a simulated Jungfrau buffer in lazy mode (``sf-daq-broker simulate``):
    #: the detector worker asks it to write the records it is about to read. Empty in
    #: production, where the detectors write the buffer themselves.
    jungfrau_control_url: str = ""
    #: How long after the time of ``stop`` a worker waits for late data before it reports the
    #: rest as missing.
    ingestion_window_s: float = Field(default=60.0, ge=0)
    #: How many pulses back the api/1 buffers keep; a range starting further back fails at once.
    databuffer_retention_pulses: int = Field(default=360_000, ge=1)
    imagebuffer_retention_pulses: int = Field(default=360_000, ge=1)


class DetectorControlConfig(_Strict):
    #: Where the detectors are controlled: the simulation's control endpoint
    #: (``sf-daq-broker simulate``). Empty: no detector control (the detector endpoints and
    #: /take_pedestal answer 503).
    url: str = ""
    timeout_s: float = Field(default=10.0, gt=0)


class PedestalConfig(_Strict):
    """``/take_pedestal``: how long each gain stage lasts and where new pedestals go."""

    #: Installed pedestal files, ``{root}/{DET}/{YYYYmmdd_HHMMSS}.h5``; the newest file of a
    #: detector is the one its conversions use. Default ``{data_root}/jungfrau/data/pedestal``.
    root: Path | None = None
    #: Frames per gain stage of the manual procedure (G0, G1, G2), at the request's rate.
    frames_per_stage: int = Field(default=1000, ge=1)
    #: The detector's pedestal mode: frames per stage and loops.
    mode_frames: int = Field(default=50, ge=1, le=255)
    mode_loops: int = Field(default=200, ge=1, le=65535)
    #: Seconds to wait after switching back to dynamic gain before the first stage counts.
    settle_s: float = Field(default=1.0, ge=0)


class ServiceFilesConfig(_Strict):
    """Files of the facility's other services that the broker edits."""

    #: The EPICS buffer's PV list per beamline: ``{pv_list_dir}/sf.{beamline}.epics_buffer.json``.
    pv_list_dir: Path = Path("/home/dbe/service_configs")
    #: DAP parameters per detector: ``{dap_config_dir}/pipeline_parameters.{DET}.json``,
    #: backups in ``{dap_config_dir}/backup/``.
    dap_config_dir: Path = Path("/gpfs/photonics/swissfel/buffer/dap/config")


class Settings(_Strict):
    data_root: Path = Path("/sf")
    rest_port: int = Field(default=10002, ge=1, le=65535)
    amqp_url: str = ""
    amqp_prefix: str = Field(default="sf-daq", pattern=r"^[A-Za-z0-9_.-]+$")
    local_beamline: str | None = None
    trusted_proxies: list[IPNetwork] = []
    max_pulse_range: int = Field(default=60000, ge=0)
    #: Sanity bounds of pulse ids in requests. The default maximum, 2**53 - 1, is the largest
    #: integer every JSON client (a float) represents exactly; at 100 Hz it is reached in 2.8
    #: million years. The buffers cannot hold more than ``PULSE_ID_LIMIT``.
    min_pulse_id: int = Field(default=0, ge=0, le=PULSE_ID_LIMIT)
    max_pulse_id: int = Field(default=2**53 - 1, ge=0, le=PULSE_ID_LIMIT)
    #: How far ahead of the buffers a range may end (30000 pulses: 5 minutes); further is a
    #: typo, refused at the door (and failed by a detector worker that meets one).
    max_pulses_ahead: int = Field(default=30000, ge=0)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: Free space a pgroup's raw/ must have for a request to be accepted (bytes); below it the
    #: broker answers 507 before a run number is spent, and /health reports the data root.
    min_free_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    detector_stale_seconds: float = Field(default=30.0, gt=0)
    #: The broker's own state (the job status store); survives restarts.
    state_dir: Path = Field(default=Path("~/.local/state/sf-daq-broker"), validate_default=True)
    beamlines: dict[str, BeamlineConfig] = {}
    buffers: BufferConfig = BufferConfig()
    detectors: dict[str, DetectorConfig] = {}
    detector_control: DetectorControlConfig = DetectorControlConfig()
    pedestals: PedestalConfig = PedestalConfig()
    service_files: ServiceFilesConfig = ServiceFilesConfig()
    #: The file these settings came from (for messages), not a key of the file.
    source: str = Field(default="<defaults>", exclude=True)

    @field_validator("local_beamline", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("state_dir", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        if self.min_pulse_id > self.max_pulse_id:
            raise ValueError(
                f"min_pulse_id {self.min_pulse_id} is above max_pulse_id {self.max_pulse_id}"
            )
        if self.local_beamline is not None and self.local_beamline not in self.beamlines:
            raise ValueError(
                f"local_beamline {self.local_beamline!r} is not one of the configured beamlines "
                f"({', '.join(sorted(self.beamlines)) or 'none'})"
            )
        for name, detector in self.detectors.items():
            if not DETECTOR_NAME.match(name):
                raise ValueError(f"detectors.{name}: name does not match JFxxTyyVzz")
            if detector.beamline not in self.beamlines:
                raise ValueError(
                    f"detectors.{name}.beamline: {detector.beamline!r} is not a configured beamline"
                )
        return self

    @property
    def uses_amqp(self) -> bool:
        return bool(self.amqp_url)

    def detectors_of(self, beamline: str) -> list[str]:
        """Detectors the given beamline may retrieve, sorted by name."""
        return sorted(name for name, det in self.detectors.items() if det.beamline == beamline)

    @property
    def pedestal_root(self) -> Path:
        """Where /take_pedestal installs new pedestal files (one directory per detector)."""
        return self.pedestals.root or self.data_root / "jungfrau" / "data" / "pedestal"

    def pgroup_raw_dir(self, beamline: str, pgroup: str) -> Path:
        return self.data_root / beamline / "data" / pgroup / "raw"


def _format_validation_error(
    source: str, error: ValidationError, from_environment: Mapping[str, str]
) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        top = str(item["loc"][0]) if item["loc"] else ""
        if top in from_environment:
            key += f" (from ${from_environment[top]})"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{source}: {key}: {message}")
    return "invalid configuration: " + "; ".join(problems)


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read the configuration file, apply environment variables, then explicit overrides.

    The file is ``path``, else ``$SF_DAQ_CONFIG``, else ``configs/sf-daq-broker.toml`` of the
    source tree. Explicit ``overrides`` (e.g. from command-line options) win over everything.
    """
    env = os.environ if environ is None else environ
    config_path = Path(path or env.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        with config_path.open("rb") as handle:
            raw: dict[str, Any] = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {config_path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {config_path} cannot be read: {exc}") from None

    from_environment = {key: var for var, key in ENV_OVERRIDES.items() if var in env}
    for key, variable in from_environment.items():
        raw[key] = env[variable]
    raw.update({key: value for key, value in overrides.items() if value is not None})
    raw["source"] = str(config_path)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            _format_validation_error(str(config_path), exc, from_environment)
        ) from None
