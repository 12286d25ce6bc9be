"""The start/stop client (the facility's client_example.py): runs as if data were recorded.

Nothing is recorded, of course: ``start`` notes the current pulse id, ``stop`` asks the broker
to retrieve what the buffers hold since then, and only that request makes a run. ``run(n)``
does both around ``n`` beam pulses with a progress bar; Ctrl-C in the middle asks whether to
keep what was taken so far, which shows the principle: discarding costs nothing, not even a
run number.

Where the current pulse id comes from is pluggable: by default the broker's
``GET /current_pulse_id`` (the buffers' newest pulse); at a beamline it may be an EPICS channel
(any object with ``current_pulse_id()`` or a plain function returning an int).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from tqdm import tqdm

from sf_daq_broker.tools.daq_client import (
    DEFAULT_TIMEOUT,
    BrokerUnreachable,
    ClientError,
    ProgressBars,
    RemoteBroker,
    RequestTemplate,
    RunResult,
    follow_run,
    submit,
)

#: Seconds between two looks at the current pulse id in ``run`` (the machine makes 10 pulses).
POLL_INTERVAL = 0.1


@runtime_checkable
class PulseIdSource(Protocol):
    def current_pulse_id(self) -> int: ...


class _FunctionSource:
    def __init__(self, function: Callable[[], int]) -> None:
        self._function = function

    def current_pulse_id(self) -> int:
        return int(self._function())


class BrokerClient:
    """Start/stop data taking for one pgroup, as in the facility's Example 2."""

    def __init__(
        self,
        pgroup: str,
        broker: str | None = None,
        pulse_ids: PulseIdSource | Callable[[], int] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.pgroup = pgroup
        self.remote = RemoteBroker(broker, timeout)
        if pulse_ids is None:
            self.pulse_ids: PulseIdSource = self.remote
        elif isinstance(pulse_ids, PulseIdSource):
            self.pulse_ids = pulse_ids
        else:
            self.pulse_ids = _FunctionSource(pulse_ids)
        self._read_files: Callable[[], RequestTemplate] = lambda: RequestTemplate(pgroup)
        self.template = RequestTemplate(pgroup)
        self.start_pulseid: int | None = None
        self.last_run: int | None = None
        self.last_result: RunResult | None = None  # of the last run(..., wait=True)

    def configure(
        self,
        output_directory: str | None = None,
        channels_file: str | Path | None = None,
        epics_file: str | Path | None = None,
        detectors_file: str | Path | None = None,
        scan_step_file: str | Path | None = None,
        rate_multiplicator: int = 1,
        *,
        scan_step_info_file: str | Path | None = None,  # the original client's name for it
    ) -> None:
        """Choose what to retrieve. The files are read now, so a mistake shows at once.

        They are read again at every ``start``, so edits between runs are taken, as before.
        Raises InputFileError for a bad file, ValueError when nothing is selected.
        """
        self._read_files = functools.partial(
            RequestTemplate.from_files,
            self.pgroup,
            output_directory=output_directory,
            channels_file=channels_file,
            epics_file=epics_file,
            detectors_file=detectors_file,
            scan_step_file=scan_step_file or scan_step_info_file,
            rate_multiplicator=rate_multiplicator,
        )
        self.template = self._selection()

    def _selection(self) -> RequestTemplate:
        template = self._read_files()
        if template.is_empty:
            raise ValueError("nothing to retrieve: configure a channels, epics or detectors file")
        return template

    def start(self) -> int:
        """Begin a run at the current pulse id (returned)."""
        self.template = self._selection()
        self.start_pulseid = self.pulse_ids.current_pulse_id()
        return self.start_pulseid

    def stop(self, stop_pulseid: int | None = None) -> int | None:
        """Ask the broker for the pulses since ``start``; the run number, or None if refused.

        If the broker cannot be reached the run stays open, so ``stop`` can be called again.
        """
        if self.start_pulseid is None:
            print("Run was not started to stop it")
            return None
        if stop_pulseid is None:
            stop_pulseid = self.pulse_ids.current_pulse_id()
        request = self.template.request(self.start_pulseid, max(stop_pulseid, self.start_pulseid))
        try:
            accepted = submit(self.remote, request)
        except BrokerUnreachable as exc:
            print(f"error: {exc} (the run is still open: call stop() again)", file=sys.stderr)
            return None
        self.start_pulseid = None
        if accepted is None:
            return None
        self.last_run = accepted.run_number
        return accepted.run_number

    def status(self) -> str | None:
        """``"running"`` between start and stop, else None (as the original client)."""
        return "running" if self.start_pulseid is not None else None

    def run(
        self, n_pulses: int = 1000, *, number_frames: int | None = None, wait: bool = False
    ) -> int | None:
        """Take ``n_pulses`` beam pulses; the run number, or None if discarded or refused.

        ``wait``: return only when every file is written (or failed), with a progress bar per
        source, so that a check right after this call finds the files; the outcome is
        ``last_result`` (and printed, one line per source).
        """
        run = self._take(number_frames if number_frames is not None else n_pulses)
        if run is not None and wait:
            self.last_result = self.wait(run)
        return run

    def wait(self, run_number: int) -> RunResult:
        """Follow a run until every source is written or failed; print its outcome."""
        result = follow_run(self.remote, self.pgroup, run_number, bars=ProgressBars(sys.stderr))
        for line in result.lines():
            print(line)
        return result

    def _take(self, n_pulses: int) -> int | None:
        start = self.start()
        stop = start + n_pulses * self.template.rate_multiplicator - 1
        try:
            with tqdm(
                total=stop - start,
                bar_format=f"[{{bar:20}}] {{percentage:.0f}}% Run: {self._next_run_number()}",
                ascii="-#",
                file=sys.stderr,
            ) as bar:
                while (current := self.pulse_ids.current_pulse_id()) < stop:
                    bar.n = max(current - start, 0)
                    bar.refresh()
                    # Following the machine's clock: the pause is the polling rate.
                    time.sleep(POLL_INTERVAL)
                bar.n = bar.total
        except KeyboardInterrupt:
            return self._interrupted()
        return self.stop(stop)

    def _next_run_number(self) -> str:
        """The run number the next request will most likely get (others may take it first)."""
        try:
            return str(self.remote.current_run_number(self.pgroup) + 1)
        except (ClientError, KeyError, ValueError):
            return "?"

    def _interrupted(self) -> int | None:
        assert self.start_pulseid is not None
        current = self.pulse_ids.current_pulse_id()
        print("\nYou pressed Ctrl+C!")
        print(
            "what do you want me to do with already collected up to now frames "
            f"(pulseids: {self.start_pulseid}-{current})"
        )
        try:
            answer = input("[s]-save them into; any other key - discard : ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer.strip() == "s":
            return self.stop(current)
        print(f"discarded pulses {self.start_pulseid}-{current}: no run was made")
        self.start_pulseid = None
        return None
