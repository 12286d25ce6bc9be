"""What to retrieve, read from the users' files: the one piece of code both clients share.

Users keep their selection in small files next to their scripts: channel lists (one name per
line, ``#`` comments), a detectors JSON and a scan step JSON. A mistake in one of them must be
told in one line that names the file, not as a traceback and not only when the broker refuses
the request — for the start/stop client that would be after the run has been taken.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sf_daq_broker.retrieval import CAMERA_SUFFIX


class InputFileError(ValueError):
    """A user's file is missing, unreadable or not what it should be; the message is one line."""


def _read_text(path: str | Path, what: str) -> str:
    file = Path(path)
    if not file.exists():
        raise InputFileError(f"{what} {file} does not exist")
    if not file.is_file():
        raise InputFileError(f"{what} {file} is not a file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            f"{what} {file} is not a text file (byte 0x{exc.object[exc.start]:02x} "
            f"at position {exc.start})"
        ) from None
    except OSError as exc:
        raise InputFileError(f"{what} {file} cannot be read: {exc.strerror or exc}") from None


def read_names(path: str | Path, what: str) -> list[str]:
    """Names, one per line; blank lines and ``#`` comments (also after a name) are ignored.

    Repeated names are kept once, in their first place (the broker would drop them anyway).
    """
    names: dict[str, None] = {}
    for line in _read_text(path, what).splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.setdefault(name, None)
    if not names:
        raise InputFileError(f"{what} {path} lists no names")
    return list(names)


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    text = _read_text(path, what)
    if not text.strip():
        raise InputFileError(f"{what} {path} is empty")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{what} {path} is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(document, dict):
        raise InputFileError(
            f"{what} {path} must hold a JSON object, not {type(document).__name__}"
        )
    if not document:
        raise InputFileError(f"{what} {path} is an empty JSON object")
    return document


@dataclass(frozen=True)
class RequestTemplate:
    """A retrieval request without its pulse range: what a start/stop client repeats per run."""

    pgroup: str
    directory_name: str | None = None
    channels: tuple[str, ...] = ()
    cameras: tuple[str, ...] = ()
    pvs: tuple[str, ...] = ()
    detectors: dict[str, Any] = field(default_factory=dict)
    scan_info: dict[str, Any] | None = None
    rate_multiplicator: int = 1
    #: user_tag, append_user_tag_to_data_dir, run_log_level (when given)
    run_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_files(
        cls,
        pgroup: str,
        *,
        output_directory: str | None = None,
        channels_file: str | Path | None = None,
        epics_file: str | Path | None = None,
        detectors_file: str | Path | None = None,
        scan_step_file: str | Path | None = None,
        rate_multiplicator: int = 1,
        run_options: dict[str, Any] | None = None,
    ) -> RequestTemplate:
        """Read every given file; camera images (``…:FPICTURE``) of the channels file go apart."""
        names = read_names(channels_file, "channels file") if channels_file else []
        scan_info = read_json_object(scan_step_file, "scan step file") if scan_step_file else None
        return cls(
            pgroup=pgroup,
            directory_name=output_directory or None,
            channels=tuple(name for name in names if not name.endswith(CAMERA_SUFFIX)),
            cameras=tuple(name for name in names if name.endswith(CAMERA_SUFFIX)),
            pvs=tuple(read_names(epics_file, "epics file")) if epics_file else (),
            detectors=read_json_object(detectors_file, "detectors file") if detectors_file else {},
            scan_info=scan_info,
            rate_multiplicator=rate_multiplicator,
            run_options=dict(run_options or {}),
        )

    @property
    def is_empty(self) -> bool:
        """Nothing selected: the broker would refuse every request made from this."""
        return not (self.channels or self.cameras or self.pvs or self.detectors)

    def request(self, start_pulseid: int, stop_pulseid: int) -> dict[str, Any]:
        """The body of ``POST /retrieve_from_buffers``; empty selections are left out."""
        body: dict[str, Any] = {
            "pgroup": self.pgroup,
            "start_pulseid": start_pulseid,
            "stop_pulseid": stop_pulseid,
            "rate_multiplicator": self.rate_multiplicator,
        }
        if self.directory_name:
            body["directory_name"] = self.directory_name
        optional = {
            "channels_list": list(self.channels),
            "camera_list": list(self.cameras),
            "pv_list": list(self.pvs),
            "detectors": self.detectors,
            "scan_info": self.scan_info,
        }
        body.update({key: value for key, value in optional.items() if value})
        body.update(self.run_options)
        return body
