"""The api/1 frame format byte by byte, and the decoder on hand-made streams."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Literal

import bitshuffle
import h5py
import hdf5plugin
import numpy as np
import pytest

from sf_daq_broker.buffers.api1_decoder import EventBatch, FrameDecoder
from sf_daq_broker.buffers.api1_format import (
    ChannelHeader,
    compress_value,
    decompress_value,
    event_frame,
    header_frame,
)
from sf_daq_broker.buffers.dates import (
    date_to_ns,
    global_seconds_to_ns,
    ns_to_date,
    ns_to_global_seconds,
)
from sf_daq_broker.buffers.errors import CorruptStream, StreamCut, UnsupportedFormat
from sf_daq_broker.simulation.api1_server import encode_events
from sf_daq_broker.simulation.channels import ChannelSpec, expected_values
from sf_daq_broker.simulation.clock import PulseTiming
from tests.buffers.helpers import P0, T0_MS

TIMING = PulseTiming(P0, T0_MS)


def frame(mtype: int, payload: bytes) -> bytes:
    """A frame built independently of the code under test."""
    return (
        struct.pack(">ib", 1 + len(payload), mtype) + payload + struct.pack(">i", 1 + len(payload))
    )


def header_bytes(document: dict[str, object]) -> bytes:
    return frame(0, json.dumps(document).encode())


def event_bytes(ts: int, pid: int, value: bytes) -> bytes:
    return frame(1, struct.pack(">qq", ts, pid) + value)


def decode(stream: bytes, chunk: int | None = None, *, decompress: bool = True) -> list[object]:
    decoder = FrameDecoder(decompress=decompress)
    items: list[object] = []
    step = chunk or max(1, len(stream))
    for begin in range(0, len(stream), step):
        items += decoder.feed(stream[begin : begin + step])
    items += decoder.finish()
    return items


def batches(items: list[object]) -> list[EventBatch]:
    return [item for item in items if isinstance(item, EventBatch)]


def test_header_frame_bytes() -> None:
    header = ChannelHeader("A:B", "float64", "BIG_ENDIAN", (2000,), False)
    payload = (
        b'{"name":"A:B","type":"float64","byteOrder":"BIG_ENDIAN","shape":[2000],"compression":0}'
    )
    assert header_frame(header) == frame(0, payload)


def test_image_header_lists_width_first() -> None:
    header = ChannelHeader("CAM:FPICTURE", "uint16", "LITTLE_ENDIAN", (480, 640), True)
    assert header.to_json()["shape"] == [640, 480]
    assert ChannelHeader.from_json(header.to_json()) == header


def test_event_frame_bytes() -> None:
    value = struct.pack(">d", 1.5)
    assert event_frame(123, 456, value) == event_bytes(123, 456, value)
    assert len(event_frame(1, 2, b"xyz")) == 4 + 1 + 16 + 3 + 4


def test_encoded_scalar_events_are_exact_frames() -> None:
    spec = ChannelSpec(name="S", type="int32", byte_order="BIG_ENDIAN")
    pids = np.array([P0, P0 + 1], dtype=np.int64)
    values = expected_values(spec, pids)
    expected = b"".join(
        event_bytes(TIMING.ts_ns(int(p)), int(p), struct.pack(">i", int(v)))
        for p, v in zip(pids, values, strict=True)
    )
    assert encode_events(spec, pids, TIMING) == expected


def test_little_endian_waveform_bytes() -> None:
    spec = ChannelSpec(name="W", type="uint16", shape=(3,), byte_order="LITTLE_ENDIAN")
    (value,) = expected_values(spec, [P0])
    encoded = encode_events(spec, np.array([P0]), TIMING)
    assert encoded == event_bytes(TIMING.ts_ns(P0), P0, struct.pack("<3H", *value.tolist()))


def test_compressed_value_is_an_hdf5_bitshuffle_chunk(tmp_path: Path) -> None:
    image = (np.arange(480 * 640).reshape(480, 640) % 1000).astype(">u2")
    blob = compress_value(image)
    nbytes, block = struct.unpack_from(">QI", blob)
    assert (nbytes, block) == (image.nbytes, 8192)
    assert blob[12:] == bitshuffle.compress_lz4(image, 8192 // 2).tobytes()
    # The blob written as a chunk of an HDF5 dataset with the bitshuffle filter reads back.
    path = tmp_path / "chunk.h5"
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset(
            "data",
            shape=(1, 480, 640),
            dtype=">u2",
            chunks=(1, 480, 640),
            **hdf5plugin.Bitshuffle(nelems=4096, cname="lz4"),
        )
        dataset.id.write_direct_chunk((0, 0, 0), blob)
    with h5py.File(path, "r") as handle:
        np.testing.assert_array_equal(handle["data"][0], image)
    header = ChannelHeader("C", "uint16", "BIG_ENDIAN", (480, 640), True)
    decoded = decompress_value(blob, header)
    assert decoded.dtype == np.dtype("=u2")
    np.testing.assert_array_equal(decoded, image)


@pytest.mark.parametrize("chunk", [None, 1, 7, 100])
def test_decoder_any_chunking(chunk: int | None) -> None:
    stream = (
        header_bytes(
            {"name": "X", "type": "int16", "byteOrder": "BIG_ENDIAN", "shape": [], "compression": 0}
        )
        + b"".join(event_bytes(10 + i, 20 + i, struct.pack(">h", -i)) for i in range(5))
        + header_bytes({"name": "T", "type": "string", "byteOrder": "BIG_ENDIAN"})
        + event_bytes(1, 2, "grüß".encode())
    )
    items = decode(stream, chunk)
    got = batches(items)
    pulse_ids = np.concatenate([b.pulse_id for b in got if b.header.name == "X"])
    values = np.concatenate(
        [b.values for b in got if b.header.name == "X" and b.values is not None]
    )
    assert pulse_ids.tolist() == [20, 21, 22, 23, 24]
    assert values.tolist() == [0, -1, -2, -3, -4]
    assert values.dtype == np.dtype("=i2")
    strings = [b for b in got if b.header.name == "T"]
    assert strings[0].values is not None and strings[0].values.tolist() == ["grüß"]
    assert [i.name for i in items if isinstance(i, ChannelHeader)] == ["X", "T"]


def test_decoder_shapes_and_legacy_forms() -> None:
    stream = (
        header_bytes({"name": "L", "type": "float64", "byteOrder": "BIG_ENDIAN", "shape": [1]})
        + event_bytes(1, 1, struct.pack(">d", 2.5))
        + header_bytes({"name": "N", "type": "uint8", "compression": None})
        + event_bytes(1, 1, b"\x07")
        + header_bytes({"name": "OLD"})
        + header_bytes({"name": "I", "type": "uint8", "shape": [3, 2], "compression": "0"})
        + event_bytes(1, 1, bytes(range(6)))
    )
    items = decode(stream)
    headers = {i.name: i for i in items if isinstance(i, ChannelHeader)}
    assert headers["L"].shape == () and headers["N"].shape == ()
    assert headers["OLD"].has_data is False
    assert headers["I"].shape == (2, 3)
    values = {b.header.name: b.values for b in batches(items)}
    assert values["L"] is not None and values["L"].tolist() == [2.5]
    assert values["I"] is not None and values["I"][0].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_decoder_keeps_blobs_untouched() -> None:
    image = (np.arange(6 * 4, dtype="<u2") * 3).reshape(6, 4)
    blob = compress_value(image)
    document = {
        "name": "C:FPICTURE",
        "type": "uint16",
        "byteOrder": "LITTLE_ENDIAN",
        "shape": [4, 6],
        "compression": 1,
    }
    stream = header_bytes(document) + event_bytes(5, 6, blob)
    (raw,) = batches(decode(stream, decompress=False))
    assert raw.values is None and raw.blobs == [blob]
    (decoded,) = batches(decode(stream))
    assert decoded.values is not None
    np.testing.assert_array_equal(decoded.values[0], image)


def test_length_mismatch_is_corrupt() -> None:
    good = event_bytes(1, 2, struct.pack(">d", 1.0))
    bad = good[:-4] + struct.pack(">i", 99)
    head = header_bytes({"name": "X", "type": "float64", "shape": []})
    with pytest.raises(CorruptStream, match="length mismatch"):
        decode(head + bad)


def test_value_size_mismatch_is_corrupt() -> None:
    head = header_bytes({"name": "X", "type": "float64", "shape": [2]})
    with pytest.raises(CorruptStream, match="needs 16"):
        decode(head + event_bytes(1, 2, struct.pack(">d", 1.0)))


def test_fast_path_stops_at_a_bad_frame() -> None:
    head = header_bytes({"name": "X", "type": "int32", "shape": []})
    events = b"".join(event_bytes(i, i, struct.pack(">i", i)) for i in range(10))
    broken = events[: 5 * 29] + b"\x00\x00\x00\x1e" + events[5 * 29 + 4 :]
    with pytest.raises(CorruptStream):
        decode(head + broken)


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"name": "X", "type": "complex128"}, UnsupportedFormat),
        ({"name": "X", "type": "int8", "compression": 2}, UnsupportedFormat),
        ({"name": "X", "type": "int8", "byteOrder": "MIDDLE"}, UnsupportedFormat),
        ({"name": "X", "type": "int8", "shape": [2, 2, 2]}, UnsupportedFormat),
        ({"name": "X", "type": "int8", "shape": "big"}, CorruptStream),
        ({"type": "int8"}, CorruptStream),
    ],
)
def test_bad_headers(document: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(header_bytes(document))


def test_event_before_header_and_unknown_mtype() -> None:
    with pytest.raises(CorruptStream, match="without a channel header"):
        decode(event_bytes(1, 2, b"x"))
    with pytest.raises(CorruptStream, match="unknown frame type 7"):
        decode(frame(7, b"x"))
    with pytest.raises(CorruptStream, match="impossible frame length"):
        decode(struct.pack(">i", -5) + b"\x00" * 10)


def test_cut_stream_is_stream_cut() -> None:
    head = header_bytes({"name": "X", "type": "int32", "shape": []})
    whole = head + event_bytes(1, 2, struct.pack(">i", 3))
    for cut in (len(head) + 1, len(whole) - 1, 2):
        with pytest.raises(StreamCut):
            decode(whole[:cut])


def test_corrupt_compressed_value() -> None:
    document = {"name": "C", "type": "uint16", "shape": [4], "compression": 1}
    blob = struct.pack(">QI", 8, 8192) + b"\x00\x00\x00\x20" + b"garbage!" * 4
    with pytest.raises(CorruptStream):
        decode(header_bytes(document) + event_bytes(1, 2, blob))
    wrong_size = struct.pack(">QI", 10, 8192) + b""
    with pytest.raises(CorruptStream, match="holds 10 bytes"):
        decode(header_bytes(document) + event_bytes(1, 2, wrong_size))


def test_dates_truncate_to_microseconds() -> None:
    ns = 1_629_205_200_123_456_789
    assert ns_to_date(ns) == "2021-08-17T13:00:00.123456Z"
    assert date_to_ns("2021-08-17T13:00:00.123456Z") == 1_629_205_200_123_456_000
    assert date_to_ns("2021-08-17T13:00:00.123456") == 1_629_205_200_123_456_000
    assert date_to_ns("2021-08-17T15:00:00.123456+02:00") == 1_629_205_200_123_456_000
    assert ns_to_global_seconds(ns) == "1629205200.123456789"
    assert global_seconds_to_ns("1629205200.123456789") == ns
    assert global_seconds_to_ns(1629205200.551143) == 1_629_205_200_551_143_000


def test_pulse_timestamps_follow_the_buffers_formula() -> None:
    pid = P0 + 123
    assert TIMING.ts_ns(pid) == T0_MS * 1_000_000 + 123 * 10_000_000 + pid % 1_000_000
    for ns in (TIMING.ts_ns(pid), TIMING.ts_ns(pid) - 1, TIMING.ts_ns(pid) + 1):
        first = TIMING.first_pulse_at_or_after(ns)
        assert TIMING.ts_ns(first) >= ns > TIMING.ts_ns(first - 1)
    # endDate = ts(stop + 1) truncated to µs keeps stop and excludes stop + 1.
    stop = P0 + 999_999  # sub-millisecond part wraps here
    end = date_to_ns(ns_to_date(TIMING.ts_ns(stop + 1)))
    assert TIMING.pulses_in(date_to_ns(ns_to_date(TIMING.ts_ns(P0))), end) == range(P0, stop + 1)


def compressed_stream(values: np.ndarray, document: dict[str, object]) -> bytes:
    """A channel of compressed values, framed independently of the bulk encoder."""
    events = b"".join(
        event_bytes(1000 + i, 2000 + i, compress_value(value)) for i, value in enumerate(values)
    )
    return header_bytes(document) + events


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
@pytest.mark.parametrize(
    ("type_name", "byte_order", "shape"),
    [
        ("uint16", "BIG_ENDIAN", (517,)),  # a partial last block and 5 leftover elements
        ("float64", "LITTLE_ENDIAN", (3,)),  # no block at all, only leftover elements
        ("int32", "BIG_ENDIAN", (5000,)),  # several 8 KiB blocks
        ("uint8", "LITTLE_ENDIAN", (6, 7)),  # an image
    ],
)
def test_compressed_values_decode_in_bulk_across_any_chunking(
    chunk: int | None, type_name: str, byte_order: str, shape: tuple[int, ...]
) -> None:
    order: Literal[">", "<"] = ">" if byte_order == "BIG_ENDIAN" else "<"
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    native = (rng.integers(0, 100, (9, *shape)) - 50).astype(type_name)
    wire_shape = list(shape[::-1]) if len(shape) == 2 else list(shape)
    document = {
        "name": "C",
        "type": type_name,
        "byteOrder": byte_order,
        "shape": wire_shape,
        "compression": 1,
    }
    stream = compressed_stream(native.astype(native.dtype.newbyteorder(order)), document)
    got = batches(decode(stream, chunk))
    values = np.concatenate([b.values for b in got if b.values is not None])
    assert values.dtype == np.dtype(type_name).newbyteorder("=")
    np.testing.assert_array_equal(values, native)
    assert np.concatenate([b.pulse_id for b in got]).tolist() == list(range(2000, 2009))
    assert np.concatenate([b.timestamp for b in got]).tolist() == list(range(1000, 1009))
    kept = batches(decode(stream, chunk, decompress=False))
    blobs = [blob for b in kept for blob in b.blobs or ()]
    assert blobs == [compress_value(v.astype(v.dtype.newbyteorder(order))) for v in native]


def test_a_block_length_beyond_the_value_is_corrupt_not_read() -> None:
    document = {"name": "C", "type": "uint16", "shape": [4096], "compression": 1}
    good = compress_value(np.arange(4096, dtype=">u2"))
    # the first block claims 100 bytes more than the value holds; the next event's bytes follow
    (first_block,) = struct.unpack_from(">I", good, 12)
    bad = good[:12] + struct.pack(">I", first_block + 100) + good[16:]
    stream = header_bytes(document) + event_bytes(1, 7, bad) + event_bytes(2, 8, good * 2)
    with pytest.raises(CorruptStream, match="channel C: cannot decompress a value"):
        decode(stream)


def test_bad_block_size_is_named() -> None:
    document = {"name": "C", "type": "uint16", "shape": [4], "compression": 1}
    blob = struct.pack(">QI", 8, 8191) + b"\x00" * 8
    with pytest.raises(CorruptStream, match="bad block size 8191"):
        decode(header_bytes(document) + event_bytes(1, 2, blob))


def test_a_string_that_is_not_utf8_names_its_pulse() -> None:
    head = header_bytes({"name": "T", "type": "string"})
    events = event_bytes(1, 10, b"ok") + event_bytes(2, 11, b"\xff\xfe") + event_bytes(3, 12, b"x")
    with pytest.raises(CorruptStream, match="channel T: pulse 11: not UTF-8"):
        decode(head + events)


def test_bulk_encoding_is_compress_value_per_event() -> None:
    spec = ChannelSpec(name="W", type="uint16", shape=(300,), compression="bitshuffle_lz4")
    pids = np.arange(P0, P0 + 20, dtype=np.int64)
    values = expected_values(spec, pids)
    expected = b"".join(
        event_frame(TIMING.ts_ns(int(p)), int(p), compress_value(v.astype(">u2")))
        for p, v in zip(pids, values, strict=True)
    )
    assert encode_events(spec, pids, TIMING) == expected
