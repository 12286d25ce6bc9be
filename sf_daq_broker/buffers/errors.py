"""Errors of the buffer clients, split by what a worker should do about them.

A worker retries a *transient* error with back-off (the buffer was down, answered 5xx, the
connection broke mid-stream, the data is not there yet) and gives up at once on a *permanent*
one (the request is wrong, the stream is corrupt, the data has aged out), because retrying
those only delays the failure report the user needs. Every message names the buffer and what
happened, so it can go into the job's status unchanged.
"""

from __future__ import annotations


class BufferClientError(Exception):
    """Base of every buffer client error; ``transient`` says whether a retry may help."""

    transient: bool = False


class TransientBufferError(BufferClientError):
    """Retrying later may succeed."""

    transient = True


class PermanentBufferError(BufferClientError):
    """Retrying will not help: the request, the data or the stream is wrong."""

    transient = False


class BufferUnavailable(TransientBufferError):
    """No answer: connection refused or reset, or a timeout."""


class BufferServerError(TransientBufferError):
    """The buffer answered with an HTTP 5xx status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class StreamCut(TransientBufferError):
    """The reply ended before its last frame was complete."""


class DataNotYetAvailable(TransientBufferError):
    """The buffer has not (yet) received the requested pulses."""


class BufferRequestRejected(PermanentBufferError):
    """The buffer answered with an HTTP 4xx status: the request itself is wrong."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CorruptStream(PermanentBufferError):
    """The reply is not a valid frame stream (length mismatch, bad header, bad payload)."""


class UnsupportedFormat(PermanentBufferError):
    """The reply uses a type, byte order, shape or compression this client does not know."""


class RequestFailed(PermanentBufferError):
    """The buffer's request status reports that the request failed."""


class DataAgedOut(PermanentBufferError):
    """The requested pulses are older than the buffer's retention: their files are gone."""


class ModuleMissing(PermanentBufferError):
    """A module of a Jungfrau detector has no buffer at all (no folder or no LATEST file)."""


class StopTooFarAhead(PermanentBufferError):
    """The range stops so far beyond the buffer's newest pulse that waiting for it would block
    the worker for longer than any run can still be ahead: surely a mistake (a typo in
    ``stop_pulseid``)."""
