"""Output files on a disk that fills up: the writing process reports ENOSPC and lives on.

HDF5 leaves a file whose deferred write failed half freed behind a valid identifier, and
h5py's next touch of it (closing it again, deallocating one of its datasets) crashes the
process (``sf_daq_broker.h5.closing``). Each case writes in a child process, so that a crash
is an exit status rather than the end of the test run, on a real tmpfs of 256 KiB, too small
for the file (``tests.support.tmpfs``: root; skipped without it, a failure under ``CI``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import PATIENCE, tmpfs

#: Lines of a child: ``{target}`` is the file to write on the small disk.
PRELUDE = """\
import contextlib, errno, gc, os
import numpy as np
from sf_daq_broker.h5.channels import ChannelFile, ChannelRows
from sf_daq_broker.h5.detector import DetectorFileWriter, FrameColumns

def rows(n):
    ids = np.arange(n, dtype=np.int64)
    return ChannelRows("A:B", ids, ids, np.ones((n, 2048)))

target = {target!r}
"""
#: Two rows and the groups of 200 more channels fit; then another writer takes the rest of
#: the disk, and the file's metadata (written when it is closed) no longer fits.
FILLED_BEFORE_CLOSING = """\
file = ChannelFile(target, {"run_number": 1})
channel = file.streamed("A:B")
channel.append(rows(2))
for index in range(200):
    file.streamed(f"C:{index}").append(rows(0))
print("write: ok")
other = os.open(target + ".other", os.O_WRONLY | os.O_CREAT)
with contextlib.suppress(OSError):
    while os.write(other, bytes(4096)):
        pass
os.close(other)
try:
    file.close()
except OSError as exc:
    print("close:", errno.errorcode[exc.errno])
os.unlink(target + ".other")
"""
CHILDREN = {
    # 2 MiB of rows on the 256 KiB disk: a write fails; the file is left by the exception.
    "channel file, a write fails": """\
try:
    with ChannelFile(target, {"run_number": 1}) as file:
        channel = file.streamed("A:B")
        channel.append(rows(128))
except OSError as exc:
    print("write:", errno.errorcode[exc.errno])
""",
    "channel file, closing fails": FILLED_BEFORE_CLOSING,
    # The same where the blocks cannot be reserved before the flush (a file system without
    # fallocate): the flush itself fails, and the file can never be closed.
    "channel file, flushing fails": """\
from sf_daq_broker.h5 import closing
closing._reserve = lambda file: None
"""
    + FILLED_BEFORE_CLOSING,
    # A 2 MiB frame of an uncompressed detector file: the writer is left by the exception.
    "detector file, a write fails": """\
columns = FrameColumns.from_arrays(
    pulse_id=[1], frame_index=[1], daq_rec=[0], is_good_frame=[1], requested_pulse_id=[1]
)
try:
    with DetectorFileWriter(
        target, "JF01T01V01", 1, (512, 1024), np.float32, compression=False
    ) as writer:
        writer.write(np.ones((1, 512, 1024), np.float32), columns)
except OSError as exc:
    print("write:", errno.errorcode[exc.errno])
""",
}
#: After each case: the objects are dropped, the file removed, its space is free again.
EPILOGUE = """\
del {name}
gc.collect()
os.unlink(target)
disk = os.statvfs(os.path.dirname(target))
print("free:", disk.f_bfree == disk.f_blocks)
"""
EXPECTED = {
    "channel file, a write fails": "write: ENOSPC\nfree: True\n",
    "channel file, closing fails": "write: ok\nclose: ENOSPC\nfree: True\n",
    "channel file, flushing fails": "write: ok\nclose: ENOSPC\nfree: True\n",
    "detector file, a write fails": "write: ENOSPC\nfree: True\n",
}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "size=256k") as mounted:
        yield mounted


@pytest.mark.parametrize("case", sorted(CHILDREN))
def test_a_full_disk_is_an_error_the_process_survives(small_disk: Path, case: str) -> None:
    target = small_disk / "run_000001.BSDATA.h5"
    name = "writer" if case.startswith("detector") else "file, channel"
    script = PRELUDE.format(target=str(target)) + CHILDREN[case] + EPILOGUE.format(name=name)
    child = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert (child.returncode, child.stdout) == (0, EXPECTED[case]), child.stderr
    assert list(small_disk.iterdir()) == []
