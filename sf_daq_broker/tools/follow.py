"""Follow a run until every source is written or has failed (``daq_client --wait``).

The broker's ``GET /run_status`` is the only thing read: it holds what the workers announced
on the status exchange, so following needs no RabbitMQ access and survives a broker restart
(the status store does). A broker that is briefly away is waited for, up to ``patience``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

from sf_daq_broker.tools.remote import BrokerUnreachable, RemoteBroker

FINAL_STATES = frozenset({"done", "failed"})
#: Seconds between two looks at /run_status: a person watching needs no more.
POLL_INTERVAL = 0.5


@dataclass(frozen=True)
class SourceResult:
    source: str
    state: str
    file: str
    detail: str  # the completeness summary when done, the error when failed

    @classmethod
    def from_status(cls, source: str, status: dict[str, Any]) -> SourceResult:
        if status["state"] == "failed":
            detail = str(status.get("error") or status.get("message") or "no reason given")
        else:
            completeness = status.get("completeness")
            detail = str(completeness.get("summary", "")) if isinstance(completeness, dict) else ""
        return cls(source, status["state"], str(status.get("file") or ""), detail)

    def line(self) -> str:
        if self.state == "failed":
            return f"{self.source} failed: {self.file} not written: {self.detail}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.source} {self.state}: {self.file}{detail}"


@dataclass(frozen=True)
class RunResult:
    pgroup: str
    run_number: int
    sources: list[SourceResult]

    @property
    def ok(self) -> bool:
        return all(source.state == "done" for source in self.sources)

    def lines(self) -> list[str]:
        lines = [source.line() for source in self.sources]
        failed = sum(source.state == "failed" for source in self.sources)
        total = len(self.sources)
        run = f"run {self.run_number} of {self.pgroup}"
        if failed:
            lines.append(f"{run} failed: {failed} of {total} sources failed")
        else:
            lines.append(f"{run} is done: {total} of {total} sources written")
        return lines


class ProgressBars:
    """One bar per source, in pulses; off when the output is not a terminal (unless forced)."""

    def __init__(self, file: TextIO, enabled: bool | None = None) -> None:
        self._file = file
        self._disable = None if enabled is None else not enabled  # None: tqdm decides (tty)
        self._bars: dict[str, tqdm[Any]] = {}

    def show(self, sources: dict[str, dict[str, Any]]) -> None:
        for source, status in sources.items():
            bar = self._bars.get(source)
            if bar is None:
                bar = tqdm(
                    desc=source,
                    unit="pulse",
                    position=len(self._bars),
                    leave=True,
                    file=self._file,
                    disable=self._disable,
                    dynamic_ncols=True,
                )
                self._bars[source] = bar
            progress = status.get("progress") or {}
            if progress.get("total") is not None:
                bar.total = progress["total"]
            if status["state"] == "done" and bar.total is not None:
                bar.n = bar.total
            elif progress.get("done") is not None:
                bar.n = progress["done"]
            bar.set_postfix_str(status["state"], refresh=False)
            bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def follow_run(
    broker: RemoteBroker,
    pgroup: str,
    run_number: int,
    *,
    poll_interval: float | None = None,
    patience: float = 60.0,
    bars: ProgressBars | None = None,
) -> RunResult:
    """Poll ``/run_status`` until every source is final; show progress on ``bars``.

    Raises BrokerRefused when the broker does not know the run, BrokerUnreachable when it has
    not answered for ``patience`` seconds.
    """
    bars = bars or ProgressBars(sys.stderr)
    try:
        reply = poll_status(
            lambda: broker.run_status(pgroup, run_number),
            lambda reply: all(s["state"] in FINAL_STATES for s in reply["sources"].values()),
            lambda reply: bars.show(reply["sources"]),
            poll_interval=poll_interval or POLL_INTERVAL,
            patience=patience,
        )
    finally:
        bars.close()
    sources: dict[str, dict[str, Any]] = reply["sources"]
    results = [SourceResult.from_status(name, s) for name, s in sources.items()]
    return RunResult(pgroup, run_number, results)


def poll_status(
    fetch: Callable[[], dict[str, Any]],
    final: Callable[[dict[str, Any]], bool],
    show: Callable[[dict[str, Any]], None],
    *,
    poll_interval: float,
    patience: float,
) -> dict[str, Any]:
    """``fetch`` a status until ``final`` says it is, showing each; a broker that does not
    answer is waited for up to ``patience`` seconds (then BrokerUnreachable)."""
    last_answer = time.monotonic()
    while True:
        try:
            reply = fetch()
            last_answer = time.monotonic()
        except BrokerUnreachable:
            if time.monotonic() - last_answer > patience:
                raise
        else:
            show(reply)
            if final(reply):
                return reply
        time.sleep(poll_interval)  # polling: the pause is the poll rate
