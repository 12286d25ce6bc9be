"""The completeness report of a job: what was expected, what was found, what is missing.

Judged on the beam pulses of the range the user asked for (``pid % rate == 0``), because that
is what the user's analysis will look for; rows outside it (the widened edges) do not count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: How many missing pulse ids a report lists (the count is always complete).
MISSING_SHOWN = 10
#: How many names without data the summary names (the lines name every one).
ABSENT_SHOWN = 3
#: What a requested name without a single value most likely means: a typo, or a name the
#: buffer never had. Said per name, because the run is otherwise written and looks fine.
ABSENT_NOTE = "no data at all (unknown to the buffer?)"


def beam_pulses(start: int, stop: int, rate: int) -> npt.NDArray[np.int64]:
    """Beam pulse ids in ``[start, stop]``: the multiples of ``rate``."""
    first = -(-start // rate) * rate
    return np.arange(first, stop + 1, rate, dtype=np.int64)


@dataclass
class NameReport:
    """Completeness of one channel, camera, PV or detector."""

    name: str
    expected: int
    found: int
    missing: int
    missing_pulse_ids: list[int]
    duplicates_removed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: What is counted: beam pulses, or values for a PV (which changes rarely, not per pulse).
    unit: str = "beam pulses"

    @classmethod
    def judge(
        cls,
        name: str,
        expected_pulses: npt.NDArray[np.int64],
        pulse_ids: npt.NDArray[np.int64],
        duplicates_removed: int = 0,
        **extra: Any,
    ) -> NameReport:
        present = np.isin(expected_pulses, pulse_ids, assume_unique=True)
        missing = expected_pulses[~present]
        return cls(
            name=name,
            expected=int(expected_pulses.size),
            found=int(present.sum()),
            missing=int(missing.size),
            missing_pulse_ids=[int(pid) for pid in missing[:MISSING_SHOWN]],
            duplicates_removed=duplicates_removed,
            extra=extra,
        )

    def line(self) -> str:
        text = f"{self.name}: {self.found} of {self.expected} {self.unit}"
        if self.missing:
            shown = ", ".join(map(str, self.missing_pulse_ids))
            more = " …" if self.missing > len(self.missing_pulse_ids) else ""
            text += f", {self.missing} missing ({shown}{more})"
        if self.duplicates_removed:
            text += f", {self.duplicates_removed} duplicates removed"
        for key, value in self.extra.items():
            text += f", {key} {value}"
        return text


@dataclass
class CompletenessReport:
    names: list[NameReport] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # requested but no data at all

    @property
    def complete(self) -> bool:
        return not self.absent and all(report.missing == 0 for report in self.names)

    def lines(self) -> list[str]:
        lines = [report.line() for report in self.names]
        lines += [f"{name}: {ABSENT_NOTE}" for name in self.absent]
        return lines

    def summary(self) -> str:
        """One line: ``complete: …``, or ``incomplete: …`` naming the names without data."""
        if self.complete:
            return f"complete: {len(self.names)} of {len(self.names)} names, no pulse missing"
        total = len(self.names) + len(self.absent)
        short = sum(report.missing > 0 for report in self.names)
        parts = [f"{short} of {total} names with missing pulses"] if short else []
        shown = self.absent[:ABSENT_SHOWN]
        parts += [f"{name}: {ABSENT_NOTE}" for name in shown]
        if len(self.absent) > len(shown):
            parts.append(f"{len(self.absent) - len(shown)} more names without data")
        return "incomplete: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "summary": self.summary(),
            "names": [asdict(report) for report in self.names],
            "absent": list(self.absent),
            "lines": self.lines(),
        }
