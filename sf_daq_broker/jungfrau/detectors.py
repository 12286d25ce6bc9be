"""Jungfrau detector names: ``JFxxTyyVzz``, where ``yy`` is the number of modules.

The placement table is keyed by the name without its version (``JF06T04``) because a new
version of a detector is a new set of modules in the same mechanical arrangement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sf_daq_broker.jungfrau.errors import DetectorError

#: Frames averaged per gain stage of a pedestal run, as upstream.
FRAMES_AVERAGE = 1000

_NAME = re.compile(r"^(JF\d\dT(\d\d))V\d\d$")

MODULE_ROWS = 512
MODULE_COLUMNS = 1024


@dataclass(frozen=True)
class DetectorName:
    full: str  # JF06T04V02
    base: str  # JF06T04
    n_modules: int

    @property
    def raw_frame_shape(self) -> tuple[int, int]:
        """One raw frame: the modules stacked along y."""
        return (MODULE_ROWS * self.n_modules, MODULE_COLUMNS)


def parse_detector_name(name: str) -> DetectorName:
    """Split ``JF06T04V02`` into its parts; a malformed name is refused."""
    match = _NAME.match(name)
    if match is None:
        raise DetectorError(f"detector name {name!r} does not match JFxxTyyVzz")
    n_modules = int(match.group(2))
    if n_modules == 0:
        raise DetectorError(f"detector name {name!r} says it has 0 modules")
    return DetectorName(full=name, base=match.group(1), n_modules=n_modules)
