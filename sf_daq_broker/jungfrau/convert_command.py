"""The conversion of `sf-daq-broker convert` (the parser is in ``cli``, which every command
loads; this module loads numpy, h5py and the kernels)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from sf_daq_broker import __version__
from sf_daq_broker.errors import BadRequest
from sf_daq_broker.h5.atomic import atomic_output
from sf_daq_broker.h5.detector import DetectorFileError, DetectorFileWriter, RawDetectorFile
from sf_daq_broker.jungfrau.converter import Converter
from sf_daq_broker.jungfrau.errors import ConversionError
from sf_daq_broker.jungfrau.events import kept_frames, write_crystfel_lists
from sf_daq_broker.jungfrau.export import Export
from sf_daq_broker.jungfrau.options import ConversionOptions, parse_module_list
from sf_daq_broker.retrieval import DetectorOptions, parse_detector_options

log = logging.getLogger(__name__)

#: Raw bytes read per batch (the converted batch is up to twice that, plus its compression).
BATCH_BYTES = 256 * 1024 * 1024


FLAGS = (
    "adc_to_energy",
    "mask",
    "mask_double_pixels",
    "geometry",
    "gap_pixels",
    "factor",
    "disabled_modules",
    "compression",
)


def run(args: argparse.Namespace) -> int:
    try:
        convert(args)
    except (ConversionError, DetectorFileError, BadRequest) as exc:
        print(f"sf-daq-broker convert: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sf-daq-broker convert: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 1
    return 0


def _request_options(args: argparse.Namespace, detector: str) -> DetectorOptions:
    """The options of ``--options``, validated as a request's (the same rules, messages)."""
    given = [f"--{flag.replace('_', '-')}" for flag in FLAGS if getattr(args, flag) is not None]
    if given:
        raise ConversionError(f"--options replaces the option flags; drop {', '.join(given)}")
    try:
        document = json.loads(args.options)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"--options is not JSON: {exc}") from None
    return parse_detector_options(detector, document)


def _flag_options(args: argparse.Namespace) -> tuple[ConversionOptions, bool]:
    """The conversion options and compression of the option flags (JUNGFRAU.md semantics:
    --no-adc-to-energy copies raw values into the converted layout)."""
    conversion = ConversionOptions(
        adc_to_energy=args.adc_to_energy is not False,
        mask=args.mask is not False,
        double_pixels="keep" if args.mask_double_pixels is False else "mask",
        geometry=bool(args.geometry),
        gap_pixels=args.gap_pixels is not False,
        factor=args.factor,
        disabled_modules=parse_module_list(args.disabled_modules or ""),
    )
    return conversion, args.compression is not False


def convert(args: argparse.Namespace) -> None:
    output: Path = args.output_file
    if output.exists() and output.resolve() == args.raw_file.resolve():
        raise ConversionError(f"{output} is the input file; choose another output file")
    if not output.parent.is_dir():
        raise ConversionError(f"output directory {output.parent} does not exist")
    started = time.monotonic()
    with RawDetectorFile(args.raw_file) as raw:
        if args.options is not None:
            options = _request_options(args, raw.detector)
            conversion = options.conversion() if options.adc_to_energy else None
        else:
            flag_conversion, compression = _flag_options(args)
            options, conversion = DetectorOptions(compression=compression), flag_conversion
        options = dataclasses.replace(options, selected_pulse_ids=tuple(args.selected_pulse_ids))
        converter = None
        if conversion is not None:
            converter = Converter.from_files(
                raw.detector,
                args.gain_file,
                args.pedestal_file,
                conversion,
                highgain=raw.highgain(),
            )
            if raw.frame_shape != converter.raw_frame_shape:
                raise ConversionError(
                    f"{args.raw_file}: frames are {raw.frame_shape}, detector {raw.detector} "
                    f"has {converter.raw_frame_shape}"
                )
        export = Export(raw.detector, raw.frame_shape, converter)
        kept = _convert_file(raw, export, output, options)
        n_frames = raw.n_frames
        raw_bytes = raw.data.nbytes
    elapsed = time.monotonic() - started
    log.info(
        "%s: %d of %d frames of %s kept, %s, %.1f s (%.2f GB/s raw)",
        output,
        kept,
        n_frames,
        raw.detector,
        ", ".join(f"{g.name} {g.dtype} {g.frame_shape}" for g in export.groups),
        elapsed,
        raw_bytes / max(elapsed, 1e-9) / 1e9,
    )


def _convert_file(
    raw: RawDetectorFile, export: Export, output: Path, options: DetectorOptions
) -> int:
    """Stream the kept frames through ``export`` into ``output``; returns how many."""
    columns = raw.columns(0, raw.n_frames)
    keep = kept_frames(
        columns.pulse_id,
        columns.daq_rec,
        columns.is_good_frame,
        selected_pulse_ids=options.selected_pulse_ids,
        ppicker_only=options.save_ppicker_events_only,
    )
    indices = np.flatnonzero(keep)
    kept_columns = columns.take(indices)
    frame_bytes = int(np.prod(raw.frame_shape)) * 2
    batch = max(1, min(len(indices), BATCH_BYTES // frame_bytes))
    raw_buffer = np.empty((batch, *raw.frame_shape), dtype=np.uint16)
    buffers = export.buffers(batch)
    attributes = {**raw.attributes, "software_version": __version__}
    with (
        atomic_output(output) as temporary,
        DetectorFileWriter(
            temporary,
            raw.detector,
            len(indices),
            groups=export.groups,
            compression=options.compression,
            attributes=attributes,
        ) as writer,
    ):
        for start in range(0, len(indices), batch):
            rows = indices[start : start + batch]
            raw.read_frames_at(rows, raw_buffer)
            frames = export.process(raw_buffer[: len(rows)], buffers)
            writer.write(frames, kept_columns.take(np.arange(start, start + len(rows))))
    if options.crystfel_lists_laser:
        write_crystfel_lists(output, kept_columns.daq_rec, kept_columns.is_good_frame)
    return len(indices)
