"""Where a pgroup's files live, and paths from requests that can never leave ``raw/``.

A request's path is checked when it is accepted (a symlink planted inside ``raw/``, or a ``..``
in a request, must not let a request write elsewhere), and every write goes through a handle
on a directory reached from ``raw/`` without the kernel following a symlink (``confined``),
so a symlink planted after the check cannot redirect it either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sf_daq_broker.bookkeeping.confined import ConfinedDir, OutsideRaw, open_below, reach_below
from sf_daq_broker.errors import BadRequest, Conflict, NotFound

PGROUP_PATTERN = re.compile(r"^p\d{5}$")
#: Where /take_pedestal puts a pedestal's files (upstream's name).
PEDESTAL_DIRECTORY = "JF_pedestals"
#: Top-level directories of raw/ that belong to the bookkeeping, not to data.
RESERVED_DIRECTORIES = frozenset({"run_info", "scan_info"})
#: The longest path component a request may give, in bytes of UTF-8: file systems take 255,
#: and the bookkeeping adds to some names (``.json``, temporary names while writing).
COMPONENT_MAX = 200


def check_pgroup_name(value: object) -> str:
    if not isinstance(value, str) or not PGROUP_PATTERN.match(value):
        raise BadRequest(f"pgroup must be 'p' followed by 5 digits (e.g. p12345), got {value!r}")
    return value


def clean_relative_path(value: object, key: str) -> str:
    """Validate a client-given relative path; return it with spaces turned into ``_`` and
    without trailing ``/`` (``sample/`` is how people type a directory)."""
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string, got {value!r}")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise BadRequest(f"{key} {value!r} contains control characters")
    if value.startswith("/"):
        raise BadRequest(f"{key} {value!r} must be relative, not an absolute path")
    cleaned = value.replace(" ", "_").rstrip("/")
    for component in cleaned.split("/"):
        if component == "":
            raise BadRequest(f"{key} {value!r} has an empty path component")
        if component in (".", ".."):
            raise BadRequest(f"{key} {value!r} must not contain '{component}' components")
        # A name the file system refuses must be refused here, before a run number is spent.
        size = len(component.encode("utf-8", "surrogatepass"))
        if size > COMPONENT_MAX:
            raise BadRequest(
                f"{key}: the path component {component[:20]!r}... is {size} bytes long, "
                f"at most {COMPONENT_MAX} bytes are allowed"
            )
    return cleaned


@dataclass(frozen=True)
class PgroupDirs:
    """The raw directory of one pgroup and the bookkeeping paths below it."""

    beamline: str
    pgroup: str
    raw: Path

    @property
    def run_info(self) -> Path:
        return self.raw / "run_info"

    @property
    def scan_info(self) -> Path:
        return self.raw / "scan_info"

    @property
    def last_run_file(self) -> Path:
        return self.run_info / "LAST_RUN"

    @property
    def closed_marker(self) -> Path:
        return self.run_info / "CLOSED"

    @property
    def lock_file(self) -> Path:
        return self.run_info / ".lock"

    def run_info_dir(self, run_number: int) -> Path:
        return self.run_info / f"{run_number // 1000 * 1000:06d}"

    def run_json(self, run_number: int) -> Path:
        return self.run_info_dir(run_number) / f"run_{run_number:06d}.json"

    def run_log(self, run_number: int, suffix: str) -> Path:
        return self.run_info_dir(run_number) / f"run_{run_number:06d}.{suffix}.log"

    def scan_json(self, scan_name: str) -> Path:
        return self.scan_info / f"{scan_name}.json"

    def output_dir(self, directory_name: str | None) -> Path:
        return self.raw / directory_name if directory_name else self.raw

    def data_file(
        self, directory_name: str | None, run_number: int, suffix: str, tag: str | None = None
    ) -> Path:
        """A run's data file; ``tag`` is the user tag of ``append_user_tag_to_data_dir``."""
        return self.output_dir(directory_name) / f"{run_prefix(run_number, tag)}.{suffix}.h5"

    def below_raw(self, path: Path) -> PurePosixPath:
        """``path`` (one of the paths above) relative to ``raw/``."""
        return PurePosixPath(path.relative_to(self.raw))

    def check_reachable(self, path: Path, what: str) -> None:
        """Refuse ``path`` if the part of it that exists leads outside ``raw/`` by a symlink,
        or is a file where a directory must be (before a run number is spent)."""
        try:
            reach_below(self.raw, self.below_raw(path))
        except OutsideRaw:
            raise BadRequest(f"{what} leads outside the raw directory of {self.pgroup}") from None
        except NotADirectoryError:
            raise Conflict(f"{what}: a file is in the way of a directory below raw/") from None

    def open_dir(self, path: Path, what: str, *, create: bool = False) -> ConfinedDir:
        """The directory ``path`` below ``raw/`` as a confined handle (created if ``create``);
        writes through it cannot leave ``raw/``. The caller closes it."""
        try:
            return open_below(self.raw, self.below_raw(path), create=create)
        except OutsideRaw:
            raise BadRequest(f"{what} leads outside the raw directory of {self.pgroup}") from None
        except NotADirectoryError:
            raise Conflict(f"{what}: a file is in the way of a directory below raw/") from None


def run_prefix(run_number: int, tag: str | None = None) -> str:
    """What every data file of a run starts with: ``run_NNNNNN`` or ``run_NNNNNN-<tag>``."""
    return f"run_{run_number:06d}-{tag}" if tag else f"run_{run_number:06d}"


def open_pgroup(data_root: Path, beamline: str, pgroup: object) -> PgroupDirs:
    """The pgroup's directories; it must already exist (the broker never creates a pgroup)."""
    name = check_pgroup_name(pgroup)
    raw = data_root / beamline / "data" / name / "raw"
    if not raw.is_dir():
        raise NotFound(f"pgroup {name} does not exist for beamline {beamline}: no directory {raw}")
    return PgroupDirs(beamline=beamline, pgroup=name, raw=raw)


def check_directory_name(dirs: PgroupDirs, value: object, key: str) -> str:
    """A data directory below raw/: safe, not a bookkeeping directory, not escaping by symlink."""
    cleaned = clean_relative_path(value, key)
    if cleaned.split("/")[0] in RESERVED_DIRECTORIES:
        raise BadRequest(f"{key} {value!r} is inside a bookkeeping directory of raw/")
    dirs.check_reachable(dirs.raw / cleaned, f"{key} {value!r}")
    return cleaned
