"""``[phantomd] trusted_proxies`` over real loopback sockets, IPv4 and IPv6.

A client that is not a trusted proxy cannot choose the X-Forwarded-* the
API sees, in any number of copies or spellings, and X-Real-IP / Forwarded
never pass from anyone; a trusted proxy's are kept and extended.
"""

from __future__ import annotations

import socket

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP6ClientEndpoint
from twisted.trial import unittest

from phantomd import config

from .fakes import (
    RawClient, Scene, async_test, connect_raw, request_bytes, wait_closed)

SPOOFED = [("X-Forwarded-For", "203.0.113.5"),
           ("X-Forwarded-For", "198.51.100.7"),
           ("X-Forwarded-Proto", "https"),
           ("X-Forwarded-Host", "shop.example"),
           ("X-Real-IP", "203.0.113.66"),
           ("Forwarded", "for=203.0.113.66;proto=https"),
           ("X_Forwarded_For", "203.0.113.66"),
           ("X_Real_IP", "203.0.113.66")]


def _no_ipv6() -> str:
    """Why IPv6 loopback tests cannot run here ("" when they can)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return "no IPv6 loopback (::1) on this machine: %s" % e
    return ""


NO_IPV6 = _no_ipv6()


def needs_ipv6(f):
    if NO_IPV6:
        f.skip = NO_IPV6
    return f


class TrustedProxies(unittest.TestCase):
    timeout = 15

    async def scene(self, trusted: str, listen: str = "") -> None:
        phantomd = {"trusted_proxies": trusted}
        if listen:
            phantomd["listen"] = listen
        self.s = await Scene.build(self, reactor, phantomd=phantomd)
        self.token, self.jwt = self.s.good_token()

    async def forwarded(self, client: RawClient = None) -> dict:
        """Send the spoofed request; the forwarding headers the API got."""
        if client is None:
            client = await connect_raw(reactor, self.s.front)
        before = len(self.s.api.requests)
        client.send(request_bytes(token=self.token, headers=SPOOFED,
                                  close=True))
        await wait_closed(reactor, client, 3.0)
        self.assertEqual([r.status for r in client.responses()], [200])
        [up] = self.s.api.requests[before:]
        names = [n.lower() for n in up.header_names()]
        self.assertNotIn(b"x-real-ip", names)
        self.assertNotIn(b"forwarded", names)
        self.assertFalse([n for n in names if b"_" in n], names)
        self.assertNotIn(b"203.0.113.66", up.raw())
        out = {}
        for name in (b"x-forwarded-for", b"x-forwarded-proto",
                     b"x-forwarded-host"):
            [out[name.decode()]] = up.header(name)  # exactly one
        return out

    async def connect_v6(self) -> RawClient:
        client = RawClient()
        ep = TCP6ClientEndpoint(reactor, "::1", self.s.front, timeout=5)
        await ep.connect(protocol.Factory.forProtocol(lambda: client))
        return client

    @async_test
    async def test_untrusted_peer_cannot_spoof(self):
        await self.scene("10.0.0.0/8 ::ffff:10.0.0.0/104")
        self.assertEqual(await self.forwarded(), {
            "x-forwarded-for": b"127.0.0.1", "x-forwarded-proto": b"http",
            "x-forwarded-host": b"api.example.test"})

    @async_test
    async def test_trusted_peer_is_kept_and_extended(self):
        await self.scene("127.0.0.1/32")
        self.assertEqual(await self.forwarded(), {
            "x-forwarded-for": b"203.0.113.5, 198.51.100.7, 127.0.0.1",
            "x-forwarded-proto": b"https",
            "x-forwarded-host": b"shop.example"})

    @needs_ipv6
    @async_test
    async def test_ipv4_mapped_peer_on_a_dual_stack_listener(self):
        """An IPv4 client of a ``::`` listener is ``::ffff:127.0.0.1``:
        matched by the IPv4 network it belongs to."""
        await self.scene("127.0.0.0/8", listen=r"tcp6:0:interface=\:\:")
        self.assertEqual((await self.forwarded())["x-forwarded-for"],
                         b"203.0.113.5, 198.51.100.7, ::ffff:127.0.0.1")

    @needs_ipv6
    @async_test
    async def test_ipv4_mapped_peer_outside_the_networks(self):
        await self.scene("10.0.0.0/8 ::1/128", listen=r"tcp6:0:interface=\:\:")
        self.assertEqual((await self.forwarded())["x-forwarded-for"],
                         b"::ffff:127.0.0.1")

    @needs_ipv6
    @async_test
    async def test_ipv6_peer(self):
        await self.scene("::1/128", listen=r"tcp6:0:interface=\:\:1")
        self.assertEqual(await self.forwarded(await self.connect_v6()), {
            "x-forwarded-for": b"203.0.113.5, 198.51.100.7, ::1",
            "x-forwarded-proto": b"https",
            "x-forwarded-host": b"shop.example"})

    @needs_ipv6
    @async_test
    async def test_ipv6_peer_not_trusted_by_an_ipv4_network(self):
        await self.scene("127.0.0.1/32", listen=r"tcp6:0:interface=\:\:1")
        self.assertEqual(await self.forwarded(await self.connect_v6()), {
            "x-forwarded-for": b"::1", "x-forwarded-proto": b"http",
            "x-forwarded-host": b"api.example.test"})

    @async_test
    async def test_reload_that_drops_a_proxy_stops_trusting_it(self):
        await self.scene("127.0.0.1/32")
        self.assertEqual((await self.forwarded())["x-forwarded-proto"],
                         b"https")
        ini = self.s.ini.replace("trusted_proxies = 127.0.0.1/32",
                                 "trusted_proxies =")
        self.assertNotEqual(ini, self.s.ini)
        self.s.gw.gateway.reload(config.parse(ini, "<reloaded.ini>"))
        self.assertEqual(await self.forwarded(), {
            "x-forwarded-for": b"127.0.0.1", "x-forwarded-proto": b"http",
            "x-forwarded-host": b"api.example.test"})

