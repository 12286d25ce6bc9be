"""Run-number bookkeeping alone: ``accept_request`` from concurrent threads of one process.

What the broker's request threads do for each accepted retrieval, without HTTP, the status
store or the queue: the pgroup lock, ``LAST_RUN``, the run JSON, the output directory, all
durable. Each measurement runs in a child process on a fresh pgroup; with ``--baseline-tree``
the same child runs with another source tree's code (``git archive`` of an older commit),
alternating with this one, and the ratios of the medians are printed.

    .venv/bin/python bench/bench_run_numbers.py --threads 1 10 50 --baseline-tree DIR --rounds 4
    .venv/bin/python bench/bench_run_numbers.py --dir /dev/shm        # without the disk's fsyncs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from sf_daq_broker.bookkeeping.ledger import accept_request
from sf_daq_broker.bookkeeping.paths import open_pgroup
from sf_daq_broker.retrieval import parse_retrieve_request

threads, count, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
body = {
    "pgroup": "p12345", "start_pulseid": 15_000_000_000, "stop_pulseid": 15_000_000_999,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet", "SAR-CVME-TIFALL4:EvtSet"],
    "camera_list": ["SARES11-SPEC125-M1:FPICTURE"], "pv_list": ["SARFE10-OAPU044:SPECTRUM_X"],
    "detectors": {"JF13T01V01": {}},
}
request = parse_retrieve_request(
    body, beamline="bernina", allowed_detectors=["JF13T01V01"], max_pulse_range=10**7
)
with tempfile.TemporaryDirectory(dir=where) as tmp:
    (Path(tmp) / "bernina/data/p12345/raw").mkdir(parents=True)
    dirs = open_pgroup(Path(tmp), "bernina", "p12345")
    accept_request(request, dirs)  # warm-up (imports, first directories)
    latencies = []

    def one(_):
        started = time.perf_counter()
        accept_request(request, dirs)
        latencies.append(time.perf_counter() - started)

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    last = (Path(tmp) / "bernina/data/p12345/raw/run_info/LAST_RUN").read_text().strip()
latencies.sort()
print(json.dumps({
    "rate": count / elapsed, "p50": latencies[count // 2],
    "p99": latencies[min(count - 1, int(count * 0.99))], "cpu": cpu / count,
    "last": int(last), "expected": count + 1,
}))
"""


def measure(threads: int, count: int, where: str, tree: Path | None) -> dict[str, float]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    output = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(count), where],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(output)
    if result["last"] != result["expected"]:
        raise SystemExit(f"LAST_RUN {result['last']}, expected {result['expected']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--requests", type=int, default=600, help="accepts per measurement")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the pgroup lives")
    parser.add_argument("--baseline-tree", type=Path, help="the code to compare with")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    trees: list[tuple[str, Path | None]] = [("this", None)]
    if args.baseline_tree is not None:
        trees = [("baseline", args.baseline_tree.resolve()), *trees]
    print(f"{args.requests} accepts per measurement in {args.dir}, {os.cpu_count()} cores")
    for threads in args.threads:
        print(f"threads {threads}:")
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
        for round_ in range(args.rounds):
            for label, tree in trees if round_ % 2 == 0 else trees[::-1]:
                r = measure(threads, args.requests, args.dir, tree)
                results[label].append(r)
                print(
                    f"  {label:<9} {r['rate']:6.0f} accepts/s  p50 {r['p50'] * 1e3:6.2f} ms  "
                    f"p99 {r['p99'] * 1e3:6.2f} ms  cpu {r['cpu'] * 1e3:5.2f} ms/accept  "
                    f"load {os.getloadavg()[0]:.1f}"
                )
        if len(trees) == 2:
            ratio = {
                key: statistics.median(r[key] for r in results["this"])
                / statistics.median(r[key] for r in results["baseline"])
                for key in ("rate", "p50", "p99", "cpu")
            }
            print(
                f"  this/baseline (medians of {args.rounds}): accepts/s x{ratio['rate']:.2f}, "
                f"p50 x{ratio['p50']:.2f}, p99 x{ratio['p99']:.2f}, cpu x{ratio['cpu']:.2f}"
            )


if __name__ == "__main__":
    main()
