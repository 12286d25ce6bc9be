"""What any JSON input must be before a handler looks at it: parseable, not absurdly deep,
and text that can be stored.

Python's JSON parser recurses: a body of 100 000 ``[`` raises ``RecursionError``, and one a
little less deep parses but breaks every later ``json.dumps`` (the run JSON, a status event).
A lone surrogate (``"\\ud800"``) parses into a ``str`` that cannot be encoded as UTF-8, so
the run JSON (or a file name, an HDF5 attribute) fails after a run number was spent. Both are
refused here, at the door, with the key that holds them.
"""

from __future__ import annotations

import json
from typing import Any

from sf_daq_broker.errors import BadRequest

#: Nesting deeper than this is refused (a retrieval request is 3 levels deep; metadata that
#: clients keep in it rarely more than a few).
MAX_DEPTH = 32


def parse_json(raw: bytes, what: str = "the request body") -> Any:
    """Parse and check ``raw``; BadRequest with a message naming the problem."""
    try:
        document = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    check_document(document, what)
    return document


def check_document(document: Any, what: str = "the request body") -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` and text that is not valid Unicode."""
    pending: list[tuple[Any, str, int]] = [(document, "", 0)]
    while pending:
        value, key, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(
                f"{what} is nested too deeply at {key or 'the top'} (at most {MAX_DEPTH} levels)"
            )
        if isinstance(value, str):
            _check_text(value, key or "the request body", what)
        elif isinstance(value, dict):
            for name, item in value.items():
                path = f"{key}.{name}" if key else str(name)
                _check_text(str(name), path, what)
                pending.append((item, path, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, f"{key}[{index}]", depth + 1) for index, item in enumerate(value))


def _check_text(text: str, key: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        shown = key.encode("utf-8", "backslashreplace").decode()
        raise BadRequest(
            f"{shown} in {what} is not valid Unicode: a lone surrogate "
            f"{text[exc.start]!r} at position {exc.start}"
        ) from None
