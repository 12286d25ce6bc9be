"""What a detector file holds and how a batch of raw frames becomes it: the one code path of
the detector worker and of ``sf-daq-broker convert``.

A file has one data group (``data/<DET>``: the converted image, or its downsampled version)
or, with regions of interest, one group per region (``data/<DET>:ROI_<label>``) cut from the
converted image, as the facility's converter writes them. ``Export.groups`` describes them
(shape, dtype, pixel mask, conversion factor and the reference's ``meta/`` datasets) for the
writer; ``Export.process`` turns a batch of raw frames into one array per group, in buffers
the caller allocates once (``Export.buffers``) and reuses, so memory stays bounded by the batch.

Without ``adc_to_energy`` the file is the raw layout (SPEC §5.4): one group, the raw frames as
read, every conversion option ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sf_daq_broker.h5.detector import DataGroup
from sf_daq_broker.jungfrau.converter import Converter
from sf_daq_broker.jungfrau.downsample import (
    downsample,
    downsampled_mask,
    downsampled_shape,
    good_counts,
)
from sf_daq_broker.jungfrau.options import ConversionOptions

log = logging.getLogger(__name__)

RawFrames = npt.NDArray[np.uint16]


@dataclass
class ExportBuffers:
    """Reusable arrays for one batch: the converted image and one array per output group."""

    image: npt.NDArray[Any] | None
    outputs: list[npt.NDArray[Any]]


class Export:
    """The groups of one detector file and the processing of a batch into them."""

    def __init__(
        self, detector: str, raw_frame_shape: tuple[int, int], converter: Converter | None
    ):
        self.detector = detector
        self.raw_frame_shape = raw_frame_shape
        self.converter = converter
        self.options = converter.options if converter is not None else ConversionOptions()
        self._rois: list[tuple[int, int, int, int]] = []
        self._counts: npt.NDArray[np.int64] | None = None
        self.groups = self._describe()

    @property
    def converts(self) -> bool:
        return self.converter is not None

    def _describe(self) -> list[DataGroup]:
        converter = self.converter
        if converter is None:
            return [DataGroup(self.detector, self.raw_frame_shape, np.dtype(np.uint16))]
        options = converter.options
        if not options.adc_to_energy:  # the converter's raw copy (JUNGFRAU.md §3)
            return [
                DataGroup(
                    self.detector, converter.frame_shape, converter.dtype, converter.pixel_mask
                )
            ]
        factor = options.factor
        meta: dict[str, Any] = {
            "conversion": True,
            "mask": options.masks,
            "gap_pixels": options.gap_pixels,
            "geometry": options.geometry,
            "double_pixels": options.double_pixels,
            "module_edge_pixels": options.module_edge_pixels,
            "conversion_factor": np.float64(np.nan if factor is None else factor),
            "downsample": np.asarray(options.downsample or (1, 1), dtype=np.int64),
            "pixel_mask_reasons": converter.pixel_mask_reasons,
        }
        dtype = np.dtype(np.int32 if factor is not None else np.float32)
        if options.downsample is not None:
            factors = options.downsample
            self._counts = good_counts(converter.pixel_mask, factors)
            mask = downsampled_mask(converter.pixel_mask, factors)
            meta["good_pixels_fraction"] = self._counts / float(factors[0] * factors[1])
            shape = downsampled_shape(converter.frame_shape, factors)
            return [
                DataGroup(
                    self.detector,
                    shape,
                    dtype,
                    mask,
                    converter.conversion_factor,
                    {**meta, "pixel_mask": mask},
                )
            ]
        if options.roi:
            groups = []
            for label, (y1, y2, x1, x2) in options.roi:
                self._rois.append((y1, y2, x1, x2))
                cut = np.s_[y1:y2, x1:x2]
                roi_meta = {
                    **meta,
                    "pixel_mask": converter.pixel_mask[cut],
                    "pixel_mask_reasons": converter.pixel_mask_reasons[cut],
                    "roi": np.asarray([[y1, y2], [x1, x2]], dtype=np.int64),
                }
                groups.append(
                    DataGroup(
                        f"{self.detector}:ROI_{label}",
                        (y2 - y1, x2 - x1),
                        converter.dtype,
                        converter.pixel_mask[cut],
                        converter.conversion_factor,
                        roi_meta,
                    )
                )
            return groups
        meta["pixel_mask"] = converter.pixel_mask
        meta["good_pixels_fraction"] = converter.pixel_mask.astype(np.float64)
        return [
            DataGroup(
                self.detector,
                converter.frame_shape,
                converter.dtype,
                converter.pixel_mask,
                converter.conversion_factor,
                meta,
            )
        ]

    def buffers(self, batch: int) -> ExportBuffers:
        """Arrays for batches of up to ``batch`` frames (allocate once per stream)."""
        if self.converter is None:
            return ExportBuffers(None, [])
        image = self.converter.empty_output(batch)
        if self._counts is None and not self._rois:
            return ExportBuffers(image, [image])
        outputs = [np.empty((batch, *g.frame_shape), dtype=g.dtype) for g in self.groups]
        return ExportBuffers(image, outputs)

    def process(self, raw: RawFrames, buffers: ExportBuffers) -> list[npt.NDArray[Any]]:
        """One array per group for the frames ``raw`` (views of ``buffers``)."""
        if self.converter is None:
            return [raw]
        count = raw.shape[0]
        assert buffers.image is not None
        image = self.converter.convert(raw, buffers.image[:count])
        options = self.options
        if self._counts is not None:
            assert options.downsample is not None
            out = buffers.outputs[0][:count]
            n, m = options.downsample
            downsample(image, self._counts, n, m, float(options.factor or 0.0), out)
            return [out]
        if self._rois:
            outputs = []
            for (y1, y2, x1, x2), buffer in zip(self._rois, buffers.outputs, strict=True):
                np.copyto(buffer[:count], image[:, y1:y2, x1:x2])
                outputs.append(buffer[:count])
            return outputs
        return [image]
