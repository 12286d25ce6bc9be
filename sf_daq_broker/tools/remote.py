"""The broker seen from a client: its HTTP endpoints as Python calls, its failures as exceptions.

Synchronous (requests) on purpose: the clients are command-line tools and interactive
sessions (ipython at a beamline), where an event loop would only be in the way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import requests

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
