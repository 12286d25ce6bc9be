"""The conversion options of a detector (SPEC §5.4), with the SPEC's defaults.

``compression`` and ``keep_raw`` are file-level choices, not conversion options, and are not
here. High-gain mode is not an option either: it is read from the data (bit 0 of ``daq_rec``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sf_daq_broker.jungfrau.errors import ConversionError

#: Request options that do not change the conversion itself.
FILE_OPTIONS = frozenset({"compression", "keep_raw"})


@dataclass(frozen=True)
class ConversionOptions:
    adc_to_energy: bool = True
    mask: bool = True
    mask_double_pixels: bool = True
    geometry: bool = False
    gap_pixels: bool = True
    factor: float | None = None
    disabled_modules: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.factor is not None and not (math.isfinite(self.factor) and self.factor > 0):
            raise ConversionError(f"factor must be a positive number, not {self.factor!r}")
        modules = tuple(sorted(set(self.disabled_modules)))
        if any(module < 0 for module in modules):
            raise ConversionError(f"disabled_modules: negative module index in {list(modules)}")
        object.__setattr__(self, "disabled_modules", modules)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> ConversionOptions:
        """Options as a request carries them; unknown keys are refused, file options skipped."""
        known = {name for name in cls.__dataclass_fields__}
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key in FILE_OPTIONS:
                continue
            if key not in known:
                raise ConversionError(f"unknown detector option {key!r}")
            values[key] = tuple(value) if key == "disabled_modules" else value
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


def parse_module_list(text: str) -> tuple[int, ...]:
    """``"0,2"`` -> (0, 2); used by the command line."""
    items: Iterable[str] = (part.strip() for part in text.split(","))
    try:
        return tuple(int(part) for part in items if part)
    except ValueError:
        raise ConversionError(
            f"disabled modules must be comma-separated integers, not {text!r}"
        ) from None
