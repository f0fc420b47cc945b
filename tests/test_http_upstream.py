"""The upstream pool and connection on a MemoryReactorClock."""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from phantomd.http.upstream import UpstreamPool
from phantomd.http.wire import MODE_CHUNKED, MODE_EOF, MODE_LENGTH, MODE_NONE
from phantomd.ops.metrics import Metrics
from tests.helpers_http import settings

HEAD = b"GET / HTTP/1.1\r\nHost: api\r\n\r\n"


class FakeFront:
    """Records what the connection reports; sends its request when ready."""

    def __init__(self, method_head: bool = False,
                 retryable: bool = True) -> None:
        self.events: list = []
        self.conn: Any = None
        self.method_head = method_head
        self.retryable = retryable
        self.body = bytearray()
        self.connecting: Any = None

    def upstream_ready(self, conn: Any) -> None:
        self.conn = conn
        self.events.append("ready")
        conn.send(self, HEAD, self.method_head, self.retryable)
        conn.request_sent()

    def upstream_connecting(self, d: Any) -> None:
        self.connecting = d

    def upstream_retry(self) -> None:
        self.events.append("retry")

    def upstream_failed(self, status: int, err: str, description: str) -> None:
        self.events.append(("failed", status))

    def upstream_write_blocked(self, flag: bool) -> None:
        self.events.append(("blocked", flag))

    def response_continue(self) -> None:
        self.events.append("continue")

    def response_head(self, status: int, reason: bytes, headers: list,
                      mode: int, length: Any, duration: float) -> None:
        self.events.append(("head", status, reason, headers, mode, length))

    def response_body(self, data: bytes) -> None:
        self.body += data

    def response_end(self) -> None:
        self.events.append("end")

    def flush_output(self) -> None:
        self.flushes = getattr(self, "flushes", 0) + 1

    def response_aborted(self) -> None:
        self.events.append("aborted")


class PoolCase(unittest.SynchronousTestCase):
    keys: dict = {}

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics()
        self.pool = UpstreamPool(
            self.reactor, settings("http://10.0.0.7:3000/base/",
                                   upstream_timeout=10, idle_timeout=60,
                                   **self.keys), self.metrics)

    def request(self, front: Any = None) -> tuple:
        """Ask the pool for a connection; complete a new one if needed."""
        front = front or FakeFront()
        clients = len(self.reactor.tcpClients)
        front.upstream_connecting(self.pool.connect(front))
        if len(self.reactor.tcpClients) > clients:
            self.complete_connection(-1)
        return front, front.conn

    def complete_connection(self, index: int) -> StringTransport:
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        self.assertEqual((host, port), ("10.0.0.7", 3000))
        wrapper = factory.buildProtocol(None)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        return transport


class ConfigTests(PoolCase):

    def test_authority_and_base_path(self) -> None:
        self.assertEqual(self.pool.authority, b"10.0.0.7:3000")
        self.assertEqual(self.pool.base_path, b"/base")

    def test_authorities(self) -> None:
        rows = [
            ("http://api.example", b"api.example"),
            ("http://api.example:8080/x", b"api.example:8080"),
            ("http://[::1]:3000", b"[::1]:3000"),
            ("https://b\u00fccher.example:8443", b"xn--bcher-kva.example:8443"),
        ]
        for url, authority in rows:
            pool = UpstreamPool(self.reactor, settings(url), self.metrics)
            self.assertEqual(pool.authority, authority, url)

    def test_https_without_path(self) -> None:
        pool = UpstreamPool(self.reactor, settings("https://api.example"),
                            self.metrics)
        self.assertEqual(pool.authority, b"api.example")
        self.assertEqual(pool.base_path, b"")
        self.assertTrue(pool.secure)


class ResponseTests(PoolCase):

    def test_framing_modes(self) -> None:
        rows = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
             MODE_LENGTH, 3, b"abc", True),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", MODE_CHUNKED, None, b"abc",
             True),
            (b"HTTP/1.1 204 No Content\r\n\r\n", MODE_NONE, None, b"", True),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
             MODE_NONE, 9, b"", True),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close"
             b"\r\n\r\nabc", MODE_LENGTH, 3, b"abc", False),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc",
             MODE_LENGTH, 3, b"abc", False),
        ]
        for raw, mode, length, body, pooled in rows:
            front, conn = self.request()
            conn.dataReceived(raw)
            head = front.events[1]
            self.assertEqual((head[4], head[5]), (mode, length), raw)
            self.assertEqual(front.events[-1], "end", raw)
            self.assertEqual(bytes(front.body), body, raw)
            self.assertEqual(self.pool.idle_count(), int(pooled), raw)
            self.assertEqual(conn.transport.disconnecting, not pooled, raw)
            for c in self.pool._idle.idle(None):
                c.transport.loseConnection()
                c.connectionLost(Failure(error.ConnectionDone()))

    def test_headers_filtered(self) -> None:
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 200 Fine\r\nConnection: X-Hop, close\r\n"
                          b"X-Hop: 1\r\nKeep-Alive: 5\r\nX-Kept: 2\r\n"
                          b"Content-Length: 0\r\n\r\n")
        _, status, reason, headers, mode, length = front.events[1]
        self.assertEqual((status, reason, headers),
                         (200, b"Fine", [(b"X-Kept", b"2")]))
        self.assertEqual(self.metrics.sample(
            "phantomd_upstream_duration_seconds_count"), 1)

    def test_head_response_has_no_body(self) -> None:
        front, conn = self.request(FakeFront(method_head=True))
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
        head = front.events[1]
        self.assertEqual(head[3], [(b"Content-Length", b"50")])
        self.assertEqual(head[4], MODE_NONE)
        self.assertEqual(front.events[-1], "end")
        # llhttp would wait for the 50 bytes: the connection is not reused.
        self.assertTrue(conn.transport.disconnecting)

    def test_read_until_close(self) -> None:
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        self.assertEqual(front.events[1][4], MODE_EOF)
        conn.dataReceived(b" more")
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(bytes(front.body), b"some more")
        self.assertEqual(front.events[-1], "end")

    def test_reset_mid_body_aborts(self) -> None:
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        conn.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(front.events[-1], "aborted")

    def test_continue_then_final(self) -> None:
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(front.events, ["ready", "continue"])
        conn.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(front.events[2][1], 201)

    def test_malformed_response_is_502(self) -> None:
        for raw in (b"HTTP/1.1 abc\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n",
                    b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n"
                    b"Connection: upgrade\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked"
                    b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                    # A 1xx with a body: it would reach the client ahead of
                    # the real head (here a whole fake answer).
                    b"HTTP/1.1 150 X\r\nContent-Length: 38\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nFAKE"
                    b"HTTP/1.1 204 No Content\r\n\r\n",
                    b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n"):
            front, conn = self.request()
            conn.dataReceived(raw)
            self.assertEqual(front.events[-1], ("failed", 502), raw)
            self.assertEqual(bytes(front.body), b"", raw)
            self.assertTrue(conn.transport.disconnected, raw)

    def test_endless_response_head_is_502(self) -> None:
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(100):
            if conn.transport.disconnected:
                break
            conn.dataReceived(b"x" * 8192)
        self.assertEqual(front.events[-1], ("failed", 502))
        self.assertTrue(conn.transport.disconnected)

    def test_closed_without_answer_is_502(self) -> None:
        front, conn = self.request()
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(front.events[-1], ("failed", 502))

    def test_bytes_on_idle_connection_close_it(self) -> None:
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idle_count(), 1)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(conn.transport.disconnected)
        conn.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.pool.idle_count(), 0)

    def test_an_idle_connection_gone_bad_is_never_handed_out(self) -> None:
        """A server's 408 on an idle connection: the abort's connectionLost
        comes a reactor turn later, and a request meanwhile (a POST, which
        is never retried) must get a new connection, not a 502."""
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        conn.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n"
                          b"Connection: close\r\n\r\n")
        self.assertEqual(self.pool.idle_count(), 0)
        clients = len(self.reactor.tcpClients)
        post, fresh = self.request(FakeFront(retryable=False))
        self.assertEqual(len(self.reactor.tcpClients), clients + 1)
        self.assertIsNot(fresh, conn)
        conn.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(post.events, ["ready"])


class TimeoutTests(PoolCase):

    def test_no_head_in_time_is_504(self) -> None:
        front, conn = self.request()
        self.reactor.advance(9.9)
        self.assertEqual(front.events, ["ready"])
        self.reactor.advance(0.2)
        self.assertEqual(front.events[-1], ("failed", 504))
        self.assertTrue(conn.transport.disconnected)

    def test_waiting_for_the_clients_body_is_not_a_504(self) -> None:
        """Until the whole request is sent the front times the client;
        upstream_timeout runs from the request's last byte."""
        front = FakeFront()
        front.upstream_ready = lambda conn: (
            setattr(front, "conn", conn),
            conn.send(front, HEAD, False, False))
        _, conn = self.request(front)
        self.reactor.advance(100)
        self.assertEqual(front.events, [])
        conn.request_sent()
        self.reactor.advance(9)
        self.assertEqual(front.events, [])
        self.reactor.advance(2)
        self.assertEqual(front.events, [("failed", 504)])

    def test_upstream_not_reading_the_body_is_a_504(self) -> None:
        front = FakeFront()
        front.upstream_ready = lambda conn: (
            setattr(front, "conn", conn),
            conn.send(front, HEAD, False, False))
        _, conn = self.request(front)
        front.upstream_write_blocked = lambda flag: None
        conn.pauseProducing()
        self.reactor.advance(11)
        self.assertEqual(front.events, [("failed", 504)])

    def test_body_stall_aborts(self) -> None:
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        self.reactor.advance(5)
        conn.dataReceived(b"def")
        self.reactor.advance(9)
        self.assertEqual(front.events[-1][0], "head")
        self.reactor.advance(2)
        self.assertEqual(front.events[-1], "aborted")

    def test_paused_by_slow_client_is_not_a_stall(self) -> None:
        front, conn = self.request()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        conn.pause_reading()
        self.assertEqual(conn.transport.producerState, "paused")
        self.reactor.advance(100)
        self.assertEqual(front.events[-1][0], "head")
        conn.resume_reading()
        conn.dataReceived(b"defghi")
        self.assertEqual(front.events[-1], "end")

    def test_connect_timeout_is_504(self) -> None:
        front = FakeFront()
        d = self.pool.connect(front)
        factory = self.reactor.tcpClients[0][2]
        self.assertEqual(self.reactor.tcpClients[0][3], 5)
        factory.clientConnectionFailed(None, Failure(error.TimeoutError()))
        self.assertEqual(front.events, [("failed", 504)])
        self.assertTrue(d.called)

    def test_refused_is_502(self) -> None:
        front = FakeFront()
        self.pool.connect(front)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(
            None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(front.events, [("failed", 502)])

    def test_outage_logs_are_throttled(self) -> None:
        events: list = []
        from twisted.logger import globalLogPublisher
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for i in range(50):
            self.pool.connect(FakeFront())
            self.reactor.tcpClients[i][2].clientConnectionFailed(
                None, Failure(error.ConnectionRefusedError()))
        self.reactor.advance(10)
        self.pool.connect(FakeFront())
        self.reactor.tcpClients[50][2].clientConnectionFailed(
            None, Failure(error.ConnectionRefusedError()))
        warnings = [e for e in events
                    if e.get("log_namespace") == "phantomd.http.upstream"]
        self.assertEqual([e["unlogged"] for e in warnings], [0, 49])

    def test_cancelled_connect_reports_nothing(self) -> None:
        front = FakeFront()
        d = self.pool.connect(front)
        d.cancel()
        self.assertEqual(front.events, [])


class PoolingTests(PoolCase):
    keys = {"upstream_max_idle": 2}

    def finish(self, conn: Any) -> None:
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def test_bytes_after_a_response_never_reach_the_next_request(self) -> None:
        """A second response in the same read as the first (a desync or
        smuggling attempt by the API) must not be handed to the request the
        front sends next, even when that request would take this very
        connection from the pool at once."""
        pool = self.pool

        class Pipelining(FakeFront):
            next = None

            def response_end(self) -> None:
                super().response_end()
                if self.next is None:
                    self.next = FakeFront()
                    pool.connect(self.next)

        first = Pipelining()
        front, conn = self.request(first)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
                          b"EVIL!")
        self.assertEqual(bytes(first.body), b"ok")
        self.assertNotEqual(first.next.conn, conn)
        self.assertEqual(bytes(first.next.body), b"")
        self.assertNotIn(b"EVIL", bytes(first.next.body))

    def test_reuse_most_recent_first(self) -> None:
        _, a = self.request()
        _, b = self.request()
        self.finish(a)
        self.finish(b)
        _, c = self.request()
        self.assertIs(c, b)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertTrue(c.reused)

    def test_idle_bound(self) -> None:
        conns = [self.request()[1] for _ in range(3)]
        for conn in conns:
            self.finish(conn)
        self.assertEqual(self.pool.idle_count(), 2)
        self.assertTrue(conns[2].transport.disconnecting)

    def test_old_idle_connection_not_used(self) -> None:
        """Idle longer than the API may keep it: closed, not used."""
        _, a = self.request()
        self.finish(a)
        self.reactor.advance(1.4)
        _, b = self.request()
        self.assertIs(a, b)
        self.finish(b)
        self.reactor.advance(1.6)
        _, b = self.request()
        self.assertIsNot(a, b)
        self.assertTrue(a.transport.disconnecting)

    def test_not_pooled_when_request_unfinished(self) -> None:
        front = FakeFront()
        front.upstream_ready = lambda conn: (
            setattr(front, "conn", conn),
            conn.send(front, HEAD, False, False))
        _, conn = self.request(front)
        self.finish(conn)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertTrue(conn.transport.disconnecting)

    def test_stale_connection_retried_once(self) -> None:
        _, a = self.request()
        self.finish(a)
        front, b = self.request()
        self.assertIs(a, b)
        b.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(front.events, ["ready", "retry"])
        self.complete_connection(-1)
        self.assertEqual(front.events, ["ready", "retry", "ready"])
        fresh = front.conn
        self.assertIsNot(fresh, a)
        fresh.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(front.events[-1], ("failed", 502))

    def test_request_with_body_not_retried(self) -> None:
        _, a = self.request()
        self.finish(a)
        front, b = self.request(FakeFront(retryable=False))
        b.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(front.events, ["ready", ("failed", 502)])

    def test_backpressure_reported(self) -> None:
        front, conn = self.request()
        conn.pauseProducing()
        conn.resumeProducing()
        self.assertEqual(front.events[1:], [("blocked", True),
                                            ("blocked", False)])

    def test_reconfigure_lowers_idle_bound(self) -> None:
        conns = [self.request()[1] for _ in range(2)]
        for conn in conns:
            self.finish(conn)
        self.pool.reconfigure(settings(upstream_max_idle=1,
                                       upstream_timeout=3))
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertEqual(self.pool.timeout, 3)
        self.assertTrue(conns[0].transport.disconnecting)

    def test_close(self) -> None:
        _, a = self.request()
        front, b = self.request()
        self.finish(a)
        d = self.pool.close()
        self.assertNoResult(d)
        self.assertTrue(a.transport.disconnecting)
        a.connectionLost(Failure(error.ConnectionDone()))
        self.successResultOf(d)
        # A connection still busy at close is not pooled when it finishes.
        self.finish(b)
        self.assertTrue(b.transport.disconnecting)
