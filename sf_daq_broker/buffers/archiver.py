"""Client of the archiver's JSON data API (EPICS PVs, BUFFERS.md §3).

One ``POST /query`` returns, per PV it knows, the value changes in the range plus (with
``start_expansion``) the last change before it, so the state at the start of a run is known.
Range edges are sent as float seconds, widened to whole microseconds (start down, end up) so no
change at an edge is lost; ``timestamps`` come back exact from the ``globalSeconds`` strings,
and the caller decides by ns which values lie inside its interval. Non-200 replies happen in
real life: they raise transient errors and the worker's retry loop deals with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from sf_daq_broker.buffers.dates import global_seconds_to_ns
from sf_daq_broker.buffers.errors import CorruptStream
from sf_daq_broker.buffers.http import HttpClient, HttpEndpoint

FIELDS = ["globalSeconds", "value", "type", "shape"]


@dataclass
class PvData:
    """The changes of one PV: ``timestamps`` int64 ns ``(N,)``, ``values`` as sent (numbers,
    strings or lists), with the ``type`` and ``shape`` of each sample."""

    name: str
    timestamps: np.ndarray
    values: list[Any]
    types: list[str | None]
    shapes: list[list[int] | None]

    def __len__(self) -> int:
        return len(self.values)


class ArchiverClient(HttpClient):
    """Client of one archiver data API."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
    ) -> None:
        self._http = HttpEndpoint(base_url, "archiver", session, connect_timeout, read_timeout)

    @staticmethod
    def query_body(
        pvs: Sequence[str],
        start_ns: int,
        end_ns: int,
        *,
        start_expansion: bool = True,
        end_inclusive: bool = True,
    ) -> dict[str, Any]:
        start_us = start_ns // 1000
        end_us = -(-end_ns // 1000)
        return {
            "range": {
                "startSeconds": start_us / 1_000_000,
                "endSeconds": end_us / 1_000_000,
                "startExpansion": start_expansion,
                "endInclusive": end_inclusive,
            },
            "channels": list(pvs),
            "fields": FIELDS,
        }

    async def query(
        self,
        pvs: Sequence[str],
        start_ns: int,
        end_ns: int,
        *,
        start_expansion: bool = True,
        end_inclusive: bool = True,
    ) -> dict[str, PvData]:
        """Changes of ``pvs`` in ``[start_ns, end_ns]``; PVs the archiver does not know are
        absent from the result."""
        body = self.query_body(
            pvs, start_ns, end_ns, start_expansion=start_expansion, end_inclusive=end_inclusive
        )
        reply = await self._http.request_json("POST", "/query", body)
        return parse_reply(reply)


def parse_reply(reply: Any) -> dict[str, PvData]:
    """Decode the archiver's JSON list; CorruptStream names what is wrong."""
    if not isinstance(reply, list):
        raise CorruptStream(f"archiver: reply is not a list: {str(reply)[:200]}")
    result: dict[str, PvData] = {}
    for element in reply:
        try:
            name = element["channel"]["name"]
            samples = element["data"]
            timestamps = np.array(
                [global_seconds_to_ns(s["globalSeconds"]) for s in samples], dtype=np.int64
            )
            values = [s["value"] for s in samples]
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise CorruptStream(f"archiver: malformed element {str(element)[:200]}") from exc
        if not isinstance(name, str):
            raise CorruptStream(f"archiver: channel name is not a string: {name!r}")
        result[name] = PvData(
            name,
            timestamps,
            values,
            [s.get("type") for s in samples],
            [s.get("shape") for s in samples],
        )
    return result
