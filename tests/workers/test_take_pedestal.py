"""/take_pedestal end to end: broker → RabbitMQ → pedestal worker → simulated detector and
buffer → pedestal file, installed, and used by the next run's conversion.

The simulation runs on a wall clock 5 times faster than the machine (buffer files close every
2 s) and the stages are short (16 frames), so a whole pedestal takes a few seconds; every wait
is for a state, never for a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - raw pedestal frames are bitshuffle+LZ4
import numpy as np
import pytest

from sf_daq_broker.api.app import create_app
from sf_daq_broker.jobs import Action, StatusEvent
from sf_daq_broker.jungfrau import ConversionOptions, Converter
from sf_daq_broker.simulation.jungfrau_frames import expected_frame, module_calibration
from sf_daq_broker.simulation.runner import Simulation
from sf_daq_broker.transport import StatusSubscription
from sf_daq_broker.transport.amqp import AmqpTransport
from sf_daq_broker.workers.detector_source import DetectorSource
from sf_daq_broker.workers.lease import LeasePolicy
from sf_daq_broker.workers.loop import RetryPolicy, Worker
from sf_daq_broker.workers.pedestal_source import PedestalSource
from tests.support import PATIENCE, async_wait_until, simulation_config

pytestmark = pytest.mark.slow

DETECTOR = "JF13T01V01"  # 1 module
FRAMES_PER_STAGE = 16
SPEED = 5.0
#: Noise of the simulated frames: -4..3 around rint(pedestal) (jungfrau_frames).
NOISE_MAX = 4.0


@dataclass
class System:
    simulation: Simulation
    broker: Any
    events: StatusSubscription
    raw_dir: Path
    pedestal_root: Path

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        response = await self.broker.request(method, path, **kwargs)
        return response.status, await response.json()

    async def pedestal(self, timeout: float = 120, **fields: Any) -> dict[str, Any]:
        """Take a pedestal of DETECTOR and wait until it is done (or failed)."""
        body = {"pgroup": "p12345", "detectors": {DETECTOR: {}}, **fields}
        status, reply = await self.call("POST", "/take_pedestal", json=body)
        assert status == 200, reply
        name = reply["pedestal"]

        async def final() -> dict[str, Any] | None:
            query = {"pgroup": "p12345", "pedestal": name}
            status, answer = await self.call("GET", "/pedestal_status", params=query)
            assert status == 200, answer
            return answer if answer["state"] in ("done", "failed") else None

        answer: dict[str, Any] = await async_wait_until(final, timeout, "the pedestal to end")
        answer["reply"] = reply
        return answer


@pytest.fixture
async def system(
    tmp_path: Path,
    aiohttp_client: Any,
    make_settings: Any,
    raw_dir: Path,
    amqp_url: str,
    amqp_prefix: str,
) -> AsyncIterator[System]:
    config = simulation_config(
        tmp_path, [DETECTOR], speed=SPEED, mode="lazy", retention_pulses=1_000_000
    )
    simulation = Simulation(config)
    await simulation.start()
    simulation.detectors[DETECTOR].illuminated = False  # the shutter is closed: dark frames
    latest = config.jungfrau.buffer_root / DETECTOR / "M00" / "LATEST"
    await async_wait_until(latest.exists, 60, "the buffer's first file to close")
    gain, pedestal = simulation.calibration_files[DETECTOR]
    pedestal_root = tmp_path / "pedestals"
    settings = make_settings(
        buffers={
            "databuffer_url": simulation.addresses["databuffer"],
            "jungfrau_root": str(config.jungfrau.buffer_root),
            "jungfrau_control_url": simulation.addresses["control"],
        },
        detectors={
            DETECTOR: {
                "beamline": "bernina",
                "gain_file": str(gain),
                "pedestal_file": str(pedestal),
            }
        },
        detector_control={"url": simulation.addresses["control"]},
        pedestals={
            "root": str(pedestal_root),
            "frames_per_stage": FRAMES_PER_STAGE,
            "mode_frames": 4,
            "mode_loops": 2,
            "settle_s": 0.0,
        },
    )
    transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    worker_transport = AmqpTransport(amqp_url, prefix=amqp_prefix)
    await transport.connect()
    events = await transport.subscribe_status()
    broker = await aiohttp_client(create_app(settings, transport))
    pedestals = PedestalSource.from_settings(settings)
    pedestals.poll_s = 0.02
    pedestals.detectors.poll_seconds = 0.02
    detectors = DetectorSource.from_settings(settings)
    detectors.poll_seconds = 0.02
    worker = asyncio.create_task(
        Worker(
            worker_transport,
            [pedestals, detectors],
            RetryPolicy(first_delay=0.01),
            lease=LeasePolicy(heartbeat=0.2, stale_after=5, poll=0.02),
        ).run()
    )
    yield System(simulation, broker, events, raw_dir, pedestal_root)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    await events.close()
    await worker_transport.close()
    await simulation.stop()


def stages_of(raw_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pulse ids, gain code (daq_rec bits 12-13) and goodness of the raw pedestal frames."""
    with h5py.File(raw_file) as file:
        group = file[f"data/{DETECTOR}"]
        pids = group["pulse_id"][:, 0].astype(np.int64)
        codes = (group["daq_rec"][:, 0].astype(np.int64) >> 12) & 3
        good = group["is_good_frame"][:, 0] != 0
    return pids, codes, good


async def events_of(events: StatusSubscription, source: str, until: Action) -> list[StatusEvent]:
    seen: list[StatusEvent] = []
    async with asyncio.timeout(PATIENCE):
        while not seen or seen[-1].action is not until:
            event = await events.__anext__()
            if event.source == source:
                seen.append(event)
    return seen


async def test_a_pedestal_recovers_the_true_pedestals_and_the_next_run_uses_it(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    status, before = await system.call(
        "GET", "/get_detector_settings", params={"detector_name": DETECTOR}
    )
    assert status == 200
    done = await system.pedestal(run_log_level="debug")
    assert done["state"] == "done", done
    name = done["pedestal"]
    reply = done["reply"]
    # 3 stages of 16 frames at 100 Hz, plus 10 s (upstream's estimate)
    assert reply["message"] == "request to take pedestal sent, wait at least 10.48 seconds"
    directory = system.raw_dir / "JF_pedestals"
    raw_file = directory / f"{name}.{DETECTOR}.h5"
    result_file = directory / f"{name}.{DETECTOR}.res.h5"
    installed = system.pedestal_root / DETECTOR / f"{name}.h5"
    assert reply["files"] == {
        "json": str(directory / f"{name}.json"),
        "log": str(directory / f"{name}.log"),
        "raw": {DETECTOR: str(raw_file)},
        "pedestal": {DETECTOR: str(result_file)},
        "installed": {DETECTOR: str(installed)},
    }
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [f"{name}.json", f"{name}.log", raw_file.name, result_file.name]
    )

    # The frames: every stage at least FRAMES_PER_STAGE frames, in G0, G1, G2 order.
    pids, codes, good = stages_of(raw_file)
    assert good.all()
    assert (np.diff(pids) == 1).all()
    counts = {code: int((codes == code).sum()) for code in (0, 1, 3)}
    assert min(counts.values()) >= FRAMES_PER_STAGE
    assert sum(counts.values()) == pids.size
    assert np.all(np.diff(codes[np.argsort(pids)]) >= 0)  # G0 frames, then G1, then G2

    # The pedestal: the simulator's true pedestals within the noise. The only bad pixels are
    # those whose noise is the same in all 8 variants (RMS 0 in every stage: bits 9, 10, 12).
    truth = module_calibration(DETECTOR, 0)
    with h5py.File(result_file) as file:
        gains, rms, mask = file["gains"][:], file["gainsRMS"][:], file["pixel_mask"][:]
    assert gains.shape == rms.shape == (3, 512, 1024) and gains.dtype == np.float64
    variants = np.stack([expected_frame(DETECTOR, 0, pid, illuminated=False) for pid in range(8)])
    constant = np.all(variants == variants[0], axis=0)
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, np.where(constant, (1 << 9) | (1 << 10) | (1 << 12), 0))
    deviation = gains - np.rint(truth.pedestal.astype(np.float64))
    assert np.abs(deviation).max() <= NOISE_MAX  # each pixel within the noise's range
    assert abs(deviation.mean() + 0.5) < 0.05  # the noise's mean, -0.5, over all pixels
    assert 1.8 < rms.mean() < 2.6  # the noise's RMS (2.29)
    with h5py.File(installed) as file:  # installed = the computed file
        np.testing.assert_array_equal(file["gains"][:], gains)

    # The result, in /pedestal_status and in the pedestal's JSON.
    result = done["result"]
    assert result["start_pulse_id"] == int(pids[0]) and result["stop_pulse_id"] == int(pids[-1])
    assert result["detectors"][DETECTOR]["stage_frames"] == {
        "G0": counts[0],
        "G1": counts[1],
        "G2": counts[3],
    }
    assert result["detectors"][DETECTOR]["good_pixels"] == 512 * 1024 - constant.sum()
    record = json.loads((directory / f"{name}.json").read_text())
    assert record["result"] == result
    assert {key: record[key] for key in ("pgroup", "beamline", "pedestal", "run_log_level")} == {
        "pgroup": "p12345",
        "beamline": "bernina",
        "pedestal": name,
        "run_log_level": "debug",
    }
    log_text = (directory / f"{name}.log").read_text()
    assert " DEBUG gain stage G1: pulse " in log_text  # run_log_level debug
    assert " INFO gain stage G1 from pulse " in log_text
    assert f"pedestal installed as {installed}" in log_text

    # The detector is back where it was; the procedure went G0 → G1 → G2 → back.
    status, after = await system.call(
        "GET", "/get_detector_settings", params={"detector_name": DETECTOR}
    )
    assert after["parameters"] == before["parameters"]
    gains_set = [
        json.loads(c.split(" ", 1)[1].replace("'", '"'))["gain_mode"]
        for c in system.simulation.detectors[DETECTOR].commands
        if c.startswith("settings ")
    ]
    assert gains_set == ["dynamic", "fixed_gain1", "fixed_gain2", "dynamic"]
    assert not (system.pedestal_root / DETECTOR / ".state_before_pedestal.json").exists()

    # The next run converts with the new pedestal and says so in its JSON.
    status, current = await system.call("GET", "/current_pulse_id")
    start = current["pulse_id"] + 10
    status, run_reply = await system.call(
        "POST",
        "/retrieve_from_buffers",
        json={
            "pgroup": "p12345",
            "start_pulseid": start,
            "stop_pulseid": start + 7,
            "detectors": {DETECTOR: {}},
        },
    )
    assert status == 200, run_reply
    run = run_reply["run_number"]
    run_json = json.loads((system.raw_dir / "run_info/000000" / f"run_{run:06d}.json").read_text())
    assert run_json["pedestal_files"] == {DETECTOR: str(installed)}

    async def run_done() -> bool:
        query = {"pgroup": "p12345", "run_number": str(run)}
        _, answer = await system.call("GET", "/run_status", params=query)
        assert answer.get("run_state") != "failed", answer
        return answer.get("run_state") == "done"

    await async_wait_until(run_done, 120, "the run to be written")
    gain_file, _ = system.simulation.calibration_files[DETECTOR]
    converter = Converter.from_files(DETECTOR, gain_file, installed, ConversionOptions())
    writer = system.simulation.jungfrau
    records = [writer.expected_record(DETECTOR, 0, pid) for pid in range(start, start + 8)]
    raw = np.stack([record["data"][0] for record in records if record is not None])
    assert len(raw) == 8
    with h5py.File(system.raw_dir / f"run_{run:06d}.{DETECTOR}.h5") as file:
        np.testing.assert_array_equal(file[f"data/{DETECTOR}/data"][:], converter.convert(raw))


async def test_pedestal_mode_in_low_noise_restores_the_settings_and_is_followed_live(
    system: System,
) -> None:
    settings = {"exptime": 7e-06, "detector_mode": "low_noise"}
    status, changed = await system.call(
        "POST",
        "/set_detector_settings",
        json={"detector_name": DETECTOR, "parameters": settings},
    )
    assert status == 200, changed
    done = await system.pedestal(pedestalmode=True, rate_multiplicator=1)
    assert done["state"] == "done", done
    result = done["result"]["detectors"][DETECTOR]
    # 4 frames x 2 loops in each gain stage, all in high gain (daq_rec bit 0)
    assert result["stage_frames"] == {"G0": 8, "G1": 8, "G2": 8}
    assert result["highgain_frames"] == 24
    # The range also holds pulses before the start and after the last frame: completeness
    # counts the frames the detector took.
    report = done["completeness"]["names"][0]
    assert (report["expected"], report["found"], report["missing"]) == (24, 24, 0)
    assert done["completeness"]["complete"] is True
    status, after = await system.call(
        "GET", "/get_detector_settings", params={"detector_name": DETECTOR}
    )
    assert after["parameters"] == {
        "delay": 0.0,
        "detector_mode": "low_noise",
        "exptime": 7e-06,
        "gain_mode": "dynamic",
    }
    status, state = await system.call(
        "GET", "/get_detector_status", params={"detector_name": DETECTOR}
    )
    assert (state["detector_status"], state["pedestal_mode"]) == ("running", None)
    commands = system.simulation.detectors[DETECTOR].commands
    assert commands[-6:-2] == ["stop", "pedestal mode 4x2", "start", "stop"]
    assert commands[-2:] == ["pedestal mode off", "start"]

    # What the debugger sees of it: queued, started, progress in the mode, finished.
    seen = await events_of(system.events, "pedestal", Action.WRITE_FINISHED)
    actions = [event.action for event in seen]
    assert actions[0] is Action.WRITE_REQUEST and actions[1] is Action.WRITE_START
    assert any(
        e.action is Action.WRITE_PROGRESS and e.message.startswith("pedestal mode: ") for e in seen
    )
    assert {e.run_number for e in seen} == {0} and {e.pgroup for e in seen} == {"p12345"}
    log_text = (system.raw_dir / "JF_pedestals" / f"{done['pedestal']}.log").read_text()
    assert " INFO pedestal mode (4 frames x 2 loops): 24 frames from pulse " in log_text
    assert " DEBUG " not in log_text  # the default level, INFO


async def test_a_stopped_detector_fails_the_pedestal_before_touching_it(system: System) -> None:
    system.simulation.detectors[DETECTOR].stop()
    done = await system.pedestal()
    assert done["state"] == "failed"
    assert done["error"] == (
        f"{DETECTOR} cannot take a pedestal: modules 0: idle (power it on or start it first; "
        "a pedestal needs frames of every module)"
    )
    assert system.simulation.detectors[DETECTOR].commands == ["illuminated False", "stop"]
    assert not (system.pedestal_root / DETECTOR).exists()
    logging.getLogger(__name__).info("failed as it should: %s", done["error"])
