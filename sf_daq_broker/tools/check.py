"""``check.py``: is the output of a run complete? Same options and lines as the facility's tool.

``Result of consistency check (summary) : True|False``, then ``OK : …`` or one
``Reason : …`` line per problem; exit status 0 only when the check passes (2: bad arguments).
``--json`` prints one JSON document instead, with the missing pulse ids of every name.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sf_daq_broker.retrieval import RATE_MULTIPLICATORS
from sf_daq_broker.tools.consistency import CheckResult, check_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="check consistency of produced files")
    parser.add_argument("-r", "--run_file", help="JSON file from the retrieve process")
    parser.add_argument(
        "--frequency_reduction_factor",
        type=int,
        default=0,
        help=(
            "beam rate, default 1 means 100Hz (2: 50Hz, 4: 25Hz....) "
            "(overwrites one from json file)"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document")
    return parser


def summary_lines(result: CheckResult) -> list[str]:
    lines = [f"Result of consistency check (summary) : {result.ok}"]
    if result.ok:
        sources = len(result.sources)
        lines.append(
            f"    OK : all tests passed ({sources} sources, {result.expected_pulses} beam pulses "
            f"at rate 1/{result.rate_multiplicator})"
        )
    else:
        lines += [f"    Reason : {problem}" for problem in result.problems]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_file is None:
        parser.error("a run file is needed (-r/--run_file raw/run_info/000000/run_000001.json)")
    if args.frequency_reduction_factor not in (0, *RATE_MULTIPLICATORS):
        parser.error(
            "--frequency_reduction_factor must be one of the beam rates "
            f"{', '.join(map(str, RATE_MULTIPLICATORS))} (or 0: the run's own rate), "
            f"got {args.frequency_reduction_factor}"
        )
    result = check_run(Path(args.run_file), args.frequency_reduction_factor)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n".join(summary_lines(result)))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
