"""Which network addresses the server may fetch client media from (server-side request forgery guard).

A client that names `http://169.254.169.254/...` or `http://10.0.0.5/admin` would otherwise read, through the
server, what only the server can reach. By default only public (globally routable, unicast) addresses are
fetched; `--allowed-media-domains` and `--allow-private-media-urls` widen that.

The check is made on resolved addresses, and `pick_address` returns the one the fetcher then connects to
(it connects to that IP itself, so no second DNS lookup can swap in another address between check and
connect: DNS rebinding). A hostname is refused if ANY of its addresses is not allowed, since an attacker who
controls a name can make it answer public and private addresses in turn.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence

from fovea.entrypoints.media_errors import MediaURLRefusedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""(hostname, port) -> its IP addresses as strings (`system_resolver`; tests inject their own)."""

# IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64): judged by that IPv4 address
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise MediaURLRefusedError(f"could not resolve media host {host!r}: {err}", reason="bad_url") from err
    return [info[4][0] for info in infos]


def is_public_address(ip: IPAddress) -> bool:
    """Globally routable unicast: not loopback, private, link-local (cloud metadata 169.254.169.254 included),
    carrier-grade NAT (100.64/10), multicast, reserved or unspecified, nor an IPv6 form of one of those."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and any(ip in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
    # is_global is False for private, loopback, link-local, 100.64/10, unspecified and most reserved blocks;
    # multicast counts as "global" in ipaddress, so it is refused separately
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback)


def parse_host(host: str) -> IPAddress | None:
    """The address if `host` is an IP literal (brackets of an IPv6 URL host stripped), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def pick_address(host: str, port: int, *, allowed_domains: frozenset[str] | None, allow_private: bool,
                 resolver: Resolver) -> IPAddress:
    """The checked address to connect to for `host`; MediaURLRefusedError if the host may not be fetched.

    `allowed_domains`: when given, only these hosts (exact, case-insensitive names or IP literals) are fetched,
    and they may be on non-public addresses (the operator named them). `allow_private`: any address at all.
    """
    name = host.strip("[]").lower().rstrip(".")
    if not name:
        raise MediaURLRefusedError("the media URL has no host", reason="bad_url")
    is_listed = allowed_domains is not None and name in allowed_domains
    if allowed_domains is not None and not is_listed:
        raise MediaURLRefusedError(f"media host {name!r} is not in --allowed-media-domains "
                                   f"({', '.join(sorted(allowed_domains)) or 'empty'})", reason="domain_not_allowed")
    literal = parse_host(name)
    addresses = [literal] if literal is not None else [_parse_resolved(a, name) for a in resolver(name, port)]
    if not addresses:
        raise MediaURLRefusedError(f"media host {name!r} resolved to no address", reason="bad_url")
    if not (allow_private or is_listed):
        for address in addresses:
            if not is_public_address(address):
                shown = "" if literal is not None else f" (it resolves to {address})"
                raise MediaURLRefusedError(
                    f"media host {name!r}{shown} is not a public address; the server fetches only public "
                    f"addresses unless the host is in --allowed-media-domains or --allow-private-media-urls is set",
                    reason="private_address")
    return addresses[0]


def _parse_resolved(address: str, host: str) -> IPAddress:
    try:  # getaddrinfo gives scoped IPv6 link-local addresses as 'fe80::1%eth0'
        return ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError as err:
        raise MediaURLRefusedError(f"media host {host!r} resolved to {address!r}, not an IP address",
                                   reason="bad_url") from err
