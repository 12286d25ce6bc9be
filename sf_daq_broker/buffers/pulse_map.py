"""Client of the pulse map: pulse id → global timestamp (BUFFERS.md §1).

The mapping is a service, not a formula: the real machine's rate drifts. The map answers a
bare JSON integer (ns) or 204 for a pulse it does not know — in the simulator, a pulse the
buffer has not ingested yet — which makes "does the map know ``stop + 1``?" the readiness check
of a retrieval.
"""

from __future__ import annotations

from typing import Literal

import aiohttp

from sf_daq_broker.buffers.errors import CorruptStream, DataNotYetAvailable
from sf_daq_broker.buffers.http import HttpClient, HttpEndpoint

_PATHS = {"api1": "/api/1/map/pulse/{pid}", "api4": "/api/4/map/pulse/sf-databuffer/{pid}"}


class PulseMapClient(HttpClient):
    """Pulse id → timestamp through ``{base}/api/1/map/pulse/{pid}`` (or the api/4 path)."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        api: Literal["api1", "api4"] = "api1",
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
    ) -> None:
        self._http = HttpEndpoint(base_url, "pulse map", session, connect_timeout, read_timeout)
        self._path = _PATHS[api]

    async def timestamp_ns(self, pid: int) -> int | None:
        """Timestamp of ``pid`` in ns, or None when the map does not know the pulse (204)."""
        value = await self._http.get_json(self._path.format(pid=int(pid)))
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise CorruptStream(f"pulse map: pulse {pid}: expected an integer, got {value!r}")
        return value

    async def range_ns(self, start_pid: int, stop_pid: int) -> tuple[int, int]:
        """The half-open api/1 range ``[ts(start), ts(stop + 1))`` of the pulses
        ``[start, stop]``; DataNotYetAvailable while the map does not know ``stop + 1``."""
        start = await self.timestamp_ns(start_pid)
        end = await self.timestamp_ns(stop_pid + 1)
        if start is None or end is None:
            missing = start_pid if start is None else stop_pid + 1
            raise DataNotYetAvailable(f"pulse map: pulse {missing} is not known yet")
        return start, end

    async def newest_pulse_id(self, known: int) -> int:
        """The newest pulse the map knows, searched from a pulse ``known`` to be known.

        Gallops forward (1, 2, 4, … pulses) until a pulse is unknown, then bisects: about
        2·log2(distance) requests.
        """
        if await self.timestamp_ns(known) is None:
            raise DataNotYetAvailable(f"pulse map: pulse {known} is not known")
        low, step = known, 1
        while await self.timestamp_ns(low + step) is not None:
            low += step
            step *= 2
        high = low + step  # unknown
        while high - low > 1:
            middle = (low + high) // 2
            if await self.timestamp_ns(middle) is None:
                high = middle
            else:
                low = middle
        return low

    async def newest_pulse_id_near(self, hint: int) -> int:
        """The newest pulse the map knows, searched from ``hint`` whether or not it is known.

        A known ``hint`` gallops forward (``newest_pulse_id``); an unknown one (a range in the
        future) gallops back 1, 2, 4, … pulses to a known pulse, then bisects. Raises
        DataNotYetAvailable when the map knows no pulse at or below ``hint``.
        """
        hint = max(int(hint), 0)
        if await self.timestamp_ns(hint) is not None:
            return await self.newest_pulse_id(hint)
        high, step = hint, 1  # high: unknown
        while True:
            low = max(high - step, 0)
            if await self.timestamp_ns(low) is not None:
                break
            if low == 0:
                raise DataNotYetAvailable(f"pulse map: no pulse at or below {hint} is known")
            high, step = low, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            if await self.timestamp_ns(middle) is None:
                high = middle
            else:
                low = middle
        return low
