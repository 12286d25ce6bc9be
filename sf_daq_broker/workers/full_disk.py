"""A job whose file system fills up while its file is written fails at once, saying what to do.

Why not retried with back-off, like a buffer that answers 5xx: a full disk (ENOSPC) or an
exceeded quota (EDQUOT) is not a hiccup that passes in the seconds of the retry budget; it
lasts until someone frees space or raises the quota, which takes minutes to hours. Retrying
for that long would keep the run showing ``running`` while nothing can succeed, so the user at
the beamline learns of the problem late or not at all, and every try would fetch the whole
range from the buffers again and fill the disk up again, taking the room other jobs (smaller
files, other sources) could still use. The buffers keep the data for a limited time only: the
user's time is best spent acting now. So the job fails at once (dead-lettered like every
permanent failure), its temporary file removed, with a reason that names the cause and the
directory and says what to do — the same advice as the broker's 507 for a request that comes
when the disk is full already ("free space and send the request again").
"""

from __future__ import annotations

import errno
from pathlib import Path

from sf_daq_broker.jobs import Job

#: The errors of a full file system, what they are called in a reason, and what to do.
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free space there"),
    errno.EDQUOT: (
        "disk quota exceeded",
        "free space in the pgroup or have its quota raised,",
    ),
}
#: How far a cause is looked for along the exceptions an error was raised from or during.
_CHAIN = 8


def full_disk_errno(exc: BaseException) -> int | None:
    """ENOSPC or EDQUOT if ``exc``, or an exception it was raised from or while handling,
    is an ``OSError`` of a full file system; None otherwise. The chain matters: a library
    may wrap the ``OSError`` of its write in its own exception."""
    seen: BaseException | None = exc
    for _ in range(_CHAIN):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _CAUSES:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def full_disk_reason(job: Job, code: int) -> str:
    """Why the job failed and what to do, for /run_status and the job log."""
    cause, remedy = _CAUSES[code]
    output = Path(job.output_file)
    return (
        f"{cause} while writing {output.name} in {output.parent}: the file was not kept; "
        f"{remedy} and send the request again while the buffers still hold the data (they "
        "keep it for a limited time only)"
    )
