"""`sf-daq-broker convert RAW_FILE OUTPUT_FILE --gain-file G --pedestal-file P [options]`.

Converts a detector file in the raw layout (SPEC §5.4) into the converted layout, streaming in
batches of frames so memory does not grow with the run. The detector comes from the file, the
gain mode from its data (bit 0 of ``daq_rec`` of the first good frame); every frame is kept
with its ``is_good_frame`` flag. The output appears only when complete (temporary name, fsync,
rename). Errors are one line on stderr, without a traceback, and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sf_daq_broker import __version__
from sf_daq_broker.jungfrau.errors import ConversionError

if TYPE_CHECKING:
    from sf_daq_broker.h5.detector import RawDetectorFile
    from sf_daq_broker.jungfrau.converter import Converter

log = logging.getLogger(__name__)
# numpy, h5py and numba are imported when a conversion runs: every `sf-daq-broker` command
# loads this module to build its --help.

#: Raw bytes read per batch (the converted batch is up to twice that, plus its compression).
BATCH_BYTES = 256 * 1024 * 1024


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a raw Jungfrau file to energy (gain and pedestal correction)",
        description="Convert a Jungfrau file in the raw layout into the converted layout "
        "(JUNGFRAU.md): gain/pedestal correction, masking, gap pixels, geometry, compression.",
    )
    parser.add_argument("raw_file", metavar="RAW_FILE", type=Path)
    parser.add_argument("output_file", metavar="OUTPUT_FILE", type=Path)
    parser.add_argument("--gain-file", required=True, type=Path, help="gain file (/gains)")
    parser.add_argument(
        "--pedestal-file", required=True, type=Path, help="pedestal file (/gains, /pixel_mask)"
    )
    parser.add_argument(
        "--no-adc-to-energy",
        dest="adc_to_energy",
        action="store_false",
        help="keep raw uint16 values (masking, gaps and geometry still apply)",
    )
    parser.add_argument("--no-mask", dest="mask", action="store_false", help="keep bad pixels")
    parser.add_argument(
        "--no-mask-double-pixels",
        dest="mask_double_pixels",
        action="store_false",
        help="keep the double-size pixels at chip borders",
    )
    parser.add_argument("--geometry", action="store_true", help="place modules as mounted")
    parser.add_argument(
        "--no-gap-pixels", dest="gap_pixels", action="store_false", help="no gaps between chips"
    )
    parser.add_argument("--factor", type=float, help="divide by this factor, round, store int32")
    parser.add_argument(
        "--disabled-modules",
        default="",
        metavar="LIST",
        help="comma-separated module indices to leave out, e.g. 0,2",
    )
    parser.add_argument(
        "--no-compression",
        dest="compression",
        action="store_false",
        help="store data uncompressed (default: bitshuffle+LZ4)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sf_daq_broker.h5.detector import DetectorFileError

    try:
        convert(args)
    except (ConversionError, DetectorFileError) as exc:
        print(f"sf-daq-broker convert: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sf-daq-broker convert: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 1
    return 0


def convert(args: argparse.Namespace) -> None:
    from sf_daq_broker.h5.detector import RawDetectorFile
    from sf_daq_broker.jungfrau.converter import Converter
    from sf_daq_broker.jungfrau.options import ConversionOptions, parse_module_list

    options = ConversionOptions(
        adc_to_energy=args.adc_to_energy,
        mask=args.mask,
        mask_double_pixels=args.mask_double_pixels,
        geometry=args.geometry,
        gap_pixels=args.gap_pixels,
        factor=args.factor,
        disabled_modules=parse_module_list(args.disabled_modules),
    )
    output: Path = args.output_file
    if output.exists() and output.resolve() == args.raw_file.resolve():
        raise ConversionError(f"{output} is the input file; choose another output file")
    if not output.parent.is_dir():
        raise ConversionError(f"output directory {output.parent} does not exist")
    started = time.monotonic()
    with RawDetectorFile(args.raw_file) as raw:
        converter = Converter.from_files(
            raw.detector, args.gain_file, args.pedestal_file, options, highgain=raw.highgain()
        )
        if raw.frame_shape != converter.raw_frame_shape:
            raise ConversionError(
                f"{args.raw_file}: frames are {raw.frame_shape}, detector {raw.detector} has "
                f"{converter.raw_frame_shape}"
            )
        bad_frames = _convert_file(raw, converter, output, compression=args.compression)
        n_frames = raw.n_frames
        raw_bytes = raw.data.nbytes
    elapsed = time.monotonic() - started
    log.info(
        "%s: %d frames of %s (%d not good, kept and flagged), %s %s, %.1f s (%.2f GB/s raw)",
        output,
        n_frames,
        converter.name.full,
        bad_frames,
        converter.dtype,
        converter.frame_shape,
        elapsed,
        raw_bytes / max(elapsed, 1e-9) / 1e9,
    )


def _convert_file(
    raw: RawDetectorFile, converter: Converter, output: Path, *, compression: bool
) -> int:
    """Stream every frame through the converter into ``output``; returns the bad-frame count."""
    import numpy as np

    from sf_daq_broker.h5.atomic import atomic_output
    from sf_daq_broker.h5.detector import DetectorFileWriter

    frame_bytes = int(np.prod(raw.frame_shape)) * 2
    batch = max(1, min(raw.n_frames, BATCH_BYTES // frame_bytes))
    raw_buffer = np.empty((batch, *raw.frame_shape), dtype=np.uint16)
    out_buffer = converter.empty_output(batch)
    attributes = {**raw.attributes, "software_version": __version__}
    bad_frames = 0
    with (
        atomic_output(output) as temporary,
        DetectorFileWriter(
            temporary,
            raw.detector,
            raw.n_frames,
            converter.frame_shape,
            converter.dtype,
            compression=compression,
            attributes=attributes,
            pixel_mask=converter.pixel_mask,
            conversion_factor=converter.conversion_factor,
        ) as writer,
    ):
        for start in range(0, raw.n_frames, batch):
            stop = min(start + batch, raw.n_frames)
            count = stop - start
            raw.read_frames(start, stop, raw_buffer)
            converted = converter.convert(raw_buffer[:count], out_buffer[:count])
            columns = raw.columns(start, stop)
            bad_frames += int(np.count_nonzero(columns.is_good_frame == 0))
            writer.write(converted, columns)
    return bad_frames
