"""Group commit of run numbers: concurrent requests of one pgroup share one lock hold.

The batches are made deterministic by holding the pgroup lock (or blocking the commit) while
the other callers queue up, then releasing it: the test waits for the queue, never sleeps.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sf_daq_broker.bookkeeping import ledger
from sf_daq_broker.bookkeeping.group_commit import GroupCommit, Pending
from sf_daq_broker.bookkeeping.ledger import AcceptedRun, accept_request
from sf_daq_broker.bookkeeping.paths import PgroupDirs
from sf_daq_broker.bookkeeping.runs import pgroup_lock
from sf_daq_broker.errors import BadRequest, Conflict
from sf_daq_broker.retrieval import RetrieveRequest, parse_retrieve_request
from tests.support import wait_until


def doubling(entries: list[Pending[int, int]]) -> None:
    for entry in entries:
        entry.succeed(entry.item * 2)


def test_callers_arriving_during_a_commit_are_committed_as_one_batch() -> None:
    started, release = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def commit(entries: list[Pending[int, int]]) -> None:
        batches.append([entry.item for entry in entries])
        if len(batches) == 1:
            started.set()
            assert release.wait(30)
        doubling(entries)

    group: GroupCommit[int, int] = GroupCommit(commit)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(group.submit, 1)
        assert started.wait(30)
        others = [pool.submit(group.submit, item) for item in (2, 3, 4)]
        wait_until(lambda: group.queued == 3, what="three callers queued")
        release.set()
        assert first.result(30) == 2
        assert sorted(f.result(30) for f in others) == [4, 6, 8]
    assert batches[0] == [1]
    assert sorted(batches[1]) == [2, 3, 4]
    assert group.batch_sizes == [1, 3]


def test_a_failing_commit_fails_its_batch_only() -> None:
    def commit(entries: list[Pending[int, int]]) -> None:
        if entries[0].item < 0:
            raise OSError(28, "No space left on device")
        doubling(entries)

    group: GroupCommit[int, int] = GroupCommit(commit)
    with pytest.raises(OSError, match="No space left"):
        group.submit(-1)
    assert group.submit(5) == 10


def test_an_item_left_without_outcome_is_an_error_not_a_hang() -> None:
    group: GroupCommit[int, int] = GroupCommit(lambda entries: None)
    with pytest.raises(RuntimeError, match="without an outcome"):
        group.submit(1)


def retrieve(**changes: Any) -> RetrieveRequest:
    body = {"pgroup": "p12345", "start_pulseid": 1000, "stop_pulseid": 2000}
    body["channels_list"] = ["A:B"]
    body.update(changes)
    return parse_retrieve_request(
        body, beamline="bernina", allowed_detectors=[], max_pulse_range=10**6
    )


def accept_in_one_batch(
    dirs: PgroupDirs, requests: list[RetrieveRequest]
) -> list[Future[AcceptedRun]]:
    """Accept ``requests`` concurrently while the pgroup lock is held, so that they queue and
    are committed as one batch once it is released (the first one waits in the lock)."""
    committer = ledger._committer(dirs)
    pool = ThreadPoolExecutor(len(requests))
    with pgroup_lock(dirs):
        first = pool.submit(accept_request, requests[0], dirs)
        wait_until(lambda: committer.batch_sizes[-1:] == [1], what="the first commit started")
        rest = [pool.submit(accept_request, request, dirs) for request in requests[1:]]
        wait_until(lambda: committer.queued == len(rest), what="the others queued")
    pool.shutdown(wait=True)
    return [first, *rest]


def outcome(future: Future[AcceptedRun]) -> AcceptedRun | BaseException:
    error = future.exception()
    return future.result() if error is None else error


def run_json(raw_dir: Path, run: int) -> dict[str, Any]:
    return json.loads((raw_dir / "run_info" / "000000" / f"run_{run:06d}.json").read_text())


@pytest.fixture
def dirs(raw_dir: Path) -> PgroupDirs:
    return PgroupDirs("bernina", "p12345", raw_dir)


def test_a_batch_gives_consecutive_numbers_and_writes_every_run(
    dirs: PgroupDirs, raw_dir: Path
) -> None:
    requests = [retrieve(directory_name=f"sample{index}") for index in range(8)]
    futures = accept_in_one_batch(dirs, requests)
    runs = [future.result() for future in futures]
    assert sorted(run.run_number for run in runs) == list(range(1, 9))
    assert ledger._committer(dirs).batch_sizes[-2:] == [1, 7]
    for index, run in enumerate(runs):
        record = run_json(raw_dir, run.run_number)
        assert record["run_number"] == run.run_number
        assert record["directory_name"] == f"sample{index}"
        assert record["request_id"] == run.request_id
        assert (raw_dir / f"sample{index}").is_dir()
    assert (raw_dir / "run_info" / "LAST_RUN").read_text() == "8\n"
    leftovers = [p.name for p in (raw_dir / "run_info").rglob(".*") if p.name != ".lock"]
    assert leftovers == []


def test_a_refused_request_in_a_batch_spends_no_number(dirs: PgroupDirs, raw_dir: Path) -> None:
    requests = [retrieve(), retrieve(), retrieve(run_number=50), retrieve(), retrieve()]
    outcomes = [outcome(future) for future in accept_in_one_batch(dirs, requests)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], BadRequest)
    assert "run_number 50 has not been given out yet" in str(refused[0])
    numbers = sorted(o.run_number for o in outcomes if isinstance(o, AcceptedRun))
    assert numbers == [1, 2, 3, 4]
    assert (raw_dir / "run_info" / "LAST_RUN").read_text() == "4\n"
    assert sorted(p.name for p in (raw_dir / "run_info" / "000000").iterdir()) == [
        f"run_{n:06d}.json" for n in (1, 2, 3, 4)
    ]


def test_a_reserved_number_used_twice_in_one_batch_is_refused_once(
    dirs: PgroupDirs, raw_dir: Path
) -> None:
    (raw_dir / "run_info").mkdir()
    (raw_dir / "run_info" / "LAST_RUN").write_text("7\n")
    requests = [retrieve(), retrieve(run_number=7), retrieve(run_number=7), retrieve()]
    outcomes = [outcome(future) for future in accept_in_one_batch(dirs, requests)]
    conflicts = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(conflicts) == 1 and "run_number 7 of p12345 already holds" in str(conflicts[0])
    numbers = sorted(o.run_number for o in outcomes if isinstance(o, AcceptedRun))
    assert numbers == [7, 8, 9]
    assert (raw_dir / "run_info" / "LAST_RUN").read_text() == "9\n"


def test_scan_steps_of_one_batch_follow_the_run_numbers(dirs: PgroupDirs, raw_dir: Path) -> None:
    requests = [
        retrieve(scan_info={"scan_name": "energy", "scan_values": [index]}) for index in range(6)
    ]
    runs = [future.result() for future in accept_in_one_batch(dirs, requests)]
    value_of = {run.run_number: index for index, run in enumerate(runs)}
    scan = json.loads((raw_dir / "scan_info" / "energy.json").read_text())
    assert scan["scan_values"] == [[value_of[n]] for n in range(1, 7)]
    assert scan["scan_files"] == [[f"{raw_dir}/run_{n:06d}.BSDATA.h5"] for n in range(1, 7)]


def test_a_run_json_in_the_way_refuses_that_request_and_spends_its_number(
    dirs: PgroupDirs, raw_dir: Path
) -> None:
    """As before group commit: a run JSON left by a crash is never overwritten; its number is
    spent so the next request does not meet it again."""
    (raw_dir / "run_info" / "000000").mkdir(parents=True)
    (raw_dir / "run_info" / "000000" / "run_000002.json").write_text("{}\n")
    outcomes = [outcome(f) for f in accept_in_one_batch(dirs, [retrieve() for _ in range(3)])]
    conflicts = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(conflicts) == 1 and "run_number 2 of p12345 already holds" in str(conflicts[0])
    numbers = sorted(o.run_number for o in outcomes if isinstance(o, AcceptedRun))
    assert numbers == [1, 3]
    assert (raw_dir / "run_info" / "LAST_RUN").read_text() == "3\n"
    assert (raw_dir / "run_info" / "000000" / "run_000002.json").read_text() == "{}\n"


def test_a_closed_pgroup_refuses_the_whole_batch(dirs: PgroupDirs, raw_dir: Path) -> None:
    (raw_dir / "run_info").mkdir()
    (raw_dir / "run_info" / "CLOSED").write_text("")
    outcomes = [outcome(f) for f in accept_in_one_batch(dirs, [retrieve() for _ in range(3)])]
    assert all(isinstance(o, Conflict) and "closed for writing" in str(o) for o in outcomes)
    assert not (raw_dir / "run_info" / "LAST_RUN").exists()
