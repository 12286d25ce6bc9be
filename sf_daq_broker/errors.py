"""Errors that become a `failed` reply: the message is for the person who sent the request."""

from __future__ import annotations


class BrokerError(Exception):
    """A request the broker refuses, with the HTTP status that says why.

    The message names the offending key and the problem, because beamline users read it in
    their terminal in the middle of an experiment and must be able to fix the request at once.
    """

    http_status = 400

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if http_status is not None:
            self.http_status = http_status


class BadRequest(BrokerError):
    http_status = 400


class Forbidden(BrokerError):
    http_status = 403


class NotFound(BrokerError):
    http_status = 404


class Conflict(BrokerError):
    """The request is well-formed but the state forbids it (closed pgroup, used run number)."""

    http_status = 409


class Unavailable(BrokerError):
    """A dependency (RabbitMQ, the file system) is down."""

    http_status = 503


class InsufficientStorage(BrokerError):
    """The file system is full: nothing was recorded, the request can be sent again later."""

    http_status = 507
