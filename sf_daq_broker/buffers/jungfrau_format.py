"""The Jungfrau detector buffer on disk (BUFFERS.md §4), shared by the reader and the simulator.

``{root}/{DET}/M{mm}/{pid // 100000 * 100000}/{pid // 1000 * 1000}.bin`` holds the pulses
``[pid // 1000 * 1000, +1000)`` of one module, record ``pid % 1000`` at byte offset
``(pid % 1000) * RECORD_BYTES``; the file is created at full size (1000 records + 1 byte,
sparse), so a record never written reads as zeros (marker 0). ``{root}/{DET}/M{mm}/LATEST``
holds the path of the module's last closed file; its mtime says whether the module runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MODULE_ROWS = 512
MODULE_COLS = 1024
PULSES_PER_FILE = 1000
PULSES_PER_FOLDER = 100_000
MARKER_WRITTEN = 0xBE
PACKETS_PER_FRAME = 128
ROWS_PER_PACKET = MODULE_ROWS // PACKETS_PER_FRAME
LATEST_NAME = "LATEST"

#: The record's header fields (41 bytes), packed little-endian.
HEADER_DTYPE = np.dtype(
    [
        ("marker", "u1"),
        ("pulse_id", "<u8"),
        ("frame_index", "<u8"),
        ("daq_rec", "<u8"),
        ("n_recv_packets", "<u8"),
        ("module_id", "<u8"),
    ]
)
HEADER_FIELDS: tuple[str, ...] = tuple(HEADER_DTYPE.names or ())
#: One record: the header then the module's pixels, packed (1 048 617 bytes).
RECORD_DTYPE = np.dtype(
    [
        *((name, HEADER_DTYPE[name]) for name in HEADER_FIELDS),
        ("data", "<u2", (MODULE_ROWS, MODULE_COLS)),
    ]
)
RECORD_BYTES = RECORD_DTYPE.itemsize
FILE_BYTES = PULSES_PER_FILE * RECORD_BYTES + 1
assert RECORD_BYTES == 1_048_617

_DETECTOR_NAME = re.compile(r"^JF(\d\d)T(\d\d)V(\d\d)$")


def n_modules(detector: str) -> int:
    """Number of modules of ``JFxxTyyVzz`` (the ``yy``)."""
    match = _DETECTOR_NAME.match(detector)
    if match is None:
        raise ValueError(f"{detector!r} is not a detector name JFxxTyyVzz")
    return int(match.group(2))


def module_dir(root: Path, detector: str, module: int) -> Path:
    return Path(root) / detector / f"M{module:02d}"


def file_first_pulse(pid: int) -> int:
    """First pulse id of the file holding ``pid``."""
    return pid // PULSES_PER_FILE * PULSES_PER_FILE


def data_file(root: Path, detector: str, module: int, pid: int) -> Path:
    """The file holding pulse ``pid`` of one module."""
    folder = pid // PULSES_PER_FOLDER * PULSES_PER_FOLDER
    return module_dir(root, detector, module) / str(folder) / f"{file_first_pulse(pid)}.bin"


def record_offset(pid: int) -> int:
    """Byte offset of the record of ``pid`` in its file."""
    return (pid % PULSES_PER_FILE) * RECORD_BYTES


def latest_file(root: Path, detector: str, module: int) -> Path:
    return module_dir(root, detector, module) / LATEST_NAME


def first_pulse_of_file(path: Path) -> int:
    """The first pulse id of a data file, from its name (``15000001000.bin``)."""
    return int(Path(path).stem)
