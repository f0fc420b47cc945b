"""The front's and the upstream connection's hooks into phantomd.http.tunnel
(DESIGN section 13), on StringTransports with the fake gate and pools."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport

from phantomd.http.wire import MODE_LENGTH
from tests.helpers_http import JWT, OPAQUE
from tests.test_http_server import AUTH, FrontCase, get
from tests.test_http_upstream import FakeFront, PoolCase

WS = (b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
      b"Sec-WebSocket-Version: 13\r\n")
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"


class FrontTunnelTests(FrontCase):

    def upgrade(self, extra: bytes = b"", auth: bytes = AUTH) -> tuple:
        proto, transport = self.connect()
        proto.dataReceived(get(b"/chat", WS + extra, auth) + SMUGGLED)
        return proto, transport

    def switch(self, proto: Any) -> tuple:
        conn = self.pool.conns[0]
        upstream = StringTransport()
        tunnel = proto.upstream_switched(
            upstream, [(b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")],
            b"frame-from-api")
        return conn, upstream, tunnel

    def test_the_upgrade_is_forwarded_and_later_bytes_are_not_parsed(self):
        proto, transport = self.upgrade()
        self.assertEqual(len(self.pool.conns), 1)
        head = self.pool.conns[0].head
        self.assertIn(b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", head)
        self.assertIn(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", head)
        self.assertIn(b"Authorization: Bearer " + JWT.encode(), head)
        self.assertNotIn(OPAQUE.encode(), head)
        self.assertEqual(self.gate.calls, [[b"Bearer " + OPAQUE.encode()]])
        self.assertEqual(transport.producerState, "paused")

    def test_on_101_the_held_bytes_go_to_the_tunnel_unparsed(self):
        proto, transport = self.upgrade()
        conn, upstream, tunnel = self.switch(proto)
        self.assertIsNotNone(tunnel)
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", out)
        self.assertIn(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\nframe-from-api"))
        self.assertEqual(upstream.value(), SMUGGLED)  # relayed, not parsed
        self.assertEqual(len(self.pool.conns), 1)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.metrics.sample("phantomd_tunnels_open"), 1)
        proto.dataReceived(b"more")
        self.assertEqual(upstream.value(), SMUGGLED + b"more")
        proto.connectionLost(None)
        self.assertTrue(upstream.disconnecting)
        self.assertEqual(self.metrics.sample("phantomd_tunnels_open"), 0)
        self.assertEqual([(e["status"], e["end"]) for e in self.access],
                         [(101, "tunnel_closed")])

    def test_another_answer_is_ordinary_and_closes_the_connection(self):
        proto, transport = self.upgrade()
        self.pool.conns[0].respond(403, b"no")
        [(status, headers, body)] = self.responses(transport)
        self.assertEqual((status, body), (403, b"no"))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(len(self.pool.conns), 1)  # the smuggled GET: never
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)
        for _ in range(4):  # discarded while the answer lingers
            proto.dataReceived(b"x" * 64 * 1024)
        self.assertEqual(aborted, [])
        self.assertEqual(len(self.pool.conns), 1)

    def test_no_token_is_401_and_nothing_forwarded(self):
        proto, transport = self.upgrade(auth=b"")
        [(status, headers, _)] = self.responses(transport)
        self.assertEqual(status, 401)
        self.assertEqual(self.pool.conns, [])
        self.assertEqual(headers[b"connection"], b"close")

    def test_auth_none_route_tunnels_without_a_token_and_sends_none(self):
        from phantomd.http.routes import Route, RouteTable
        self.factory.routes = RouteTable([], Route("default", auth="none"))
        proto, transport = self.upgrade()  # with the client's token
        head = self.pool.conns[0].head
        self.assertNotIn(b"Authorization", head)
        self.assertNotIn(OPAQUE.encode(), head)
        self.assertEqual(self.gate.calls, [])
        conn, upstream, tunnel = self.switch(proto)
        self.assertIsNone(tunnel.expires_at)
        self.assertTrue(tunnel.open)

    def test_too_much_before_the_101_cuts_the_connection(self):
        proto, transport = self.upgrade()
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)
        proto.dataReceived(b"x" * 64 * 1024)
        self.assertEqual(aborted, [])
        proto.dataReceived(b"x" * 64 * 1024)
        self.assertEqual(aborted, [True])
        self.assertEqual(len(self.pool.conns), 1)

    def test_h2c_is_dropped_and_parsing_goes_on_as_today(self):
        proto, transport = self.connect()
        proto.dataReceived(get(b"/", b"Connection: Upgrade\r\nUpgrade: h2c\r\n")
                           + get(b"/second"))
        head = self.pool.conns[0].head
        self.assertNotIn(b"pgrade", head)
        self.pool.conns[0].respond()
        self.assertEqual(len(self.pool.conns), 2)
        self.assertIsNone(proto.upstream_switched(StringTransport(), [], b""))

    def test_a_101_to_a_plain_request_is_refused(self):
        proto, transport = self.connect()
        proto.dataReceived(get(b"/"))
        self.assertIsNone(proto.upstream_switched(StringTransport(), [], b""))
        self.assertEqual(self.metrics.sample("phantomd_tunnels_open"), 0)

    def test_the_token_exp_bounds_the_tunnel(self):
        from phantomd.token.outcomes import Forward
        self.gate.decide = lambda auth: Forward(
            jwt=JWT, claims={"exp": self.reactor.seconds() + 30})
        proto, transport = self.upgrade()
        conn, upstream, tunnel = self.switch(proto)
        self.reactor.advance(29)
        proto.dataReceived(b"ping")
        self.assertTrue(tunnel.open)
        self.reactor.advance(1)
        self.assertEqual(tunnel.ended, "expired")
        self.assertTrue(upstream.disconnecting)
        self.assertEqual(self.access[-1]["end"], "tunnel_expired")

    def test_drain_waits_then_abort_closes_the_tunnel(self):
        proto, transport = self.upgrade()
        conn, upstream, tunnel = self.switch(proto)
        drained = self.factory.drain()
        self.assertFalse(drained.called)
        self.assertTrue(tunnel.open)
        self.factory.abort()
        proto.connectionLost(None)  # what abortConnection brings
        self.assertFalse(tunnel.open)
        self.assertTrue(upstream.disconnecting)
        self.assertTrue(drained.called)
        self.assertEqual(self.access[-1]["end"], "drain")


class RevocationTests(FrontCase):
    """A revoked token's tunnels close, as its exp would close them."""

    upgrade = FrontTunnelTests.upgrade
    switch = FrontTunnelTests.switch

    def open_tunnel(self, token: str, sub: str):
        from phantomd.token.outcomes import Forward
        self.gate.decide = lambda auth: Forward(
            jwt=JWT, claims={"sub": sub}, token_id="t")
        proto, transport = self.upgrade(
            auth=b"Authorization: Bearer " + token.encode() + b"\r\n")
        conn, upstream, tunnel = self.switch(proto)
        self.assertTrue(tunnel.open)
        return proto, upstream, tunnel

    def test_revoking_a_token_closes_its_tunnels_only(self):
        from phantomd.token.tokens import token_key
        _, up_a, a = self.open_tunnel("token-a", "alice")
        _, up_b, b = self.open_tunnel("token-b", "alice")
        self.assertEqual(self.factory.revoked(token_key("token-a")), 1)
        self.assertEqual((a.open, a.ended), (False, "revoked"))
        self.assertTrue(up_a.disconnecting)
        self.assertTrue(b.open)
        self.assertEqual(self.access[-1]["end"], "tunnel_revoked")
        self.assertEqual(self.metrics.sample("phantomd_tunnels_open"), 1)
        self.assertEqual(list(self.factory.tunnels), [b])
        self.assertEqual(self.factory.revoked(token_key("token-a")), 0)

    def test_revoking_a_subject_closes_every_tunnel_of_it(self):
        _, _, a = self.open_tunnel("token-a", "alice")
        _, _, b = self.open_tunnel("token-b", "alice")
        _, _, c = self.open_tunnel("token-c", "bob")
        self.assertEqual(
            self.factory.revoked(subject=lambda sub: sub == "alice"), 2)
        self.assertEqual([t.open for t in (a, b, c)], [False, False, True])

    def test_a_closed_tunnel_is_forgotten(self):
        proto, _, a = self.open_tunnel("token-a", "alice")
        proto.connectionLost(None)
        self.assertEqual(self.factory.tunnels, {})

    def test_a_tunnel_without_a_token_is_never_matched(self):
        from phantomd.http.routes import Route, RouteTable
        from phantomd.token.tokens import token_key
        self.factory.routes = RouteTable([], Route("default", auth="none"))
        proto, transport = self.upgrade(auth=b"")
        _, _, tunnel = self.switch(proto)
        self.assertEqual(self.factory.tunnels[tunnel], (None, None))
        self.assertEqual(self.factory.revoked(token_key("")), 0)
        self.assertEqual(self.factory.revoked(subject=lambda s: True), 0)
        self.assertTrue(tunnel.open)


class WebSocketFront(FakeFront):
    """A front that asked for a WebSocket: takes the 101's handover."""

    def upstream_switched(self, upstream: Any, headers: list,
                          rest: bytes) -> Any:
        self.switched = (upstream, headers, rest)
        self.tunnel = _Recorder()
        return self.tunnel


class _Recorder:
    def __init__(self) -> None:
        self.data: list = []
        self.lost = False

    def from_upstream(self, data: bytes) -> None:
        self.data.append(data)

    def upstream_lost(self) -> None:
        self.lost = True


SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
          b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n")


class UpstreamSwitchTests(PoolCase):

    def test_a_101_is_handed_to_a_front_that_asked(self):
        front, conn = self.request(WebSocketFront())
        conn.dataReceived(SWITCH + b"\x81\x02hi")
        upstream, headers, rest = front.switched
        self.assertIs(upstream, conn.transport)
        self.assertEqual(headers, [(b"Sec-WebSocket-Accept", b"abc")])
        self.assertEqual(rest, b"\x81\x02hi")
        self.assertNotIn(("failed", 502), front.events)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")  # now tunnel bytes
        self.assertEqual(front.tunnel.data, [b"HTTP/1.1 200 OK\r\n\r\n"])
        conn.connectionLost(None)
        self.assertTrue(front.tunnel.lost)
        self.assertEqual(self.pool.idle_count(), 0)

    def test_a_101_to_a_front_that_did_not_ask_is_502(self):
        front, conn = self.request(FakeFront())
        conn.dataReceived(SWITCH)
        self.assertIn(("failed", 502), front.events)

    def test_a_101_to_another_protocol_is_502(self):
        front, conn = self.request(WebSocketFront())
        conn.dataReceived(SWITCH.replace(b"websocket", b"h2c"))
        self.assertIn(("failed", 502), front.events)
        self.assertFalse(hasattr(front, "switched"))

    def test_a_plain_answer_to_an_upgrade_is_ordinary(self):
        front, conn = self.request(WebSocketFront())
        conn.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(front.events[-2][:2], ("head", 403))
        self.assertEqual(front.events[-2][4], MODE_LENGTH)
        self.assertEqual(front.events[-1], "end")
