"""The data path over real loopback sockets: client -> front -> fake API."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.endpoints import (
    TCP4ClientEndpoint, connectProtocol, wrapClientTLS)
from twisted.trial import unittest

from phantomd.http.listener import FrontFactory
from phantomd.http.upstream import UpstreamPool
from phantomd.ops.metrics import Metrics
from tests.helpers_http import (
    JWT, OPAQUE, FakeGate, RawClient, UpstreamFactory, buffered, self_signed,
    settings)

AUTH = b"Authorization: Bearer " + OPAQUE.encode() + b"\r\n"


def get(target: bytes = b"/", extra: bytes = b"", auth: bytes = AUTH) -> bytes:
    return (b"GET " + target + b" HTTP/1.1\r\nHost: front.example\r\n"
            + auth + extra + b"\r\n")


class ProxyCase(unittest.TestCase):
    """A front on 127.0.0.1:0 in front of a fake API on 127.0.0.1:0."""

    front_keys: dict = {}
    upstream_path = ""

    def setUp(self) -> None:
        self.api = UpstreamFactory()
        self.api_port = reactor.listenTCP(0, self.api, interface="127.0.0.1")
        self.addCleanup(self.api_port.stopListening)
        self.start_front(self.upstream_path, **self.front_keys)

    def start_front(self, upstream_path: str = "", **keys: Any) -> None:
        url = "http://127.0.0.1:%d%s" % (self.api_port.getHost().port,
                                         upstream_path)
        self.settings = settings(url, **keys)
        self.metrics = Metrics()
        self.gate = FakeGate()
        self.pool = UpstreamPool(reactor, self.settings, self.metrics)
        self.access: list = []
        self.front = FrontFactory(reactor, self.gate, self.pool,
                                  self.settings, self.metrics,
                                  access_log=self.access.append)
        self.port = reactor.listenTCP(0, self.front, interface="127.0.0.1")
        self.addCleanup(self._stop_front)

    @defer.inlineCallbacks
    def _stop_front(self) -> Any:
        yield self.port.stopListening()
        for p in list(self.front.connections):
            p.transport.abortConnection()
        yield self.pool.close()
        for p in list(self.api.open):
            p.transport.abortConnection()
        # Let the aborted connections' connectionLost run.
        yield task.deferLater(reactor, 0.01, lambda: None)

    def connect(self, client: protocol.Protocol) -> defer.Deferred:
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1",
                                self.port.getHost().port)
        return connectProtocol(ep, client)

    @defer.inlineCallbacks
    def exchange(self, data: bytes, expect: Any = None) -> Any:
        client = RawClient(expect=expect)
        yield self.connect(client)
        client.transport.write(data)
        responses = yield client.done
        if not client.closed:
            client.transport.loseConnection()
        return client, responses


class HappyPathTests(ProxyCase):

    @defer.inlineCallbacks
    def test_jwt_replaces_opaque_token(self) -> Any:
        """The API gets the JWT; the opaque token appears nowhere."""
        _, [resp] = yield self.exchange(get(
            b"/v1/items", b"Authorization: Bearer second\r\n"
            b"Cookie: a=b\r\n"), expect=1)
        # Two Authorization headers are both handed to the gate.
        self.assertEqual(self.gate.calls,
                         [[b"Bearer " + OPAQUE.encode(), b"Bearer second"]])
        self.assertEqual(resp.status, 401)
        _, [resp] = yield self.exchange(get(b"/v1/items", b"Cookie: a=b\r\n"),
                                        expect=1)
        self.assertEqual(resp.status, 200)
        self.assertEqual(bytes(resp.body), b"target=/v1/items")
        [req] = self.api.requests
        self.assertEqual(req.header(b"authorization"),
                         [b"Bearer " + JWT.encode()])
        self.assertEqual(req.header(b"cookie"), [b"a=b"])
        self.assertNotIn(OPAQUE.encode(), bytes(self.api.raw))
        self.assertEqual(self.metrics.sample(
            "phantomd_requests_total", {"code": "2xx"}), 1)
        self.assertEqual(self.metrics.sample(
            "phantomd_requests_total", {"code": "4xx"}), 1)

    @defer.inlineCallbacks
    def test_access_log(self) -> Any:
        yield self.exchange(get(b"/a/b?secret=1"), expect=1)
        [entry] = self.access
        self.assertEqual(entry["method"], "GET")
        self.assertEqual(entry["path"], "/a/b")
        self.assertEqual(entry["status"], 200)
        self.assertEqual(entry["cache"], "hit")
        self.assertEqual(entry["token_id"], "abcdef012345")
        self.assertIsNotNone(entry["upstream_duration"])
        self.assertGreater(entry["bytes_sent"], 16)

    @defer.inlineCallbacks
    def test_reject_of_an_upload_reaches_the_client(self) -> Any:
        """The client still sending its body gets the 401.  (On loopback a
        plain close rarely loses it; the linger that protects it on real
        networks is checked in test_http_server.LingerTests.)"""
        size = 8 << 20
        client = RawClient()
        yield self.connect(client)
        client.transport.write(b"PUT / HTTP/1.1\r\nHost: h\r\n"
                               b"Authorization: Bearer bad\r\n"
                               b"Content-Length: %d\r\n\r\n" % size)
        client.transport.write(b"u" * size)
        [resp] = yield client.done
        self.assertEqual(resp.status, 401)
        self.assertEqual(resp.header(b"connection"), [b"close"])

    @defer.inlineCallbacks
    def test_reject_answers_without_upstream(self) -> Any:
        _, [resp] = yield self.exchange(get(auth=b""), expect=1)
        self.assertEqual(resp.status, 401)
        self.assertEqual(resp.header(b"www-authenticate"),
                         [b'Bearer realm="api"'])
        self.assertEqual(resp.header(b"cache-control"), [b"no-store"])
        self.assertEqual(self.api.connections, 0)


    @defer.inlineCallbacks
    def test_response_hop_by_hop_removed(self) -> Any:
        def handler(request: Any, proto: Any) -> bytes:
            return (b"HTTP/1.1 201 Made\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
                    b"Keep-Alive: timeout=5\r\nX-Kept: 1\r\n"
                    b"Content-Length: 2\r\n\r\nok")
        self.api.handler = handler
        _, [resp] = yield self.exchange(get(), expect=1)
        self.assertEqual(resp.status, 201)
        self.assertEqual(bytes(resp.body), b"ok")
        self.assertEqual(resp.header(b"x-hop"), [])
        self.assertEqual(resp.header(b"keep-alive"), [])
        self.assertEqual(resp.header(b"x-kept"), [b"1"])

    @defer.inlineCallbacks
    def test_keep_alive_reuses_upstream_connection(self) -> Any:
        client = RawClient(expect=1)
        yield self.connect(client)
        for i in range(3):
            client.expect = i + 1
            client.done = defer.Deferred()
            client.transport.write(get(b"/%d" % i))
            yield client.done
        client.transport.loseConnection()
        self.assertEqual([bytes(r.body) for r in client.responses],
                         [b"target=/0", b"target=/1", b"target=/2"])
        self.assertEqual(self.api.connections, 1)
        # A second client reuses the pooled connection too.
        yield self.exchange(get(b"/again"), expect=1)
        self.assertEqual(self.api.connections, 1)

    @defer.inlineCallbacks
    def test_nagle_is_off_both_ways(self) -> Any:
        """So a body sent after its head never waits for a delayed ACK."""
        client = RawClient(expect=1)
        yield self.connect(client)
        client.transport.write(get())
        yield client.done
        [front] = list(self.front.connections)
        self.assertTrue(front.transport.getTcpNoDelay())
        [conn] = self.pool._idle.idle(None)
        self.assertTrue(conn.transport.getTcpNoDelay())
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_pipelined_answers_in_order(self) -> Any:
        delays = {b"/slow": 0.05, b"/fast": 0.0}

        def handler(request: Any, proto: Any) -> None:
            body = b"target=" + request.target
            out = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body))
            reactor.callLater(delays.get(request.target, 0),
                              proto.transport.write, out)
        self.api.handler = handler
        data = (get(b"/slow") + get(b"/fast") + get(auth=b"")
                + get(b"/fast"))
        _, responses = yield self.exchange(data, expect=4)
        self.assertEqual([(r.status, bytes(r.body)[:12]) for r in responses],
                         [(200, b"target=/slow"), (200, b"target=/fast"),
                          (401, b'{"error":"un'), (200, b"target=/fast")])

    @defer.inlineCallbacks
    def test_http10_client(self) -> Any:
        def handler(request: Any, proto: Any) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n"
                                  b"3\r\nabc\r\n0\r\n\r\n")
        self.api.handler = handler
        client, [resp] = yield self.exchange(
            b"GET / HTTP/1.0\r\n" + AUTH + b"\r\n")
        self.assertEqual(bytes(resp.body), b"abc")
        self.assertEqual(resp.header(b"transfer-encoding"), [])
        self.assertTrue(client.closed)
        self.assertEqual(self.api.requests[0].header(b"x-forwarded-host"), [])


class BasePathTests(ProxyCase):
    upstream_path = "/base/"

    @defer.inlineCallbacks
    def test_target_host_and_forwarded_headers(self) -> Any:
        """Target byte for byte under the base path, Host is the API's,
        X-Forwarded-* are phantomd's own, hop-by-hop headers are gone."""
        target = b"/a%2Fb/%7e;p?q=%20x&y=1&&z"
        _, [resp] = yield self.exchange(get(
            target,
            b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: evil\r\nForwarded: for=6.6.6.6\r\n"
            b"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\n"
            b"Keep-Alive: 5\r\nTE: trailers\r\nTrailer: X\r\n"
            b"Upgrade: h2c\r\nProxy-Authorization: Basic Zm9v\r\n"
            b"Proxy-Connection: keep-alive\r\nX-Kept: yes\r\n"), expect=1)
        self.assertEqual(resp.status, 200)
        [req] = self.api.requests
        self.assertEqual(req.target, b"/base" + target)
        self.assertEqual(req.header(b"host"), [b"127.0.0.1:%d" % (
            self.api_port.getHost().port,)])
        self.assertEqual(req.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(req.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(req.header(b"x-forwarded-host"), [b"front.example"])
        self.assertEqual(req.header(b"forwarded"), [])
        for gone in (b"connection", b"x-secret-hop", b"keep-alive", b"te",
                     b"trailer", b"upgrade", b"proxy-authorization",
                     b"proxy-connection"):
            self.assertEqual(req.header(gone), [], gone)
        self.assertEqual(req.header(b"x-kept"), [b"yes"])


class ChunkedTests(ProxyCase):

    @defer.inlineCallbacks
    def test_chunked_both_ways(self) -> Any:
        def handler(request: Any, proto: Any) -> bytes:
            body = bytes(request.body)
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n5\r\n-done\r\n0\r\n\r\n" % (len(body), body))
        self.api.handler = handler
        data = (b"POST /up HTTP/1.1\r\nHost: h\r\n" + AUTH +
                b"Transfer-Encoding: chunked\r\n\r\n"
                b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\nX-Trailer: t\r\n\r\n")
        _, [resp] = yield self.exchange(data, expect=1)
        self.assertEqual(bytes(resp.body), b"abcdefg-done")
        self.assertEqual(resp.header(b"transfer-encoding"), [b"chunked"])
        [req] = self.api.requests
        self.assertEqual(bytes(req.body), b"abcdefg")
        self.assertEqual(req.header(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(req.header(b"x-trailer"), [])

    @defer.inlineCallbacks
    def test_until_close_response_is_chunked_for_http11(self) -> Any:
        def handler(request: Any, proto: Any) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close"
                                  b"\r\n\r\nall of it")
            proto.transport.loseConnection()
        self.api.handler = handler
        client = RawClient(expect=2)
        yield self.connect(client)
        client.transport.write(get() + get())
        responses = yield client.done
        client.transport.loseConnection()
        self.assertEqual([bytes(r.body) for r in responses],
                         [b"all of it"] * 2)
        self.assertEqual(self.api.connections, 2)


class LimitTests(ProxyCase):
    front_keys = {"max_request_line": 300, "max_header_bytes": 1024,
                  "max_headers": 10, "header_timeout": 0.2,
                  "max_connections": 2}

    @defer.inlineCallbacks
    def answer(self, data: bytes) -> Any:
        client, responses = yield self.exchange(data)
        self.assertTrue(client.closed)
        self.assertEqual(len(responses), 1, bytes(client.raw))
        self.assertEqual(self.api.requests, [])
        return responses[0].status

    @defer.inlineCallbacks
    def test_limits_and_framing(self) -> Any:
        rows = [
            (b"GET /" + b"a" * 400 + b" HTTP/1.1\r\n\r\n", 414),
            (get(extra=b"X-Big: " + b"b" * 2000 + b"\r\n"), 431),
            (get(extra=b"".join(b"X-%d: 1\r\n" % i for i in range(12))), 431),
            (b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH + b"Content-Length: 3"
             b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH + b"Content-Length: 3"
             b"\r\nContent-Length: 4\r\n\r\nabcd", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH + b"Transfer-Encoding:"
             b" chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
            (get(extra=b"X-Fold: a\r\n b\r\n"), 400),
            (b"GET / HTTP/1.1 x\r\n\r\n", 400),
        ]
        for data, status in rows:
            got = yield self.answer(data)
            self.assertEqual(got, status, data[:60])

    @defer.inlineCallbacks
    def test_header_timeout(self) -> Any:
        client = RawClient()
        yield self.connect(client)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: slow")
        [resp] = yield client.done
        self.assertEqual(resp.status, 408)
        self.assertTrue(client.closed)

    @defer.inlineCallbacks
    def test_max_connections(self) -> Any:
        held = [RawClient(), RawClient()]
        for c in held:
            yield self.connect(c)
        while len(self.front.connections) < 2:
            yield task.deferLater(reactor, 0.005, lambda: None)
        extra = RawClient()
        yield self.connect(extra)
        [resp] = yield extra.done
        self.assertEqual(resp.status, 503)
        for c in held:
            c.transport.loseConnection()


class UpstreamFaultTests(ProxyCase):
    front_keys = {"upstream_timeout": 0.2}

    @defer.inlineCallbacks
    def test_refused_is_502(self) -> Any:
        yield self.api_port.stopListening()
        _, [resp] = yield self.exchange(get(), expect=1)
        self.assertEqual(resp.status, 502)

    @defer.inlineCallbacks
    def test_timeout_is_504(self) -> Any:
        self.api.handler = lambda request, proto: None
        _, [resp] = yield self.exchange(get(), expect=1)
        self.assertEqual(resp.status, 504)
        self.assertEqual(self.metrics.sample(
            "phantomd_requests_total", {"code": "5xx"}), 1)

    @defer.inlineCallbacks
    def test_reset_mid_response_aborts_client(self) -> Any:
        def handler(request: Any, proto: Any) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100"
                                  b"\r\n\r\npartial")
            reactor.callLater(0.01, proto.transport.abortConnection)
        self.api.handler = handler
        client, [resp] = yield self.exchange(get())
        self.assertTrue(client.closed)
        self.assertFalse(resp.complete)
        self.assertEqual(bytes(resp.body), b"partial")

    @defer.inlineCallbacks
    def test_stale_pooled_connection_is_retried(self) -> Any:
        """The API closes idle connections; a GET on one is sent again."""
        yield self.exchange(get(b"/1"), expect=1)
        [api_side] = list(self.api.open)
        # The API forgets the connection without phantomd noticing: it
        # reads the request, then closes without a byte of response.
        self.api.handler = lambda request, proto: proto.transport.loseConnection()
        original = self.api.handler

        def once(request: Any, proto: Any) -> Any:
            self.api.handler = lambda r, p: b"HTTP/1.1 200 OK\r\n" \
                b"Content-Length: 2\r\n\r\nok"
            return original(request, proto)
        self.api.handler = once
        _, [resp] = yield self.exchange(get(b"/2"), expect=1)
        self.assertEqual(resp.status, 200)
        self.assertEqual(bytes(resp.body), b"ok")
        self.assertEqual(self.api.connections, 2)
        self.assertEqual([r.target for r in self.api.requests],
                         [b"/1", b"/2", b"/2"])


    @defer.inlineCallbacks
    def test_unsafe_methods_are_never_resent(self) -> Any:
        """RFC 9110 section 9.2.2: a proxy must not resend a non-idempotent
        request by itself.  A POST, PATCH or DELETE (even without a body)
        on a pooled connection that closes without answering may have been
        acted on: the client gets 502 and the API saw it exactly once."""
        for method in (b"POST", b"PATCH", b"DELETE"):
            self.api.requests = []
            self.api.handler = lambda request, proto: (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            yield self.exchange(get(b"/warm"), expect=1)
            self.assertEqual(self.pool.idle_count(), 1)
            self.api.handler = \
                lambda request, proto: proto.transport.loseConnection()
            _, [resp] = yield self.exchange(
                method + b" /act HTTP/1.1\r\nHost: front.example\r\n" + AUTH
                + b"Content-Length: 0\r\n\r\n", expect=1)
            self.assertEqual(resp.status, 502, method)
            self.assertEqual([r.target for r in self.api.requests],
                             [b"/warm", b"/act"], method)


class BlockSource:
    """A streaming producer writing ``size`` bytes as fast as allowed."""

    def __init__(self, transport: Any, size: int,
                 on_write: Any = None) -> None:
        self.transport = transport
        self.left = size
        self.paused = False
        self.on_write = on_write
        self.block = b"z" * 65536

    def resumeProducing(self) -> None:
        self.paused = False
        while self.left > 0 and not self.paused:
            chunk = self.block[:self.left]
            self.left -= len(chunk)
            self.transport.write(chunk)
            if self.on_write is not None:
                self.on_write()
        if self.left <= 0:
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True
        self.left = 0


class StreamingTests(ProxyCase):
    """64 MiB each way through a reader or writer slower than the other
    side: what phantomd buffers stays near its 64 KiB socket buffers."""

    SIZE = 64 * 1024 * 1024

    @defer.inlineCallbacks
    def test_large_download_to_slow_client(self) -> Any:
        size = self.SIZE
        self.api.keep_bodies = False
        def handler(request: Any, proto: Any) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d"
                                  b"\r\n\r\n" % size)
            source = BlockSource(proto.transport, size)
            proto.transport.registerProducer(source, True)
            source.resumeProducing()
        self.api.handler = handler
        peak = [0]
        received = [0]

        def hook(client: RawClient, data: bytes) -> None:
            received[0] += len(data)
            for p in self.front.connections:
                peak[0] = max(peak[0], buffered(p.transport))
            # Read slowly: stop for a moment every 4 MiB.
            if received[0] % (4 << 20) < len(data):
                client.transport.pauseProducing()
                reactor.callLater(0.01, client.transport.resumeProducing)
        client = RawClient(expect=1)
        client.on_body_hook = hook
        yield self.connect(client)
        client.transport.write(get())
        [resp] = yield client.done
        client.transport.loseConnection()
        self.assertEqual(received[0], size)
        self.assertLess(peak[0], 1 << 20)

    @defer.inlineCallbacks
    def test_large_upload_to_slow_api(self) -> Any:
        size = self.SIZE
        self.api.keep_bodies = False
        peak = [0]

        def on_head(request: Any, proto: Any) -> None:
            proto.transport.pauseProducing()
            reactor.callLater(0.05, proto.transport.resumeProducing)

        def handler(request: Any, proto: Any) -> bytes:
            body = b"%d" % request.body_bytes
            return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body))
        self.api.on_head = on_head
        self.api.handler = handler
        client = RawClient(expect=1)
        yield self.connect(client)
        def sample() -> None:
            for p in self.front.connections:
                body = p._req.body if p._req is not None else None
                held = len(p._stash) + sum(len(c) for c in body or [])
                if p._upstream is not None:
                    held += buffered(p._upstream.transport)
                peak[0] = max(peak[0], held)

        client.transport.write(b"PUT /big HTTP/1.1\r\nHost: h\r\n" + AUTH +
                               b"Content-Length: %d\r\n\r\n" % size)
        source = BlockSource(client.transport, size, on_write=sample)
        client.transport.registerProducer(source, True)
        source.resumeProducing()
        [resp] = yield client.done
        client.transport.loseConnection()
        self.assertEqual(bytes(resp.body), b"%d" % size)
        self.assertLess(peak[0], 1 << 20)


class TLSTests(ProxyCase):
    """TLS on both sides: X-Forwarded-Proto says https, the API is reached
    over https with the given TLS options."""

    def setUp(self) -> None:
        key, cert = self_signed()
        server_options = ssl.PrivateCertificate.loadPEM(key + cert).options()
        self.client_options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(cert))
        self.api = UpstreamFactory()
        self.api_port = reactor.listenSSL(0, self.api, server_options,
                                          interface="127.0.0.1")
        self.addCleanup(self.api_port.stopListening)
        url = "https://127.0.0.1:%d" % self.api_port.getHost().port
        self.settings = settings(url)
        self.metrics = Metrics()
        self.gate = FakeGate()
        self.pool = UpstreamPool(reactor, self.settings, self.metrics,
                                 tls_options=self.client_options)
        self.access = []
        self.front = FrontFactory(reactor, self.gate, self.pool,
                                  self.settings, self.metrics)
        self.port = reactor.listenSSL(0, self.front, server_options,
                                      interface="127.0.0.1")
        self.addCleanup(self._stop_front)

    def connect(self, client: protocol.Protocol) -> defer.Deferred:
        ep = wrapClientTLS(self.client_options, TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port.getHost().port))
        return connectProtocol(ep, client)

    @defer.inlineCallbacks
    def test_https_both_sides(self) -> Any:
        client = RawClient(expect=2)
        yield self.connect(client)
        client.transport.write(get(b"/1") + get(b"/2"))
        responses = yield client.done
        self.assertEqual([bytes(r.body) for r in responses],
                         [b"target=/1", b"target=/2"])
        self.assertEqual([r.header(b"x-forwarded-proto")
                          for r in self.api.requests], [[b"https"]] * 2)
        self.assertEqual(self.api.connections, 1)
        client.transport.loseConnection()
        yield client.done


    @defer.inlineCallbacks
    def test_reject_of_an_upload_reaches_a_tls_client(self) -> Any:
        """The TLS client still sending its body gets the 401."""
        size = 8 << 20
        client = RawClient(expect=1)
        yield self.connect(client)
        client.transport.write(b"PUT / HTTP/1.1\r\nHost: h\r\n"
                               b"Authorization: Bearer bad\r\n"
                               b"Content-Length: %d\r\n\r\n" % size)
        client.transport.write(b"u" * size)
        [resp] = yield client.done
        self.assertEqual(resp.status, 401)
        client.done = defer.Deferred()
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_untrusted_upstream_certificate_is_502(self) -> Any:
        """Without tls_options the system trust store applies: the API's
        self-signed certificate is refused and nothing is forwarded."""
        pool = UpstreamPool(reactor, self.settings, self.metrics)
        self.addCleanup(pool.close)
        self.front.reconfigure(upstream=pool)
        client = RawClient(expect=1)
        yield self.connect(client)
        client.transport.write(get())
        [resp] = yield client.done
        self.assertEqual(resp.status, 502)
        self.assertEqual(self.api.requests, [])
        client.transport.loseConnection()
        yield client.done
        self.flushLoggedErrors()


class DisconnectTests(ProxyCase):

    @defer.inlineCallbacks
    def wait_for(self, condition: Any) -> Any:
        for _ in range(400):
            if condition():
                return
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.fail("condition never became true")

    @defer.inlineCallbacks
    def test_disconnect_while_gate_decides_cancels_it(self) -> Any:
        self.gate.hold = True
        client = RawClient()
        yield self.connect(client)
        client.transport.write(get())
        yield self.wait_for(lambda: self.gate.pending)
        client.transport.loseConnection()
        yield self.wait_for(lambda: self.gate.cancelled == 1)
        self.assertEqual(self.front.connections, set())

    @defer.inlineCallbacks
    def test_disconnect_while_upstream_works_aborts_it(self) -> Any:
        self.api.handler = lambda request, proto: None
        client = RawClient()
        yield self.connect(client)
        client.transport.write(get())
        yield self.wait_for(lambda: self.api.requests)
        client.transport.loseConnection()
        yield self.wait_for(lambda: self.api.lost)
        self.assertEqual(self.pool.idle_count(), 0)


class DrainTests(ProxyCase):

    @defer.inlineCallbacks
    def test_drain_closes_idle_and_finishes_busy(self) -> Any:
        pending = []
        self.api.handler = lambda request, proto: pending.append(proto)
        idle = RawClient()
        yield self.connect(idle)
        busy = RawClient(expect=1)
        yield self.connect(busy)
        busy.transport.write(get())
        while not pending:
            yield task.deferLater(reactor, 0.005, lambda: None)
        yield self.port.stopListening()
        drained = self.front.drain()
        yield idle.done
        self.assertTrue(idle.closed)
        self.assertFalse(drained.called)
        pending[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2"
                                   b"\r\n\r\nok")
        [resp] = yield busy.done
        self.assertEqual(resp.header(b"connection"), [b"close"])
        yield drained
        self.assertEqual(self.front.connections, set())
