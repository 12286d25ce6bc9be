"""`sf-daq-broker convert RAW_FILE OUTPUT_FILE --gain-file G --pedestal-file P
[--options JSON] [--selected-pulse-ids ID ...] [option flags]`.

Converts a detector file in the raw layout (SPEC §5.4) into the converted layout, streaming in
batches of frames so memory does not grow with the run. The detector comes from the file, the
gain mode from its data (bit 0 of ``daq_rec`` of the first good frame). ``--options`` takes a
request's options object for the detector, checked by the same rules (``retrieval``) and
written by the same code (``export``, ``events``) as the detector worker; without a selection
every frame is kept with its ``is_good_frame`` flag. File options about the raw file
(``keep_raw``, ``remove_raw_files``) do not apply: the raw file is the input and stays.

The option flags are the converter's own knobs (JUNGFRAU.md): with them ``--no-adc-to-energy``
copies raw values into the converted layout (gaps, masking, geometry), whereas a request's
``adc_to_energy: false`` means the raw layout, untouched.

The output appears only when complete (temporary name, fsync, rename). Errors are one line on
stderr, without a traceback, and exit status 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# The conversion itself (numpy, h5py, numba) lives in ``convert_command`` and is imported when
# a conversion runs: every `sf-daq-broker` command loads this module to build its --help.


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a raw Jungfrau file to energy (gain and pedestal correction)",
        description="Convert a Jungfrau file in the raw layout into the converted layout "
        "(JUNGFRAU.md): gain/pedestal correction, masking, gap pixels, geometry, compression; "
        "with --options, exactly as the detector worker does for a request's options.",
    )
    parser.add_argument("raw_file", metavar="RAW_FILE", type=Path)
    parser.add_argument("output_file", metavar="OUTPUT_FILE", type=Path)
    parser.add_argument("--gain-file", required=True, type=Path, help="gain file (/gains)")
    parser.add_argument(
        "--pedestal-file", required=True, type=Path, help="pedestal file (/gains, /pixel_mask)"
    )
    parser.add_argument(
        "--options",
        metavar="JSON",
        help="a request's options object for this detector, e.g. "
        '\'{"roi": {"spot": [100, 200, 300, 400]}, "factor": 12.4}\' (SPEC defaults for '
        "what it leaves out); replaces the option flags below",
    )
    parser.add_argument(
        "--selected-pulse-ids",
        nargs="+",
        type=int,
        default=[],
        metavar="ID",
        help="keep only the good frames of these pulses (the request's selected_pulse_ids)",
    )
    flags = parser.add_argument_group("option flags (without --options)")
    flags.add_argument(
        "--no-adc-to-energy",
        dest="adc_to_energy",
        action="store_false",
        default=None,
        help="keep raw uint16 values (masking, gaps and geometry still apply)",
    )
    flags.add_argument(
        "--no-mask", dest="mask", action="store_false", default=None, help="keep bad pixels"
    )
    flags.add_argument(
        "--no-mask-double-pixels",
        dest="mask_double_pixels",
        action="store_false",
        default=None,
        help="keep the double-size pixels at chip borders",
    )
    flags.add_argument(
        "--geometry", action="store_true", default=None, help="place modules as mounted"
    )
    flags.add_argument(
        "--no-gap-pixels",
        dest="gap_pixels",
        action="store_false",
        default=None,
        help="no gaps between chips",
    )
    flags.add_argument("--factor", type=float, help="divide by this factor, round, store int32")
    flags.add_argument(
        "--disabled-modules",
        metavar="LIST",
        help="comma-separated module indices to leave out, e.g. 0,2",
    )
    flags.add_argument(
        "--no-compression",
        dest="compression",
        action="store_false",
        default=None,
        help="store data uncompressed (default: bitshuffle+LZ4)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sf_daq_broker.jungfrau.convert_command import run as run_conversion

    return run_conversion(args)
