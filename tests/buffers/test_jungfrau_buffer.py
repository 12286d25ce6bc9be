"""Jungfrau buffer files: layout byte by byte, writer (eager and lazy), reader, faults."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from sf_daq_broker.buffers import jungfrau_format as fmt
from sf_daq_broker.buffers.errors import DataAgedOut, DataNotYetAvailable, ModuleMissing
from sf_daq_broker.buffers.jungfrau_buffer import JungfrauBufferReader
from sf_daq_broker.simulation.calibration import write_calibration_files
from sf_daq_broker.simulation.clock import ManualClock
from sf_daq_broker.simulation.faults import ALL, PulseSelection
from sf_daq_broker.simulation.jungfrau_frames import (
    detector_calibration,
    expected_frame,
    module_calibration,
)
from sf_daq_broker.simulation.jungfrau_writer import JungfrauBufferWriter, lost_packets

DET1 = "JF13T01V01"
DET3 = "JF07T03V01"
#: Close to a file boundary, so a few pulses cover two files.
START = 15_000_000_995


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START, 1_629_205_200_000)


@pytest.fixture
def writer(tmp_path: Path, clock: ManualClock) -> Iterator[JungfrauBufferWriter]:
    jf = JungfrauBufferWriter(tmp_path / "buffer", [DET1, DET3], clock)
    yield jf
    jf.close()


def test_record_layout() -> None:
    assert fmt.RECORD_BYTES == 1_048_617 == 41 + 512 * 1024 * 2
    fields, names = fmt.RECORD_DTYPE.fields, fmt.RECORD_DTYPE.names
    assert fields is not None and names is not None
    offsets = {name: fields[name][1] for name in names}
    assert offsets == {
        "marker": 0,
        "pulse_id": 1,
        "frame_index": 9,
        "daq_rec": 17,
        "n_recv_packets": 25,
        "module_id": 33,
        "data": 41,
    }
    assert fmt.FILE_BYTES == 1000 * 1_048_617 + 1
    pid = 15_123_456_789
    path = fmt.data_file(Path("/b"), DET3, 2, pid)
    assert path == Path("/b/JF07T03V01/M02/15123400000/15123456000.bin")
    assert fmt.record_offset(pid) == 789 * 1_048_617
    assert fmt.n_modules("JF07T32V01") == 32
    with pytest.raises(ValueError):
        fmt.n_modules("JF7T32V01")


def test_writer_files_records_and_latest(
    writer: JungfrauBufferWriter, clock: ManualClock, tmp_path: Path
) -> None:
    writer.catch_up()
    clock.advance_to(START + 9)  # pulses ...995 to ...004: two files per module
    assert writer.catch_up() == 9
    root = tmp_path / "buffer"
    first = fmt.data_file(root, DET1, 0, START)
    second = fmt.data_file(root, DET1, 0, START + 9)
    assert first.name == "15000000000.bin" and second.name == "15000001000.bin"
    for path in (first, second):
        assert path.stat().st_size == fmt.FILE_BYTES
        assert path.stat().st_blocks * 512 < fmt.FILE_BYTES // 10  # sparse
    assert fmt.latest_file(root, DET1, 0).read_text() == f"{first}\n"
    # Byte level: the record of START+7 in the second file.
    pid = START + 7
    with second.open("rb") as handle:
        handle.seek(fmt.record_offset(pid))
        raw = handle.read(fmt.RECORD_BYTES)
    marker, pulse_id, frame_index, daq_rec, packets, module_id = struct.unpack_from("<BQQQQQ", raw)
    assert (marker, pulse_id, frame_index, daq_rec, packets, module_id) == (0xBE, pid, 8, 0, 128, 0)
    pixels = np.frombuffer(raw, dtype="<u2", offset=41).reshape(512, 1024)
    np.testing.assert_array_equal(pixels, expected_frame(DET1, 0, pid))
    # A never-written slot reads as zeros.
    with second.open("rb") as handle:
        handle.seek(fmt.record_offset(START + 100))
        assert handle.read(fmt.RECORD_BYTES) == bytes(fmt.RECORD_BYTES)
    record = writer.expected_record(DET3, 2, pid)
    assert record is not None
    with fmt.data_file(root, DET3, 2, pid).open("rb") as handle:
        handle.seek(fmt.record_offset(pid))
        assert handle.read(fmt.RECORD_BYTES) == record.tobytes()


def test_reader_stacks_modules_with_headers(
    writer: JungfrauBufferWriter, clock: ManualClock
) -> None:
    writer.catch_up()
    clock.advance_to(START + 9)
    writer.catch_up()
    reader = JungfrauBufferReader(writer.buffer_root, DET3)
    assert reader.n_modules == 3
    assert [reader.latest_pulse_id(m) for m in range(3)] == [15_000_000_999] * 3
    pids = [START, START + 2, START + 4]  # evenly spaced: one strided copy per module
    frames = reader.read(pids)
    assert frames.data.shape == (3, 1536, 1024) and frames.data.dtype == np.uint16
    for i, pid in enumerate(pids):
        for m in range(3):
            np.testing.assert_array_equal(
                frames.data[i, m * 512 : (m + 1) * 512], expected_frame(DET3, m, pid)
            )
    assert frames.requested_pulse_id.tolist() == pids
    assert frames.pulse_id.tolist() == [[p] * 3 for p in pids]
    assert frames.module_id.tolist() == [[0, 1, 2]] * 3
    assert frames.frame_index[:, 0].tolist() == [p - START + 1 for p in pids]
    assert frames.daq_rec.tolist() == [[0] * 3] * 3
    assert frames.is_good_frame().tolist() == [True] * 3
    # Across two files (the second still open: no readiness check with missing="zeros"), in
    # an uneven order, into a reused output buffer.
    out = np.full((8, 1536, 1024), 7, dtype=np.uint16)
    again = reader.read([START + 8, START, START + 3], out=out, missing="zeros")
    assert np.shares_memory(again.data, out)
    np.testing.assert_array_equal(out[1], frames.data[0])
    np.testing.assert_array_equal(out[0, :512], expected_frame(DET3, 0, START + 8))
    np.testing.assert_array_equal(out[2, 1024:], expected_frame(DET3, 2, START + 3))
    assert (out[3:] == 7).all()
    with pytest.raises(DataNotYetAvailable):
        reader.read([START + 5])


def test_reader_readiness_and_retention(
    writer: JungfrauBufferWriter, clock: ManualClock, tmp_path: Path
) -> None:
    reader = JungfrauBufferReader(writer.buffer_root, DET1)
    with pytest.raises(ModuleMissing):
        reader.read([START])
    writer.catch_up()
    clock.advance_to(START + 4)
    writer.catch_up()
    assert reader.latest_pulse_id(0) == START + 4 and reader.latest_file(0) is not None
    assert reader.newest_pulse_id() == START + 4
    with pytest.raises(DataNotYetAvailable) as not_yet:
        reader.read([START + 5])
    assert not_yet.value.transient
    removed = writer.age_out(START + 5)
    assert len(removed) == 4  # one file per module of both detectors
    with pytest.raises(DataAgedOut) as gone:
        reader.read([START])
    assert not gone.value.transient and "aged out" in str(gone.value)
    zeros = reader.read([START], missing="zeros")
    assert not zeros.data.any() and zeros.marker.tolist() == [[0]]
    assert zeros.is_good_frame().tolist() == [False]


def test_flag_mode_reads_a_gap_as_flagged_zeros_and_fails_only_what_aged_out(
    tmp_path: Path, clock: ManualClock
) -> None:
    """A missing file is aged out only if it is older than the module's oldest surviving file;
    one newer than that (a gap: the module stopped for a while; or not written) reads as zeros,
    flagged."""
    writer = JungfrauBufferWriter(
        tmp_path / "b", [DET3], clock, retention_pulses=1_000_000, mode="lazy"
    )
    base = 15_000_000_000
    clock.advance_to(base + 4000)  # files base .. base+3000 closed, base+4000 open
    writer.catch_up()
    module1 = fmt.module_dir(writer.buffer_root, DET3, 1)
    (module1 / "14999900000").mkdir()  # an empty older folder: skipped by the listing
    (module1 / "notes.txt").write_text("not a folder of the buffer")
    fmt.data_file(writer.buffer_root, DET3, 1, base + 2000).unlink()  # module 1: a gap
    reader = JungfrauBufferReader(
        writer.buffer_root, DET3, before_read=lambda det, pids: writer.materialise(det, pids)
    )
    assert [reader.oldest_file_pulse(m) for m in range(3)] == [base] * 3
    assert reader.retention_horizon(1) == base
    pids = [base + 1500, base + 2000, base + 2500, base + 3000, base + 5500]
    frames = reader.read(pids, missing="flag")
    # base+5500: newer than every file (never written): zeros and flagged as well.
    assert frames.is_good_frame().tolist() == [True, False, False, True, False]
    assert frames.marker.tolist() == [
        [0xBE] * 3,
        [0xBE, 0, 0xBE],
        [0xBE, 0, 0xBE],
        [0xBE] * 3,
        [0, 0, 0],
    ]
    assert frames.pulse_id[:, 1].tolist() == [base + 1500, 0, 0, base + 3000, 0]
    for i, pid in enumerate(pids):
        for m in range(3):
            rows = frames.data[i, m * 512 : (m + 1) * 512]
            if frames.marker[i, m]:
                np.testing.assert_array_equal(rows, expected_frame(DET3, m, pid))
            else:
                assert not rows.any()
    # "raise" mode stays strict: a gap is an error there.
    with pytest.raises(DataAgedOut, match="never written"):
        reader.read([base + 2000])
    # Retention deletes the oldest files: base+1500 has aged out now (module 0 first), and
    # module 1's gap is older than its oldest surviving file (base+3000): aged out as well.
    writer.age_out(base + 2000)
    with pytest.raises(DataAgedOut) as gone:
        reader.read([base + 1500], missing="flag")
    path = fmt.data_file(writer.buffer_root, DET3, 0, base + 1000)
    assert str(gone.value) == (
        f"{DET3} module 0: {path} is gone: pulses {base + 1000}..{base + 1999} aged out of the "
        f"buffer (its oldest file now starts at pulse {base + 2000})"
    )
    assert not gone.value.transient
    with pytest.raises(DataAgedOut) as gap_gone:
        reader.read([base + 2000], missing="flag")  # the horizon listed before is refreshed
    path = fmt.data_file(writer.buffer_root, DET3, 1, base + 2000)
    assert str(gap_gone.value) == (
        f"{DET3} module 1: {path} is gone: pulses {base + 2000}..{base + 2999} aged out of the "
        f"buffer (its oldest file now starts at pulse {base + 3000})"
    )
    assert reader.retention_horizon(1, refresh=False) == base + 3000
    # No file left although the module closed some: everything up to LATEST has aged out.
    for path in module1.rglob("*.bin"):
        path.unlink()
    assert reader.oldest_file_pulse(1) is None
    assert reader.retention_horizon(1) == base + 4000
    writer.close()


def test_retention_deletes_old_files(tmp_path: Path, clock: ManualClock) -> None:
    writer = JungfrauBufferWriter(tmp_path / "b", [DET1], clock, retention_pulses=1000, mode="lazy")
    clock.advance_to(START + 3005)  # 15_000_004_000
    writer.catch_up()
    module = fmt.module_dir(tmp_path / "b", DET1, 0)
    files = sorted(p.name for p in module.rglob("*.bin"))
    # The newest closed file ends at ...3999: files ending 1000 pulses before that are gone.
    assert files == ["15000003000.bin", "15000004000.bin"]
    writer.close()


def test_latest_age_is_liveness(writer: JungfrauBufferWriter, clock: ManualClock) -> None:
    writer.catch_up()
    clock.advance_to(START + 5)
    writer.catch_up()
    reader = JungfrauBufferReader(writer.buffer_root, DET1)
    latest = fmt.latest_file(writer.buffer_root, DET1, 0)
    os.utime(latest, (1000.0, 1000.0))
    assert reader.latest_age(0, now=1031.0) == pytest.approx(31.0)


def test_faults_missing_module_incomplete_and_dropped(
    writer: JungfrauBufferWriter, clock: ManualClock
) -> None:
    faults = writer.faults
    faults.missing_modules.add((DET3, 1))
    faults.incomplete_frames[(DET3, 2)] = PulseSelection.of(START + 2)
    faults.dropped_frames[(ALL, -1)] = PulseSelection.of(START + 3)
    writer.catch_up()
    clock.advance_to(START + 5)
    writer.catch_up()
    reader = JungfrauBufferReader(writer.buffer_root, DET3)
    with pytest.raises(ModuleMissing, match="module 1"):
        reader.read([START + 1])
    frames = reader.read(range(START, START + 5), missing="zeros")
    assert frames.marker[:, 1].tolist() == [0] * 5
    assert frames.marker[:, 0].tolist() == [0xBE, 0xBE, 0xBE, 0, 0xBE]
    assert frames.n_recv_packets[2].tolist() == [128, 0, 128 - faults.lost_packets]
    assert frames.is_good_frame().tolist() == [False] * 5  # module 1 never wrote
    lost = lost_packets(DET3, 2, START + 2, faults.lost_packets)
    assert len(set(lost.tolist())) == faults.lost_packets
    module2 = frames.data[2, 1024:1536]
    expected = expected_frame(DET3, 2, START + 2)
    for packet in range(128):
        rows = slice(packet * 4, packet * 4 + 4)
        if packet in lost:
            assert not module2[rows].any()
        else:
            np.testing.assert_array_equal(module2[rows], expected[rows])
    single = JungfrauBufferReader(writer.buffer_root, DET1).read(range(START, START + 5))
    assert single.is_good_frame().tolist() == [True, True, True, False, True]


def test_lazy_mode_writes_on_demand(tmp_path: Path, clock: ManualClock) -> None:
    writer = JungfrauBufferWriter(tmp_path / "lazy", [DET1], clock, mode="lazy")
    calls = []

    def before_read(detector: str, pids: np.ndarray) -> None:
        calls.append(pids.tolist())
        writer.materialise(detector, pids)

    writer.catch_up()
    clock.advance_to(START + 1500)
    writer.catch_up()
    assert writer.frames_written == 0
    reader = JungfrauBufferReader(writer.buffer_root, DET1)
    assert reader.latest_pulse_id(0) == 15_000_001_999  # LATEST follows the clock (...2495)
    assert not reader.read([START + 10], missing="zeros").marker.any()
    lazy = JungfrauBufferReader(writer.buffer_root, DET1, before_read=before_read)
    frames = lazy.read([START + 10, START + 11])
    assert calls == [[START + 10, START + 11]]
    np.testing.assert_array_equal(frames.data[1], expected_frame(DET1, 0, START + 11))
    assert frames.is_good_frame().all()
    assert writer.frames_written == 2
    assert writer.materialise(DET1, [START + 10, START + 11, START + 99_999]) == 0
    writer.close()


def test_frames_have_a_realistic_gain_mix() -> None:
    frames = np.stack([expected_frame(DET1, 0, START + i) for i in range(20)])
    codes = np.bincount((frames >> 14).ravel(), minlength=4) / frames.size
    assert 0.99 < codes[0] < 0.9999 and 1e-4 < codes[1] < 0.01 and 1e-5 < codes[3] < 1e-3
    assert codes[2] == 0
    adc = frames & 0x3FFF
    calibration = module_calibration(DET1, 0)
    g0 = (frames >> 14) == 0
    photons = (adc - calibration.pedestal[0]) / calibration.gain[0]
    count = photons[g0 & (photons > 6)] / 12.4  # hits of 1, 2 or 3 photons of 12.4 keV
    assert np.abs(count - np.rint(count)).max() < 0.01
    assert set(np.unique(np.rint(count)).tolist()) == {1.0, 2.0, 3.0}
    assert not np.array_equal(frames[0], frames[8])  # noise repeats, hits do not


def test_calibration_files(tmp_path: Path) -> None:
    gain_path, pedestal_path = write_calibration_files(tmp_path, DET3)
    expected = detector_calibration(DET3, 3)
    with h5py.File(gain_path) as gain:
        assert gain["gains"].shape == (4, 1536, 1024)
        np.testing.assert_array_equal(gain["gains"][:], expected.gain)
        assert gain["gains"][0].mean() == pytest.approx(40, abs=0.01)
    with h5py.File(pedestal_path) as pedestal:
        assert pedestal["gains"].shape == (3, 1536, 1024)
        assert pedestal["gainsRMS"].shape == (3, 1536, 1024)
        assert pedestal["pixel_mask"].dtype == np.int64
        np.testing.assert_array_equal(pedestal["pixel_mask"][:], expected.pixel_mask)
        bad = (pedestal["pixel_mask"][:] != 0).mean()
        assert 0.002 < bad < 0.008
    assert [p.name for p in gain_path.parent.iterdir()] != []
    assert sorted(p.name for p in gain_path.parent.iterdir()) == ["gains.h5", "pedestal.h5"]


def test_manual_clock_never_goes_back() -> None:
    clock = ManualClock(100, 0)
    clock.advance(5)
    assert clock.current_pulse_id() == 105
    with pytest.raises(ValueError):
        clock.advance_to(104)
