"""Configuration: the shipped file, environment overrides, and errors that name file and key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from sf_daq_broker.config import DEFAULT_CONFIG, ConfigError, load_settings


def test_shipped_configuration() -> None:
    settings = load_settings(environ={})
    assert settings.source == str(DEFAULT_CONFIG)
    assert settings.data_root == Path("/sf")
    assert settings.rest_port == 10002
    assert settings.amqp_url == ""
    assert settings.local_beamline is None
    assert settings.trusted_proxies == []
    assert settings.max_pulse_range == 60000
    assert settings.state_dir == Path.home() / ".local/state/sf-daq-broker"
    assert {name: [str(n) for n in b.subnets] for name, b in settings.beamlines.items()} == {
        "alvra": ["129.129.242.0/24"],
        "bernina": ["129.129.243.0/24"],
        "maloja": ["129.129.246.0/24"],
        "furka": ["129.129.247.0/24"],
    }
    assert settings.detectors_of("alvra") == [
        "JF02T09V02",
        "JF06T08V02",
        "JF06T32V02",
        "JF08T01V01",
        "JF09T01V01",
        "JF10T01V01",
    ]
    assert settings.detectors_of("bernina") == [
        "JF01T03V01",
        "JF03T01V02",
        "JF04T01V01",
        "JF05T01V01",
        "JF07T03V01",
        "JF07T32V01",
        "JF13T01V01",
        "JF14T01V01",
    ]
    assert settings.detectors_of("maloja") == ["JF15T08V01"]
    assert settings.detectors_of("furka") == []


def test_environment_overrides_file(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        'data_root = "/data"\nrest_port = 1234\n[beamlines.x]\nsubnets = ["10.0.0.0/8"]\n'
    )
    settings = load_settings(
        environ={
            "SF_DAQ_CONFIG": str(config),
            "SF_DAQ_DATA_ROOT": "/elsewhere",
            "SF_DAQ_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
            "SF_DAQ_REST_PORT": "4321",
            "SF_DAQ_LOCAL_BEAMLINE": "x",
        }
    )
    assert settings.source == str(config)
    assert settings.data_root == Path("/elsewhere")
    assert settings.uses_amqp
    assert settings.rest_port == 4321
    assert settings.local_beamline == "x"
    # An explicit override (the --port option) wins over the environment.
    assert load_settings(environ={"SF_DAQ_CONFIG": str(config)}, rest_port=99).rest_port == 99
    assert settings.beamlines["x"].subnets == [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            'rest_port = "abc"\n',
            "{file}: rest_port: Input should be a valid integer, unable to parse string as an "
            "integer",
        ),
        ('data_rot = "/sf"\n', "{file}: data_rot: Extra inputs are not permitted"),
        (
            '[beamlines.alvra]\nsubnets = ["129.129.242.0/33"]\n',
            "{file}: beamlines.alvra.subnets.0: value is not a valid IPv4 or IPv6 network",
        ),
        (
            'local_beamline = "nowhere"\n[beamlines.alvra]\nsubnets = ["10.0.0.0/8"]\n',
            "{file}: (top level): local_beamline 'nowhere' is not one of the configured beamlines "
            "(alvra)",
        ),
        (
            '[beamlines.alvra]\nsubnets = ["10.0.0.0/8"]\n[detectors.JF01T03V01]\nbeamline = "x"\n',
            "{file}: (top level): detectors.JF01T03V01.beamline: 'x' is not a configured beamline",
        ),
        (
            '[beamlines.alvra]\nsubnets = ["10.0.0.0/8"]\n[detectors.JF1]\nbeamline = "alvra"\n',
            "{file}: (top level): detectors.JF1: name does not match JFxxTyyVzz",
        ),
    ],
)
def test_broken_configuration_names_file_and_key(
    tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert str(caught.value) == "invalid configuration: " + message.format(file=config)


def test_environment_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"SF_DAQ_REST_PORT": "http"})
    assert str(caught.value) == (
        f"invalid configuration: {DEFAULT_CONFIG}: rest_port (from $SF_DAQ_REST_PORT): "
        "Input should be a valid integer, unable to parse string as an integer"
    )


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "none.toml", environ={})
    assert str(caught.value) == f"configuration file {tmp_path / 'none.toml'} does not exist"
    bad = tmp_path / "bad.toml"
    bad.write_text("rest_port = = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(bad, environ={})
    assert str(caught.value).startswith(f"{bad}: not valid TOML: ")


def test_serve_refuses_to_start_on_broken_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sf_daq_broker.cli import main

    config = tmp_path / "broken.toml"
    config.write_text("rest_port = 0\n")
    assert main(["serve", "--config", str(config)]) == 2
