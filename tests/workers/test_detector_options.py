"""The detector worker honours every option of a request end to end (UPSTREAM_HEAD §1-§2):
broker → RabbitMQ → detector worker → HDF5, on the simulated Jungfrau buffer, whose frames and
``daq_rec`` event bits the test knows exactly.

Expected arrays come from ``Export`` applied to the simulator's raw frames with the same
options: the kernels themselves are checked byte for byte against the reference vectors in
tests/jungfrau; here the question is whether the worker passes every option through, selects
the right frames and writes the right groups, lists and raw files.
"""

from __future__ import annotations

from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - detector chunks are bitshuffle+LZ4
import numpy as np

from sf_daq_broker.jobs import Action
from sf_daq_broker.jungfrau import Converter
from sf_daq_broker.jungfrau.export import Export
from sf_daq_broker.retrieval import DetectorOptions, parse_detector_options
from sf_daq_broker.simulation.faults import PulseSelection
from tests.workers import test_detector_source as base
from tests.workers.test_detector_source import (
    FOUR,
    ONE,
    System,
    no_leases_left,
    pulses,
    raw_frames,
)

system = base.system  # the fixture: simulator, broker, RabbitMQ and a detector worker


def exported(system: System, detector: str, options: dict[str, Any], raw: np.ndarray) -> Export:
    parsed = parse_detector_options(detector, options)
    gain, pedestal = system.simulation.calibration_files[detector]
    converter = Converter.from_files(detector, gain, pedestal, parsed.conversion())
    export = Export(detector, raw.shape[1:], converter)
    return export


def expected_groups(
    system: System, detector: str, options: dict[str, Any], raw: np.ndarray
) -> dict[str, np.ndarray]:
    export = exported(system, detector, options, raw)
    outputs = export.process(raw, export.buffers(len(raw)))
    return {group.name: array.copy() for group, array in zip(export.groups, outputs, strict=True)}


async def test_conversion_options_reach_the_file(system: System) -> None:
    one: dict[str, Any] = {
        "roi": {"spot": [10, 200, 0, 300], "border": [250, 270, 250, 530]},
        "double_pixels_action": "keep",
        "module_edge_pixels": "mask",
    }
    four: dict[str, Any] = {
        "downsample": [4, 4],
        "geometry": True,
        "factor": 2.5,
        "double_pixels_action": "interp",
    }
    run = await system.request({ONE: one, FOUR: four})
    system.pass_files()
    outcomes = await system.outcomes(2)
    assert {e.action for e in outcomes.values()} == {Action.WRITE_FINISHED}
    pids = pulses()
    for detector, options in [(ONE, one), (FOUR, four)]:
        raw = raw_frames(system, detector, pids)
        expected = expected_groups(system, detector, options, raw)
        with h5py.File(system.raw_dir / f"run_{run:06d}.{detector}.h5") as file:
            assert sorted(file["data"]) == sorted(expected)
            for name, array in expected.items():
                group = file[f"data/{name}"]
                assert group["data"].dtype == array.dtype
                assert group["data"][()].tobytes() == array.tobytes()
                assert group["pulse_id"][:, 0].tolist() == pids
                assert group["is_good_frame"][:, 0].tolist() == [1] * len(pids)
                assert group["meta/pixel_mask"].shape == array.shape[1:]
                assert group["meta/pixel_mask"].id == group["pixel_mask"].id  # one dataset
    with h5py.File(system.raw_dir / f"run_{run:06d}.{ONE}.h5") as file:
        spot = file[f"data/{ONE}:ROI_spot"]
        assert spot["data"].shape == (5, 190, 300)
        assert spot["meta/roi"][()].tolist() == [[10, 200], [0, 300]]
        assert np.isnan(spot["meta/conversion_factor"][()])
        assert spot["conversion_factor"][()] == 1.0
        assert spot["meta/double_pixels"][()].decode() == "keep"
        assert not spot["pixel_mask"][:, 0].any()  # the module's edge (column 0) is masked
        assert spot["pixel_mask"][:, 1].sum() > 150
    with h5py.File(system.raw_dir / f"run_{run:06d}.{FOUR}.h5") as file:
        group = file[f"data/{FOUR}"]
        assert group["data"].shape == (5, 534, 283)  # 2136 x 1132 downsampled 4 x 4
        assert group["data"].dtype == np.int32
        assert group["meta/downsample"][()].tolist() == [4, 4]
        assert group["meta/conversion_factor"][()] == 2.5
        assert group["meta/pixel_mask_reasons"].shape == (2136, 1132)
    log = (system.raw_dir / "run_info" / "000000" / f"run_{run:06d}.{FOUR}.log").read_text()
    assert f"converting to {FOUR} int32 (534, 283), double pixels interpolated, downsampled " in log
    await no_leases_left(system.raw_dir)


async def test_selected_pulses_pulse_picker_and_crystfel_lists(system: System) -> None:
    pids = pulses()
    faults = system.simulation.jungfrau.faults
    faults.event_bits[16] = PulseSelection.of(pids[0], pids[2], pids[3])  # laser
    faults.event_bits[17] = PulseSelection.of(pids[2])  # darkshot
    faults.event_bits[19] = PulseSelection.of(pids[2], pids[3])  # pulse picker
    faults.incomplete_frames[(ONE, 0)] = PulseSelection.of(pids[4])  # not good: never kept
    selected = [pids[0], pids[2], pids[4], 999]
    run = await system.request(
        {
            ONE: {"crystfel_lists_laser": True, "factor": 12.4},
            FOUR: {"adc_to_energy": False, "save_ppicker_events_only": True, "keep_raw": True},
        },
        selected_pulse_ids=selected,
    )
    system.pass_files()
    outcomes = await system.outcomes(2)
    assert {e.action for e in outcomes.values()} == {Action.WRITE_FINISHED}

    one_file = system.raw_dir / f"run_{run:06d}.{ONE}.h5"
    kept = [pids[0], pids[2]]
    raw = raw_frames(system, ONE, kept)
    expected = expected_groups(system, ONE, {"factor": 12.4}, raw)[ONE]
    with h5py.File(one_file) as file:
        group = file[f"data/{ONE}"]
        assert group["data"][()].tobytes() == expected.tobytes()
        assert group["pulse_id"][:, 0].tolist() == kept
        assert group["daq_rec"][:, 0].tolist() == [1 << 16, (1 << 16) | (1 << 17) | (1 << 19)]
    assert (one_file.parent / f"run_{run:06d}.{ONE}.light.lst").read_text() == f"{one_file} //0\n"
    assert (one_file.parent / f"run_{run:06d}.{ONE}.dark.lst").read_text() == f"{one_file} //1\n"
    assert not (system.raw_dir / "RAW_DATA").joinpath(one_file.name).exists()

    with h5py.File(system.raw_dir / f"run_{run:06d}.{FOUR}.h5") as file:
        group = file[f"data/{FOUR}"]
        assert group["data"][()].tobytes() == raw_frames(system, FOUR, [pids[2]]).tobytes()
        assert group["pulse_id"][:, 0].tolist() == [pids[2]]
        assert "meta" not in group and "pixel_mask" not in group
    with h5py.File(system.raw_dir / "RAW_DATA" / f"run_{run:06d}.{FOUR}.h5") as file:
        group = file[f"data/{FOUR}"]  # keep_raw: every frame of the range
        assert group["data"][()].tobytes() == raw_frames(system, FOUR, pids).tobytes()
        assert group["requested_pulse_id"][:, 0].tolist() == pids

    one = outcomes[ONE].details["report"]["names"][0]
    assert (one["expected"], one["found"], one["missing"]) == (5, 4, 1)
    assert one["extra"] == {
        "frames_written": 2,
        "bad_frames": 1,
        "bad_frames_per_module": [1],
        "missing_modules": [],
    }
    log = (system.raw_dir / "run_info" / "000000" / f"run_{run:06d}.{FOUR}.log").read_text()
    assert (
        f"{FOUR}: keeping 1 of 5 frames (good frames, 4 selected pulse ids (3 in the range) "
        "and pulse-picker events only)"
    ) in log
    await no_leases_left(system.raw_dir)


async def test_a_selection_that_keeps_nothing_keeps_the_raw_file(system: System) -> None:
    """remove_raw_files true, but nothing was converted: the raw file stays (as upstream)."""
    run = await system.request({ONE: {"remove_raw_files": True}}, selected_pulse_ids=[7])
    system.pass_files()
    outcome = (await system.outcomes(1))[ONE]
    assert outcome.action is Action.WRITE_FINISHED
    pids = pulses()
    with h5py.File(system.raw_dir / f"run_{run:06d}.{ONE}.h5") as file:
        assert file[f"data/{ONE}/data"].shape == (0, 514, 1030)
        assert file[f"data/{ONE}/pulse_id"].shape == (0, 1)
    with h5py.File(system.raw_dir / "RAW_DATA" / f"run_{run:06d}.{ONE}.h5") as file:
        assert file[f"data/{ONE}/data"][()].tobytes() == raw_frames(system, ONE, pids).tobytes()
    report = outcome.details["report"]["names"][0]
    assert report["extra"]["frames_written"] == 0
    log = (system.raw_dir / "run_info" / "000000" / f"run_{run:06d}.{ONE}.log").read_text()
    assert "the selection keeps no frame: the file is empty and the raw file is kept" in log
    await no_leases_left(system.raw_dir)


def test_job_options_round_trip_and_old_jobs() -> None:
    options = parse_detector_options(
        ONE,
        {
            "roi": [[1, 2, 3, 4]],
            "mask_double_pixels": False,
            "remove_raw_files": False,
            "save_ppicker_events_only": True,
        },
    )
    assert options.double_pixels_action == "keep" and options.keep_raw
    assert DetectorOptions.from_json(options.to_json()) == options
    downsampled = parse_detector_options(FOUR, {"downsample": [2, 3], "factor": 1.5})
    assert downsampled.downsample == (2, 3)
    assert DetectorOptions.from_json(downsampled.to_json()) == downsampled
    # a job queued by a broker before these options: mask_double_pixels as a field
    old = {"adc_to_energy": True, "mask_double_pixels": False, "factor": None}
    assert DetectorOptions.from_json(old) == DetectorOptions(double_pixels_action="keep")
