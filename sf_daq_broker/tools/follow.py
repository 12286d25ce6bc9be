"""Following a run (``daq_client --wait``): kept in ``daq_client.py``, which must stay one file
that needs only Python and requests (users copy it); imported from there under this old name."""

from sf_daq_broker.tools.daq_client import (
    FINAL_STATES,
    POLL_INTERVAL,
    ProgressBars,
    RunResult,
    SourceResult,
    follow_run,
)

__all__ = [
    "FINAL_STATES",
    "POLL_INTERVAL",
    "ProgressBars",
    "RunResult",
    "SourceResult",
    "follow_run",
]
