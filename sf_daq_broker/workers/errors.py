"""How a source tells the worker loop what went wrong, so the loop knows whether to retry."""

from __future__ import annotations


class RetrievalError(Exception):
    """A job could not be done. The message names the buffer, the range and what happened."""


class TransientError(RetrievalError):
    """Worth another try after a pause: connection refused, HTTP 5xx, a stream cut short."""


class PermanentError(RetrievalError):
    """Retrying cannot help: data aged out of the buffer, a corrupt stream, a bad request."""
