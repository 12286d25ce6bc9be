"""Request keys about a run as a whole: ``user_tag``, ``append_user_tag_to_data_dir``,
``run_log_level`` (UPSTREAM_HEAD §1).

**The tag in the layout.** Upstream writes each run into its own directory ``runNNNN/`` and,
with ``append_user_tag_to_data_dir``, into ``runNNNN-<tag>/``. Our runs have no directory of
their own: a run's files share the prefix ``run_NNNNNN`` inside ``directory_name``. So the tag
goes where upstream puts it, right after the run number: ``run_000012-dark_ref.BSDATA.h5``,
``run_000012-dark_ref.JF07T32V01.h5`` (the run JSON and logs in ``run_info/`` keep their
names). The tag is cleaned as upstream cleans it — every character outside ``A-Za-z0-9_-+.``
becomes ``_``, it is cut to 50 characters, a last character that is not a letter or digit
becomes ``_`` — and saved as ``appended_directory_suffix`` in the run JSON. As upstream, a run
whose files already exist with another tag (or none) is refused. Without the flag, or with an
empty tag, the tag is only kept in the run JSON.

**run_log_level** is the level of the run's job logs (``run_info/…/run_NNNNNN.SOURCE.log``)
and of a pedestal's log: a level name (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``,
``CRITICAL``, any case) or its number (10 … 50). Default ``INFO``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sf_daq_broker.errors import BadRequest

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "INFO"
TAG_MAX_LENGTH = 50
_TAG_FORBIDDEN = re.compile(r"[^A-Za-z0-9_\-+.]")
RUN_OPTION_KEYS = ("user_tag", "append_user_tag_to_data_dir", "run_log_level")


@dataclass(frozen=True)
class RunOptions:
    """What the three keys ask for: the cleaned tag for file names (None: no tag in the
    names) and the job logs' level name."""

    file_tag: str | None = None
    log_level: str = DEFAULT_LOG_LEVEL


def clean_user_tag(tag: str) -> str:
    """Upstream's cleaning: bad characters → ``_``, at most 50, alphanumeric last character."""
    cleaned = _TAG_FORBIDDEN.sub("_", tag)[:TAG_MAX_LENGTH]
    if cleaned and not cleaned[-1].isalnum():
        cleaned = cleaned[:-1] + "_"
    return cleaned


def parse_log_level(value: Any, key: str = "run_log_level") -> str:
    """A standard level name (any case) or its number, as the level's name."""
    if isinstance(value, str) and value.strip().upper() in LOG_LEVELS:
        return value.strip().upper()
    if isinstance(value, int) and not isinstance(value, bool):
        name = logging.getLevelName(value)
        if name in LOG_LEVELS:
            return str(name)
    raise BadRequest(
        f"{key} must be one of {', '.join(LOG_LEVELS)} (or 10, 20, 30, 40, 50), got {value!r}"
    )


def parse_run_options(body: dict[str, Any]) -> RunOptions:
    """Check the three keys of a request body (all optional)."""
    tag = body.get("user_tag")
    if tag is not None and not isinstance(tag, str):
        raise BadRequest(f"user_tag must be a string, got {tag!r}")
    append = body.get("append_user_tag_to_data_dir")
    if append is not None and not isinstance(append, bool):
        raise BadRequest(f"append_user_tag_to_data_dir must be true or false, got {append!r}")
    level = DEFAULT_LOG_LEVEL
    if body.get("run_log_level") is not None:
        level = parse_log_level(body["run_log_level"])
    file_tag = clean_user_tag(tag) if append and tag else None
    return RunOptions(file_tag=file_tag or None, log_level=level)
