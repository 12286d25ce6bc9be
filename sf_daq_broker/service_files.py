"""Configuration files of the facility's other services that the broker edits for a beamline.

- **PV list** of the EPICS buffer, one per beamline:
  ``{pv_list_dir}/sf.{beamline}.epics_buffer.json`` = ``{"pulse_id_pv": …, "pv_list": […]}``
  (upstream's file). Setting it de-duplicates the list
  keeping the first occurrence, keeps the file's ``pulse_id_pv`` and saves the previous file
  as ``….json.{dd-Mon-YYYY_HH:MM:SS}`` beside it. The simulated archiver records exactly the
  PVs of these files when its ``pv_list_dir`` points here.
- **DAP parameters** per detector: ``{dap_config_dir}/pipeline_parameters.{DET}.json``. Setting
  merges the given parameters into the file (others stay), replies ``{name: [old, new]}`` of
  what changed, and first saves the previous file as
  ``backup/pipeline_parameters.{DET}.json.{dd-Mon-YYYY_HH:MM:SS}``. Nothing changed, nothing
  written.

Both files are replaced atomically, under a lock per file (threads of this broker), so two
requests at once cannot lose one another's change.
"""

from __future__ import annotations

import json
import shutil
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from sf_daq_broker.bookkeeping.atomic import dump_json
from sf_daq_broker.bookkeeping.confined import replace_file
from sf_daq_broker.errors import BadRequest, Conflict, NotFound, Unavailable

#: What upstream writes as the pulse id source when the file has none.
DEFAULT_PULSE_ID_PV = "SLAAR11-LTIM01-EVR0:RX-PULSEID"
BACKUP_TIME_FORMAT = "%d-%b-%Y_%H:%M:%S"

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def pv_list_file(pv_list_dir: Path, beamline: str) -> Path:
    return pv_list_dir / f"sf.{beamline}.epics_buffer.json"


def dap_settings_file(dap_config_dir: Path, detector: str) -> Path:
    return dap_config_dir / f"pipeline_parameters.{detector}.json"


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; missing 404, unreadable 503, not an object 409."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Conflict(f"{what} {path} is not valid JSON ({exc}): fix or replace it") from None
    except OSError as exc:
        raise Unavailable(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not isinstance(document, dict):
        raise Conflict(f"{what} {path} does not hold a JSON object: fix or replace it")
    return document


def _backup(path: Path, backup_dir: Path) -> Path:
    backup_dir.mkdir(exist_ok=True)
    stamp = datetime.now().strftime(BACKUP_TIME_FORMAT)
    backup = backup_dir / f"{path.name}.{stamp}"
    shutil.copyfile(path, backup)
    return backup


def parse_pv_list(value: Any) -> list[str]:
    """A list of PV names, de-duplicated keeping the first occurrence."""
    if not isinstance(value, list):
        raise BadRequest(f"pv_list must be a list of PV names, got {value!r}")
    names: dict[str, None] = {}
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise BadRequest(f"pv_list[{index}] must be a non-empty string, got {name!r}")
        names.setdefault(name, None)
    return list(names)


def read_pv_list(pv_list_dir: Path, beamline: str) -> list[str]:
    path = pv_list_file(pv_list_dir, beamline)
    pv_list = read_json_object(path, f"the PV list of {beamline}").get("pv_list", [])
    if not isinstance(pv_list, list):
        raise Conflict(f"{path}: pv_list is not a list: fix or replace the file")
    return [str(name) for name in pv_list]


def write_pv_list(pv_list_dir: Path, beamline: str, pv_list: list[str]) -> list[str]:
    """Replace the beamline's PV list (the previous file is kept as a backup)."""
    if not pv_list_dir.is_dir():
        raise Unavailable(f"the PV list directory {pv_list_dir} does not exist")
    path = pv_list_file(pv_list_dir, beamline)
    with _lock(path):
        document: dict[str, Any] = {"pulse_id_pv": DEFAULT_PULSE_ID_PV}
        if path.exists():
            document = read_json_object(path, f"the PV list of {beamline}")
            _backup(path, path.parent)
        document = {"pulse_id_pv": document.get("pulse_id_pv", DEFAULT_PULSE_ID_PV)}
        document["pv_list"] = pv_list
        replace_file(path, dump_json(document))
    return pv_list


def read_dap_settings(dap_config_dir: Path, detector: str) -> dict[str, Any]:
    return read_json_object(
        dap_settings_file(dap_config_dir, detector), f"the DAP settings of {detector}"
    )


def update_dap_settings(
    dap_config_dir: Path, detector: str, parameters: dict[str, Any]
) -> dict[str, list[Any]]:
    """Merge ``parameters`` into the detector's DAP settings; ``{name: [old, new]}``."""
    path = dap_settings_file(dap_config_dir, detector)
    with _lock(path):
        current = read_json_object(path, f"the DAP settings of {detector}")
        changed = {
            name: [current.get(name), value]
            for name, value in parameters.items()
            if current.get(name) != value or name not in current
        }
        if changed:
            _backup(path, path.parent / "backup")
            replace_file(path, dump_json({**current, **parameters}))
    return changed
