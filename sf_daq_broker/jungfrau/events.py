"""The timing system's event bits in ``daq_rec``: which frames a file keeps, and the CrystFEL
lists of laser-on and laser-off frames (UPSTREAM_HEAD §1-§2).

Every frame carries the event flags of its pulse: bit 16 laser, 17 darkshot, 18 FEL, 19 pulse
picker. By default (SPEC §5.4) a file keeps every frame and flags the ones that are not good.
A selection (``selected_pulse_ids``, ``save_ppicker_events_only``) keeps, in file order, the
good frames that pass it, as the facility's broker does: a frame that is not good has no data
worth selecting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sf_daq_broker.h5.atomic import atomic_output

LASER_BIT = 16
DARKSHOT_BIT = 17
PPICKER_BIT = 19


def has_bit(daq_rec: npt.ArrayLike, bit: int) -> npt.NDArray[np.bool_]:
    values = np.asarray(daq_rec, dtype=np.uint32).reshape(-1)
    flags: npt.NDArray[np.bool_] = (values >> np.uint32(bit)) & np.uint32(1) == 1
    return flags


def selects(selected_pulse_ids: Sequence[int], ppicker_only: bool) -> bool:
    """Whether a selection drops frames (otherwise every frame is kept and flagged)."""
    return bool(selected_pulse_ids) or ppicker_only


def kept_frames(
    pulse_id: npt.ArrayLike,
    daq_rec: npt.ArrayLike,
    is_good_frame: npt.ArrayLike,
    *,
    selected_pulse_ids: Sequence[int] = (),
    ppicker_only: bool = False,
) -> npt.NDArray[np.bool_]:
    """Which frames the file keeps: all of them without a selection; with one, the good
    frames whose pulse id is selected (unknown ids are ignored) and, with ``ppicker_only``,
    whose pulse-picker bit is set."""
    pulse_ids = np.asarray(pulse_id, dtype=np.uint64).reshape(-1)
    keep = np.ones(pulse_ids.size, dtype=bool)
    if not selects(selected_pulse_ids, ppicker_only):
        return keep
    keep &= np.asarray(is_good_frame).reshape(-1) != 0
    if selected_pulse_ids:
        keep &= np.isin(pulse_ids, np.asarray(selected_pulse_ids, dtype=np.uint64))
    if ppicker_only:
        keep &= has_bit(daq_rec, PPICKER_BIT)
    return keep


def crystfel_lists(
    data_file: Path, daq_rec: npt.ArrayLike, is_good_frame: npt.ArrayLike
) -> dict[str, list[str]]:
    """``{"dark": lines, "light": lines}``: one line ``<data_file> //<frame index>`` per good
    frame; light = laser on and no darkshot, dark = every other good frame."""
    good = np.asarray(is_good_frame).reshape(-1) != 0
    light = has_bit(daq_rec, LASER_BIT) & ~has_bit(daq_rec, DARKSHOT_BIT)
    return {
        kind: [f"{data_file} //{index}" for index in np.flatnonzero(good & frames).tolist()]
        for kind, frames in (("dark", ~light), ("light", light))
    }


def list_file(data_file: Path, kind: str) -> Path:
    """``run_000012.JF06T08V02.h5`` -> ``run_000012.JF06T08V02.dark.lst``."""
    return data_file.with_name(f"{data_file.name.removesuffix('.h5')}.{kind}.lst")


def _write_by_path(path: Path, data: bytes) -> None:
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)


def write_crystfel_lists(
    data_file: Path,
    daq_rec: npt.ArrayLike,
    is_good_frame: npt.ArrayLike,
    write: Callable[[Path, bytes], None] = _write_by_path,
) -> list[Path]:
    """Write the non-empty lists beside ``data_file`` (atomically); returns their paths.

    ``write`` replaces a file atomically: a worker passes one that stays below the pgroup's
    ``raw/`` (``workers.job_files.write_job_file``); the command line writes where it is told.
    """
    written = []
    for kind, lines in crystfel_lists(data_file, daq_rec, is_good_frame).items():
        if lines:
            path = list_file(data_file, kind)
            write(path, ("\n".join(lines) + "\n").encode())
            written.append(path)
    return written
