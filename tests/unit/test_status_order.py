"""Late news in the status store: events that waited in an outbox must not undo an ending."""

from __future__ import annotations

from sf_daq_broker.jobs import Action, StatusEvent
from sf_daq_broker.status.store import JobState, StatusStore


def event(action: Action, timestamp: float, message: str = "") -> StatusEvent:
    return StatusEvent(
        action=action,
        request_id="req",
        job_id="job-1",
        pgroup="p12345",
        run_number=1,
        source="BSDATA",
        file="/x.h5",
        message=message,
        timestamp=timestamp,
    )


def state(store: StatusStore) -> tuple[str, str]:
    job = store.job_status("job-1")
    assert job is not None
    return job["state"], job["message"]


def test_a_start_older_than_the_end_is_old_news() -> None:
    store = StatusStore()
    store.apply(event(Action.WRITE_START, 100, "started"))
    store.apply(event(Action.WRITE_FINISHED, 110, "complete"))
    store.apply(event(Action.WRITE_START, 105, "started"))  # waited in an outbox
    store.apply(event(Action.WRITE_PROGRESS, 106))
    assert state(store) == (JobState.DONE, "complete")


def test_a_start_newer_than_the_end_starts_the_job_over() -> None:
    store = StatusStore()
    store.apply(event(Action.WRITE_REJECTED, 110, "lost"))
    store.apply(event(Action.WRITE_START, 120, "started"))  # delivered again after all
    assert state(store) == (JobState.RUNNING, "started")
    store.apply(event(Action.WRITE_FINISHED, 130, "complete"))
    assert state(store) == (JobState.DONE, "complete")


def test_a_final_event_after_the_reconcilers_verdict_sets_the_outcome() -> None:
    store = StatusStore()
    store.apply(event(Action.WRITE_START, 100, "started"))
    (row,) = store.unfinished()
    assert store.conclude("job-1", row["updated_at"], JobState.FAILED, "lost: …")
    store.apply(event(Action.WRITE_FINISHED, 105, "complete"))  # its worker came back
    assert state(store) == (JobState.DONE, "complete")


def test_the_reconciler_does_not_end_a_job_that_changed_since_it_looked() -> None:
    store = StatusStore()
    store.apply(event(Action.WRITE_START, 100, "started"))
    (row,) = store.unfinished()
    store.apply(event(Action.WRITE_PROGRESS, 101))
    assert not store.conclude("job-1", row["updated_at"], JobState.FAILED, "lost")
    assert state(store)[0] == JobState.RUNNING
