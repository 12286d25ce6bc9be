"""Where a job's files are, as confined handles below its pgroup's ``raw/``.

A job names absolute paths (output, log, run JSON); the broker built them below the pgroup's
``raw/``, the directory above ``run_info`` (``raw/run_info/NNN000/run_NNNNNN.json``). A worker
writes only through handles that ``open_job_dir`` gives it, so a directory of the job that was
replaced by a symlink since the broker accepted the request fails the job with
``OutsideRaw`` instead of redirecting its writes (see ``bookkeeping.confined``). Sources that
write more files into ``raw/`` (a raw detector file, lists for other tools) use it too.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from sf_daq_broker.bookkeeping.confined import ConfinedDir, OutsideRaw, open_below
from sf_daq_broker.bookkeeping.paths import PEDESTAL_DIRECTORY
from sf_daq_broker.jobs import Job


def job_raw_dir(job: Job) -> Path:
    """The pgroup's ``raw/`` of the job: the directory above ``run_info`` (above
    ``JF_pedestals`` for a pedestal)."""
    run_json = Path(job.run_info_file)
    if run_json.parent.name == PEDESTAL_DIRECTORY:  # a pedestal (and its detectors' parts)
        return run_json.parents[1]
    if run_json.parent.parent.name != "run_info":
        raise OutsideRaw(f"{run_json} is not in a run_info directory: the job's raw/ is unknown")
    return run_json.parents[2]


def below_raw(job: Job, path: Path | str) -> PurePosixPath:
    """``path`` (absolute, or relative to ``raw/``) as a path below the job's ``raw/``."""
    path = Path(path)
    if not path.is_absolute():
        return PurePosixPath(path)
    raw = job_raw_dir(job)
    try:
        return PurePosixPath(path.relative_to(raw))
    except ValueError:
        raise OutsideRaw(f"{path} is not below {raw}: refusing to write there") from None


def open_job_dir(job: Job, directory: Path | str, *, create: bool = False) -> ConfinedDir:
    """A handle on ``directory`` below the job's ``raw/`` (created if ``create``).

    ``OutsideRaw`` (with the reason) if the way there leaves ``raw/``, ``FileNotFoundError``
    if it is gone and not to be created. The caller closes it.
    """
    relative = below_raw(job, directory)
    try:
        return open_below(job_raw_dir(job), relative, create=create)
    except OutsideRaw as exc:
        raise OutsideRaw(f"refusing to write below {directory}: {exc}") from None


def open_output_dir(job: Job) -> ConfinedDir:
    """The directory of the job's output file (the broker created it)."""
    return open_job_dir(job, Path(job.output_file).parent)


def write_job_file(job: Job, path: Path | str, data: bytes) -> None:
    """Write a small file below the job's ``raw/`` in one call (a list for another tool, a
    copy of a user file): its directories are created, the file replaced atomically, nothing
    followed out of ``raw/`` (``OutsideRaw`` instead)."""
    path = Path(path)
    with open_job_dir(job, path.parent, create=True) as directory:
        directory.write_atomic(path.name, data)
