"""The API misbehaves; clients get 502/504 or a visibly broken response,
phantomd's memory stays bounded and no upstream connection is leaked.

Timeouts here: ``upstream_timeout = 1``, ``upstream_connect_timeout = 1``.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial import unittest

from .fakes import (
    Hang, Raw, Reply, Scene, Stream, async_test, closed_port, connect_raw,
    exchange, request_bytes, response_head, wait_for, wait_stalled,
)

MB = 1 << 20


class UpstreamFaults(unittest.TestCase):
    timeout = 15

    async def scene(self, **kw):
        self.s = await Scene.build(self, reactor, **kw)
        self.token, self.jwt = self.s.good_token()
        return self.s

    async def status_for(self, behaviour):
        self.s.api.behaviour = behaviour
        r = await self.s.get(self.token)
        return r

    def assertError(self, r, status):
        self.assertEqual(r.status, status, r.body)
        self.assertEqual(r.first(b"cache-control"), b"no-store")

    async def recovers(self):
        self.s.api.behaviour = None
        r = await self.s.get(self.token)
        self.assertEqual(r.status, 200, r.body)

    @async_test
    async def test_refused_is_502(self):
        await self.scene(api_port=closed_port(reactor))
        self.assertError(await self.s.get(self.token), 502)

    @async_test
    async def test_closed_without_answer_is_502(self):
        await self.scene()
        self.assertError(await self.status_for(Raw(b"", then="close")), 502)
        await self.recovers()

    @async_test
    async def test_reset_without_answer_is_502(self):
        await self.scene()
        self.assertError(await self.status_for(Raw(b"", then="reset")), 502)
        await self.recovers()

    @async_test
    async def test_reset_mid_head_is_502(self):
        await self.scene()
        self.assertError(await self.status_for(
            Raw(b"HTTP/1.1 200 OK\r\nContent-Ty", then="reset")), 502)
        await self.recovers()

    @async_test
    async def test_garbage_answer_is_502(self):
        await self.scene()
        self.assertError(await self.status_for(
            Raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", then="close")), 502)
        await self.recovers()

    @async_test
    async def test_hang_past_upstream_timeout_is_504(self):
        await self.scene()
        self.assertError(await self.status_for(Hang()), 504)
        await self.recovers()

    @async_test
    async def test_reset_mid_body_is_not_a_complete_response(self):
        """The head has gone to the client already; the only honest thing
        left is to break the client connection, so the client sees a
        truncated response -- never a complete-looking one."""
        await self.scene()
        for chunked in (True, False):
            self.s.api.behaviour = Stream(total=4 * MB, chunked=chunked,
                                          reset_after=256 * 1024)
            client = await exchange(reactor, self.s.front, request_bytes(
                token=self.token), 5.0)
            self.assertFalse(client.aborted_by_us,
                             "client connection left open after the "
                             "upstream reset (chunked=%s)" % chunked)
            complete = client.responses()
            if complete:  # a 502 is fine if nothing had been sent yet
                self.assertEqual([r.status for r in complete], [502])
        await self.recovers()

    @async_test
    async def test_stall_mid_body_does_not_hold_the_client_forever(self):
        await self.scene()
        self.s.api.behaviour = Raw(response_head(
            200, [(b"Content-Length", 1000)]) + b"x" * 100, then="hang")
        client = await exchange(reactor, self.s.front, request_bytes(
            token=self.token), 6.0)
        self.assertFalse(client.aborted_by_us, "client still waiting 6 s "
                         "after the upstream stalled (upstream_timeout=1)")
        self.assertEqual(client.responses(), [])
        self.assertTrue(await wait_for(
            reactor, lambda: not self.s.api.connections, 2.0),
            "the stalled upstream connection was not closed")

    @async_test
    async def test_buffering_is_bounded_when_client_does_not_read(self):
        """The API offers 256 MB; the client reads nothing.  With
        backpressure, the API can only fill socket buffers (a few MB each
        on loopback) plus phantomd's bounded buffers; without it, phantomd
        reads all 256 MB into memory."""
        await self.scene(phantomd={"upstream_timeout": "30",
                                   "idle_timeout": "30"})
        self.s.api.behaviour = Stream(total=256 * MB, chunked=True)
        client = await connect_raw(reactor, self.s.front)
        self.addCleanup(lambda: client.is_closed or
                        client.transport.abortConnection())
        client.transport.pauseProducing()  # never read
        client.send(request_bytes(token=self.token))

        written = await wait_stalled(reactor, lambda: self.s.api.written)
        self.assertLess(written, 64 * MB,
                        "phantomd accepted %d MB from the API for a client "
                        "that read nothing" % (written // MB))
        client.transport.abortConnection()
        self.assertTrue(await wait_for(
            reactor, lambda: not self.s.api.connections, 3.0),
            "the upstream connection outlived the client")

    @async_test
    async def test_client_disconnect_mid_response_closes_upstream(self):
        """An endless response cannot be finished and pooled, so when the
        client goes away the upstream connection must be closed."""
        await self.scene(phantomd={"upstream_timeout": "30"})
        self.s.api.behaviour = Stream(total=None, chunked=True)
        client = await connect_raw(reactor, self.s.front)
        client.send(request_bytes(token=self.token))
        got = await wait_for(reactor, lambda: len(client.received) > MB, 5.0)
        self.assertTrue(got, "the streamed response never arrived")
        self.assertEqual(len(self.s.api.connections), 1)
        client.transport.abortConnection()
        self.assertTrue(await wait_for(
            reactor, lambda: not self.s.api.connections, 3.0),
            "upstream connection leaked after the client disconnected")
        await self.recovers()

    @async_test
    async def test_client_disconnect_while_upstream_hangs(self):
        await self.scene(phantomd={"upstream_timeout": "30"})
        self.s.api.behaviour = Hang()
        client = await connect_raw(reactor, self.s.front)
        client.send(request_bytes(token=self.token))
        await wait_for(reactor, lambda: self.s.api.requests, 3.0)
        self.assertEqual(len(self.s.api.connections), 1)
        client.transport.abortConnection()
        self.assertTrue(await wait_for(
            reactor, lambda: not self.s.api.connections, 3.0),
            "upstream connection leaked after the client disconnected")

    @async_test
    async def test_many_sequential_requests_reuse_few_connections(self):
        """Completed responses release their connection to the pool: 30
        sequential requests do not need 30 upstream connections."""
        await self.scene()
        for _ in range(30):
            r = await self.s.get(self.token)
            self.assertEqual(r.status, 200)
        self.assertLessEqual(self.s.api.connections_made, 3)

    @async_test
    async def test_upstream_error_statuses_pass_through(self):
        """The API's own errors are its answer, not phantomd's."""
        await self.scene()
        for status in (500, 503, 404):
            r = await self.status_for(Reply(status, body=b"api says no"))
            self.assertEqual(r.status, status)
            self.assertEqual(r.body, b"api says no")


class UpstreamTunnels(unittest.TestCase):
    timeout = 10

    @async_test
    async def test_unrequested_101_does_not_open_a_tunnel(self):
        """An API that answers 101 Switching Protocols to a request that
        did not ask for a WebSocket (DESIGN section 13: only those tunnel)
        must not turn the client connection into a raw tunnel: later bytes
        from the client would reach the API without passing the gate.  It
        is a 502."""
        from .fakes import sleep
        s = await Scene.build(self, reactor)
        token, _ = s.good_token()
        for headers in ([], [("Upgrade", "h2c"), ("Connection", "Upgrade")]):
            s.api.behaviour = Raw(b"HTTP/1.1 101 Switching Protocols\r\n"
                                  b"Upgrade: websocket\r\nConnection: "
                                  b"Upgrade\r\n\r\n", then="keep")
            client = await connect_raw(reactor, s.front)
            self.addCleanup(lambda c=client: c.is_closed or
                            c.transport.abortConnection())
            client.send(request_bytes(target="/ws", token=token,
                                      headers=headers))
            await wait_for(reactor,
                           lambda: client.received or client.is_closed, 3.0)
            s.api.behaviour = None
            self.assertTrue(client.received.startswith(b"HTTP/1.1 502 "),
                            client.received[:100])
            if not client.is_closed:
                client.send(b"GET /unauthenticated HTTP/1.1\r\nHost: x"
                            b"\r\n\r\n")
            await sleep(reactor, 0.5)
            self.assertNotIn(b"/unauthenticated",
                             [r.target for r in s.api.requests])
            self.assertEqual(s.gw.metrics.sample("phantomd_tunnels_open"), 0)


class UploadBackpressure(unittest.TestCase):
    timeout = 20

    @async_test
    async def test_upload_buffering_is_bounded_when_api_does_not_read(self):
        """The client offers 256 MB of body; the API reads the head and
        then nothing.  phantomd must stop reading from the client instead
        of buffering the upload."""
        from .fakes import UploadPump
        s = await Scene.build(self, reactor, phantomd={
            "upstream_timeout": "30", "idle_timeout": "30"})
        token, _ = s.good_token()
        s.api.stop_reading_after_head = True
        client = await connect_raw(reactor, s.front)
        self.addCleanup(lambda: client.is_closed or
                        client.transport.abortConnection())
        client.send(request_bytes("POST", "/upload", token=token,
                                  headers=[("Transfer-Encoding", "chunked")]))
        pump = UploadPump(client, 256 * MB)
        pump.start(reactor)
        await wait_stalled(reactor, lambda: pump.sent)
        self.assertLess(pump.sent, 64 * MB, "phantomd took %d MB of upload "
                        "the API did not read" % (pump.sent // MB))
        self.assertGreater(s.api.bytes_received, 0)


class UpstreamFraming(unittest.TestCase):
    """A hostile or broken API must not desynchronise the connection pool:
    bytes it sends beyond one response never become another client's
    answer."""

    timeout = 10

    async def scene(self):
        self.s = await Scene.build(self, reactor)
        self.token, _ = self.s.good_token()
        self.other, _ = self.s.good_token()

    async def next_answer_is_clean(self):
        self.s.api.behaviour = None
        r = await self.s.get(self.other, target="/next")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json()["target"], "/next",
                         "another client got a poisoned answer")

    @async_test
    async def test_extra_bytes_after_a_response(self):
        await self.scene()
        self.s.api.behaviour = Raw(
            response_head(200, [(b"Content-Length", 5)]) + b"hello"
            + response_head(200, [(b"Content-Length", 4)]) + b"evil",
            then="keep")
        r = await self.s.get(self.token)
        self.assertEqual((r.status, r.body), (200, b"hello"))
        await self.next_answer_is_clean()

    @async_test
    async def test_body_on_204_and_304(self):
        await self.scene()
        for status in (204, 304):
            self.s.api.behaviour = Raw(
                response_head(status, [(b"Content-Length", 4)]) + b"evil",
                then="keep")
            r = await self.s.get(self.token)
            self.assertEqual(r.status, status)
            self.assertEqual(r.body, b"")
            await self.next_answer_is_clean()

    @async_test
    async def test_head_response_with_content_length(self):
        await self.scene()
        self.s.api.behaviour = Raw(
            response_head(200, [(b"Content-Length", 100)]), then="keep")
        client = await exchange(reactor, self.s.front, request_bytes(
            "HEAD", token=self.token, close=True), 3.0)
        self.assertFalse(client.aborted_by_us,
                         "HEAD answer waited for a body that never comes")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200"))
        self.assertTrue(client.received.endswith(b"\r\n\r\n"),
                        client.received[-100:])
        await self.next_answer_is_clean()

    @async_test
    async def test_content_length_with_transfer_encoding(self):
        """RFC 9112 section 6.3: TE wins and the connection must close;
        the client gets one well-formed answer (or a 502)."""
        await self.scene()
        self.s.api.behaviour = Raw(response_head(200, [
            (b"Content-Length", 60), (b"Transfer-Encoding", b"chunked")])
            + b"5\r\nhello\r\n0\r\n\r\n"
            + response_head(200, [(b"Content-Length", 4)]) + b"evil",
            then="keep")
        r = await self.s.get(self.token)
        self.assertIn((r.status, r.body), ((200, b"hello"), (502, r.body)))
        await self.next_answer_is_clean()

    @async_test
    async def test_two_content_lengths(self):
        await self.scene()
        self.s.api.behaviour = Raw(response_head(200, [
            (b"Content-Length", 5), (b"Content-Length", 9)])
            + b"helloevil", then="keep")
        r = await self.s.get(self.token)
        self.assertEqual(r.status, 502)
        await self.next_answer_is_clean()

    @async_test
    async def test_endless_response_head(self):
        """A response head that never ends is refused once it passes a
        bound (502), not buffered until upstream_timeout (504)."""
        await self.scene()
        self.s.api.behaviour = Stream(
            total=None, chunked=False, prefix=b"HTTP/1.1 200 OK\r\nX-Big: ")
        r = await self.s.get(self.token)
        self.assertEqual(r.status, 502, "after the API sent %d MB of one "
                         "header line" % (self.s.api.written // MB))
        await self.next_answer_is_clean()

    @async_test
    async def test_interim_responses_are_skipped(self):
        await self.scene()
        self.s.api.behaviour = Raw(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            + response_head(200, [(b"Content-Length", 2)]) + b"ok",
            then="keep")
        r = await self.s.get(self.token)
        self.assertEqual((r.status, r.body), (200, b"ok"))
        await self.next_answer_is_clean()


class ResponseHeaders(unittest.TestCase):
    timeout = 10

    @async_test
    async def test_hop_by_hop_response_headers_are_dropped(self):
        s = await Scene.build(self, reactor)
        token, _ = s.good_token()
        s.api.behaviour = Reply(200, (
            (b"Connection", b"X-Internal-Secret, keep-alive"),
            (b"X-Internal-Secret", b"s3"), (b"Keep-Alive", b"timeout=99"),
            (b"Proxy-Authenticate", b"Basic"), (b"Upgrade", b"h2c"),
            (b"X-Kept", b"yes")), b"ok")
        r = await s.get(token)
        self.assertEqual((r.status, r.body), (200, b"ok"))
        names = {k.lower() for k, _ in r.headers}
        for gone in (b"x-internal-secret", b"keep-alive",
                     b"proxy-authenticate", b"upgrade"):
            self.assertNotIn(gone, names)
        self.assertEqual(r.header(b"x-kept"), [b"yes"])

    @async_test
    async def test_http10_client_never_gets_chunked(self):
        """HTTP/1.0 has no chunked coding: a chunked upstream answer goes
        to an HTTP/1.0 client delimited by close (or a length)."""
        s = await Scene.build(self, reactor)
        token, _ = s.good_token()
        s.api.behaviour = Stream(total=100_000, chunked=True)
        client = await exchange(reactor, s.front, (
            b"GET /old HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer "
            + token.encode() + b"\r\n\r\n"), 5.0)
        self.assertFalse(client.aborted_by_us)
        r = client.responses()[0]
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header(b"transfer-encoding"), [])
        self.assertEqual(len(r.body), 100_000)


class ReloadInFlight(unittest.TestCase):
    timeout = 10

    @async_test
    async def test_reload_to_a_new_upstream_during_a_slow_response(self):
        """The request in flight finishes against the old API; the next
        goes to the new one; the old pool leaves no connection behind."""
        from twisted.internet import defer
        from phantomd import config as configmod
        from .fakes import Delayed, FakeAPI
        s = await Scene.build(self, reactor)
        token, _ = s.good_token()
        new_api = FakeAPI(reactor)
        new_port = new_api.listen()
        self.addCleanup(new_api.stop)
        s.api.behaviour = Delayed(0.4, Reply(200, body=b"old"))
        first = defer.ensureDeferred(s.get(token))
        await wait_for(reactor, lambda: s.api.requests, 2.0)
        s.gw.gateway.reload(configmod.parse(s.ini.replace(
            "upstream = http://127.0.0.1:%d" % s.api.portnum,
            "upstream = http://127.0.0.1:%d" % new_port), "<reloaded.ini>"))
        r = await first
        self.assertEqual((r.status, r.body), (200, b"old"))
        r = await s.get(token)
        self.assertEqual(r.status, 200)
        self.assertEqual(len(new_api.requests), 1)
        self.assertTrue(await wait_for(
            reactor, lambda: not s.api.connections, 3.0),
            "the replaced upstream pool left a connection open")
