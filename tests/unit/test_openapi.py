"""GET /openapi.json, its agreement with the parsers, and a property-based fuzzer against it.

The fuzzer (hypothesis) draws requests from the document's own schemas, with any field now
and then replaced by arbitrary JSON (huge integers, NaN, lone surrogates, deep nesting), or
the whole body by arbitrary bytes, and sends them to a real broker (HTTP server, embedded
queue, a simulated pulse map): no reply may be a 5xx, and every reply is the JSON envelope.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sf_daq_broker.api.app import ROUTES, create_app
from sf_daq_broker.api.models import RetrieveBody
from sf_daq_broker.retrieval import DETECTOR_OPTION_KEYS, REQUEST_KEYS
from sf_daq_broker.simulation.api1_server import SimulatedApi1Buffer, create_api1_app
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.detector_server import add_detector_routes
from sf_daq_broker.simulation.jungfrau_detector import SimulatedJungfrau
from sf_daq_broker.transport.embedded import EmbeddedTransport

EXAMPLES_PER_ENDPOINT = 60
BASE: dict[str, Any] = {
    "pgroup": "p12345",
    "start_pulseid": 1000,
    "stop_pulseid": 2000,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet"],
}
DETECTOR = "JF07T32V01"  # allowed for bernina in the shipped configuration


@pytest.fixture
async def client(aiohttp_client: Any, settings: Any) -> TestClient:
    return await aiohttp_client(create_app(settings, EmbeddedTransport()))


async def test_the_document_lists_every_endpoint(client: TestClient) -> None:
    response = await client.get("/openapi.json")
    document = await response.json()
    assert response.status == 200 and document["openapi"] == "3.1.0"
    assert {(m.lower(), p) for p, ops in document["paths"].items() for m in ops} == {
        (m.lower(), p) for m, p, _ in ROUTES
    }
    retrieve = document["paths"]["/retrieve_from_buffers"]["post"]
    assert retrieve["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RetrieveBody"
    }
    schema = document["components"]["schemas"]["RetrieveBody"]
    assert list(schema["properties"]) == list(RetrieveBody.model_fields)
    assert schema["required"] == ["pgroup", "start_pulseid", "stop_pulseid"]
    assert schema["properties"]["stop_pulseid"]["maximum"] == 2**53 - 1
    options = schema["properties"]["detectors"]["anyOf"][0]["patternProperties"]
    (option_schema,) = options.values()
    assert list(option_schema["properties"]) == list(DETECTOR_OPTION_KEYS)
    assert option_schema["additionalProperties"] is False
    run_status = document["paths"]["/run_status"]["get"]
    assert [p["name"] for p in run_status["parameters"]] == ["pgroup", "run_number"]


#: A value of the wrong type for each documented key, and what the parser says about it.
WRONG = {
    "pgroup": ([1], "pgroup must be 'p' followed by 5 digits (e.g. p12345), got [1]"),
    "start_pulseid": ("x", "start_pulseid must be an integer, got 'x'"),
    "stop_pulseid": ("x", "stop_pulseid must be an integer, got 'x'"),
    "rate_multiplicator": ("x", "rate_multiplicator must be an integer, got 'x'"),
    "directory_name": (1, "directory_name must be a string, got 1"),
    "channels_list": ("x", "channels_list must be a list of strings, got 'x'"),
    "camera_list": ("x", "camera_list must be a list of strings, got 'x'"),
    "pv_list": ("x", "pv_list must be a list of strings, got 'x'"),
    "detectors": (
        "x",
        "detectors must be an object mapping detector names to options, got 'x'",
    ),
    "selected_pulse_ids": ("x", "selected_pulse_ids must be a list of pulse ids, got 'x'"),
    "scan_info": ("x", "scan_info must be an object, got 'x'"),
    "run_number": ("x", "run_number must be an integer, got 'x'"),
    "user_tag": (1, "user_tag must be a string, got 1"),
    "append_user_tag_to_data_dir": (
        "x",
        "append_user_tag_to_data_dir must be true or false, got 'x'",
    ),
    "run_log_level": (
        "x",
        "run_log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (or 10, 20, 30, 40, "
        "50), got 'x'",
    ),
}


async def test_every_documented_key_is_the_parsers(client: TestClient) -> None:
    """A key documented but not parsed (or parsed under another name) fails here."""
    assert set(WRONG) == set(RetrieveBody.model_fields) == set(REQUEST_KEYS)
    for key, (value, message) in WRONG.items():
        response = await client.post("/retrieve_from_buffers", json={**BASE, key: value})
        assert (key, response.status, (await response.json())["message"]) == (key, 400, message)
    for option in DETECTOR_OPTION_KEYS:
        body = {**BASE, "detectors": {DETECTOR: {option: "x"}}}
        response = await client.post("/retrieve_from_buffers", json=body)
        message = (await response.json())["message"]
        assert response.status == 400
        assert message.startswith(f"detectors.{DETECTOR}.{option} must be "), message


# --- the fuzzer -----------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=()), max_size=30)  # lone surrogates included
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**66),
    st.floats(),  # NaN and infinities too: Python's JSON reads them back
    TEXT,
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
DEEP = st.integers(30, 40).map(lambda depth: json.loads("[" * depth + "]" * depth))


def from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values matching a JSON schema (the subset the document uses), now and then replaced
    by arbitrary JSON so that every key also gets wrong types."""
    return st.one_of(_valid(schema, defs), _valid(schema, defs), ANY_JSON, DEEP)


def _valid(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "$ref" in schema:
        return st.deferred(lambda: _valid(defs[schema["$ref"].rsplit("/", 1)[1]], defs))
    if "anyOf" in schema:
        return st.one_of([_valid(option, defs) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        return st.integers(low, high) | st.integers(0, 5000)
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=schema["pattern"].startswith("^"))
        return TEXT
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=3)
    if kind == "object":
        return _object(schema, defs)
    return ANY_JSON


def _object(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    fixed = st.fixed_dictionaries(
        {name: from_schema(properties[name], defs) for name in properties if name in required},
        optional={
            name: from_schema(spec, defs)
            for name, spec in properties.items()
            if name not in required
        },
    )
    for pattern, spec in schema.get("patternProperties", {}).items():
        keys = st.from_regex(pattern, fullmatch=True) | st.just(DETECTOR)
        extra = st.dictionaries(keys, from_schema(spec, defs), max_size=2)
        fixed = st.tuples(fixed, extra).map(lambda pair: {**pair[0], **pair[1]})
    return fixed


class LiveBroker:
    """The broker and a simulated pulse map on real HTTP servers, in a thread of their own
    (hypothesis drives the requests synchronously)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _start(self) -> str:
        clock = ManualClock(start_pulse_id=15_000_000_000)
        buffer = SimulatedApi1Buffer([], clock)
        pulse_map = await self._serve(create_api1_app(buffer))
        # Simulated detectors for every configured one, so that the detector endpoints answer
        # (a detector control that is away would be a 503); the service files in the data root.
        control = web.Application()
        detectors = {name: SimulatedJungfrau(name, clock) for name in self.settings.detectors}
        add_detector_routes(control, detectors)
        control_url = await self._serve(control)
        services = self.settings.data_root / "services"
        services.mkdir(exist_ok=True)
        settings = self.settings.model_copy(
            update={
                "buffers": self.settings.buffers.model_copy(update={"databuffer_url": pulse_map}),
                "detector_control": self.settings.detector_control.model_copy(
                    update={"url": control_url}
                ),
                "service_files": self.settings.service_files.model_copy(
                    update={"pv_list_dir": services, "dap_config_dir": services}
                ),
            }
        )
        return await self._serve(create_app(settings, EmbeddedTransport()))

    def __enter__(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def live_broker(settings: Any) -> Iterator[str]:
    with LiveBroker(settings) as url:
        yield url


def _bodies(operation: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    garbage = st.binary(max_size=40).map(lambda raw: ("raw", raw))
    if content is None:
        return st.one_of(st.just(("none", None)), garbage)
    return st.one_of(
        from_schema(content["schema"], defs).map(lambda body: ("json", body)),
        garbage,
        st.just(("none", None)),
    )


def _queries(operation: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    parameters = operation.get("parameters", [])
    values = {p["name"]: st.one_of(_valid(p["schema"], defs).map(str), TEXT) for p in parameters}
    return st.fixed_dictionaries({}, optional=values)


def _send(url: str, method: str, path: str, query: dict[str, str], body: Any) -> Any:
    kind, value = body
    data = None
    if kind == "json":
        data = json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")
    elif kind == "raw":
        data = value
    return requests.request(
        method,
        url + path,
        params={k: v.encode("utf-8", "surrogatepass") for k, v in query.items()},
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _ in ROUTES])
def test_fuzzed_requests_never_get_a_5xx(
    live_broker: str, method: str, path: str, raw_dir: Path
) -> None:
    document = requests.get(live_broker + "/openapi.json", timeout=30).json()
    operation = document["paths"][path][method.lower()]
    defs = document["components"]["schemas"]
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES_PER_ENDPOINT,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(query=_queries(operation, defs), body=_bodies(operation, defs))
    def one_request(query: dict[str, str], body: Any) -> None:
        response = _send(live_broker, method, path, query, body)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:500])
        if path not in ("/metrics", "/openapi.json"):  # these two are no envelope
            envelope = response.json()
            assert envelope["status"] in ("ok", "failed") and isinstance(envelope["message"], str)

    one_request()
    assert sum(seen.values()) >= EXAMPLES_PER_ENDPOINT
