"""Which peers are proxies phantomd trusts, and what it forwards for them.

``[phantomd] trusted_proxies`` lists the networks of the load balancers in
front of phantomd.  A request from one of them keeps the client address,
scheme and host the balancer saw (``X-Forwarded-For/-Proto/-Host``); from
anyone else those headers are whatever the client chose to write, so the
front replaces them with what it saw itself.  Anything else that believes a
peer's word about a client (a ``Client-Cert`` header, the URL a DPoP proof
must name, forward-auth callers) asks the same ``TrustedProxies.trusts``.

An IPv4 client reaching a dual-stack (``::``) listener shows up as an
IPv4-mapped IPv6 address (``::ffff:10.0.0.7``); it is matched as the IPv4
address it is, and so is a configured ``::ffff:10.0.0.0/104``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Optional

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> _Network:
    """``10.0.0.0/8``, ``2001:db8::/32`` or a single address; ValueError
    (saying what is wrong) for anything else.

    Host bits must be clear (``10.0.0.1/8`` is refused: did it mean
    ``10.0.0.0/8`` or ``10.0.0.1/32``?), and a ``/0`` is refused: trusting
    every peer would let any client write its own forwarding headers."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError("%r is not a network in CIDR notation such as "
                         "10.0.0.0/8 or 2001:db8::/32 (%s)" % (text, e))
    if net.version == 6 and net.prefixlen >= 96 and \
            net.network_address.ipv4_mapped is not None:
        net = ipaddress.ip_network("%s/%d" % (
            net.network_address.ipv4_mapped, net.prefixlen - 96))
    if net.prefixlen == 0:
        raise ValueError("%r trusts every peer, so any client could choose "
                         "its own X-Forwarded-For; list the proxies' "
                         "networks" % text)
    return net


class TrustedProxies:
    """An immutable list of networks (as many as the operator wrote);
    ``trusts(host)`` says whether a peer address is in one of them."""

    __slots__ = ("networks",)

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self.networks: tuple[_Network, ...] = tuple(
            parse_network(c) for c in cidrs)

    def trusts(self, host: Optional[str]) -> bool:
        """Whether ``host`` (a peer's address as Twisted gives it: dotted
        IPv4, IPv6 with an optional ``%scope``, ``None`` for a UNIX
        socket) belongs to a trusted proxy.  Anything that is not an IP
        address is not trusted."""
        if not self.networks or not host:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedProxies) and \
            self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return "TrustedProxies(%r)" % ([str(n) for n in self.networks],)


def _items(value: bytes) -> list:
    return [v for v in (p.strip() for p in value.split(b",")) if v]


def forwarded_by_proxy(received: list, peer: bytes, proto: bytes,
                       host: Optional[bytes], drop: Any = None) -> bytes:
    """The ``X-Forwarded-*`` head lines for a request that came through a
    trusted proxy.

    ``received`` holds the proxy's ``X-Forwarded-For/-Proto/-Host`` lines
    as (name, value), in order.  For: every address the proxy sent, in
    order (all its lines, comma-separated items), then ``peer``, the proxy
    itself.  Proto and Host: the proxy's, the last item when it sent more
    than one (the one the nearest hop wrote: what a client put in front of
    it comes first), else ``proto`` and ``host`` as phantomd saw them.
    Exactly one line of each goes out; their size is bounded by the
    request head's (``max_header_bytes``).  The other lines of
    ``received`` (``headers.proxy_reported``) go on as the proxy wrote
    them, but for names in ``drop`` (a route's claim headers, as
    ``routes.drop_name`` spells them): the API gets those from the token
    only."""
    chain: list = []
    protos: list = []
    hosts: list = []
    reported: list = []
    for name, value in received:
        n = name.lower()
        if n == b"x-forwarded-for":
            chain += _items(value)
        elif n == b"x-forwarded-proto":
            protos += _items(value)
        elif n == b"x-forwarded-host":
            hosts += _items(value)
        elif not drop or n.replace(b"_", b"-") not in drop:
            reported += (name, b": ", value, b"\r\n")
    chain.append(peer)
    out = [b"X-Forwarded-For: ", b", ".join(chain),
           b"\r\nX-Forwarded-Proto: ", protos[-1] if protos else proto,
           b"\r\n"]
    host = hosts[-1] if hosts else host
    if host is not None:
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
    return b"".join(out + reported)


def forwarded_origin(received: Optional[list], proto: bytes,
                     host: Optional[bytes]) -> tuple:
    """``(scheme, host)`` the client used, as a trusted proxy reports it
    in ``received`` (its ``X-Forwarded-*`` lines; the last item of each,
    as ``forwarded_by_proxy`` keeps), else ``proto`` and ``host``."""
    protos: list = []
    hosts: list = []
    for name, value in received or ():
        n = name.lower()
        if n == b"x-forwarded-proto":
            protos += _items(value)
        elif n == b"x-forwarded-host":
            hosts += _items(value)
    return (protos[-1].lower() if protos else proto,
            hosts[-1] if hosts else host)
