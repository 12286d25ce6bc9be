"""`sf-daq-broker pedestal RAW --output RES [--number-bad-modules K] [--frames-average N]
[--pixel-mask FILE]`: the pedestal file of a raw pedestal run (``pedestal.py``).

Without ``--number-bad-modules`` the detector's ``number_bad_modules`` from the configuration
is used (0 for a detector it does not list): the value is a property of the detector, and the
take_pedestal job reads it from there too. Errors are one line on stderr and exit status 1;
"contains no good pixel" also exits 1, after writing the file (as the reference does).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from sf_daq_broker.config import ConfigError, load_settings
from sf_daq_broker.jungfrau.detectors import FRAMES_AVERAGE
from sf_daq_broker.jungfrau.errors import ConversionError

# h5py and the numba kernels are imported when a pedestal is computed: every `sf-daq-broker`
# command loads this module to build its --help.

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pedestal",
        help="compute a pedestal file (gains, gainsRMS, pixel_mask) from a raw pedestal run",
        description="Compute the pedestal file of a raw Jungfrau pedestal run (frames in G0, "
        "G1 and G2, the stage in daq_rec bits 12-13), as the facility's broker does.",
    )
    parser.add_argument("raw_file", metavar="RAW", type=Path, help="raw pedestal-run file")
    parser.add_argument(
        "--output", required=True, type=Path, metavar="RES", help="pedestal file to write"
    )
    parser.add_argument(
        "--number-bad-modules",
        type=int,
        metavar="K",
        help="modules allowed in the wrong gain in a frame that is still used (default: the "
        "detector's number_bad_modules in the configuration, else 0)",
    )
    parser.add_argument(
        "--frames-average",
        type=int,
        default=FRAMES_AVERAGE,
        metavar="N",
        help=f"frames of the moving average per gain stage (default {FRAMES_AVERAGE})",
    )
    parser.add_argument(
        "--pixel-mask",
        type=Path,
        metavar="FILE",
        help="site pixel mask (/pixel_mask, non-zero = bad) to add as bit 0",
    )
    parser.add_argument("--config", help="configuration file (default: $SF_DAQ_CONFIG)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sf_daq_broker.h5.detector import DetectorFileError
    from sf_daq_broker.jungfrau.pedestal import compute_pedestal

    try:
        summary = compute_pedestal(
            args.raw_file,
            args.output,
            number_bad_modules=_number_bad_modules(args),
            frames_average=args.frames_average,
            pixel_mask_file=args.pixel_mask,
            progress=_Progress(),
        )
    except (ConversionError, DetectorFileError, ConfigError) as exc:
        print(f"sf-daq-broker pedestal: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sf-daq-broker pedestal: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 1
    print(
        f"{summary.result_file}: {summary.good_pixels} of {summary.pixels} pixels good "
        f"(frames per stage: "
        + ", ".join(f"{name} {count}" for name, count in summary.stage_frames.items())
        + ")"
    )
    return 0


class _Progress:
    """Logs every tenth of the run: a 16-module pedestal run takes a minute or more."""

    def __init__(self) -> None:
        self.next_tenth = 1

    def __call__(self, done: int, total: int) -> None:
        if total and done * 10 >= self.next_tenth * total:
            log.info("pedestal: %d of %d frames", done, total)
            self.next_tenth = done * 10 // total + 1


def _number_bad_modules(args: argparse.Namespace) -> int:
    if args.number_bad_modules is not None:
        return int(args.number_bad_modules)
    from sf_daq_broker.h5.detector import RawDetectorFile

    with RawDetectorFile(args.raw_file) as raw:
        detector = raw.detector
    settings = load_settings(args.config)
    configured = settings.detectors.get(detector)
    return configured.number_bad_modules if configured is not None else 0
