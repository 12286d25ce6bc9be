"""Typing and complexity are part of the build (issue 13 item 4): mypy --strict on the package
and on the tests, ruff's complexity rule at 13, both run by CI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mypy_is_strict_and_ruff_limits_complexity_to_13_in_ci() -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]
    assert tool["mypy"]["strict"] is True
    assert "C901" in tool["ruff"]["lint"]["select"]
    assert tool["ruff"]["lint"]["mccabe"]["max-complexity"] == 13
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ".venv/bin/mypy sf_daq_broker tests" in ci
    assert any(line.startswith(".venv/bin/ruff check .") for line in ci)


def test_the_tests_conftest_files_are_distinct_modules_for_mypy() -> None:
    """``mypy tests`` used to stop on "Duplicate module named conftest"."""
    conftests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("conftest.py"))
    assert len(conftests) == 4
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *conftests],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (result.returncode, result.stdout) == (
        0,
        f"Success: no issues found in {len(conftests)} source files\n",
    ), result.stdout + result.stderr
