"""The demo's closing report: what was written, how complete it is, what was left out, how long.

Plain lines on stdout, so a newcomer reads them and a test can assert them; the consistency
check's lines are the ones ``sf-daq-check`` prints, because that is the tool users will run on
their own runs afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sf_daq_broker.tools.check import summary_lines
from sf_daq_broker.tools.consistency import CheckResult
from sf_daq_broker.tools.daq_client import RunResult


def human_size(size: int) -> str:
    """``1234567`` → ``1.2 MB`` (decimal units, as ``ls -h --si`` and file managers show)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


@dataclass
class Timings:
    """Seconds spent per step, in the order they happened."""

    steps: list[tuple[str, float]] = field(default_factory=list)

    def add(self, step: str, seconds: float) -> None:
        self.steps.append((step, seconds))

    def line(self, total: float) -> str:
        parts = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.steps)
        return f"time taken: {total:.1f} s ({parts})"


def file_lines(raw: Path, files: list[Path]) -> list[str]:
    """One line per file, relative to the pgroup's raw directory, with its size."""
    lines = []
    shown = [
        str(path.relative_to(raw)) if path.is_relative_to(raw) else str(path) for path in files
    ]
    width = max(map(len, shown), default=0)
    for path, name in zip(files, shown, strict=True):
        size = human_size(path.stat().st_size) if path.exists() else "missing"
        lines.append(f"    {name:<{width}}  {size:>9}")
    return lines


def report_lines(
    *,
    raw: Path,
    run: RunResult,
    run_file: Path,
    data_files: list[Path],
    check: CheckResult,
    left_out: list[str],
) -> list[str]:
    """The report after the run, without the timing line (the caller knows the total)."""
    lines = [f"files in {raw}:"]
    lines += file_lines(raw, [*data_files, run_file])
    lines.append("per source (the workers' completeness reports):")
    width = max((len(source.source) for source in run.sources), default=0)
    for source in run.sources:
        lines.append(f"    {source.source:<{width}}  {source.state:<6}  {source.detail}")
    if left_out:
        lines.append("left out of the request:")
        lines += [f"    {reason}" for reason in left_out]
    lines.append(f"consistency check (sf-daq-check -r {run_file}):")
    lines += [f"    {line}" for line in summary_lines(check)]
    return lines
