"""``daq_client --take-pedestal DET … [--wait]``: take a pedestal and follow it.

Following reads ``GET /pedestal_status`` only (like ``--wait`` of a run): one progress bar for
the step the pedestal is in ("gain stage G1", "JF07T32V01: retrieving", …), then one line per
detector with its pedestal file, the frames per gain stage and the good pixels — or the reason
it failed. A broker that is briefly away is waited for, up to ``patience``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

from sf_daq_broker.tools.follow import poll_status
from sf_daq_broker.tools.remote import RemoteBroker

FINAL_STATES = frozenset({"done", "failed"})
POLL_INTERVAL = 0.5


def pedestal_request(
    pgroup: str,
    detectors: list[str],
    rate_multiplicator: int = 1,
    pedestalmode: bool = False,
    run_log_level: str | None = None,
) -> dict[str, Any]:
    """The body of ``POST /take_pedestal`` (upstream's clients send detectors as an object)."""
    body: dict[str, Any] = {
        "pgroup": pgroup,
        "detectors": {name: {} for name in detectors},
        "rate_multiplicator": rate_multiplicator,
        "pedestalmode": pedestalmode,
    }
    if run_log_level is not None:
        body["run_log_level"] = run_log_level
    return body


@dataclass(frozen=True)
class PedestalResult:
    pgroup: str
    pedestal: str
    status: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.status["state"] == "done")

    def lines(self) -> list[str]:
        where = f"pedestal {self.pedestal} of {self.pgroup}"
        if not self.ok:
            return [f"{where} failed: {self.status.get('error') or 'no reason given'}"]
        result = self.status.get("result") or {}
        lines = []
        for name, detector in (result.get("detectors") or {}).items():
            stages = ", ".join(f"{stage} {n}" for stage, n in detector["stage_frames"].items())
            lines.append(
                f"{name}: {detector['result_file']} ({stages} frames; "
                f"{detector['good_pixels']} good pixels), in use as {detector['installed_file']}"
            )
        lines.append(
            f"{where} is done: pulses {result.get('start_pulse_id')}-{result.get('stop_pulse_id')}"
        )
        return lines


class StepBar:
    """One bar, re-labelled with each step; off when the output is not a terminal."""

    def __init__(self, file: TextIO, enabled: bool | None = None) -> None:
        disable = None if enabled is None else not enabled
        self._bar = tqdm(file=file, disable=disable, dynamic_ncols=True, unit="frame")

    def show(self, status: dict[str, Any]) -> None:
        message = str(status.get("message") or status["state"])
        step = message.split(": ", 1)[1] if ": " in message else message
        progress = status.get("progress") or {}
        self._bar.set_description_str(step.rsplit(": ", 1)[0][:40], refresh=False)
        if progress.get("total") is not None:
            self._bar.total = progress["total"]
        if progress.get("done") is not None:
            self._bar.n = progress["done"]
        self._bar.set_postfix_str(status["state"], refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def follow_pedestal(
    broker: RemoteBroker,
    pgroup: str,
    pedestal: str,
    *,
    poll_interval: float | None = None,
    patience: float = 60.0,
    bar: StepBar | None = None,
) -> PedestalResult:
    """Poll ``/pedestal_status`` until the pedestal is done or failed.

    Raises BrokerRefused when the broker does not know it, BrokerUnreachable when it has not
    answered for ``patience`` seconds.
    """
    bar = bar or StepBar(sys.stderr)
    try:
        status = poll_status(
            lambda: broker.pedestal_status(pgroup, pedestal),
            lambda status: status["state"] in FINAL_STATES,
            bar.show,
            poll_interval=poll_interval or POLL_INTERVAL,
            patience=patience,
        )
    finally:
        bar.close()
    return PedestalResult(pgroup, pedestal, status)
