"""Which pedestal file a detector's conversions use: the newest one taken, else the configured.

A pedestal taken with ``/take_pedestal`` is installed as ``{pedestal_root}/{DET}/{name}.h5``,
``name`` its ``YYYYmmdd_HHMMSS`` (as upstream's ``/sf/jungfrau/data/pedestal/{DET}/``). The
newest file of that directory — by name, that is by the time the pedestal was requested — is
the detector's pedestal; files of other names (temporary files, a copy someone left there)
are ignored. With no installed pedestal the detector's configured ``pedestal_file`` is used.

The broker resolves the pedestal when it accepts a run and records it in the run JSON
(``pedestal_files``) and the detector job, so a run converts with the pedestal that was in
force when it was requested, whatever is installed while it waits in the queue. Installing is
a copy under a temporary name and a rename: a run never sees half a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sf_daq_broker.bookkeeping.atomic import publish_file
from sf_daq_broker.config import Settings

PEDESTAL_NAME = re.compile(r"^\d{8}_\d{6}\.h5$")


def pedestal_dir(root: Path, detector: str) -> Path:
    return root / detector


def installed_pedestal(root: Path, detector: str) -> Path | None:
    """The newest installed pedestal of ``detector`` (None: none installed)."""
    try:
        names = [name for name in os.listdir(pedestal_dir(root, detector))]
    except FileNotFoundError:
        return None
    newest = max((name for name in names if PEDESTAL_NAME.match(name)), default=None)
    return pedestal_dir(root, detector) / newest if newest else None


def current_pedestal(settings: Settings, detector: str) -> Path | None:
    """The pedestal file conversions of ``detector`` use now."""
    installed = installed_pedestal(settings.pedestal_root, detector)
    if installed is not None:
        return installed
    configured = settings.detectors.get(detector)
    return configured.pedestal_file if configured is not None else None


def pedestals_in_use(settings: Settings, converting: list[str]) -> dict[str, str]:
    """The pedestal file of each converting detector that has one (for the run JSON)."""
    files = {name: current_pedestal(settings, name) for name in converting}
    return {name: str(path) for name, path in files.items() if path is not None}


def computing_name(destination: Path) -> Path:
    """Where a pedestal is computed before it is installed as ``destination`` (hidden, in the
    same directory: installing is a rename, and no conversion ever sees half a file)."""
    return destination.with_name(f".{destination.name}.computing")


def install_pedestal(computed: Path, destination: Path) -> Path:
    """Make the computed file the detector's newest pedestal (fsync, rename)."""
    publish_file(computed, destination)
    return destination
