"""Plain words for RabbitMQ failures: what a person reading a reply or a log can act on.

aio-pika's exceptions often carry an object's repr as their text (``<aio_pika.robust_channel.
RobustChannel object at 0x7f…> closed``), which says nothing to a user and leaks internals into
HTTP replies. Every message about a RabbitMQ failure is built here instead: the server's address
and what went wrong, named by the exception's kind; an exception's own text is used only once
every object repr is cut out of it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
from collections.abc import Iterator

from aio_pika import exceptions as amqp_errors
from yarl import URL

_REPR = re.compile(r"<[^<>]*\bobject at 0x[0-9a-fA-F]+>")

#: (exception kind, what it means), the most specific first.
_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (amqp_errors.ProbableAuthenticationError, "login refused"),
    (amqp_errors.AuthenticationError, "login refused"),
    (amqp_errors.ChannelInvalidStateError, "connection closed"),
    (amqp_errors.ConnectionClosed, "connection closed"),
    (amqp_errors.ChannelClosed, "channel closed by the server"),
    (amqp_errors.DeliveryError, "message refused"),
    (amqp_errors.PublishError, "message refused"),
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "host name not known"),
    (asyncio.TimeoutError, "no answer in time"),
    (TimeoutError, "no answer in time"),
    (ConnectionError, "connection lost"),
)


def server_address(url: str) -> str:
    """``host:port`` of an AMQP URL (never its password)."""
    parsed = URL(url)
    return f"{parsed.host or '127.0.0.1'}:{parsed.port or 5672}"


def without_reprs(text: str) -> str:
    """``text`` with every ``<… object at 0x…>`` cut out (and the spaces it leaves)."""
    return " ".join(_REPR.sub("", text).split())


_ERRNOS = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "no answer in time",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it (aio-pika wraps the socket's error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def failure_kind(exc: BaseException) -> str:
    """A few plain words for what went wrong: ``connection refused``, ``login refused``…"""
    causes = list(_chain(exc))
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in _ERRNOS:
            return _ERRNOS[cause.errno]
    for kind, words in _KINDS:
        if any(isinstance(cause, kind) for cause in causes):
            return words
    text = without_reprs(str(exc))
    if not text or text == "closed":
        return exc.__class__.__name__
    return text if len(text) < 200 else text[:200] + "…"


def describe_failure(url: str, exc: BaseException) -> str:
    """``RabbitMQ at 127.0.0.1:5672 is not reachable (connection closed)``."""
    return f"RabbitMQ at {server_address(url)} is not reachable ({failure_kind(exc)})"


class PlainReprs(logging.Filter):
    """A log handler's filter that cuts object reprs out of every line it writes, also out of
    the lines of aio-pika and aiormq themselves (``Callback <OneShotCallback: cb=<bound method
    RobustChannel._on_close of <aio_pika.robust_channel.RobustChannel object at 0x…>>> …``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a repr that fails itself (seen in aio-pika): leave the record be
            return True
        if _REPR.search(message):
            record.msg, record.args = without_reprs(message), None
        return True


def plain_log_lines() -> None:
    """Install ``PlainReprs`` on every handler of the root logger (the command line does)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(PlainReprs())
