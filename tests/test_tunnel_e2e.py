"""WebSocket tunnels (DESIGN section 13) end to end: a real ``websockets``
client and echo server (each in a process of its own, tests/wspeer.py)
with a real phantomd Gateway and the fake token service between them, on
loopback."""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from tests.robustness.fakes import (
    Scene, async_test, exchange, make_jwt, new_token, request_bytes,
    wait_for)

try:
    import websockets  # noqa: F401
except ImportError:  # pragma: no cover - the test extra installs it
    websockets = None

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wspeer.py")
LENIENT = {"header_timeout": "5", "idle_timeout": "10",
           "upstream_timeout": "5"}


class Peer(protocol.ProcessProtocol):
    """One wspeer.py process; ``lines`` holds its JSON lines."""

    def __init__(self) -> None:
        self.lines: list = []
        self.err = b""
        self._buf = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.lines.append(json.loads(line))

    def errReceived(self, data):
        self.err = (self.err + data)[-4000:]

    def processEnded(self, reason):
        self.ended.callback(None)

    def get(self, key):
        return [doc[key] for doc in self.lines if key in doc]

    async def first(self, key, timeout=10.0):
        ok = await wait_for(reactor, lambda: self.get(key) or
                            self.ended.called, timeout)
        got = self.get(key)
        if not ok or not got:
            raise AssertionError("no %r from wspeer: %r %s" % (
                key, self.lines, self.err.decode("utf-8", "replace")))
        return got[0]


def spawn(testcase, *args) -> Peer:
    peer = Peer()
    proc = reactor.spawnProcess(peer, sys.executable,
                                [sys.executable, PEER] + list(args),
                                env=os.environ.copy())

    def stop():
        if not peer.ended.called:
            proc.signalProcess("KILL")
        return peer.ended
    testcase.addCleanup(stop)
    peer.proc = proc
    return peer


class TunnelE2E(unittest.TestCase):
    timeout = 30
    if websockets is None:
        skip = "the websockets package is not installed (pip install .[test])"

    async def scene(self, **keys):
        self.server = spawn(self, "serve")
        port = await self.server.first("port")
        return await Scene.build(self, reactor, api_port=port,
                                 phantomd=dict(LENIENT, **keys),
                                 introspection={"timeout": "5"})

    def client(self, scene, mode, token=None):
        url = "ws://127.0.0.1:%d/chat" % scene.front
        args = [url, mode] + (["Bearer " + token] if token else [])
        return spawn(self, "client", *args)

    def gauge(self, scene):
        return scene.gw.metrics.sample("phantomd_tunnels_open")

    @async_test
    async def test_messages_echo_and_the_api_sees_the_jwt_only(self):
        scene = await self.scene()
        token, jwt = scene.good_token()
        c = self.client(scene, "wait", token)
        self.assertEqual(await c.first("echo"), "hello")
        headers = await self.server.first("open")
        auth = [v for k, v in headers if k.lower() == "authorization"]
        self.assertEqual(auth, ["Bearer " + jwt])
        self.assertNotIn(token, json.dumps(headers))
        names = {k.lower() for k, _ in headers}
        self.assertIn("sec-websocket-key", names)
        self.assertEqual(self.gauge(scene), 1)
        c.proc.writeToChild(0, b"\n")
        await c.ended
        self.assertEqual(c.get("echo"), ["hello", "bye"])
        self.assertTrue(await wait_for(reactor,
                                       lambda: self.gauge(scene) == 0, 5))
        self.assertTrue(await wait_for(reactor,
                                       lambda: self.server.get("closed"), 5))

    @async_test
    async def test_no_token_or_a_bad_one_is_401_and_no_upstream(self):
        scene = await self.scene()
        for token in (None, new_token("bad")):
            c = self.client(scene, "wait", token)
            self.assertEqual(await c.first("status"), 401)
        self.assertEqual(self.server.get("open"), [])
        self.assertEqual(self.gauge(scene), 0)

    @async_test
    async def test_idle_tunnel_is_closed_both_ways(self):
        scene = await self.scene(tunnel_idle_timeout="1")
        token, _ = scene.good_token()
        c = self.client(scene, "quiet", token)
        self.assertEqual(await c.first("echo"), "hello")
        closed = await c.first("closed")
        self.assertGreaterEqual(closed, 0.5)
        self.assertTrue(await wait_for(reactor,
                                       lambda: self.server.get("closed"), 5))
        self.assertEqual(self.gauge(scene), 0)

    @async_test
    async def test_the_token_exp_closes_a_busy_tunnel(self):
        scene = await self.scene()
        token = new_token()
        scene.ts.activate(token, jwt=make_jwt(lifetime=3))
        c = self.client(scene, "chatty", token)
        self.assertEqual(await c.first("echo"), "hello")
        self.assertEqual(self.gauge(scene), 1)
        await c.first("closed", timeout=15)
        self.assertTrue(await wait_for(reactor,
                                       lambda: self.server.get("closed"), 5))
        self.assertEqual(self.gauge(scene), 0)

    @async_test
    async def test_a_tunnel_opened_on_a_cache_hit_still_ends_at_exp(self):
        """The token's exp is read from the cached JWT: a tunnel opened by
        a cache hit must not outlive the token."""
        from tests.robustness.fakes import one_request
        scene = await self.scene()
        token = new_token()
        scene.ts.activate(token, jwt=make_jwt(lifetime=3))
        await one_request(reactor, scene.front, request_bytes(
            "GET", "/plain", token, close=True))
        self.assertEqual(len(scene.ts.requests), 1)
        c = self.client(scene, "chatty", token)
        self.assertEqual(await c.first("echo"), "hello")
        self.assertEqual(len(scene.ts.requests), 1)  # the tunnel: a hit
        await c.first("closed", timeout=15)
        self.assertTrue(await wait_for(reactor,
                                       lambda: self.gauge(scene) == 0, 5))

    @async_test
    async def test_revoking_the_token_closes_its_tunnel(self):
        # [revocation] without Redis: POST /revoke on the admin listener.
        import tempfile
        from tests.robustness.fakes import one_request
        bearer = b"revocation-bearer-for-the-tunnel-test"
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, "wb") as f:
            f.write(bearer)
        self.server = spawn(self, "serve")
        port = await self.server.first("port")
        scene = await Scene.build(self, reactor, api_port=port,
                                  phantomd=LENIENT,
                                  introspection={"timeout": "5"},
                                  revocation={"token_file": path})
        token, _ = scene.good_token()
        other, _ = scene.good_token()
        c = self.client(scene, "chatty", token)
        stays = self.client(scene, "chatty", other)
        self.assertEqual(await c.first("echo"), "hello")
        self.assertEqual(await stays.first("echo"), "hello")
        self.assertEqual(self.gauge(scene), 2)
        body = b"token=" + token.encode()
        r = await one_request(reactor, scene.gw.admin, b"\r\n".join([
            b"POST /revoke HTTP/1.1", b"Host: admin", b"Connection: close",
            b"Authorization: Bearer " + bearer,
            b"Content-Type: application/x-www-form-urlencoded",
            b"Content-Length: %d" % len(body)]) + b"\r\n\r\n" + body)
        self.assertEqual(r.status, 200, r.body)
        await c.first("closed", timeout=5)
        self.assertTrue(await wait_for(reactor,
                                       lambda: self.gauge(scene) == 1, 5))
        self.assertEqual(stays.get("closed"), [])


class PlainUpgrades(unittest.TestCase):
    """Upgrade values other than websocket: no tunnel, a plain request."""

    timeout = 15

    @async_test
    async def test_h2c_is_dropped_and_the_request_goes_on_plain(self):
        scene = await Scene.build(self, reactor, phantomd=LENIENT,
                                  introspection={"timeout": "5"})
        token, jwt = scene.good_token()
        client = await exchange(reactor, scene.front, request_bytes(
            "GET", "/resource", token,
            [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
             ("HTTP2-Settings", "AAMAAABkAAQAAP__")], b"", close=True))
        self.assertEqual(client.responses()[0].status, 200)
        self.assertEqual(len(scene.api.requests), 1)
        seen = scene.api.requests[0]
        self.assertEqual(seen.header(b"upgrade"), [])
        self.assertEqual(seen.header(b"http2-settings"), [])
        self.assertEqual(scene.gw.metrics.sample("phantomd_tunnels_open"), 0)
