"""The conversion options of a detector (SPEC §5.4, UPSTREAM_HEAD §2), with the SPEC's defaults.

``compression``, ``keep_raw`` and the other file-level choices are not conversion options and
are not here; the request's options object (``retrieval.DetectorOptions``) holds them all and
is the one place where option names and types are checked. High-gain mode is not an option
either: it is read from the data (bit 0 of ``daq_rec``).

The rules that need the detector (a region of interest must lie inside the image) are checked
by ``Converter`` and, before a run number is spent, by the request validation through
``check_options``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sf_daq_broker.jungfrau.detectors import parse_detector_name
from sf_daq_broker.jungfrau.errors import ConversionError, DetectorError

if TYPE_CHECKING:
    # Imported by check_options when it runs: a request carries options through every
    # process (the channel workers too), only the broker and the detector worker plan images.
    from sf_daq_broker.jungfrau.geometry import DetectorGeometry, GeometryTable
    from sf_daq_broker.jungfrau.layout import Placement

#: Request options that do not change the conversion itself.
FILE_OPTIONS = frozenset(
    {
        "compression",
        "keep_raw",
        "remove_raw_files",
        "save_ppicker_events_only",
        "crystfel_lists_laser",
        "selected_pulse_ids",
    }
)
DOUBLE_PIXELS_ACTIONS = ("mask", "keep", "interp")
MODULE_EDGE_ACTIONS = ("keep", "mask")

#: A region of interest: label and (y1, y2, x1, x2), half-open, in the final image.
Roi = tuple[str, tuple[int, int, int, int]]


@dataclass(frozen=True)
class ConversionOptions:
    adc_to_energy: bool = True
    mask: bool = True
    double_pixels: str = "mask"  # "mask" | "keep" | "interp" (SPEC: mask_double_pixels)
    module_edge_pixels: str = "keep"  # "keep" | "mask"
    geometry: bool = False
    gap_pixels: bool = True
    factor: float | None = None
    disabled_modules: tuple[int, ...] = field(default=())
    roi: tuple[Roi, ...] = field(default=())
    downsample: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.factor is not None and not (math.isfinite(self.factor) and self.factor > 0):
            raise ConversionError(f"factor must be a positive number, not {self.factor!r}")
        modules = tuple(sorted(set(self.disabled_modules)))
        if any(module < 0 for module in modules):
            raise ConversionError(f"disabled_modules: negative module index in {list(modules)}")
        object.__setattr__(self, "disabled_modules", modules)
        if self.double_pixels not in DOUBLE_PIXELS_ACTIONS:
            raise ConversionError(
                f"double_pixels_action must be one of {', '.join(DOUBLE_PIXELS_ACTIONS)}, "
                f"not {self.double_pixels!r}"
            )
        if self.module_edge_pixels not in MODULE_EDGE_ACTIONS:
            raise ConversionError(
                f"module_edge_pixels must be one of {', '.join(MODULE_EDGE_ACTIONS)}, "
                f"not {self.module_edge_pixels!r}"
            )
        if self.downsample == (1, 1):
            object.__setattr__(self, "downsample", None)
        if self.downsample is not None and min(self.downsample) < 1:
            raise ConversionError(
                f"downsample must be two positive integers, not {self.downsample}"
            )
        if self.adc_to_energy:
            self._check_combinations()

    def _check_combinations(self) -> None:
        """Upstream's refusals (UPSTREAM_HEAD §2), each a message instead of a traceback."""
        if self.double_pixels == "interp" and not self.gap_pixels:
            raise ConversionError(
                "double_pixels_action 'interp' needs gap_pixels: the interpolated values are "
                "spread into the gap pixels"
            )
        if self.double_pixels == "interp" and self.factor is not None and not self.downsample:
            raise ConversionError(
                "double_pixels_action 'interp' cannot be combined with factor (the reference "
                "refuses it; with downsample it is allowed)"
            )
        if self.roi and self.downsample:
            raise ConversionError("roi and downsample cannot be combined")
        for label, (y1, y2, x1, x2) in self.roi:
            if min(y1, y2, x1, x2) < 0 or y1 >= y2 or x1 >= x2:
                raise ConversionError(
                    f"roi {label!r}: [{y1}, {y2}, {x1}, {x2}] must be [y1, y2, x1, x2] with "
                    "0 <= y1 < y2 and 0 <= x1 < x2"
                )

    @property
    def masks(self) -> bool:
        """Bad pixels are zeroed: ``mask``, or forced by ``downsample`` (as upstream)."""
        return self.mask or self.downsample is not None

    @property
    def kernel_factor(self) -> float | None:
        """The factor the kernel applies; with interpolation or downsampling it comes after."""
        if self.double_pixels == "interp" or self.downsample is not None:
            return None
        return self.factor

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> ConversionOptions:
        """Options by their request names (SPEC's and upstream's); file options skipped.

        ``mask_double_pixels`` (SPEC) is ``double_pixels_action`` "mask" (true) or "keep"
        (false). The request validation checks types and contradictions first; this is for
        callers that hold an already valid options object (tests, benchmarks).
        """
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key in FILE_OPTIONS or value is None:
                continue
            if key == "mask_double_pixels":
                values.setdefault("double_pixels", "mask" if value else "keep")
            elif key == "double_pixels_action":
                values["double_pixels"] = value
            elif key == "disabled_modules":
                values[key] = tuple(value)
            elif key == "roi":
                values[key] = roi_items(value)
            elif key == "downsample":
                values[key] = (int(value[0]), int(value[1]))
            elif key in cls.__dataclass_fields__ and key != "double_pixels":
                values[key] = value
            else:
                raise ConversionError(f"unknown detector option {key!r}")
        return cls(**values)

    def active_modules(self, n_modules: int) -> list[int]:
        """Physical indices of the modules that appear in the output, in order."""
        bad = [m for m in self.disabled_modules if m >= n_modules]
        if bad:
            raise ConversionError(
                f"disabled_modules: module {bad[0]} does not exist (the detector has "
                f"{n_modules} modules, 0..{n_modules - 1})"
            )
        active = [m for m in range(n_modules) if m not in self.disabled_modules]
        if not active:
            raise ConversionError("disabled_modules: every module is disabled, nothing to convert")
        return active


def check_options(
    detector: str, options: ConversionOptions, geometry_table: GeometryTable | None = None
) -> tuple[tuple[int, int], list[Placement], DetectorGeometry | None]:
    """Everything about ``options`` that depends on the detector, without calibration: the
    sensor type, the geometry entry, the disabled modules and the regions of interest (inside
    the final image; the reference refuses the last row and column too). Returns the final
    image shape, the module placements and the geometry used. Cheap: the request validation
    calls it before a run number is spent."""
    from sf_daq_broker.jungfrau.geometry import default_geometry_table
    from sf_daq_broker.jungfrau.layout import plan_placements

    name = parse_detector_name(detector)
    table = geometry_table or default_geometry_table()
    entry = table.lookup(name.base)
    if entry is not None and entry.is_strip:
        raise DetectorError(
            f"{detector} has strip sensors, whose pixel remapping is not supported; "
            "it cannot be converted (retrieve it with adc_to_energy false)"
        )
    if options.geometry and entry is None:
        raise DetectorError(f"no geometry for {name.base} in {table.path}")
    geometry = entry if options.geometry else None
    shape, placements = plan_placements(
        name.n_modules,
        options.active_modules(name.n_modules),
        gap_pixels=options.gap_pixels,
        geometry=geometry,
    )
    height, width = shape
    for label, (y1, y2, x1, x2) in options.roi:
        if y2 >= height or x2 >= width:
            raise ConversionError(
                f"roi {label!r}: [{y1}, {y2}, {x1}, {x2}] is not inside the image of "
                f"{height} x {width} pixels (y2 < {height} and x2 < {width} are needed)"
            )
    return shape, placements, geometry


def roi_items(value: Mapping[str, Any] | Iterable[Any]) -> tuple[Roi, ...]:
    """A request's ``roi`` (dict label -> [y1, y2, x1, x2], or a list: labels 0, 1, ...)."""
    pairs = value.items() if isinstance(value, Mapping) else enumerate(value)
    rois: list[Roi] = []
    for label, box in pairs:
        y1, y2, x1, x2 = (int(v) for v in box)
        rois.append((str(label), (y1, y2, x1, x2)))
    return tuple(rois)


def parse_module_list(text: str) -> tuple[int, ...]:
    """``"0,2"`` -> (0, 2); used by the command line."""
    items: Iterable[str] = (part.strip() for part in text.split(","))
    try:
        return tuple(int(part) for part in items if part)
    except ValueError:
        raise ConversionError(
            f"disabled modules must be comma-separated integers, not {text!r}"
        ) from None
