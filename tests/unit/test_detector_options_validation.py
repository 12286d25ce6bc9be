"""The detector options of UPSTREAM_HEAD §2 and ``selected_pulse_ids`` at the door: every
refusal a 400 with a message naming the key, before a run number is spent; accepted options
reach the job exactly as normalised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import Job, SourceKind
from sf_daq_broker.retrieval import DetectorOptions
from sf_daq_broker.transport.embedded import EmbeddedTransport
from tests.unit.test_retrieve_validation import post, request_with, tree

DET = "JF13T01V01"  # 1 module: 514 x 1030 with gap pixels
GEO = "JF07T03V01"  # 3 modules, geometry 1614 x 1030


@pytest.fixture
async def transport() -> EmbeddedTransport:
    return EmbeddedTransport()


@pytest.fixture
async def client(aiohttp_client: Any, settings: Any, transport: EmbeddedTransport) -> TestClient:
    return await aiohttp_client(create_app(settings, transport))


def det(options: Any, name: str = DET) -> dict[str, Any]:
    return {"detectors": {name: options}}


K = f"detectors.{DET}"
CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "double pixels action unknown",
        det({"double_pixels_action": "smear"}),
        f"{K}.double_pixels_action must be one of 'mask', 'keep', 'interp', got 'smear'",
    ),
    (
        "module edge pixels not a string",
        det({"module_edge_pixels": True}),
        f"{K}.module_edge_pixels must be one of 'keep', 'mask', got true",
    ),
    (
        "alias contradicts (true vs keep)",
        det({"mask_double_pixels": True, "double_pixels_action": "keep"}),
        f"{K}: mask_double_pixels true contradicts double_pixels_action 'keep' (give only one)",
    ),
    (
        "alias contradicts (false vs mask)",
        det({"mask_double_pixels": False, "double_pixels_action": "mask"}),
        f"{K}: mask_double_pixels false contradicts double_pixels_action 'mask' (give only one)",
    ),
    (
        "alias not a bool",
        det({"mask_double_pixels": "no"}),
        f"{K}.mask_double_pixels must be true or false, got 'no'",
    ),
    (
        "remove_raw_files contradicts keep_raw",
        det({"remove_raw_files": True, "keep_raw": True}),
        f"{K}: remove_raw_files true contradicts keep_raw true (give only one)",
    ),
    (
        "interp without gap pixels",
        det({"double_pixels_action": "interp", "gap_pixels": False}),
        f"{K}: double_pixels_action 'interp' needs gap_pixels: the interpolated values are "
        "spread into the gap pixels",
    ),
    (
        "interp with factor",
        det({"double_pixels_action": "interp", "factor": 12.4}),
        f"{K}: double_pixels_action 'interp' cannot be combined with factor (the reference "
        "refuses it; with downsample it is allowed)",
    ),
    (
        "roi flat list",
        det({"roi": [0, 10, 0, 10]}),
        f"{K}.roi must be an object of label: [y1, y2, x1, x2] or a list of such lists, got "
        "[0, 10, 0, 10] (one region is [[y1, y2, x1, x2]])",
    ),
    (
        "roi not a list or object",
        det({"roi": "all"}),
        f"{K}.roi must be an object of label: [y1, y2, x1, x2] or a list of such lists, got 'all'",
    ),
    (
        "roi box of 3",
        det({"roi": {"a": [0, 10, 0]}}),
        f"{K}.roi.a must be [y1, y2, x1, x2] (4 integers), got [0, 10, 0]",
    ),
    (
        "roi box of floats",
        det({"roi": [[0, 10.5, 0, 10]]}),
        f"{K}.roi.0 must be [y1, y2, x1, x2] (4 integers), got [0, 10.5, 0, 10]",
    ),
    (
        "roi label with a slash",
        det({"roi": {"a/b": [0, 10, 0, 10]}}),
        f"{K}.roi: label 'a/b' must be 1 to 64 letters, digits or _ . + - (it names an HDF5 group)",
    ),
    (
        "roi empty",
        det({"roi": {"a": [10, 10, 0, 10]}}),
        f"{K}: roi 'a': [10, 10, 0, 10] must be [y1, y2, x1, x2] with 0 <= y1 < y2 and "
        "0 <= x1 < x2",
    ),
    (
        "roi negative",
        det({"roi": {"a": [-1, 10, 0, 10]}}),
        f"{K}: roi 'a': [-1, 10, 0, 10] must be [y1, y2, x1, x2] with 0 <= y1 < y2 and "
        "0 <= x1 < x2",
    ),
    (
        "roi reaches the last row",
        det({"roi": {"a": [0, 514, 0, 10]}}),
        f"{K}: roi 'a': [0, 514, 0, 10] is not inside the image of 514 x 1030 pixels "
        "(y2 < 514 and x2 < 1030 are needed)",
    ),
    (
        "roi outside without gap pixels",
        det({"roi": {"a": [0, 10, 0, 1024]}, "gap_pixels": False}),
        f"{K}: roi 'a': [0, 10, 0, 1024] is not inside the image of 512 x 1024 pixels "
        "(y2 < 512 and x2 < 1024 are needed)",
    ),
    (
        "roi outside the geometry",
        det({"roi": {"a": [1600, 1614, 0, 10]}, "geometry": True}, GEO),
        f"detectors.{GEO}: roi 'a': [1600, 1614, 0, 10] is not inside the image of 1614 x 1030 "
        "pixels (y2 < 1614 and x2 < 1030 are needed)",
    ),
    (
        "roi with downsample",
        det({"roi": {"a": [0, 10, 0, 10]}, "downsample": [2, 2]}),
        f"{K}: roi and downsample cannot be combined",
    ),
    (
        "downsample of one",
        det({"downsample": [2]}),
        f"{K}.downsample must be [N, M] (two positive integers), got [2]",
    ),
    (
        "downsample zero",
        det({"downsample": [0, 2]}),
        f"{K}.downsample must be [N, M] (two positive integers), got [0, 2]",
    ),
    (
        "downsample as a string",
        det({"downsample": "2x2"}),
        f"{K}.downsample must be [N, M] (two positive integers), got '2x2'",
    ),
    (
        "save_ppicker_events_only not a bool",
        det({"save_ppicker_events_only": 1}),
        f"{K}.save_ppicker_events_only must be true or false, got 1",
    ),
    (
        "selected_pulse_ids per detector",
        det({"selected_pulse_ids": [1000]}),
        f"{K}: unknown option 'selected_pulse_ids' (known options: adc_to_energy, compression, "
        "mask, double_pixels_action, module_edge_pixels, geometry, gap_pixels, factor, "
        "disabled_modules, roi, downsample, keep_raw, save_ppicker_events_only, "
        "crystfel_lists_laser, mask_double_pixels, remove_raw_files)",
    ),
    (
        "selected_pulse_ids not a list",
        {"selected_pulse_ids": 1000},
        "selected_pulse_ids must be a list of pulse ids, got 1000",
    ),
    (
        "selected_pulse_ids with a fraction",
        {"selected_pulse_ids": [1000, 1000.5]},
        "selected_pulse_ids[1] must be an integer, got 1000.5",
    ),
    (
        "selected_pulse_ids negative",
        {"selected_pulse_ids": [-4]},
        "selected_pulse_ids must not be negative, got -4",
    ),
]


@pytest.mark.parametrize(("changes", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_refused_at_the_door(
    client: TestClient, data_root: Path, changes: dict[str, Any], message: str
) -> None:
    before = tree(data_root)
    status, reply = await post(client, request_with(**changes))
    assert (status, reply) == (400, {"status": "failed", "message": message})
    after = tree(data_root) - {
        "bernina/data/p12345/raw/run_info",
        "bernina/data/p12345/raw/run_info/.lock",
    }
    assert after == before


async def test_accepted_options_reach_the_job(
    client: TestClient, raw_dir: Path, transport: EmbeddedTransport
) -> None:
    """Normalised once: aliases resolved, a list of regions labelled, [1, 1] = no
    downsampling, the request's selected_pulse_ids in every detector's options (sorted, once);
    conversion options are not checked when adc_to_energy is false (they are ignored)."""
    body = request_with(
        selected_pulse_ids=[1002, "1000", 1002],
        detectors={
            DET: {
                "mask_double_pixels": False,
                "remove_raw_files": True,
                "roi": [[0, 10, 0, 20], [5, 513, 7, 1029]],
                "crystfel_lists_laser": True,
            },
            GEO: {"adc_to_energy": False, "roi": [[0, 99999, 0, 1]], "downsample": [1, 1]},
        },
    )
    status, reply = await post(client, body)
    assert status == 200, reply
    jobs: dict[str, Job] = {}
    async for delivery in transport.consume_jobs(SourceKind.DETECTOR, prefetch=2):
        jobs[delivery.job.source] = Job.from_json(delivery.job.to_json())
        if len(jobs) == 2:
            break
    one = DetectorOptions.from_json(jobs[DET].options)
    assert one.double_pixels_action == "keep" and not one.keep_raw
    assert one.roi == (("0", (0, 10, 0, 20)), ("1", (5, 513, 7, 1029)))
    assert one.selected_pulse_ids == (1000, 1002) and one.crystfel_lists_laser
    assert jobs[DET].options["roi"] == {"0": [0, 10, 0, 20], "1": [5, 513, 7, 1029]}
    geo = DetectorOptions.from_json(jobs[GEO].options)
    assert geo.downsample is None and geo.selected_pulse_ids == (1000, 1002)
    record = json.loads((raw_dir / "run_info/000000/run_000001.json").read_text())
    assert record["selected_pulse_ids"] == [1002, "1000", 1002]  # the request as given
