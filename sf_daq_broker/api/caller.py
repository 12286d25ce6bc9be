"""Who is calling: the beamline is derived from the client's IP address, never from the body.

``X-Forwarded-For`` is believed only when the direct peer is a configured trusted proxy, and
then only up to the first hop that is not itself a trusted proxy (counting from the right), so a
client cannot claim another beamline by writing the header itself.
"""

from __future__ import annotations

import ipaddress

from sf_daq_broker.config import Settings
from sf_daq_broker.errors import Forbidden

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_address(text: str, what: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise Forbidden(f"{what} {text!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(peer: str | None, forwarded_for: str | None, settings: Settings) -> IPAddress:
    if not peer:
        raise Forbidden("the client's address is unknown")
    address = _parse_address(peer, "peer address")

    def trusted(candidate: IPAddress) -> bool:
        return any(candidate in network for network in settings.trusted_proxies)

    if forwarded_for and trusted(address):
        hops = [hop for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = _parse_address(hop, "X-Forwarded-For entry")
            if not trusted(address):
                break
    return address


def beamline_of(address: IPAddress, settings: Settings) -> str:
    for name, beamline in settings.beamlines.items():
        if any(address in network for network in beamline.subnets):
            return name
    if address.is_loopback:
        if settings.local_beamline:
            return settings.local_beamline
        raise Forbidden(
            f"requests from {address} are not allowed: loopback clients need a local beamline "
            "(set SF_DAQ_LOCAL_BEAMLINE or local_beamline in the configuration)"
        )
    raise Forbidden(
        f"requests from {address} are not allowed: the address is in no beamline's subnet"
    )
