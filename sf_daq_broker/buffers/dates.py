"""Conversions between nanosecond timestamps and the text forms the buffers speak.

All arithmetic is on integers: a float of seconds since the epoch carries only about 0.2 µs
of precision today, which is enough to move an edge pulse in or out of a range.

- api/1 ranges are ISO-8601 UTC dates with microseconds. A date for a range edge is the
  timestamp *truncated* to microseconds (BUFFERS.md §2): with the half-open range
  ``[ts(start), ts(stop + 1))`` truncation keeps ``stop`` in and ``stop + 1`` out.
- The archiver reports ``globalSeconds`` as a decimal string with nanosecond digits.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NS_PER_S = 1_000_000_000


def ns_to_date(ns: int) -> str:
    """``2021-08-17T13:00:00.123456Z`` for a timestamp in ns, truncated (never rounded) to µs."""
    micros = ns // 1000
    moment = _EPOCH + timedelta(microseconds=micros)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def date_to_ns(text: str) -> int:
    """Nanoseconds since the epoch of an ISO-8601 date; a date without zone is UTC.

    Raises ValueError for text that is not such a date.
    """
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000


def ns_to_global_seconds(ns: int) -> str:
    """The archiver's ``globalSeconds``: ``"1629205199.123456789"``."""
    seconds, rest = divmod(ns, NS_PER_S)
    return f"{seconds}.{rest:09d}"


def global_seconds_to_ns(value: str | float | int | Decimal) -> int:
    """Nanoseconds of a ``globalSeconds`` value, exact for strings and Decimals.

    A float is converted through its shortest decimal representation, which is what the
    sender wrote into the JSON.
    """
    number = value if isinstance(value, Decimal) else Decimal(str(value))
    if not number.is_finite():
        raise ValueError(f"not a finite number of seconds: {value!r}")
    return int((number * NS_PER_S).to_integral_value(rounding="ROUND_FLOOR"))


def ns_to_seconds(ns: int) -> float:
    """Seconds as a float for request bodies of clients that send numbers (µs precision)."""
    seconds, rest = divmod(ns, NS_PER_S)
    return seconds + rest / NS_PER_S
