"""The HTTP API's request models: what each endpoint reads, for the OpenAPI document.

The rules themselves, with the messages users rely on, are the hand-written parsers
(``retrieval.parse_retrieve_request``, ``parse_integer``, ``check_pgroup_name``,
``clean_relative_path``); these models describe the same keys with the same constants, so that
the document cannot drift from them:

- the detector options are the ``DetectorOptions`` dataclass itself (its schema is generated
  from it: a new option appears in the document by being added there, nowhere else);
- the limits are the parsers' constants (``RATE_MULTIPLICATORS``, ``CAMERA_SUFFIX``,
  ``COMPONENT_MAX``, the pulse-id bounds of the settings, ``MAX_RUN_NUMBER``);
- ``RetrieveBody``'s fields are the top-level keys the broker interprets, in the parser's
  order (``tests/unit/test_openapi.py`` sends each one a wrong value and checks the parser's
  message names it, so a key documented here and not parsed, or the reverse, fails a test).

Adding a top-level key: one field here (type, description), its parsing in ``retrieval``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema

from sf_daq_broker.bookkeeping.paths import COMPONENT_MAX, PGROUP_PATTERN
from sf_daq_broker.config import PULSE_ID_LIMIT
from sf_daq_broker.detector_control.interface import SETTING_NAMES
from sf_daq_broker.retrieval import (
    CAMERA_SUFFIX,
    DETECTOR_OPTION_KEYS,
    OPTION_ALIASES,
    RATE_MULTIPLICATORS,
    DetectorOptions,
)
from sf_daq_broker.run_options import LOG_LEVELS

#: Run numbers are stored as signed 64-bit integers (SQLite, the run JSON's readers).
MAX_RUN_NUMBER = 2**63 - 1

Pgroup = Annotated[
    str,
    Field(pattern=PGROUP_PATTERN.pattern, description="the pgroup, 'p' and 5 digits (p12345)"),
]
PulseId = Annotated[
    int,
    Field(
        ge=0,
        le=PULSE_ID_LIMIT,
        description="a pulse id (the configured sanity bounds may be narrower; a string "
        "holding an integer is accepted too)",
    ),
]
RelativePath = Annotated[
    str,
    Field(
        description="a path relative to raw/: no leading '/', no '.', '..' or empty "
        f"components, no control characters, components of at most {COMPONENT_MAX} bytes; "
        "spaces become '_'"
    ),
]
ChannelName = Annotated[str, Field(min_length=1, pattern=r"\S")]
DetectorName = Annotated[str, Field(pattern=r"^JF\d\dT\d\dV\d\d$")]
LogLevel = Annotated[
    str | int,
    Field(description=f"{', '.join(LOG_LEVELS)} (any case) or 10, 20, 30, 40, 50"),
]


def _detector_options_schema() -> dict[str, Any]:
    """The schema of ``DetectorOptions``, generated from the dataclass; unknown options are
    refused by the parser, so the document says so."""
    schema = TypeAdapter(DetectorOptions).json_schema()
    properties = schema["properties"]
    for alias in OPTION_ALIASES:
        properties[alias] = {"type": "boolean", "description": "an older name (see README)"}
    schema["properties"] = {key: properties[key] for key in DETECTOR_OPTION_KEYS}
    schema["additionalProperties"] = False
    schema["description"] = "per-detector options (SPEC §5.4); null or {} for the defaults"
    schema.pop("required", None)  # every option has a default
    return schema


DetectorOptionsBody = Annotated[DetectorOptions | None, WithJsonSchema(_detector_options_schema())]


class ScanInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    scan_name: RelativePath | None = Field(
        default=None, description="the scan's JSON, scan_info/{scan_name}.json below raw/"
    )


class RetrieveBody(BaseModel):
    """The body of POST /retrieve_from_buffers (SPEC §3). Keys not listed are kept verbatim
    in the run's JSON, never interpreted."""

    model_config = ConfigDict(extra="allow", title="RetrieveRequest")

    pgroup: Pgroup
    start_pulseid: PulseId
    stop_pulseid: PulseId = Field(description="the last pulse id, at least start_pulseid")
    rate_multiplicator: Annotated[
        int | None, Field(json_schema_extra={"enum": [*RATE_MULTIPLICATORS, None]})
    ] = Field(default=1, description="beam rate divider: 100 Hz / rate_multiplicator")
    directory_name: RelativePath | None = Field(
        default=None, description="output directory below raw/ (default: raw/ itself)"
    )
    channels_list: list[ChannelName] | None = Field(
        default=None, description="beam-synchronous channels (data buffer)"
    )
    camera_list: list[Annotated[str, Field(pattern=f"{CAMERA_SUFFIX}$")]] | None = Field(
        default=None, description=f"camera images (names end with {CAMERA_SUFFIX})"
    )
    pv_list: list[ChannelName] | None = Field(default=None, description="EPICS PVs (archiver)")
    detectors: (
        dict[Annotated[str, Field(pattern=r"^JF\d\dT\d\dV\d\d$")], DetectorOptionsBody] | None
    ) = Field(default=None, description="Jungfrau detectors allowed for the beamline, with options")
    selected_pulse_ids: list[PulseId] | None = Field(
        default=None,
        description="detectors keep only the good frames of these pulses, in file order "
        "(ids outside the range are ignored); channels, cameras and PVs are not affected",
    )
    scan_info: ScanInfo | None = Field(default=None, description="a scan step (SPEC §4)")
    run_number: Annotated[int, Field(ge=1, le=MAX_RUN_NUMBER)] | None = Field(
        default=None, description="a run number reserved with /advance_run_number"
    )
    user_tag: str | None = Field(default=None, description="a tag kept in the run's JSON")
    append_user_tag_to_data_dir: bool | None = Field(
        default=None, description="also put the (cleaned) tag into the run's file names"
    )
    run_log_level: LogLevel | None = Field(
        default=None, description="the level of the run's job logs (default INFO)"
    )


class PgroupQuery(BaseModel):
    """The pgroup, in the query string or a JSON body."""

    pgroup: Pgroup


# --- detector control, pedestals and the facility's other endpoints (UPSTREAM_HEAD §4, §5) --


class DetectorQuery(BaseModel):
    """A detector of the caller's beamline."""

    detector_name: DetectorName


class JfstatsQuery(BaseModel):
    det: DetectorName


class DetectorSettingsBody(DetectorQuery):
    parameters: dict[
        Annotated[str, Field(json_schema_extra={"enum": list(SETTING_NAMES)})], Any
    ] = Field(
        description="settings to change (null = unchanged): delay and exptime in s, "
        "detector_mode normal|low_noise, gain_mode dynamic|fixed_gain1|fixed_gain2"
    )


class ModulesBody(DetectorQuery):
    modules: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class DapSettingsBody(DetectorQuery):
    parameters: dict[str, Any] = Field(description="DAP parameters to merge into the file")


class TakePedestalBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    pgroup: Pgroup
    detectors: list[DetectorName] | dict[DetectorName, Any] = Field(
        description="the detectors (an object: its keys)"
    )
    rate_multiplicator: Annotated[
        int | None, Field(json_schema_extra={"enum": [*RATE_MULTIPLICATORS, None]})
    ] = 1
    pedestalmode: bool | None = Field(default=False, description="use the pedestal mode")
    run_log_level: LogLevel | None = Field(default=None, description="the pedestal log's level")


class PedestalStatusQuery(PgroupQuery):
    pedestal: str = Field(pattern=r"^\d{8}_\d{6}$", description="the name /take_pedestal gave")


class PvListBody(BaseModel):
    pv_list: list[ChannelName] = Field(description="the beamline's PVs (duplicates dropped)")


class CopyUserFilesBody(PgroupQuery):
    run_number: Annotated[int, Field(ge=1, le=MAX_RUN_NUMBER)]
    files: list[Annotated[str, Field(pattern="^/")]] = Field(
        default=[], description="absolute paths of files the pgroup's group may read"
    )


class RunStatusQuery(PgroupQuery):
    run_number: Annotated[int, Field(ge=1, le=MAX_RUN_NUMBER)]


class Reply(BaseModel):
    """Every reply: ``status`` and a ``message`` for people, plus the endpoint's fields."""

    model_config = ConfigDict(extra="allow")

    status: str = Field(json_schema_extra={"enum": ["ok", "failed"]})
    message: str
