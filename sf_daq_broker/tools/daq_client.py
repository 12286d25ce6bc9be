"""``daq_client``: ask the broker to retrieve a pulse range, as the facility's users always have.

One file that needs only Python and ``requests`` (progress bars when ``tqdm`` is there, plain
lines otherwise): users copy it next to their scripts, as they did the facility's
``daq_client.py`` (the repository's ``daq_client.py`` is this file). Everything a client needs
is here — the broker's HTTP calls, reading the users' files, following a run — and the
package's other clients (the start/stop ``BrokerClient``, the demo) use it from here.

The options and the output lines are those of the facility's original daq_client.py (users
have them in their scripts and logbooks): ``success: run number(request_id) is N`` on
acceptance, ``Error, reason : …`` with the broker's reason on refusal. New: ``--broker``,
``--timeout``, ``--wait`` (follows the run with a progress bar per source),
``--follow PGROUP RUN`` (follows a run accepted earlier, e.g. after Ctrl-C of ``--wait``), the
run options ``--user-tag`` (with ``--append-user-tag``) and ``--run-log-level``, and
``--take-pedestal DET …`` (with ``-r``, ``--pedestalmode``, ``--run-log-level``, ``--wait``),
which takes a pedestal instead of retrieving a range.

Exit status: 0 accepted (with ``--wait``/``--follow``: every source written and complete),
1 refused or a source failed, 2 a bad command line or input file, 3 the broker not reachable,
4 every source written but some incomplete (a name without data, missing pulses), 130 Ctrl-C
while following (the broker goes on with the run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import requests

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INCOMPLETE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

# ---------------------------------------------------------------------------------------------
# The broker seen from a client: its HTTP endpoints as Python calls, its failures as exceptions.
# Synchronous on purpose: the clients are command-line tools and interactive sessions (ipython
# at a beamline), where an event loop would only be in the way.

DEFAULT_BROKER = "http://localhost:10002"
BROKER_ENVIRONMENT = "SF_DAQ_BROKER"
DEFAULT_TIMEOUT = 10.0


def broker_url(explicit: str | None = None) -> str:
    """The broker's address: the one given, else ``$SF_DAQ_BROKER``, else localhost:10002."""
    url = explicit or os.environ.get(BROKER_ENVIRONMENT) or DEFAULT_BROKER
    return url.rstrip("/")


class ClientError(Exception):
    """Something a client cannot do; the message is one line for the user."""


class BrokerUnreachable(ClientError):
    """No usable reply: the broker is down, the network is, or something else answered."""


class BrokerRefused(ClientError):
    """The broker answered ``failed``; the message is its reason, word for word."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


@dataclass(frozen=True)
class Accepted:
    """A retrieval the broker accepted."""

    run_number: int
    request_id: str
    files: list[str]


_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def _reason(exc: requests.RequestException) -> str:
    """A short cause instead of urllib3's nested repr of the whole retry history."""
    if isinstance(exc, requests.Timeout):
        return "no reply in time"
    match = _ERRNO_TEXT.search(str(exc))
    return match.group(1).strip().lower() if match else type(exc).__name__


class RemoteBroker:
    def __init__(self, url: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = broker_url(url)
        self.timeout = timeout
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One request; the reply's fields when it is ``ok``, else BrokerRefused/Unreachable."""
        try:
            response = self._session.request(
                method, f"{self.url}{path}", timeout=self.timeout, **kwargs
            )
        except requests.RequestException as exc:
            raise BrokerUnreachable(
                f"the broker at {self.url} is not reachable: {_reason(exc)}"
            ) from None
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or reply.get("status") not in ("ok", "failed"):
            raise BrokerUnreachable(
                f"{self.url}{path} answered HTTP {response.status_code} without a broker reply"
            )
        if reply["status"] != "ok":
            raise BrokerRefused(str(reply.get("message", "no reason given")), response.status_code)
        return reply

    def retrieve(self, request: dict[str, Any]) -> Accepted:
        reply = self.call("POST", "/retrieve_from_buffers", json=request)
        try:  # older brokers only had the run number in "message"
            run_number = int(reply.get("run_number", reply["message"]))
        except (KeyError, TypeError, ValueError):
            message = f"{self.url} accepted the request without a run number"
            raise BrokerUnreachable(message) from None
        return Accepted(run_number, str(reply.get("request_id", "")), list(reply.get("files", [])))

    def run_status(self, pgroup: str, run_number: int) -> dict[str, Any]:
        return self.call(
            "GET", "/run_status", params={"pgroup": pgroup, "run_number": str(run_number)}
        )

    def take_pedestal(self, request: dict[str, Any]) -> dict[str, Any]:
        """``POST /take_pedestal``: the reply (``pedestal`` is its name)."""
        return self.call("POST", "/take_pedestal", json=request)

    def pedestal_status(self, pgroup: str, pedestal: str) -> dict[str, Any]:
        return self.call("GET", "/pedestal_status", params={"pgroup": pgroup, "pedestal": pedestal})

    def current_run_number(self, pgroup: str) -> int:
        """The last run number given out in the pgroup (0 if none)."""
        reply = self.call("GET", "/get_current_run_number", params={"pgroup": pgroup})
        return int(reply["run_number"])

    def current_pulse_id(self) -> int:
        """The newest pulse id the buffers hold (``GET /current_pulse_id``)."""
        reply = self.call("GET", "/current_pulse_id")
        pulse_id = reply.get("pulse_id")
        if isinstance(pulse_id, bool) or not isinstance(pulse_id, int):
            raise BrokerUnreachable(
                f"{self.url}/current_pulse_id answered without an integer pulse_id: {pulse_id!r}"
            )
        return pulse_id


# ---------------------------------------------------------------------------------------------
# What to retrieve, read from the users' files. Users keep their selection in small files next
# to their scripts: channel lists (one name per line, ``#`` comments), a detectors JSON and a
# scan step JSON. A mistake in one of them is told in one line that names the file, not as a
# traceback and not only when the broker refuses the request — for the start/stop client that
# would be after the run has been taken.

#: Camera image names end with this (the broker's rule; they go into ``camera_list``).
CAMERA_SUFFIX = ":FPICTURE"


class InputFileError(ValueError):
    """A user's file is missing, unreadable or not what it should be; the message is one line."""


def _read_text(path: str | Path, what: str) -> str:
    file = Path(path)
    if not file.exists():
        raise InputFileError(f"{what} {file} does not exist")
    if not file.is_file():
        raise InputFileError(f"{what} {file} is not a file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            f"{what} {file} is not a text file (byte 0x{exc.object[exc.start]:02x} "
            f"at position {exc.start})"
        ) from None
    except OSError as exc:
        raise InputFileError(f"{what} {file} cannot be read: {exc.strerror or exc}") from None


def read_names(path: str | Path, what: str) -> list[str]:
    """Names, one per line; blank lines and ``#`` comments (also after a name) are ignored.

    Repeated names are kept once, in their first place (the broker would drop them anyway).
    """
    names: dict[str, None] = {}
    for line in _read_text(path, what).splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.setdefault(name, None)
    if not names:
        raise InputFileError(f"{what} {path} lists no names")
    return list(names)


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    text = _read_text(path, what)
    if not text.strip():
        raise InputFileError(f"{what} {path} is empty")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{what} {path} is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(document, dict):
        raise InputFileError(
            f"{what} {path} must hold a JSON object, not {type(document).__name__}"
        )
    if not document:
        raise InputFileError(f"{what} {path} is an empty JSON object")
    return document


@dataclass(frozen=True)
class RequestTemplate:
    """A retrieval request without its pulse range: what a start/stop client repeats per run."""

    pgroup: str
    directory_name: str | None = None
    channels: tuple[str, ...] = ()
    cameras: tuple[str, ...] = ()
    pvs: tuple[str, ...] = ()
    detectors: dict[str, Any] = field(default_factory=dict)
    scan_info: dict[str, Any] | None = None
    rate_multiplicator: int = 1
    #: user_tag, append_user_tag_to_data_dir, run_log_level (when given)
    run_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_files(
        cls,
        pgroup: str,
        *,
        output_directory: str | None = None,
        channels_file: str | Path | None = None,
        epics_file: str | Path | None = None,
        detectors_file: str | Path | None = None,
        scan_step_file: str | Path | None = None,
        rate_multiplicator: int = 1,
        run_options: dict[str, Any] | None = None,
    ) -> RequestTemplate:
        """Read every given file; camera images (``…:FPICTURE``) of the channels file go apart."""
        names = read_names(channels_file, "channels file") if channels_file else []
        scan_info = read_json_object(scan_step_file, "scan step file") if scan_step_file else None
        return cls(
            pgroup=pgroup,
            directory_name=output_directory or None,
            channels=tuple(name for name in names if not name.endswith(CAMERA_SUFFIX)),
            cameras=tuple(name for name in names if name.endswith(CAMERA_SUFFIX)),
            pvs=tuple(read_names(epics_file, "epics file")) if epics_file else (),
            detectors=read_json_object(detectors_file, "detectors file") if detectors_file else {},
            scan_info=scan_info,
            rate_multiplicator=rate_multiplicator,
            run_options=dict(run_options or {}),
        )

    @property
    def is_empty(self) -> bool:
        """Nothing selected: the broker would refuse every request made from this."""
        return not (self.channels or self.cameras or self.pvs or self.detectors)

    def request(self, start_pulseid: int, stop_pulseid: int) -> dict[str, Any]:
        """The body of ``POST /retrieve_from_buffers``; empty selections are left out."""
        body: dict[str, Any] = {
            "pgroup": self.pgroup,
            "start_pulseid": start_pulseid,
            "stop_pulseid": stop_pulseid,
            "rate_multiplicator": self.rate_multiplicator,
        }
        if self.directory_name:
            body["directory_name"] = self.directory_name
        optional = {
            "channels_list": list(self.channels),
            "camera_list": list(self.cameras),
            "pv_list": list(self.pvs),
            "detectors": self.detectors,
            "scan_info": self.scan_info,
        }
        body.update({key: value for key, value in optional.items() if value})
        body.update(self.run_options)
        return body


# ---------------------------------------------------------------------------------------------
# Following a run until every source is written or has failed. The broker's GET /run_status is
# the only thing read: it holds what the workers announced, so following needs no RabbitMQ
# access and survives a broker restart. A broker that is briefly away is waited for.

FINAL_STATES = frozenset({"done", "failed"})
#: Seconds between two looks at /run_status: a person watching needs no more.
POLL_INTERVAL = 0.5
#: A waiting source's message starts so (the broker's ``buffers.horizon.WAITING_PREFIX``).
WAITING_PREFIX = "waiting for pulse "
#: Seconds between two plain progress lines of a source whose state did not change.
PLAIN_LINE_EVERY = 10.0


@dataclass(frozen=True)
class SourceResult:
    source: str
    state: str
    file: str
    detail: str  # the completeness summary when done, the error when failed
    complete: bool = True  # False: written, but a name without data or missing pulses

    @classmethod
    def from_status(cls, source: str, status: dict[str, Any]) -> SourceResult:
        complete = True
        if status["state"] == "failed":
            detail = str(status.get("error") or status.get("message") or "no reason given")
        else:
            completeness = status.get("completeness")
            if not isinstance(completeness, dict):
                completeness = {}
            detail = str(completeness.get("summary", ""))
            complete = completeness.get("complete") is not False
        return cls(source, status["state"], str(status.get("file") or ""), detail, complete)

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
        """Every source written (complete or not)."""
        return all(source.state == "done" for source in self.sources)

    @property
    def incomplete(self) -> list[str]:
        return [s.source for s in self.sources if s.state == "done" and not s.complete]

    @property
    def exit_status(self) -> int:
        if not self.ok:
            return EXIT_FAILED
        return EXIT_INCOMPLETE if self.incomplete else EXIT_OK

    def lines(self) -> list[str]:
        lines = [source.line() for source in self.sources]
        failed = sum(source.state == "failed" for source in self.sources)
        total = len(self.sources)
        run = f"run {self.run_number} of {self.pgroup}"
        if failed:
            lines.append(f"{run} failed: {failed} of {total} sources failed")
        elif self.incomplete:
            lines.append(
                f"{run} is done, incomplete: {total} of {total} sources written, "
                f"{len(self.incomplete)} incomplete ({', '.join(self.incomplete)})"
            )
        else:
            lines.append(f"{run} is done: {total} of {total} sources written")
        return lines


def _tqdm_class() -> Any:
    """tqdm if it is installed (it is with the package; a copied daq_client.py may lack it)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


@dataclass
class _Clock:
    """A source's own time: from the worker's start and finish, so a source that is done keeps
    its duration instead of the time the whole run has taken so far."""

    first_seen: float = field(default_factory=time.monotonic)
    frozen: float | None = None

    def seconds(self, status: dict[str, Any]) -> float:
        if self.frozen is not None:
            return self.frozen
        if status["state"] not in FINAL_STATES:
            return time.monotonic() - self.first_seen
        started, finished = status.get("started_at"), status.get("finished_at")
        if isinstance(started, int | float) and isinstance(finished, int | float):
            self.frozen = max(float(finished) - float(started), 0.0)
        else:
            self.frozen = time.monotonic() - self.first_seen
        return self.frozen


def _what(status: dict[str, Any]) -> str:
    """The state, or what a running source waits for."""
    message = str(status.get("message") or "")
    if status["state"] == "running" and message.startswith(WAITING_PREFIX):
        return message
    return str(status["state"])


def _progress(status: dict[str, Any]) -> tuple[int | None, int | None]:
    progress = status.get("progress") or {}
    done, total = progress.get("done"), progress.get("total")
    if status["state"] == "done" and total is not None:
        done = total
    return done, total


class ProgressBars:
    """One bar per source, in pulses, with the source's own time and state (tqdm); off when
    the output is not a terminal (unless ``enabled``). Without tqdm: plain lines, one when a
    source changes state or what it waits for, and at most every ``PLAIN_LINE_EVERY`` s."""

    def __init__(self, file: TextIO, enabled: bool | None = None) -> None:
        self._file = file
        self._tqdm = _tqdm_class()
        self._disable = None if enabled is None else not enabled  # None: tqdm decides (tty)
        self._bars: dict[str, Any] = {}
        self._clocks: dict[str, _Clock] = {}
        self._printed: dict[str, tuple[tuple[str, bool] | None, str, float]] = {}

    def show(self, sources: dict[str, dict[str, Any]]) -> None:
        for source, status in sources.items():
            clock = self._clocks.setdefault(source, _Clock())
            seconds = clock.seconds(status)
            if self._tqdm is None:
                self._line(source, status, seconds)
            else:
                self._bar(source, status, seconds)

    def _bar(self, source: str, status: dict[str, Any], seconds: float) -> None:
        bar = self._bars.get(source)
        if bar is None:
            bar = self._tqdm(
                desc=source,
                unit="pulse",
                position=len(self._bars),
                leave=True,
                file=self._file,
                disable=self._disable,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} pulses{postfix}",
            )
            self._bars[source] = bar
        done, total = _progress(status)
        if total is not None:
            bar.total = total
        if done is not None:
            bar.n = done
        rate = f", {done / seconds:.1f} pulses/s" if done and seconds > 0 else ""
        bar.set_postfix_str(f"{_duration(seconds)}{rate}, {_what(status)}", refresh=False)
        bar.refresh()

    def _line(self, source: str, status: dict[str, Any], seconds: float) -> None:
        done, total = _progress(status)
        counted = f" {done}/{total} pulses" if total is not None else ""
        what = _what(status)
        text = f"{source}: {what}{counted}"
        phase = (str(status["state"]), what.startswith(WAITING_PREFIX))
        last_phase, last_text, last_time = self._printed.get(source, (None, "", -math.inf))
        if text == last_text:
            return
        if phase == last_phase and time.monotonic() - last_time < PLAIN_LINE_EVERY:
            return
        print(f"{text} [{_duration(seconds)}]", file=self._file, flush=True)
        self._printed[source] = (phase, text, time.monotonic())

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes:02d}:{rest:02d}"


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


# ---------------------------------------------------------------------------------------------
# Taking a pedestal (``--take-pedestal DET …``) and following it by name: GET /pedestal_status,
# shown as one more "source" of the progress bars, then one line per detector.


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


def follow_pedestal(
    broker: RemoteBroker,
    pgroup: str,
    pedestal: str,
    *,
    poll_interval: float | None = None,
    patience: float = 60.0,
    bars: ProgressBars | None = None,
) -> PedestalResult:
    """Poll ``/pedestal_status`` until the pedestal is done or failed (its step on ``bars``)."""
    bars = bars or ProgressBars(sys.stderr)
    label = f"pedestal {pedestal}"
    try:
        status = poll_status(
            lambda: broker.pedestal_status(pgroup, pedestal),
            lambda status: status["state"] in FINAL_STATES,
            lambda status: bars.show({label: status}),
            poll_interval=poll_interval or POLL_INTERVAL,
            patience=patience,
        )
    finally:
        bars.close()
    return PedestalResult(pgroup, pedestal, status)


# ---------------------------------------------------------------------------------------------
# The command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="test broker",
        epilog=(
            "exit status: 0 accepted (with --wait/--follow: every source written and complete), "
            "1 refused or a source failed, 2 bad arguments or input file, 3 broker not "
            "reachable, 4 every source written but some incomplete (names without data or "
            "missing pulses), 130 Ctrl-C while following (the broker goes on)"
        ),
    )
    parser.add_argument("-p", "--pgroup", help="pgroup, example p12345")
    parser.add_argument(
        "-d",
        "--output_directory",
        help="output directory for the data, relative path to the raw directory in the pgroup",
    )
    parser.add_argument("-c", "--channels_file", help="TXT file with list channels")
    parser.add_argument("-e", "--epics_file", help="TXT file with list of epics channels to save")
    parser.add_argument("-f", "--file_detectors", help="JSON file with the detector list")
    parser.add_argument(
        "-r",
        "--rate_multiplicator",
        type=int,
        default=1,
        help="rate multiplicator (1(default): 100Hz, 2: 50Hz,)",
    )
    parser.add_argument("-s", "--scan_step_file", help="JSON file with the scan step information")
    parser.add_argument("--start_pulseid", type=int, help="start pulseid")
    parser.add_argument("--stop_pulseid", type=int, help="stop pulseid")
    parser.add_argument(
        "--broker",
        help="broker address (default: $SF_DAQ_BROKER, else http://localhost:10002)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for each reply of the broker (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="follow the run until every source is written; exit 1 if one failed, 4 if one "
        "is incomplete",
    )
    parser.add_argument(
        "--follow",
        nargs=2,
        metavar=("PGROUP", "RUN"),
        help="follow a run accepted earlier (nothing is requested), as --wait does",
    )
    run = parser.add_argument_group("run options")
    run.add_argument("--user-tag", metavar="TAG", help="a tag kept in the run's JSON")
    run.add_argument(
        "--append-user-tag",
        action="store_true",
        help="also put the tag into the run's file names (run_NNNNNN-TAG.*.h5)",
    )
    run.add_argument(
        "--run-log-level",
        metavar="LEVEL",
        help="level of the run's (or pedestal's) job logs: DEBUG, INFO (default), WARNING, …",
    )
    pedestal = parser.add_argument_group("pedestal")
    pedestal.add_argument(
        "--take-pedestal",
        nargs="+",
        metavar="DET",
        help="take a pedestal of these detectors (at the rate of -r) instead of a retrieval; "
        "with --wait, follow it to its pedestal files",
    )
    pedestal.add_argument(
        "--pedestalmode",
        action="store_true",
        help="with --take-pedestal: use the detectors' pedestal mode",
    )
    return parser


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run option keys of the request, as the command line gives them."""
    options: dict[str, Any] = {}
    if args.user_tag is not None:
        options["user_tag"] = args.user_tag
    if args.append_user_tag:
        options["append_user_tag_to_data_dir"] = True
    if args.run_log_level is not None:
        options["run_log_level"] = args.run_log_level
    return options


def take_pedestal(args: argparse.Namespace) -> int:
    """``--take-pedestal``: request it, then (``--wait``) follow it to its result."""
    remote = RemoteBroker(args.broker, args.timeout)
    body = pedestal_request(
        args.pgroup,
        args.take_pedestal,
        args.rate_multiplicator,
        args.pedestalmode,
        args.run_log_level,
    )
    try:
        try:
            reply = remote.take_pedestal(body)
        except BrokerRefused as exc:
            print(f"Error, reason : {exc}", file=sys.stderr)
            return EXIT_FAILED
        name = str(reply.get("pedestal"))
        print(f"success: pedestal {name}: {reply['message']}", flush=True)
        if not args.wait:
            return EXIT_OK
        try:
            result = follow_pedestal(remote, args.pgroup, name)
        except KeyboardInterrupt:
            print(f"\nstopped following pedestal {name}; the broker goes on", file=sys.stderr)
            return EXIT_INTERRUPTED
        for line in result.lines():
            print(line)
        return EXIT_OK if result.ok else EXIT_FAILED
    except BrokerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BrokerRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        remote.close()


def retrieve(
    pgroup: str,
    start_pulseid: int,
    stop_pulseid: int,
    *,
    output_directory: str | None = None,
    channels_file: str | Path | None = None,
    epics_file: str | Path | None = None,
    detectors_file: str | Path | None = None,
    scan_step_file: str | Path | None = None,
    rate_multiplicator: int = 1,
    broker: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Accepted:
    """For scripts: read the files, send the request, return the accepted run.

    Raises InputFileError (a file), BrokerRefused (with the broker's reason) or
    BrokerUnreachable.
    """
    template = RequestTemplate.from_files(
        pgroup,
        output_directory=output_directory,
        channels_file=channels_file,
        epics_file=epics_file,
        detectors_file=detectors_file,
        scan_step_file=scan_step_file,
        rate_multiplicator=rate_multiplicator,
    )
    remote = RemoteBroker(broker, timeout)
    try:
        return remote.retrieve(template.request(start_pulseid, stop_pulseid))
    finally:
        remote.close()


def submit(remote: RemoteBroker, request: dict[str, Any]) -> Accepted | None:
    """Send a request and tell the user the outcome in the facility's words.

    Returns None when refused; BrokerUnreachable is left to the caller, who knows whether the
    request can be sent again.
    """
    try:
        accepted = remote.retrieve(request)
    except BrokerRefused as exc:
        print(f"Error, reason : {exc}", file=sys.stderr)
        return None
    print(f"success: run number(request_id) is {accepted.run_number}", flush=True)
    return accepted


def _followed_run(parser: argparse.ArgumentParser, follow: list[str]) -> tuple[str, int]:
    pgroup, run = follow
    if not run.isdigit() or int(run) < 1:
        parser.error(f"--follow: the run number must be a positive integer, got {run!r}")
    return pgroup, int(run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.follow:
        pgroup, run = _followed_run(parser, args.follow)
        remote = RemoteBroker(args.broker, args.timeout)
        try:
            return wait_for(remote, pgroup, run)
        except BrokerUnreachable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        finally:
            remote.close()
    if args.pgroup is None:
        parser.error("a pgroup is needed (-p/--pgroup)")
    if args.take_pedestal:
        return take_pedestal(args)
    if args.start_pulseid is None or args.stop_pulseid is None:
        parser.error("the pulse range is needed (--start_pulseid and --stop_pulseid)")
    try:
        template = RequestTemplate.from_files(
            args.pgroup,
            output_directory=args.output_directory,
            channels_file=args.channels_file,
            epics_file=args.epics_file,
            detectors_file=args.file_detectors,
            scan_step_file=args.scan_step_file,
            rate_multiplicator=args.rate_multiplicator,
            run_options=run_options(args),
        )
    except InputFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    remote = RemoteBroker(args.broker, args.timeout)
    try:
        accepted = submit(remote, template.request(args.start_pulseid, args.stop_pulseid))
        if accepted is None:
            return EXIT_FAILED
        if not args.wait:
            return EXIT_OK
        return wait_for(remote, args.pgroup, accepted.run_number)
    except BrokerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        remote.close()


def wait_for(remote: RemoteBroker, pgroup: str, run_number: int) -> int:
    """``--wait``/``--follow``: follow the run, then list each source's file and outcome."""
    try:
        result = follow_run(remote, pgroup, run_number)
    except BrokerRefused as exc:  # e.g. --follow of a run that does not exist
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"\nstopped following run {run_number} of {pgroup}; the broker goes on with it "
            f"(follow it again: daq_client --follow {pgroup} {run_number})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    for line in result.lines():
        print(line)
    return result.exit_status


if __name__ == "__main__":
    sys.exit(main())
