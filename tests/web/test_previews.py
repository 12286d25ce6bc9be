"""Previews: the numbers behind the pictures, bounded reads, and the preview service's cache.

Files are written with the project's own writers (the layouts the workers produce); the service
runs its real child process.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import h5py
import numpy as np
import pytest
from pebble import ProcessExpired
from PIL import Image

from sf_daq_broker.h5.channels import ChannelRows, write_channels
from sf_daq_broker.h5.detector import DetectorFileWriter, FrameColumns
from sf_daq_broker.web import render
from sf_daq_broker.web.previews import PreviewBusy, PreviewService
from sf_daq_broker.web.runs import detector_layout
from tests.support import PATIENCE, async_wait_until
from tests.web import preview_support


def write_detector(
    path: Path,
    frames: np.ndarray,
    good: list[int],
    mask: np.ndarray | None,
    converted: bool = True,
) -> None:
    count = len(frames)
    columns = FrameColumns.from_arrays(
        pulse_id=np.arange(count) + 100,
        frame_index=np.arange(count),
        daq_rec=np.zeros(count),
        is_good_frame=good,
        requested_pulse_id=np.arange(count) + 100,
    )
    with DetectorFileWriter(
        path,
        "JF13T01V01",
        count,
        frames.shape[1:],
        frames.dtype,
        pixel_mask=mask,
        conversion_factor=1.0 if converted else None,
    ) as writer:
        writer.write(frames, columns)


def test_block_reduce_ignores_masked_pixels_and_pads_the_edges() -> None:
    image = np.array(
        [
            [1, 2, 3, 4, 5],
            [5, 6, 7, np.nan, 9],
            [9, 10, 11, 12, 13],
        ],
        dtype=np.float32,
    )
    mean, peak = render.block_reduce(image, 2)
    np.testing.assert_allclose(mean, [[3.5, 14 / 3, 7], [9.5, 11.5, 13]], rtol=1e-6)
    np.testing.assert_array_equal(peak, [[6, 7, 9], [10, 12, 13]])
    assert render.block_factor((2056, 1030)) == 5
    assert render.block_factor((100, 512)) == 1


def test_detector_images_average_the_first_good_frames(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).normal(size=(6, 4, 6)).astype(np.float32)
    mask = np.ones((4, 6), dtype=bool)
    mask[1, 2] = False
    path = tmp_path / "det.h5"
    write_detector(path, frames, [0, 1, 1, 0, 1, 1], mask)

    images = render.detector_images(str(path), "JF13T01V01", frames=3)
    assert images.frames == [1, 2, 4]
    assert (images.factor, images.unit, images.good_frames) == (1, "keV", True)
    expected = frames[[1, 2, 4]].astype(np.float64)
    expected[:, 1, 2] = np.nan
    np.testing.assert_allclose(images.mean, expected.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(images.max, expected.max(axis=0))
    assert np.isnan(images.mean[1, 2]) and np.isnan(images.max[1, 2])


def test_raw_detector_frames_lose_their_gain_bits(tmp_path: Path) -> None:
    frames = np.full((2, 2, 4), 0xC000 | 100, dtype=np.uint16)
    frames[1] = 0x4000 | 300
    path = tmp_path / "raw.h5"
    write_detector(path, frames, [1, 1], None, converted=False)
    images = render.detector_images(str(path), "JF13T01V01")
    np.testing.assert_array_equal(images.mean, np.full((2, 4), 200.0))
    np.testing.assert_array_equal(images.max, np.full((2, 4), 300.0))
    assert images.unit == "ADC counts (gain bits removed)"


def test_no_good_frame_uses_the_first_frames_and_says_so(tmp_path: Path) -> None:
    frames = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    path = tmp_path / "bad.h5"
    write_detector(path, frames, [0, 0, 0], None)
    images = render.detector_images(str(path), "JF13T01V01", frames=2)
    assert (images.frames, images.good_frames) == ([0, 1], False)
    np.testing.assert_array_equal(images.mean, frames[:2].mean(axis=0))


def test_channel_plots_read_a_bounded_number_of_values(tmp_path: Path) -> None:
    count = 10_001
    pulse_ids = np.arange(count, dtype=np.int64) + 1000
    long = ChannelRows("LONG", pulse_ids, pulse_ids, np.arange(count, dtype=np.float64))
    waves = ChannelRows("WAVE", pulse_ids[:3], pulse_ids[:3], np.array([[1, 2], [3, 4], [5, 9]]))
    text = ChannelRows("TEXT", pulse_ids[:1], pulse_ids[:1], ["on"])
    path = tmp_path / "bsdata.h5"
    write_channels(path, {}, [long, waves, text])

    x, y, total, what = render.channel_series(str(path), "LONG")
    assert (total, len(x), what) == (count, 3334, "every 3th value")
    np.testing.assert_array_equal(x[:3], [1000, 1003, 1006])
    np.testing.assert_array_equal(y[-1], 9999)
    x, y, total, what = render.channel_series(str(path), "WAVE")
    assert (total, what) == (3, "mean of 3 of 3 waveforms")
    np.testing.assert_array_equal(y, [3, 5])
    with pytest.raises(ValueError, match="TEXT holds strings, which are not plotted"):
        render.channel_series(str(path), "TEXT")
    picture = render.draw(render.PreviewSpec(render.PreviewKind.CHANNEL, str(path), "TEXT"))
    assert Image.open(io.BytesIO(picture)).size == (480, 240)


def test_pv_values_show_the_first_values_of_each_pv(tmp_path: Path) -> None:
    path = tmp_path / "pvs.h5"
    many = np.arange(30, dtype=np.int64)
    write_channels(
        path,
        {},
        [
            ChannelRows(
                "PV:A",
                many,
                many,
                many * 2,
                extra={"changed_in_interval": many % 2 == 0},
            ),
            ChannelRows("PV:S", many[:1], many[:1], ["open"]),
        ],
    )
    values = render.pv_values(str(path), ["PV:A", "PV:S", "PV:GONE"])
    assert values[0].count == 30 and len(values[0].rows) == render.PV_VALUES
    assert values[0].rows[:2] == [(0, "0", True), (1, "2", False)]
    assert values[1].rows == [(0, "open", True)]
    assert (values[2].count, values[2].problem) == (0, "not in the file")


def test_a_file_in_another_layout_gives_a_picture_of_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file["data/JF13T01V01/data"] = np.zeros((2, 3))
    spec = render.PreviewSpec(render.PreviewKind.DETECTOR, str(path), "JF13T01V01")
    assert Image.open(io.BytesIO(render.draw(spec))).size == (960, 420)
    with pytest.raises(ValueError, match=r"is \(2, 3\), not \(frames, y, x\)"):
        render.detector_images(str(path), "JF13T01V01")


async def test_the_service_computes_once_caches_and_refuses_a_flood() -> None:
    picture_bytes = len(render.text_png("a", (100, 50)))
    # Room for one picture and a few small results, not for two pictures.
    service = PreviewService(cache_bytes=picture_bytes + 200, max_pending=2)
    try:
        first, second = await asyncio.gather(
            service.get("a", render.text_png, "a", (100, 50)),
            service.get("a", render.text_png, "a", (100, 50)),
        )
        assert first == second and service.computed == 1
        assert Image.open(io.BytesIO(first)).size == (100, 50)
        assert await service.get("a", render.text_png, "a", (100, 50)) == first
        assert service.computed == 1

        results = await asyncio.gather(
            service.get("b", pow, 2, 10),
            service.get("c", pow, 3, 3),
            service.get("d", pow, 4, 2),
            return_exceptions=True,
        )
        assert list(results[:2]) == [1024, 27]
        assert isinstance(results[2], PreviewBusy)

        # The second picture pushes out the least recently used entry, the first picture.
        await service.get("e", render.text_png, "e", (100, 50))
        assert service.cached("a") is None
        assert service.cached("b") == 1024
    finally:
        await asyncio.to_thread(service.close)


@pytest.mark.parametrize(
    ("options", "layout"),
    [
        ({}, "converted, modules stacked (no geometry)"),
        ({"geometry": True}, "geometry-corrected"),
        ({"adc_to_energy": False, "geometry": True}, "raw file: modules stacked"),
        ({"unknown": 1}, "options not understood"),
    ],
)
def test_the_detector_preview_says_how_the_file_is_laid_out(
    options: dict[str, object], layout: str
) -> None:
    assert detector_layout({"detectors": {"JF13T01V01": options}}, "JF13T01V01") == layout


async def test_a_dead_preview_process_is_replaced() -> None:
    service = PreviewService()
    try:
        with pytest.raises(ProcessExpired) as died:
            await service.get("boom", os._exit, 3)  # the child dies as on a crash
        assert died.value.exitcode == 3
        assert await service.get("next", pow, 2, 5) == 32
    finally:
        await asyncio.to_thread(service.close)


def process_is_gone(pid: int) -> bool:
    """Whether no process has the id ``pid`` (ended and reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def started_child(started: Path) -> int:
    """The pid of the child once a preview of ``preview_support`` says it started."""
    await async_wait_until(started.exists, what=f"{started.name} from the preview process")
    return int(started.read_text())


async def test_a_stuck_preview_times_out_its_process_ends_and_the_next_preview_runs(
    tmp_path: Path,
) -> None:
    timeout = 1.5
    service = PreviewService(timeout=timeout)
    try:
        child = await service.get("pid", os.getpid)  # started: its start-up is not measured
        started = tmp_path / "started"
        asked = time.monotonic()
        with pytest.raises(TimeoutError):
            await service.get("stuck", preview_support.wait_forever, str(started))
        assert time.monotonic() - asked >= timeout
        assert await started_child(started) == child
        assert process_is_gone(child)
        # The next preview is not stuck behind it: a new child computes it.
        replacement = await asyncio.wait_for(service.get("pid again", os.getpid), PATIENCE)
        assert replacement != child
        assert await service.get("next", pow, 2, 5) == 32
    finally:
        await asyncio.to_thread(service.close)


async def test_time_spent_waiting_behind_another_preview_does_not_count(tmp_path: Path) -> None:
    """Each preview runs ``hold`` seconds, well within the timeout, but the second one waits
    ``hold`` seconds behind the first: answered ``2 * hold`` after it was asked for, more
    than the timeout. Only a timeout counted from the start of its own run lets it finish."""
    timeout, hold = 10.0, 5.5  # 4.5 s of room for a loaded machine; 2 * hold > timeout
    service = PreviewService(timeout=timeout)
    try:
        await service.get("pid", os.getpid)  # started: its start-up is not measured
        started, gate = tmp_path / "started", tmp_path / "gate"
        first = asyncio.ensure_future(
            service.get("first", preview_support.wait_for_gate, str(started), str(gate))
        )
        await started_child(started)
        asked = time.monotonic()
        second = asyncio.ensure_future(service.get("second", preview_support.run_for, hold))
        # Not a synchronisation: how long the second preview waits is what is tested.
        await asyncio.sleep(hold)
        gate.touch()
        results = await asyncio.wait_for(asyncio.gather(first, second), PATIENCE)
        assert list(results) == ["opened", hold]
        assert time.monotonic() - asked > timeout
    finally:
        await asyncio.to_thread(service.close)


async def test_close_terminates_a_stuck_preview_instead_of_waiting_for_it(
    tmp_path: Path,
) -> None:
    service = PreviewService()  # the default timeout (120 s) would end it only much later
    started = tmp_path / "started"
    stuck = asyncio.ensure_future(service.get("stuck", preview_support.wait_forever, str(started)))
    try:
        child = await started_child(started)
    except BaseException:
        await asyncio.to_thread(service.close)
        raise
    await asyncio.wait_for(asyncio.to_thread(service.close), PATIENCE)
    assert process_is_gone(child)
    # The page waiting for the stuck preview gets an answer too (from pebble as it stops, or
    # from the service for a preview pebble left waiting).
    with pytest.raises(BrokenProcessPool):
        await asyncio.wait_for(stuck, PATIENCE)


async def test_a_child_that_cannot_start_fails_its_previews_and_the_next_one_gets_a_new_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = PreviewService()
    try:
        monkeypatch.setattr(render, "init_preview_process", preview_support.fail_to_start)
        with pytest.raises(BrokenProcessPool):
            await asyncio.wait_for(service.get("a", pow, 2, 3), PATIENCE)
        monkeypatch.undo()
        assert await asyncio.wait_for(service.get("a", pow, 2, 3), PATIENCE) == 8
    finally:
        await asyncio.to_thread(service.close)
