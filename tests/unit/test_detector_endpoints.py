"""The detector endpoints of UPSTREAM_HEAD §5 against the simulated detectors over HTTP.

The caller is bernina (loopback); JF13T01V01 and JF07T03V01 are bernina's and simulated,
JF02T09V02 is alvra's: every endpoint refuses it (403), as it refuses a malformed name (400)
and a detector configured nowhere (404).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.detector_control.interface import ModuleState
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.runner import Simulation
from sf_daq_broker.transport.embedded import EmbeddedTransport
from tests.support import PATIENCE, async_wait_until, simulation_config

START = 15_000_000_000
ONE, THREE, ALVRA = "JF13T01V01", "JF07T03V01", "JF02T09V02"
DEFAULTS = {"delay": 0.0, "detector_mode": "normal", "exptime": 5e-06, "gain_mode": "dynamic"}
#: Every detector endpoint: method, path, the key naming the detector, a valid rest of body.
ENDPOINTS = [
    ("GET", "/get_detector_settings", "detector_name", {}),
    ("POST", "/set_detector_settings", "detector_name", {"parameters": {"exptime": 6e-06}}),
    ("POST", "/power_on_modules", "detector_name", {"modules": [0]}),
    ("POST", "/power_off_modules", "detector_name", {"modules": [0]}),
    ("GET", "/get_detector_status", "detector_name", {}),
    ("GET", "/get_detector_temperatures", "detector_name", {}),
    ("GET", "/get_jfctrl_monitor", "detector_name", {}),
    ("GET", "/get_detector_pings", "detector_name", {}),
    ("GET", "/get_jfstats", "det", {}),
    ("POST", "/power_on_detector", "detector_name", {}),
    ("GET", "/get_dap_settings", "detector_name", {}),
    ("POST", "/set_dap_settings", "detector_name", {"parameters": {"x": 1}}),
]


@pytest.fixture
async def simulation(tmp_path: Path) -> AsyncIterator[Simulation]:
    config = simulation_config(tmp_path, [ONE, THREE])
    simulation = Simulation(config, ManualClock(START, 1_700_000_000_000))
    await simulation.start(follow_clock=False)
    yield simulation
    await simulation.stop()


@pytest.fixture
async def client(
    aiohttp_client: Any, make_settings: Any, simulation: Simulation, tmp_path: Path
) -> TestClient:
    settings = make_settings(
        buffers={"jungfrau_root": str(simulation.jungfrau.buffer_root)},
        detector_control={"url": simulation.addresses["control"]},
        service_files={"dap_config_dir": str(tmp_path / "dap")},
    )
    return await aiohttp_client(create_app(settings, EmbeddedTransport()))


@pytest.fixture
async def unreachable(aiohttp_client: Any, make_settings: Any) -> TestClient:
    """A broker whose detector control does not answer: a request that reached a detector
    would get 503, so a 4xx proves it was refused before."""
    settings = make_settings(detector_control={"url": "http://127.0.0.1:9"})
    return await aiohttp_client(create_app(settings, EmbeddedTransport()))


async def call(client: TestClient, method: str, path: str, **body: Any) -> tuple[int, Any]:
    if method == "GET":
        response = await client.get(path, json=body)
    else:
        response = await client.post(path, json=body)
    return response.status, await response.json()


@pytest.mark.parametrize(("method", "path", "key", "rest"), ENDPOINTS)
@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        (None, 400, "{key} is missing"),
        ("JF13", 400, "{key} must be a Jungfrau detector name (JFxxTyyVzz), got 'JF13'"),
        ("JF99T01V01", 404, "{key}: JF99T01V01 is not a configured detector"),
        (ALVRA, 403, "{key}: JF02T09V02 is not a detector of beamline bernina"),
    ],
)
async def test_every_detector_endpoint_refuses_what_is_not_the_callers(
    unreachable: TestClient,
    method: str,
    path: str,
    key: str,
    rest: dict[str, Any],
    name: str | None,
    code: int,
    message: str,
) -> None:
    body = dict(rest) if name is None else {key: name, **rest}
    status, reply = await call(unreachable, method, path, **body)
    assert (status, reply) == (code, {"status": "failed", "message": message.format(key=key)})


async def test_settings_are_read_and_changed_with_their_old_and_new_values(
    client: TestClient, simulation: Simulation
) -> None:
    status, reply = await call(client, "GET", "/get_detector_settings", detector_name=ONE)
    assert (status, reply["parameters"]) == (200, DEFAULTS)
    change = {
        "exptime": 1e-05,
        "gain_mode": "fixed_gain1",
        "delay": None,
        "detector_mode": "normal",
    }
    status, reply = await call(
        client, "POST", "/set_detector_settings", detector_name=ONE, parameters=change
    )
    assert (status, reply) == (
        200,
        {
            "status": "ok",
            "message": f"successfully changed detector settings of {ONE}",
            "changed_parameters": {
                "exptime": [5e-06, 1e-05],
                "gain_mode": ["dynamic", "fixed_gain1"],
            },
        },
    )
    settings = simulation.detectors[ONE].settings()
    assert (settings.exptime, settings.gain_mode.value) == (1e-05, "fixed_gain1")
    status, reply = await call(
        client, "POST", "/set_detector_settings", detector_name=ONE, parameters=change
    )
    assert (status, reply["changed_parameters"]) == (200, {})
    assert reply["message"] == f"nothing to change: {ONE} has these settings already"
    assert len(simulation.detectors[ONE].commands) == 1  # the second request sent nothing


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (None, "parameters must be an object of settings, got None"),
        ([1], "parameters must be an object of settings, got [1]"),
        (
            {"exptme": 1e-5},
            "parameters: unknown setting 'exptme' (known: delay, detector_mode, "
            "exptime, gain_mode)",
        ),
        (
            {"exptime": 0.02},
            "parameters.exptime must be in seconds with 0 < exptime < 0.01 (one "
            "pulse period), got 0.02",
        ),
        ({"exptime": "5us"}, "parameters.exptime must be a number of seconds, got '5us'"),
        (
            {"delay": -1},
            "parameters.delay must be in seconds with 0 <= delay < 0.01 (one pulse period), got -1",
        ),
        (
            {"gain_mode": "fixed_gain3"},
            "parameters.gain_mode must be one of dynamic, fixed_gain1, "
            "fixed_gain2, got 'fixed_gain3'",
        ),
        (
            {"detector_mode": "high"},
            "parameters.detector_mode must be one of normal, low_noise, got 'high'",
        ),
    ],
)
async def test_bad_settings_are_refused_and_nothing_is_changed(
    client: TestClient, simulation: Simulation, parameters: Any, message: str
) -> None:
    body: dict[str, Any] = {"detector_name": THREE}
    if parameters is not None:
        body["parameters"] = parameters
    status, reply = await call(client, "POST", "/set_detector_settings", **body)
    assert (status, reply["message"]) == (400, message)
    assert simulation.detectors[THREE].commands == []


async def test_modules_power_off_and_on_show_in_status_temperatures_and_monitor(
    client: TestClient, simulation: Simulation
) -> None:
    status, reply = await call(
        client, "POST", "/power_off_modules", detector_name=THREE, modules=[1, 1]
    )
    assert (status, reply) == (
        200,
        {
            "status": "ok",
            "message": f"successfully powered off modules [1] of {THREE}",
            "modules": [1],
        },
    )
    status, reply = await call(client, "GET", "/get_detector_status", detector_name=THREE)
    assert status == 200
    assert reply["detector_status"] == ["running", "off", "running"]
    assert reply["modules"] == ["running", "off", "running"]
    assert reply["powered_modules"] == [0, 2]
    assert (reply["pedestal_mode"], reply["power_on"]) == (None, None)
    status, reply = await call(client, "GET", "/get_detector_temperatures", detector_name=THREE)
    assert reply["temperatures"] == {
        "TEMPERATURE_ADC": [38.0, None, 39.0],
        "TEMPERATURE_FPGA": [48.0, None, 49.0],
        "TEMPERATURE_THRESHOLDS": [55.0, 55.0, 55.0],
    }
    status, reply = await call(client, "GET", "/get_jfctrl_monitor", detector_name=THREE)
    assert reply["parameters"] == {
        "chip_power": [True, False, True],
        "high_voltage": [120, 0, 120],
    }
    status, reply = await call(
        client, "POST", "/power_on_modules", detector_name=THREE, modules=[1]
    )
    assert (status, reply["message"]) == (200, f"successfully powered on modules [1] of {THREE}")
    assert simulation.detectors[THREE].status().modules == (ModuleState.RUNNING,) * 3
    status, reply = await call(client, "GET", "/get_detector_pings", detector_name=THREE)
    assert (status, reply["pings"]) == (200, [True, True, True])


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (None, "modules is missing"),
        ([], "modules must be a non-empty list of module numbers, got []"),
        (1, "modules must be a non-empty list of module numbers, got 1"),
        ([3], f"modules: {THREE} has no module 3 (its modules are 0..2)"),
        ([-1], f"modules: {THREE} has no module -1 (its modules are 0..2)"),
        (["1"], "modules must hold integers, got '1'"),
        ([True], "modules must hold integers, got True"),
    ],
)
async def test_bad_module_lists_are_refused(
    client: TestClient, simulation: Simulation, modules: Any, message: str
) -> None:
    body: dict[str, Any] = {"detector_name": THREE}
    if modules is not None:
        body["modules"] = modules
    status, reply = await call(client, "POST", "/power_off_modules", **body)
    assert (status, reply["message"]) == (400, message)
    assert simulation.detectors[THREE].commands == []


async def test_power_on_is_answered_at_once_and_followed_in_the_status(
    client: TestClient, simulation: Simulation
) -> None:
    simulation.detectors[ONE].stop()
    simulation.detectors[ONE].power_modules([0], on=False)
    status, reply = await call(client, "POST", "/power_on_detector", detector_name=ONE)
    assert (status, reply) == (
        202,
        {
            "status": "ok",
            "message": f"request to power on {ONE} sent, wait a few minutes "
            "(get_detector_status shows it)",
            "detector_name": ONE,
        },
    )

    async def powered() -> Any:
        _, answer = await call(client, "GET", "/get_detector_status", detector_name=ONE)
        return answer if answer["power_on"]["state"] != "running" else None

    answer = await async_wait_until(powered, PATIENCE, "the power-on to end")
    assert answer["power_on"]["state"] == "done"
    assert answer["power_on"]["message"] == f"{ONE} powered on and started"
    assert answer["power_on"]["finished_at"] >= answer["power_on"]["started_at"]

    async def running() -> Any:
        # A command takes effect at the detector's next pulse: on a busy machine the status
        # may be read within the pulse of the command, when the modules are still off.
        _, answer = await call(client, "GET", "/get_detector_status", detector_name=ONE)
        return answer if answer["detector_status"] == "running" else None

    answer = await async_wait_until(running, PATIENCE, "the detector to run")
    assert answer["power_on"]["state"] == "done"
    assert simulation.detectors[ONE].commands[-1] == "power_on"


async def test_jfstats_says_whether_the_buffer_is_written(
    client: TestClient, simulation: Simulation
) -> None:
    status, reply = await call(client, "GET", "/get_jfstats", det=ONE)
    assert (status, reply["writing"]) == (200, False)  # no buffer file closed yet
    assert reply["temperatures"]["TEMPERATURE_ADC"] == [38.0]
    assert reply["parameters"] == {"chip_power": [True], "high_voltage": [120]}
    clock = simulation.clock
    assert isinstance(clock, ManualClock)
    clock.advance(1000)
    simulation.jungfrau.catch_up()
    status, reply = await call(client, "GET", "/get_jfstats", det=ONE)
    assert (status, reply["writing"]) == (200, True)
    assert reply["message"] == (
        f"successfully retrieved JFCtrl monitor parameters and temperatures from {ONE}"
    )


async def test_without_detector_control_or_with_one_that_is_down_the_answer_is_503(
    aiohttp_client: Any, make_settings: Any
) -> None:
    none = await aiohttp_client(
        create_app(make_settings(detector_control={"url": ""}), EmbeddedTransport())
    )
    status, reply = await call(none, "GET", "/get_detector_settings", detector_name=ONE)
    assert status == 503
    assert reply["message"].startswith(
        "this broker has no detector control (set detector_control.url in "
    )
    down = await aiohttp_client(
        create_app(
            make_settings(detector_control={"url": "http://127.0.0.1:9", "timeout_s": 2}),
            EmbeddedTransport(),
        )
    )
    started = time.monotonic()
    status, reply = await call(down, "GET", "/get_detector_status", detector_name=ONE)
    assert status == 503
    assert reply["message"] == (
        f"{ONE}: the detector control at http://127.0.0.1:9/detectors/{ONE}/status does not "
        "answer (ConnectionError)"
    )
    assert time.monotonic() - started < 10
