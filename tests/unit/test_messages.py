"""The job and status messages: one validated model each, versioned, exact round trips.

A message that is not what this program writes (not JSON, keys missing or unknown, wrong types,
a newer format) is refused with one line that names the problem: the transport puts that line
beside the message in the dead-letter queue.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from sf_daq_broker.jobs import (
    JOB_FORMAT_VERSION,
    STATUS_FORMAT_VERSION,
    Action,
    Job,
    SourceKind,
    StatusEvent,
    UndecodableMessage,
    job_id_for,
)


def sample_job() -> Job:
    return Job(
        job_id=job_id_for("p12345", 7, "JF07T32V01"),
        request_id="req-7",
        kind=SourceKind.DETECTOR,
        source="JF07T32V01",
        names=("JF07T32V01",),
        start_pulse_id=9_999_998,
        stop_pulse_id=10_000_101,
        requested_start=10_000_000,
        requested_stop=10_000_100,
        rate_multiplicator=2,
        pgroup="p12345",
        beamline="bernina",
        run_number=7,
        output_file="/sf/bernina/data/p12345/raw/run_000007.JF07T32V01.h5",
        log_file="/sf/bernina/data/p12345/raw/run_info/000000/run_000007.JF07T32V01.log",
        run_info_file="/sf/bernina/data/p12345/raw/run_info/000000/run_000007.json",
        request_time="2026-11-21 00:00:00.000000",
        options={"compression": True, "roi": {"a": [1, 2, 3, 4]}},
        log_level="DEBUG",
        pedestal_file="/sf/jungfrau/data/pedestal/JF07T32V01/20261120_1200.h5",
    )


def job_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(sample_job().to_json())
    return document


def test_a_job_travels_unchanged() -> None:
    job = sample_job()
    assert Job.from_json(job.to_json()) == job
    assert Job.from_json(job.to_json().decode()) == job
    assert job_document() == {
        "job_id": job.job_id,
        "request_id": "req-7",
        "kind": "detector",
        "source": "JF07T32V01",
        "names": ["JF07T32V01"],
        "start_pulse_id": 9_999_998,
        "stop_pulse_id": 10_000_101,
        "requested_start": 10_000_000,
        "requested_stop": 10_000_100,
        "rate_multiplicator": 2,
        "pgroup": "p12345",
        "beamline": "bernina",
        "run_number": 7,
        "output_file": "/sf/bernina/data/p12345/raw/run_000007.JF07T32V01.h5",
        "log_file": "/sf/bernina/data/p12345/raw/run_info/000000/run_000007.JF07T32V01.log",
        "run_info_file": "/sf/bernina/data/p12345/raw/run_info/000000/run_000007.json",
        "request_time": "2026-11-21 00:00:00.000000",
        "options": {"compression": True, "roi": {"a": [1, 2, 3, 4]}},
        "log_level": "DEBUG",
        "pedestal_file": "/sf/jungfrau/data/pedestal/JF07T32V01/20261120_1200.h5",
        "format_version": 1,
    }
    assert JOB_FORMAT_VERSION == 1


def test_a_job_of_the_first_format_without_a_version_is_read_as_version_1() -> None:
    """The messages written before the version existed: still in queues after an upgrade."""
    document = job_document()
    del document["format_version"], document["log_level"], document["pedestal_file"]
    job = Job.from_json(json.dumps(document))
    assert job == dataclasses.replace(sample_job(), log_level="INFO", pedestal_file=None)
    assert job.format_version == 1
    assert isinstance(job.names, tuple)
    assert job.kind is SourceKind.DETECTOR


def test_a_job_stays_a_frozen_dataclass_and_replace_validates() -> None:
    job = sample_job()
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.run_number = 8  # type: ignore[misc]
    assert dataclasses.replace(job, run_number=8).run_number == 8
    assert dataclasses.asdict(job)["names"] == ("JF07T32V01",)
    with pytest.raises(ValueError, match="run_number"):
        dataclasses.replace(job, run_number="eight")  # type: ignore[arg-type]


def refused(payload: bytes | str, model: type[Job] | type[StatusEvent] = Job) -> str:
    with pytest.raises(UndecodableMessage) as caught:
        model.from_json(payload)
    return str(caught.value)


def with_changes(**changes: Any) -> bytes:
    return json.dumps(job_document() | changes).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "undecodable job message: Invalid JSON: expected ident at line 1 column 2"),
        (
            b"",
            "undecodable job message: Invalid JSON: EOF while parsing a value at line 1 column 0",
        ),
        (b"\xff\xfe", "undecodable job message: Invalid JSON: expected value at line 1 column 1"),
        (b"[1, 2]", "undecodable job message: Input should be an object"),
        (
            b"{}",
            "undecodable job message: missing job_id, request_id, kind, source, names, "
            "start_pulse_id, stop_pulse_id, requested_start, requested_stop, rate_multiplicator, "
            "pgroup, beamline, run_number, output_file, log_file, run_info_file, request_time",
        ),
        (
            with_changes(format_version=99),
            "undecodable job message: format version 99 is unknown here "
            "(this sf-daq-broker reads format versions 1 to 1)",
        ),
        (
            # A newer format may change anything: its version is the only thing worth saying.
            json.dumps({"format_version": 2, "job": {"id": 1}}),
            "undecodable job message: format version 2 is unknown here "
            "(this sf-daq-broker reads format versions 1 to 1)",
        ),
        (
            with_changes(format_version=0),
            "undecodable job message: format version 0 is unknown here "
            "(this sf-daq-broker reads format versions 1 to 1)",
        ),
        (
            with_changes(run_number="x"),
            "undecodable job message: run_number: Input should be a valid integer, got 'x'",
        ),
        (
            # Strict: no number from a string, no number from a boolean.
            with_changes(run_number="7", start_pulse_id=True),
            "undecodable job message: start_pulse_id: Input should be a valid integer, got True; "
            "run_number: Input should be a valid integer, got '7'",
        ),
        (
            with_changes(kind="camera"),
            "undecodable job message: kind: Input should be 'databuffer', 'imagebuffer', "
            "'archiver', 'detector' or 'pedestal', got 'camera'",
        ),
        (
            with_changes(names=["A:B", 3]),
            "undecodable job message: names.1: Input should be a valid string, got 3",
        ),
        (
            with_changes(colour="red", size=3),
            "undecodable job message: unknown key colour; unknown key size",
        ),
    ],
)
def test_a_message_that_is_not_a_job_is_refused_with_the_reason(
    payload: bytes | str, reason: str
) -> None:
    assert refused(payload) == reason


def test_a_long_wrong_value_is_shortened_in_the_reason() -> None:
    assert refused(with_changes(run_number="x" * 500)) == (
        "undecodable job message: run_number: Input should be a valid integer, got '"
        + "x" * 58  # 60 characters with the quote and the ellipsis
        + "…"
    )


def test_a_status_event_travels_unchanged() -> None:
    event = StatusEvent.for_job(
        Action.WRITE_FINISHED, sample_job(), "complete", report={"complete": True}
    )
    assert StatusEvent.from_json(event.to_json()) == event
    document = json.loads(event.to_json())
    assert document == {
        "action": "write_finished",
        "request_id": "req-7",
        "job_id": sample_job().job_id,
        "pgroup": "p12345",
        "run_number": 7,
        "source": "JF07T32V01",
        "file": "/sf/bernina/data/p12345/raw/run_000007.JF07T32V01.h5",
        "message": "complete",
        "timestamp": event.timestamp,
        "details": {"report": {"complete": True}},
        "format_version": 1,
    }
    assert STATUS_FORMAT_VERSION == 1
    assert event.headers() == {
        "action": "write_finished",
        "source": "JF07T32V01",
        "file": "/sf/bernina/data/p12345/raw/run_000007.JF07T32V01.h5",
        "message": "complete",
    }
    # The first format: no version, no message, an integer timestamp.
    del document["format_version"], document["message"]
    document["timestamp"] = 1_700_000_000
    old = StatusEvent.from_json(json.dumps(document))
    assert (old.message, old.timestamp, old.format_version) == ("", 1_700_000_000.0, 1)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (
            b"not json",
            "undecodable status message: Invalid JSON: expected ident at line 1 column 2",
        ),
        (
            b'{"action": "write_start"}',
            "undecodable status message: missing request_id, job_id, pgroup, run_number, source, "
            "file",
        ),
        (
            json.dumps(
                {
                    "action": "write_exploded",
                    "request_id": "r",
                    "job_id": "j",
                    "pgroup": "p12345",
                    "run_number": 1,
                    "source": "BSDATA",
                    "file": "/x.h5",
                    "format_version": 1,
                }
            ),
            "undecodable status message: action: Input should be 'write_request', "
            "'write_start', 'write_progress', 'write_finished' or 'write_rejected', "
            "got 'write_exploded'",
        ),
        (
            json.dumps({"format_version": 3}),
            "undecodable status message: format version 3 is unknown here "
            "(this sf-daq-broker reads format versions 1 to 1)",
        ),
    ],
)
def test_a_message_that_is_not_a_status_event_is_refused_with_the_reason(
    payload: bytes | str, reason: str
) -> None:
    assert refused(payload, StatusEvent) == reason


def test_a_status_event_with_text_that_is_not_unicode_still_travels() -> None:
    """A lone surrogate (an undecodable file name in an error message) becomes "?"."""
    event = StatusEvent.for_job(
        Action.WRITE_REJECTED, sample_job(), "cannot open /raw/x\udcff.h5", ratio=float("nan")
    )
    decoded = StatusEvent.from_json(event.to_json())
    assert decoded.message == "cannot open /raw/x?.h5"
    assert decoded.details["ratio"] != decoded.details["ratio"]  # NaN still NaN
    assert dataclasses.replace(decoded, message=event.message, details={}) == dataclasses.replace(
        event, details={}
    )


def test_nan_and_infinity_travel_as_before() -> None:
    event = StatusEvent.for_job(
        Action.WRITE_FINISHED, sample_job(), report={"a": float("inf"), "b": float("-inf")}
    )
    assert b'"details":{"report":{"a":Infinity,"b":-Infinity}}' in event.to_json()
    assert StatusEvent.from_json(event.to_json()) == event


def test_a_job_with_text_that_is_not_unicode_is_not_sent() -> None:
    """Its paths must arrive exactly as they are or not at all (the broker refuses such text
    at the door, so no job is ever made of it)."""
    job = dataclasses.replace(sample_job(), output_file="/raw/x\udcff.h5")
    with pytest.raises(ValueError, match="surrogates not allowed"):
        job.to_json()
