"""RabbitMQ failures in plain words: never an object repr, in replies or in log lines."""

from __future__ import annotations

import logging

import pytest
from aio_pika.exceptions import AMQPConnectionError, ChannelInvalidStateError

from sf_daq_broker.transport.failures import PlainReprs, describe_failure, failure_kind

REPR = "<aio_pika.robust_channel.RobustChannel object at 0x7f01b33e6330>"


def test_a_closed_channel_is_named_plainly() -> None:
    exc = ChannelInvalidStateError(f"{REPR} closed")
    assert describe_failure("amqp://guest:secret@mq.example:5673/", exc) == (
        "RabbitMQ at mq.example:5673 is not reachable (connection closed)"
    )


def test_a_refused_connection_is_found_below_aio_pikas_wrapper() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
        except ConnectionRefusedError as cause:
            raise AMQPConnectionError(111, "Connect call failed") from cause
    except AMQPConnectionError as exc:
        assert failure_kind(exc) == "connection refused"


def test_an_unknown_failure_keeps_its_text_without_reprs() -> None:
    assert failure_kind(RuntimeError(f"{REPR} went away")) == "went away"
    assert failure_kind(RuntimeError(f"{REPR} closed")) == "RuntimeError"


def test_log_lines_lose_their_reprs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(PlainReprs())
    logging.getLogger("aio_pika.tools").error("Callback <cb of %s> error: %s closed", REPR, REPR)
    assert caplog.messages == ["Callback <cb of > error: closed"]
