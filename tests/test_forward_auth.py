"""``[forward_auth]`` (DESIGN section 10): a real ``Gateway`` on loopback
answering token checks as nginx, Caddy, Traefik and Envoy send them, with
the fake token service behind it; and the hostile cases (peers outside
``allow_from``, a missing or wrong secret, forged original-request
headers)."""

from __future__ import annotations

import os
import re
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from phantomd import config as configmod
from phantomd.http.forward_auth import (
    MAX_ORIGINAL_URI, OriginalRequest, original_request)
from phantomd.token.outcomes import Reject
from tests.robustness.fakes import (
    Reply, async_test, connect_raw, exchange, get, new_token, wait_closed)
from tests.test_gateway_e2e import GatewayCase, build
from tests.test_service_e2e import ServiceCase, get_once


async def build_fa(testcase, forward_auth=None, **sections):
    fa = {"listen": "tcp:0:interface=127.0.0.1"}
    fa.update(forward_auth or {})
    scene = await build(testcase, forward_auth=fa, **sections)
    scene.fa = scene.gw.gateway.forward_auth_ports[0].getHost().port
    return scene


def checks(scene, code: str) -> float:
    return scene.gw.metrics.sample("phantomd_forward_auth_checks_total",
                                   {"code": code})


class Answers(GatewayCase):
    """What each outcome of the gate looks like to the proxy."""

    def assertGranted(self, r, token: str, jwt: str) -> None:
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.body, b"")
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        self.assertEqual(r.first(b"cache-control"), b"no-store")
        self.assertEqual(r.first(b"content-length"), b"0")
        self.assertIsNotNone(r.first(b"date"))
        self.assertNotIn(token.encode(), repr(r.headers).encode())

    @async_test
    async def test_granted_check_carries_the_jwt_and_is_cached(self):
        scene = await build_fa(self)
        token, jwt = scene.good_token(sub="alice")
        for _ in range(2):
            r = await get(reactor, scene.fa, token, target="/auth", headers=[
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Uri", "/orders/1?x=1")])
            self.assertGranted(r, token, jwt)
        self.assertEqual(scene.ts.calls_for(token), 1)
        self.assertEqual(checks(scene, "2xx"), 2)
        # The proxied-request counter is the front's alone.
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_requests_total", {"code": "2xx"}), 0)
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_cache_lookups_total", {"result": "hit"}), 1)
        self.assertEqual(scene.api.requests, [])

    @async_test
    async def test_concurrent_checks_for_one_token_introspect_once(self):
        from tests.robustness.fakes import Delayed
        scene = await build_fa(self)
        token, jwt = scene.good_token()
        scene.ts.behaviour = lambda request: Delayed(
            0.2, scene.ts.active_reply(jwt))
        rs = await defer.gatherResults([
            defer.ensureDeferred(get(reactor, scene.fa, token))
            for _ in range(5)])
        self.assertEqual([r.status for r in rs], [200] * 5)
        self.assertEqual(scene.ts.calls_for(token), 1)
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_coalesced_requests_total"), 4)

    @async_test
    async def test_check_shares_the_fronts_cache(self):
        scene = await build_fa(self)
        token, jwt = scene.good_token()
        r = await scene.get(token)
        self.assertEqual(r.status, 200)
        r = await get(reactor, scene.fa, token)
        self.assertGranted(r, token, jwt)
        self.assertEqual(scene.ts.calls_for(token), 1)

    @async_test
    async def test_no_authorization_is_401_with_bare_challenge(self):
        scene = await build_fa(self)
        r = await get(reactor, scene.fa, None)
        self.assertError(r, 401, challenge=None)
        self.assertEqual(r.header(b"authorization"), [])
        self.assertEqual(checks(scene, "4xx"), 1)

    @async_test
    async def test_two_authorization_headers_are_400(self):
        scene = await build_fa(self)
        token, _ = scene.good_token()
        r = await get(reactor, scene.fa, token, headers=[
            ("Authorization", "Bearer " + token)])
        self.assertError(r, 400, "invalid_request",
                         challenge="invalid_request")
        self.assertEqual(r.header(b"authorization"), [])
        self.assertEqual(scene.ts.requests, [])

    @async_test
    async def test_inactive_token_is_401_invalid_token(self):
        scene = await build_fa(self)
        token = new_token()
        r = await get(reactor, scene.fa, token)
        self.assertError(r, 401, "invalid_token", challenge="invalid_token")
        self.assertNotIn(token.encode(), r.body)
        self.assertNotIn(token.encode(), repr(r.headers).encode())

    @async_test
    async def test_missing_scope_is_403_on_cache_hits_too(self):
        scene = await build_fa(self, phantomd={
            "required_scopes": "orders:read"})
        token, _ = scene.good_token(scope="profile")
        for _ in range(2):
            r = await get(reactor, scene.fa, token)
            self.assertError(r, 403, "insufficient_scope",
                             challenge="insufficient_scope",
                             scope="orders:read")
            self.assertEqual(r.header(b"authorization"), [])
        good, jwt = scene.good_token(scope="orders:read profile")
        r = await get(reactor, scene.fa, good)
        self.assertGranted(r, good, jwt)

    @async_test
    async def test_token_service_failure_is_502_without_jwt(self):
        scene = await build_fa(self)
        scene.ts.behaviour = Reply(500, (), b"oops")
        r = await get(reactor, scene.fa, new_token())
        self.assertError(r, 502, "bad_gateway")
        self.assertEqual(r.header(b"authorization"), [])
        self.assertEqual(checks(scene, "5xx"), 1)

    @async_test
    async def test_request_id_kept_or_generated(self):
        scene = await build_fa(self)
        r = await get(reactor, scene.fa, None, headers=[
            ("X-Request-Id", "abc-123")])
        self.assertEqual(r.header(b"x-request-id"), [b"abc-123"])
        r = await get(reactor, scene.fa, None, headers=[
            ("X-Request-Id", "x" * 129)])
        [rid] = r.header(b"x-request-id")
        self.assertNotEqual(rid, b"x" * 129)
        self.assertTrue(1 <= len(rid) <= 128)

    @async_test
    async def test_keep_alive_checks_on_one_connection(self):
        scene = await build_fa(self)
        token, jwt = scene.good_token()
        one = ("GET /auth HTTP/1.1\r\nHost: fa\r\nAuthorization: Bearer %s"
               "\r\n\r\n" % token).encode()
        client = await exchange(reactor, scene.fa, one + one + one.replace(
            b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        rs = client.responses()
        self.assertEqual([r.status for r in rs], [200, 200, 200])
        self.assertNotIn(token.encode(), client.received)

    @async_test
    async def test_nothing_is_answered_after_a_closing_check(self):
        """RFC 9112 section 9.6: a check pipelined behind one that asked to
        close is neither checked nor answered (it was a stray 400)."""
        scene = await build_fa(self)
        token, _ = scene.good_token()
        one = ("GET /auth HTTP/1.1\r\nHost: fa\r\nAuthorization: Bearer %s"
               "\r\n\r\n" % token).encode()
        # Cached first: the closing check is answered within the read.
        await exchange(reactor, scene.fa, one)
        client = await exchange(reactor, scene.fa, one.replace(
            b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + one)
        self.assertEqual([r.status for r in client.responses()], [200])
        self.assertEqual(client.received.count(b"HTTP/1.1 "), 1)


class Hostile(GatewayCase):

    @async_test
    async def test_peer_outside_allow_from_gets_403_and_no_gate_call(self):
        scene = await build_fa(self, forward_auth={
            "allow_from": "10.0.0.0/8 ::1/128"})
        token, jwt = scene.good_token()
        r = await get(reactor, scene.fa, token)
        self.assertError(r, 403, "access_denied")
        self.assertNotIn(jwt.encode(), r.body)
        self.assertEqual(r.header(b"authorization"), [])
        self.assertEqual(scene.ts.requests, [])
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_cache_lookups_total", {"result": "miss"}), 0)
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_forward_auth_refused_total", {"reason": "peer"}), 1)

    @async_test
    async def test_allow_from_applies_on_reload(self):
        scene = await build_fa(self)
        token, _ = scene.good_token()
        self.assertEqual((await get(reactor, scene.fa, token)).status, 200)
        ini = scene.ini.replace(
            "[forward_auth]", "[forward_auth]\nallow_from = 10.0.0.0/8")
        scene.gw.gateway.reload(configmod.parse(ini, "<reload>"))
        self.assertEqual((await get(reactor, scene.fa, token)).status, 403)

    @async_test
    async def test_shared_secret_required_when_configured(self):
        d = tempfile.mkdtemp()
        self.addCleanup(lambda: [os.remove(os.path.join(d, "s")),
                                 os.rmdir(d)])
        with open(os.path.join(d, "s"), "w") as f:
            f.write("s3cret-value\n")
        scene = await build_fa(self, forward_auth={
            "secret_file": os.path.join(d, "s")})
        token, jwt = scene.good_token()
        for headers in ([], [("X-Phantomd-Secret", "wrong")],
                        [("X-Phantomd-Secret", "s3cret-valu")],
                        [("X-Phantomd-Secret", "s3cret-value"),
                         ("X-Phantomd-Secret", "s3cret-value")]):
            r = await get(reactor, scene.fa, token, headers=headers)
            self.assertError(r, 403, "access_denied")
            self.assertEqual(r.header(b"authorization"), [])
        self.assertEqual(scene.ts.requests, [])
        r = await get(reactor, scene.fa, token, headers=[
            ("X-Phantomd-Secret", "s3cret-value")])
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])

    @async_test
    async def test_forged_original_request_headers_are_400(self):
        scene = await build_fa(self)
        token, jwt = scene.good_token()
        # Some never reach the check: the HTTP parser refuses the head
        # (400 without a challenge: no credentials were looked at).
        for headers in (
                [("X-Forwarded-Uri", "/a\rb")],
                [("X-Forwarded-Method", "GET\rX")],
                [("X-Forwarded-Uri", "/a\x00b")],
                [("X-Forwarded-Uri", "/a b")],
                [("X-Forwarded-Uri", "/a\x7fb")],
                [("X-Forwarded-Uri", "/admin#x")],
                [("X-Original-URI", "/admin#/public")],
                [("X-Forwarded-Uri", "/" + "a" * MAX_ORIGINAL_URI)],
                [("X-Forwarded-Method", "G(ET")],
                [("X-Forwarded-Uri", "/public"),
                 ("X-Original-URI", "/admin")],
                [("X-Forwarded-Uri", "/public"),
                 ("X-Forwarded-Uri", "/admin")],
                [("X-Forwarded-Method", "GET"),
                 ("X-Original-Method", "DELETE")]):
            r = await get(reactor, scene.fa, token, headers=headers)
            self.assertError(r, 400, "invalid_request", challenge=(
                "invalid_request" if r.header(b"www-authenticate")
                else "absent"))
            self.assertEqual(r.header(b"authorization"), [], headers)
        self.assertEqual(scene.ts.requests, [])

    @async_test
    async def test_header_section_beyond_the_limit_is_refused(self):
        scene = await build_fa(self)
        token, jwt = scene.good_token()
        client = await connect_raw(reactor, scene.fa)
        client.send(("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s"
                     "\r\nX-Forwarded-Uri: /%s\r\n\r\n"
                     % (token, "a" * 20000)).encode())
        self.assertTrue(await wait_closed(reactor, client, 5))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 431"),
                        client.received[:100])
        self.assertNotIn(jwt.encode(), client.received)

    @async_test
    async def test_check_body_is_not_kept(self):
        scene = await build_fa(self)
        token, jwt = scene.good_token()
        r = await get(reactor, scene.fa, token, method="POST",
                      body=b"x" * 200000)
        self.assertEqual(r.status, 200)


class OriginalRequestTable(unittest.TestCase):
    """Where the original method and URI come from (table-driven)."""

    def row(self, headers, method=b"GET", uri=b"/auth"):
        h = Headers()
        for k, v in headers:
            h.addRawHeader(k, v)
        return original_request(h, method, uri)

    def test_rows(self):
        rows = [
            ([], OriginalRequest(b"GET", b"/auth")),  # Envoy
            ([(b"X-Forwarded-Method", b"post"),
              (b"X-Forwarded-Uri", b"/o?q=1")],
             OriginalRequest(b"POST", b"/o?q=1")),  # Traefik, Caddy
            ([(b"X-Original-Method", b"PUT"),
              (b"X-Original-URI", b"/x")],
             OriginalRequest(b"PUT", b"/x")),  # nginx convention
            ([(b"X-Forwarded-Uri", b"/same"), (b"X-Original-URI", b"/same")],
             OriginalRequest(b"GET", b"/same")),
            ([(b"X-Original-URI", b"http://h.example/p?q")],
             OriginalRequest(b"GET", b"/p?q")),
            ([(b"X-Original-URI", b"https://h.example?q")],
             OriginalRequest(b"GET", b"/?q")),
            ([(b"X-Forwarded-Method", b"options"), (b"X-Forwarded-Uri", b"*")],
             OriginalRequest(b"OPTIONS", b"*")),
        ]
        for headers, want in rows:
            self.assertEqual(self.row(headers), want, headers)
        self.assertEqual(self.row([(b"X-Forwarded-Uri", b"/a/b?c")]).path,
                         b"/a/b")

    def test_refused(self):
        for headers in ([(b"X-Forwarded-Uri", b"relative")],
                        [(b"X-Forwarded-Uri", b"/\x00")],
                        [(b"X-Forwarded-Uri", b"/a\nb")],
                        [(b"X-Forwarded-Method", b"")],
                        [(b"X-Forwarded-Method", b"A" * 33)],
                        # Only OPTIONS has the target * (RFC 9112 3.2.4):
                        # another method would take the default route.
                        [(b"X-Forwarded-Method", b"DELETE"),
                         (b"X-Forwarded-Uri", b"*")],
                        [(b"X-Forwarded-Uri", b"*")],
                        # A fragment ends the authority (RFC 3986 3.2):
                        # this is /, not /public.
                        [(b"X-Original-URI", b"http://api.example#/public")],
                        [(b"X-Original-URI", b"/public#x")]):
            r = self.row(headers)
            self.assertIsInstance(r, Reject, headers)
            self.assertEqual(r.status, 400)


_INI = """\
[phantomd]
{phantomd}
[introspection]
url = http://127.0.0.1:9/introspect
client_id = gw
client_secret = s
[metrics]
listen =
{fa}
"""


class Config(unittest.TestCase):

    def parse(self, phantomd="", fa=""):
        return configmod.parse(_INI.format(phantomd=phantomd, fa=fa), "f.ini")

    def test_upstream_required_without_forward_auth(self):
        with self.assertRaises(configmod.ConfigError) as e:
            self.parse()
        self.assertEqual((e.exception.section, e.exception.key),
                         ("phantomd", "upstream"))

    def test_upstream_optional_with_forward_auth(self):
        c = self.parse(fa="[forward_auth]\nlisten = tcp:0")
        self.assertIsNone(c.phantomd.upstream)
        self.assertTrue(c.forward_auth.allow_from.trusts("127.0.0.1"))
        self.assertTrue(c.forward_auth.allow_from.trusts("::1"))
        self.assertFalse(c.forward_auth.allow_from.trusts("10.0.0.1"))

    def test_bad_keys_name_the_key(self):
        for fa, key in (
                ("listen = tcp:0\nallow_from =", "allow_from"),
                ("listen = tcp:0\nallow_from = 0.0.0.0/0", "allow_from"),
                ("listen = tcp:0\nallow_from = 10.0.0.1/8", "allow_from"),
                ("listen = nonsense:1", "listen"),
                ("listen = tcp:0\nsecret_file = /nonexistent", "secret_file")):
            with self.assertRaises(configmod.ConfigError) as e:
                self.parse(fa="[forward_auth]\n" + fa)
            self.assertEqual((e.exception.section, e.exception.key),
                             ("forward_auth", key), fa)

    def test_empty_secret_file_refused(self):
        d = tempfile.mkdtemp()
        path = os.path.join(d, "empty")
        open(path, "w").close()
        self.addCleanup(lambda: (os.remove(path), os.rmdir(d)))
        with self.assertRaises(configmod.ConfigError) as e:
            self.parse(fa="[forward_auth]\nlisten = tcp:0\nsecret_file = "
                       + path)
        self.assertEqual(e.exception.key, "secret_file")

    def test_workers_without_upstream_refused(self):
        with self.assertRaises(configmod.ConfigError) as e:
            self.parse(phantomd="workers = 2",
                       fa="[forward_auth]\nlisten = tcp:0")
        self.assertEqual(e.exception.key, "workers")


class Listeners(GatewayCase):

    @async_test
    async def test_forward_auth_only_gateway_binds_no_front(self):
        from phantomd.app import Gateway
        from phantomd.ops.metrics import Metrics
        from tests.robustness.fakes import TokenService
        ts = TokenService(reactor)
        port = ts.listen()
        self.addCleanup(ts.stop)
        c = configmod.parse(_INI.format(
            phantomd="listen = tcp:0:interface=127.0.0.1",
            fa="[forward_auth]\nlisten = tcp:0:interface=127.0.0.1"
        ).replace("127.0.0.1:9/", "127.0.0.1:%d/oauth/v2/" % port), "f.ini")
        gw = Gateway(reactor, c, Metrics(), probe=False)
        await gw.start()
        self.addCleanup(gw.stop)
        self.assertEqual(gw.front_ports, [])
        token = new_token()
        jwt = ts.activate(token)
        r = await get(reactor, gw.forward_auth_ports[0].getHost().port, token)
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])

    @async_test
    async def test_bind_failure_fails_start(self):
        scene = await build_fa(self)
        from phantomd.app import Gateway
        from phantomd.ops.metrics import Metrics
        busy = "tcp:%d:interface=127.0.0.1" % scene.fa
        c = configmod.parse(scene.ini.replace(
            "[forward_auth]\nlisten = tcp:0:interface=127.0.0.1",
            "[forward_auth]\nlisten = %s" % busy), "<busy>")
        self.assertEqual(c.forward_auth.listen, (busy,))
        gw = Gateway(reactor, c, Metrics(), probe=False)
        with self.assertRaises(Exception):
            await gw.start()
        self.assertEqual(gw.forward_auth_ports, [])


class WorkersMode(ServiceCase):
    """``workers = 2``: the parent answers the checks (the workers' config
    has no forward-auth listener, so they do not fight over its port)."""

    @defer.inlineCallbacks
    def test_parent_answers_checks_while_workers_serve(self):
        from tests.test_forward_auth_proxies import free_port
        fa = free_port()
        self.write_ini(workers=2, extra=(
            "[forward_auth]\nlisten = tcp:%d:interface=127.0.0.1\n" % fa))
        yield self.start()
        status, headers, body = yield deferToThread(get_once, fa, "/a",
                                                    self.good)
        self.assertEqual(status, 200, self.why(body))
        self.assertEqual(headers.get("authorization"),
                         "Bearer " + self.jwt, headers)
        self.assertEqual(body, b"")
        status, _, body = yield deferToThread(get_once, self.port, "/a",
                                              self.good)
        self.assertEqual(status, 200, self.why(body))
        # The parent's checks are in /metrics beside the workers' counts.
        text = yield self.metrics_with(
            b'phantomd_requests_total{code="2xx"} 1.0')
        self.assertIn(b'phantomd_forward_auth_checks_total{code="2xx"} 1.0',
                      text)
        self.assertEqual(text.count(
            b"# TYPE phantomd_forward_auth_checks_total counter"), 1, text)
        self.assertPromtoolClean(text)


class ProtocolUnit(unittest.TestCase):
    """The listener's connection on fakes: ordering, timers, cancels."""

    def setUp(self):
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from phantomd.http.forward_auth import Checker, ForwardAuthFactory
        from phantomd.ops.metrics import Metrics
        from tests.helpers_http import FakeGate
        self.clock = Clock()
        self.gate = FakeGate()
        self.gate.realm = "api"
        c = configmod.parse(_INI.format(
            phantomd="", fa="[forward_auth]\nlisten = tcp:0"), "f.ini")
        self.factory = ForwardAuthFactory(
            self.clock, Checker(self.gate, Metrics(), c.forward_auth, None),
            Metrics(), idle_timeout=30, header_timeout=5)
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.proto.makeConnection(self.transport)

    def check(self, token: str = "", extra: str = "") -> bytes:
        from tests.helpers_http import OPAQUE
        auth = "Authorization: Bearer %s\r\n" % (token or OPAQUE)
        return ("GET /auth HTTP/1.1\r\nHost: fa\r\n%s%s\r\n"
                % (auth, extra)).encode()

    def test_pipelined_answers_keep_request_order(self):
        from tests.helpers_http import JWT
        self.gate.hold = True
        self.proto.dataReceived(self.check() + self.check("other-token"))
        [(first, a1), (second, a2)] = self.gate.pending
        second.callback(self.gate.decide(a2))
        self.assertEqual(self.transport.value(), b"")  # the first is owed
        first.callback(self.gate.decide(a1))
        out = self.transport.value()
        self.assertLess(out.index(b"200 OK"), out.index(b"401"))
        self.assertIn(b"Authorization: Bearer " + JWT.encode(), out)

    def test_disconnect_cancels_the_pending_check(self):
        self.gate.hold = True
        self.proto.dataReceived(self.check())
        self.proto.connectionLost(None)
        self.assertEqual(self.gate.cancelled, 1)

    def test_slow_head_gets_408_then_close(self):
        self.proto.dataReceived(b"GET /auth HTTP/1.1\r\nHost: fa\r\n")
        self.clock.advance(4.9)
        self.proto.dataReceived(b"X-A: b\r\n")  # dribbling does not help
        self.clock.advance(0.2)
        self.assertTrue(self.transport.value().startswith(
            b"HTTP/1.1 408 "), self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_idle_connection_closed_after_idle_timeout(self):
        self.proto.dataReceived(self.check())
        self.assertIn(b"200 OK", self.transport.value())
        self.clock.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)

    def test_head_check_has_no_body(self):
        self.proto.dataReceived(b"HEAD /auth HTTP/1.1\r\nHost: fa\r\n\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out)
        self.assertTrue(out.endswith(b"\r\n\r\n"), out)
        self.assertNotIn(b"Content-Length: 0\r\n", out)

    def test_connection_close_is_honoured(self):
        self.proto.dataReceived(self.check(extra="Connection: close\r\n"))
        self.assertIn(b"Connection: close\r\n", self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_garbage_gets_400_and_close(self):
        self.proto.dataReceived(b"\x16\x03\x01 not http\r\n\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertIn(b'"error":"invalid_request"', out)
        self.assertTrue(self.transport.disconnecting)

    def test_head_deadline_met_after_an_idle_spell(self):
        self.clock.advance(20)  # idle, under idle_timeout
        self.proto.dataReceived(b"GET /auth HTTP/1.1\r\n")
        self.clock.advance(5.1)
        self.assertTrue(self.transport.value().startswith(
            b"HTTP/1.1 408 "), self.transport.value())

    def test_request_ids_differ(self):
        self.proto.dataReceived(self.check() + self.check())
        ids = [line for line in self.transport.value().split(b"\r\n")
               if line.startswith(b"X-Request-Id: ")]
        self.assertEqual(len(ids), 2)
        self.assertNotEqual(ids[0], ids[1])

    def test_upgrade_check_is_answered_then_closed(self):
        self.proto.dataReceived(self.check(
            extra="Connection: Upgrade\r\nUpgrade: websocket\r\n") +
            b"\x81\x05hello")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"), out)
        self.assertEqual(out.count(b"HTTP/1.1"), 1)
        self.assertTrue(self.transport.disconnecting)


class Reload(GatewayCase):

    @async_test
    async def test_reload_cannot_empty_upstream(self):
        scene = await build_fa(self)
        ini = re.sub(r"(?m)^upstream = .*$", "upstream =", scene.ini)
        with self.assertRaises(configmod.ConfigError) as e:
            scene.gw.gateway.reload(configmod.parse(ini, "<reload>"))
        self.assertEqual((e.exception.section, e.exception.key),
                         ("phantomd", "upstream"))
        token, _ = scene.good_token()
        self.assertEqual((await scene.get(token)).status, 200)
        self.assertEqual((await get(reactor, scene.fa, token)).status, 200)


ROUTES = {
    "route public": {"match": "/public", "auth": "optional",
                     "claim_headers": "X-User-Id=sub X-Tenant=tenant"},
    "route api": {"match": "/", "claim_headers":
                  "X-User-Id=sub X-Tenant=tenant"},
}


class ClaimHeaders(GatewayCase):
    """Every claim header of the original URI's route is in each 200, so
    that a proxy copying it never keeps a client's forged copy nor sends a
    placeholder (Caddy 2.6-2.9, caddyserver/caddy#6610)."""

    @async_test
    async def test_present_claim_sent_absent_claim_empty(self):
        scene = await build_fa(self, **ROUTES)
        token, jwt = scene.good_token(sub="alice", groups=["a", "b"])
        for _ in range(2):  # the second: a cache hit, same headers
            r = await get(reactor, scene.fa, token, headers=[
                ("X-Forwarded-Uri", "/orders/1"), ("X-Tenant", "forged")])
            self.assertEqual(r.status, 200, r.body)
            self.assertEqual(r.header(b"x-user-id"), [b"alice"])
            self.assertEqual(r.header(b"x-tenant"), [b""])
            self.assertEqual(r.header(b"authorization"),
                             [b"Bearer " + jwt.encode()])
        self.assertEqual(len(scene.ts.requests), 1)

    @async_test
    async def test_unsendable_claim_is_502_without_jwt(self):
        scene = await build_fa(self, **ROUTES)
        token, _ = scene.good_token(sub="alice\r\nX-Admin: yes")
        r = await get(reactor, scene.fa, token, headers=[
            ("X-Forwarded-Uri", "/orders/1")])
        self.assertError(r, 502, "bad_gateway")
        self.assertEqual(r.header(b"authorization"), [])
        self.assertEqual(r.header(b"x-user-id"), [])
        self.assertEqual(r.header(b"x-admin"), [])

    @async_test
    async def test_public_check_answers_empty_authorization_and_claims(self):
        """auth = optional, no token: the proxy must not keep the
        client's own X-User-Id (nor any Authorization)."""
        scene = await build_fa(self, **ROUTES)
        r = await get(reactor, scene.fa, None, headers=[
            ("X-Forwarded-Uri", "/public/x"), ("X-User-Id", "root")])
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.header(b"authorization"), [b""])
        self.assertEqual(r.header(b"x-user-id"), [b""])
        self.assertEqual(r.header(b"x-tenant"), [b""])
        self.assertEqual(scene.ts.requests, [])

    @async_test
    async def test_a_preflight_passes_without_a_token(self):
        """A browser sends no token on a CORS preflight (DESIGN section 9):
        the check lets it through with no Authorization, as the front
        forwards one without [cors].  An OPTIONS that is not a preflight
        still needs a token, and a preflight does not get the JWT of one
        it carries."""
        scene = await build_fa(self, **ROUTES)
        token, _ = scene.good_token(sub="alice")
        preflight = [("X-Forwarded-Method", "OPTIONS"),
                     ("X-Forwarded-Uri", "/orders/1"),
                     ("Origin", "https://app.example"),
                     ("Access-Control-Request-Method", "DELETE"),
                     ("X-User-Id", "root")]
        for sent in (None, token):
            r = await get(reactor, scene.fa, sent, headers=preflight)
            self.assertEqual(r.status, 200, r.body)
            self.assertEqual(r.header(b"authorization"), [b""])
            self.assertEqual(r.header(b"x-user-id"), [b""])
        self.assertEqual(scene.ts.requests, [])
        for not_preflight in (preflight[:2], preflight[:3],
                              [("X-Forwarded-Method", "DELETE")]
                              + preflight[1:]):
            r = await get(reactor, scene.fa, None, headers=not_preflight)
            self.assertError(r, 401, challenge=None)


class AccessLog(GatewayCase):

    @async_test
    async def test_each_check_is_one_access_log_line(self):
        from phantomd.ops.logs import ACCESS_FIELDS
        from tests.robustness.fakes import Scene
        from tests.test_gateway_e2e import LENIENT
        records: list = []
        sections = {name: dict(keys) for name, keys in LENIENT.items()}
        sections["forward_auth"] = {"listen": "tcp:0:interface=127.0.0.1"}
        scene = await Scene.build(self, reactor, access_log=records.append,
                                  **sections)
        fa = scene.gw.gateway.forward_auth_ports[0].getHost().port
        token, _ = scene.good_token()
        for t in (token, token, None):
            await get(reactor, fa, t, headers=[
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Uri", "/orders/1?access_token=x"),
                ("X-Request-Id", "check-1")])
        self.assertEqual(len(records), 3)
        for record in records:
            self.assertEqual(set(record), set(ACCESS_FIELDS))
        self.assertEqual([(r["status"], r["cache"], r["end"])
                          for r in records],
                         [(200, "miss", "ok"), (200, "hit", "ok"),
                          (401, None, "ok")])
        first = records[0]
        self.assertEqual((first["method"], first["path"], first["client"],
                          first["request_id"]),
                         ("POST", "/orders/1", "127.0.0.1", "check-1"))
        self.assertTrue(first["token_id"])
        self.assertNotIn(token, repr(records))


class SenderConstrained(GatewayCase):
    """DPoP- and certificate-bound tokens through forward-auth (DESIGN
    section 12), the real gate deciding."""

    def proof_headers(self, token, proof, host="api.example.test"):
        return [("Authorization", "DPoP " + token), ("DPoP", proof),
                ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", host),
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/resource?q=1")]

    @async_test
    async def test_dpop_bound_token_passes_with_proof_of_original_url(self):
        from tests.test_dpop_e2e import KEY, proof
        scene = await build_fa(self)
        token, jwt = scene.good_token(cnf={"jkt": KEY.thumbprint()})
        r = await get(reactor, scene.fa, None, headers=self.proof_headers(
            token, proof(token)))
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])

    @async_test
    async def test_dpop_refused_without_proof_or_for_another_url(self):
        from tests.test_dpop_e2e import KEY, proof
        scene = await build_fa(self)
        token, _ = scene.good_token(cnf={"jkt": KEY.thumbprint()})
        # As Bearer, without the proof.
        r = await get(reactor, scene.fa, token)
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(r.header(b"authorization"), [])
        self.assertIn(b"DPoP", b" ".join(r.header(b"www-authenticate")))
        # A proof made for another host than the proxy reports.
        r = await get(reactor, scene.fa, None, headers=self.proof_headers(
            token, proof(token), host="evil.example.test"))
        self.assertEqual(r.status, 401, r.body)
        self.assertIn(b'error="invalid_dpop_proof"',
                      b" ".join(r.header(b"www-authenticate")))
        self.assertEqual(r.header(b"authorization"), [])
        # No X-Forwarded-Host: the check's own Host (phantomd's address,
        # as nginx and Caddy send it), which the proof does not name.
        r = await get(reactor, scene.fa, None, host="127.0.0.1:8181",
                      headers=[h for h in self.proof_headers(
                          token, proof(token))
                          if h[0] != "X-Forwarded-Host"])
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(r.header(b"authorization"), [])

    @async_test
    async def test_dpop_through_envoy_uses_the_checks_host_and_path(self):
        # Envoy's ext_authz: the client's method, path and Host on the
        # check itself, X-Forwarded-Proto as Envoy set it, no
        # X-Forwarded-Host (the README's allowed_headers).
        from tests.test_dpop_e2e import KEY, proof
        scene = await build_fa(self)
        token, jwt = scene.good_token(cnf={"jkt": KEY.thumbprint()})
        url = "https://api.example.test/orders/7?x=1"

        def envoy(p):
            return [("x-forwarded-proto", "https"),
                    ("Authorization", "DPoP " + token), ("DPoP", p),
                    ("Content-Length", "0")]
        r = await get(reactor, scene.fa, None, method="PUT",
                      target="/orders/7?x=1", host="api.example.test",
                      headers=envoy(proof(token, htm="PUT", htu=url)))
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        # The proof names another host than the client used.
        r = await get(reactor, scene.fa, None, method="PUT",
                      target="/orders/7?x=1", host="evil.example.test",
                      headers=envoy(proof(token, htm="PUT", htu=url)))
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(r.header(b"authorization"), [])
        # Another method than the client's.
        r = await get(reactor, scene.fa, None, method="DELETE",
                      target="/orders/7?x=1",
                      headers=envoy(proof(token, htm="PUT", htu=url)))
        self.assertEqual(r.status, 401, r.body)

    @async_test
    async def test_a_replayed_proof_is_refused(self):
        # A proof the proxy passes twice (a client replaying it) is used
        # up by the first check.
        from tests.test_dpop_e2e import KEY, proof
        scene = await build_fa(self)
        token, _ = scene.good_token(cnf={"jkt": KEY.thumbprint()})
        once = proof(token)
        r = await get(reactor, scene.fa, None,
                      headers=self.proof_headers(token, once))
        self.assertEqual(r.status, 200, r.body)
        r = await get(reactor, scene.fa, None,
                      headers=self.proof_headers(token, once))
        self.assertEqual(r.status, 401, r.body)
        self.assertIn(b'error="invalid_dpop_proof"',
                      b" ".join(r.header(b"www-authenticate")))
        self.assertEqual(r.header(b"authorization"), [])

    @async_test
    async def test_certificate_bound_token_needs_client_cert(self):
        import base64
        from phantomd.token.mtls import thumbprint
        der = b"0\x82 a client certificate's DER"
        scene = await build_fa(self)
        token, jwt = scene.good_token(cnf={"x5t#S256": thumbprint(der)})
        header = ":" + base64.b64encode(der).decode() + ":"
        r = await get(reactor, scene.fa, token,
                      headers=[("Client-Cert", header)])
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        r = await get(reactor, scene.fa, token)
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(r.header(b"authorization"), [])
        other = ":" + base64.b64encode(b"another").decode() + ":"
        r = await get(reactor, scene.fa, token,
                      headers=[("Client-Cert", other)])
        self.assertEqual(r.status, 401, r.body)
