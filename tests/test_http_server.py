"""The front protocol on a StringTransport, with a fake gate and pool."""

from __future__ import annotations

from typing import Any, Optional

import httptools
from zope.interface import directlyProvides
from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from phantomd.http.front import LINGER
from phantomd.http.listener import FrontFactory
from phantomd.http.wire import MODE_CHUNKED, MODE_EOF, MODE_LENGTH
from phantomd.ops.metrics import Metrics
from phantomd.token.outcomes import Forward
from tests.helpers_http import JWT, OPAQUE, FakeGate, settings

AUTH = b"Authorization: Bearer " + OPAQUE.encode() + b"\r\n"


def get(target: bytes = b"/", extra: bytes = b"", auth: bytes = AUTH) -> bytes:
    return (b"GET " + target + b" HTTP/1.1\r\nHost: front.example\r\n"
            + auth + extra + b"\r\n")


class FakeConn:
    """Stands for an UpstreamConnection: records what the front sends."""

    def __init__(self) -> None:
        self.front: Any = None
        self.head = b""
        self.body = bytearray()
        self.sent = False
        self.aborted = False
        self.paused = False
        self.retryable: Optional[bool] = None

    def send(self, front: Any, head: bytes, head_method: bool,
             retryable: bool) -> None:
        self.front, self.head, self.retryable = front, head, retryable

    def write(self, data: bytes) -> None:
        self.body += data

    def write_sequence(self, parts: list) -> None:
        self.body += b"".join(parts)

    def request_sent(self, with_head: bool = False) -> None:
        self.sent = True
        self.sent_with_head = with_head

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True

    def respond(self, status: int = 200, body: bytes = b"ok",
                headers: Optional[list] = None, mode: int = MODE_LENGTH) -> None:
        front = self.front
        front.response_head(status, b"", headers or [], mode,
                            len(body) if mode == MODE_LENGTH else None, 0.001)
        if body:
            front.response_body(body)
        front.response_end()


class FakePool:
    base_path = b""
    authority = b"api.internal:3000"

    def __init__(self) -> None:
        self.conns: list = []
        self.pending: list = []
        self.immediate = True

    def connect(self, front: Any) -> Optional[defer.Deferred]:
        conn = FakeConn()
        self.conns.append(conn)
        if self.immediate:
            front.upstream_ready(conn)
            return None
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, front, conn))
        return d


class FrontCase(unittest.SynchronousTestCase):
    keys: dict = {}

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.gate = FakeGate()
        self.pool = FakePool()
        self.metrics = Metrics()
        self.access: list = []
        self.settings = settings(**self.keys)
        self.factory = FrontFactory(self.reactor, self.gate, self.pool,
                                    self.settings, self.metrics,
                                    access_log=self.access.append)

    def connect(self) -> tuple:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def responses(self, transport: StringTransport) -> list:
        """(status, headers, body) of each complete response written."""
        out: list = []

        class P:
            def on_message_begin(s) -> None:
                s.headers, s.body = [], b""

            def on_header(s, n: bytes, v: bytes) -> None:
                s.headers.append((n.lower(), v))

            def on_body(s, b: bytes) -> None:
                s.body += b

            def on_message_complete(s) -> None:
                out.append((parser.get_status_code(), dict(s.headers),
                            s.body))
        parser = httptools.HttpResponseParser(P())
        parser.feed_data(transport.value())
        return out


class MalformedRequestTests(FrontCase):
    keys = {"max_request_line": 300, "max_header_bytes": 1024,
            "max_headers": 10}

    ROWS = [
        ("CL with TE", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         400),
        ("two Content-Lengths", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        ("Content-Length list", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Content-Length: 3, 3\r\n\r\nabc", 400),
        ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Content-Length: -1\r\n\r\n", 400),
        ("bad chunk size", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
        ("chunk size with space", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
        ("TE twice", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\n", 400),
        ("obs-fold", get(extra=b"X-A: a\r\n b\r\n"), 400),
        ("NUL in value", get(extra=b"X-A: a\x00b\r\n"), 400),
        ("CR in value", get(extra=b"X-A: a\rb\r\n"), 400),
        ("LF in value", get(extra=b"X-A: a\nX-B: b\r\n"), 400),
        ("space before colon", get(extra=b"X-A : a\r\n"), 400),
        ("empty header name", get(extra=b": a\r\n"), 400),
        ("bare LF line ends", b"GET / HTTP/1.1\nHost: h\n\n", 400),
        ("space in target", b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        ("unknown method", b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        ("lower-case method", b"get / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        ("HTTP/0.9", b"GET /\r\n\r\n", 400),
        ("HTTP/2.0 line", b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        ("no Host", b"GET / HTTP/1.1\r\n" + AUTH + b"\r\n", 400),
        ("two Hosts", get(extra=b"Host: other\r\n"), 400),
        ("target not a path", b"GET foo HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        ("TE gzip", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        ("TE gzip then chunked on two lines", b"POST / HTTP/1.1\r\nHost: h\r\n"
         + AUTH + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n0\r\n\r\n", 501),
        ("TE identity then chunked on two lines", b"POST / HTTP/1.1\r\n"
         b"Host: h\r\n" + AUTH + b"Transfer-Encoding: identity\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
        ("Upgrade with a body", b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
         b"Connection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\n"
         b"abc", 400),
        ("request line too long", b"GET /" + b"a" * 400 + b" HTTP/1.1\r\n"
         b"Host: h\r\n\r\n", 414),
        ("header section too large",
         get(extra=b"X-Big: " + b"b" * 2000 + b"\r\n"), 431),
        ("too many headers",
         get(extra=b"".join(b"X-%d: 1\r\n" % i for i in range(12))), 431),
    ]

    def test_rows(self) -> None:
        """Each is answered with its status, closed, and never forwarded."""
        for name, data, status in self.ROWS:
            proto, transport = self.connect()
            proto.dataReceived(data)
            got = self.responses(transport)
            self.assertEqual([r[0] for r in got], [status], name)
            self.assertEqual(got[0][1][b"connection"], b"close", name)
            self.assertEqual(got[0][1][b"cache-control"], b"no-store", name)
            self.assertTrue(transport.disconnecting, name)
            self.assertEqual(self.pool.conns, [], name)
            self.assertEqual(self.gate.calls, [], name)

    def test_rows_byte_by_byte(self) -> None:
        """The same answers when the bytes trickle in one at a time."""
        for name, data, status in self.ROWS:
            proto, transport = self.connect()
            for i in range(len(data)):
                if transport.disconnecting:
                    break
                proto.dataReceived(data[i:i + 1])
            got = self.responses(transport)
            self.assertEqual([r[0] for r in got], [status], name)
            # A body error found after the head went upstream: the upstream
            # connection is aborted before the request is complete.
            for conn in self.pool.conns:
                self.assertTrue(conn.aborted and not conn.sent, name)

    def test_header_value_growing_over_many_reads(self) -> None:
        """One endless header value is cut off at the limit, not buffered."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: ")
        for _ in range(100):
            if transport.disconnecting:
                break
            proto.dataReceived(b"v" * 100)
        self.assertEqual([r[0] for r in self.responses(transport)], [431])

    def test_endless_input_without_progress_is_cut_off(self) -> None:
        """Chunk extensions, chunk-size lines, trailers and empty lines are
        kept by nobody, but must not be read forever (CVE-2024-22019)."""
        chunked = (b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                   b"Transfer-Encoding: chunked\r\n\r\n")
        rows = [
            ("chunk extension", chunked + b"5;ext=", b"e" * 1000),
            ("chunk size", chunked, b"0" * 1000),
            ("trailers", chunked + b"5\r\nhello\r\n0\r\n",
             b"X-T: " + b"t" * 50 + b"\r\n"),
            ("empty lines", b"", b"\r\n" * 500),
        ]
        for name, head, unit in rows:
            proto, transport = self.connect()
            proto.dataReceived(head)
            for _ in range(1000):
                if transport.disconnecting:
                    break
                proto.dataReceived(unit)
            self.assertTrue(transport.disconnecting, name)
            statuses = [r[0] for r in self.responses(transport)]
            self.assertEqual(statuses, [400], name)
            for conn in self.pool.conns:
                self.assertTrue(conn.aborted and not conn.sent, name)

    def test_large_chunk_extension_within_bound(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Transfer-Encoding: chunked\r\n\r\n3;e=" +
                           b"x" * 8000 + b"\r\nabc\r\n0\r\n\r\n")
        [conn] = self.pool.conns
        self.assertEqual(bytes(conn.body), b"3\r\nabc\r\n0\r\n\r\n")
        self.assertFalse(transport.disconnecting)

    def test_earlier_pipelined_request_still_answered(self) -> None:
        """A bad request after a good one: the good one first, then 400."""
        proto, transport = self.connect()
        proto.dataReceived(get(b"/good") + b"GET / HTTP/1.1\r\nX : y\r\n\r\n")
        [conn] = self.pool.conns
        self.assertEqual(self.responses(transport), [])
        conn.respond()
        self.assertEqual([r[0] for r in self.responses(transport)],
                         [200, 400])
        self.assertTrue(transport.disconnecting)

    def test_bad_chunk_mid_stream_aborts_upstream(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Transfer-Encoding: chunked\r\n\r\n")
        [conn] = self.pool.conns
        proto.dataReceived(b"3\r\nabc\r\n")
        self.assertEqual(bytes(conn.body), b"3\r\nabc\r\n")
        proto.dataReceived(b"zz\r\n")
        self.assertTrue(conn.aborted)
        self.assertFalse(conn.sent)
        self.assertEqual([r[0] for r in self.responses(transport)], [400])
        self.assertTrue(transport.disconnecting)


class ForwardingTests(FrontCase):

    def test_gate_gets_every_authorization_value(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(
            b"GET /p%20q?x=%2F&y HTTP/1.1\r\nHost: front.example\r\n" + AUTH +
            b"authorization: Bearer other\r\nX-Forwarded-For: 1.2.3.4\r\n"
            b"Forwarded: for=1.2.3.4\r\nConnection: X-Drop\r\nX-Drop: 1\r\n"
            b"Accept: */*\r\n\r\n")
        self.assertEqual(self.gate.calls,
                         [[b"Bearer " + OPAQUE.encode(), b"Bearer other"]])

    def test_head_sent_upstream(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(
            b"GET /p%20q?x=%2F&y HTTP/1.1\r\nHost: front.example\r\n" + AUTH +
            b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Host: evil\r\n"
            b"Forwarded: for=1.2.3.4\r\nConnection: X-Drop\r\nX-Drop: 1\r\n"
            b"Accept: */*\r\nX-Request-Id: req-42\r\n\r\n")
        [conn] = self.pool.conns
        self.assertEqual(conn.head, (
            b"GET /p%20q?x=%2F&y HTTP/1.1\r\n"
            b"Host: api.internal:3000\r\n"
            b"Authorization: Bearer " + JWT.encode() + b"\r\n"
            b"X-Request-Id: req-42\r\n"
            b"Accept: */*\r\n"
            b"X-Forwarded-For: 192.168.1.1\r\n"
            b"X-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: front.example\r\n\r\n"))
        self.assertTrue(conn.sent)
        # All of it went with the head: the upstream's time limit, started
        # by send, runs on.
        self.assertTrue(conn.sent_with_head)
        self.assertTrue(conn.retryable)

    def test_only_safe_bodiless_requests_may_be_resent(self) -> None:
        """The pool may resend a request once when a reused connection
        closes unanswered: only a safe method without a body qualifies
        (RFC 9110 section 9.2.2), never POST, PATCH, PUT or DELETE."""
        rows = [(b"GET", b"", True), (b"HEAD", b"", True),
                (b"OPTIONS", b"", True), (b"GET", b"Content-Length: 0\r\n",
                                          True),
                (b"POST", b"", False), (b"POST", b"Content-Length: 0\r\n",
                                        False),
                (b"PATCH", b"", False), (b"DELETE", b"", False),
                (b"PUT", b"Content-Length: 0\r\n", False),
                (b"GET", b"Content-Length: 1\r\n", False)]
        for method, extra, retryable in rows:
            proto, transport = self.connect()
            proto.dataReceived(method + b" / HTTP/1.1\r\nHost: h\r\n" + AUTH
                               + extra + b"\r\n")
            self.assertIs(self.pool.conns[-1].retryable, retryable,
                          (method, extra))

    def test_targets(self) -> None:
        """Absolute-form becomes origin-form; the base path is prefixed."""
        self.pool.base_path = b"/api"
        rows = [
            (b"/x?y=%41", b"/api/x?y=%41"),
            (b"http://front.example/a/b?c", b"/api/a/b?c"),
            (b"HTTPS://front.example?q", b"/api/?q"),
            (b"http://front.example", b"/api/"),
        ]
        for target, upstream in rows:
            proto, transport = self.connect()
            proto.dataReceived(get(target))
            self.assertEqual(self.pool.conns[-1].head.split(b" ")[1],
                             upstream, target)
        proto, transport = self.connect()
        proto.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"\r\n")
        self.assertEqual(self.pool.conns[-1].head.split(b" ")[1], b"/api")

    def test_body_waits_for_the_gate(self) -> None:
        """While the gate decides, the client is not read."""
        self.gate.hold = True
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Content-Length: 10\r\n\r\n01234")
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.pool.conns, [])
        self.gate.release()
        [conn] = self.pool.conns
        self.assertEqual(bytes(conn.body), b"01234")
        self.assertEqual(transport.producerState, "producing")
        self.assertIn(b"Content-Length: 10\r\n", conn.head)
        self.assertFalse(conn.retryable)
        proto.dataReceived(b"56789")
        self.assertEqual(bytes(conn.body), b"0123456789")
        self.assertTrue(conn.sent)
        # The body ended later: the upstream's time limit starts again.
        self.assertFalse(conn.sent_with_head)
        # The next pipelined request stops reading until this one is done.
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(b"GET /next HT")
        self.assertEqual(transport.producerState, "paused")
        conn.respond()
        self.assertEqual(transport.producerState, "producing")

    def test_body_in_the_same_read_stays_unparsed(self) -> None:
        """What arrived with the head waits as raw bytes, not parsed."""
        self.gate.hold = True
        proto, transport = self.connect()
        body = bytes(range(256)) * 240
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        parsed = sum(len(c) for c in proto._req.body or [])
        self.assertGreater(len(proto._stash), 0)
        self.assertLess(parsed, 4096)
        self.gate.release()
        [conn] = self.pool.conns
        self.assertEqual(bytes(conn.body), body)
        self.assertTrue(conn.sent)

    def test_chunked_request_rechunked(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Transfer-Encoding: chunked\r\n\r\n"
                           b"3;ext\r\nabc\r\n1\r\nd\r\n0\r\nX-T: 1\r\n\r\n")
        [conn] = self.pool.conns
        self.assertIn(b"Transfer-Encoding: chunked\r\n", conn.head)
        self.assertEqual(bytes(conn.body),
                         b"3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n")

    def test_upstream_write_blocked_pauses_client(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"PUT / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Content-Length: 100\r\n\r\n")
        self.assertEqual(transport.producerState, "producing")
        proto.upstream_write_blocked(True)
        self.assertEqual(transport.producerState, "paused")
        proto.upstream_write_blocked(False)
        self.assertEqual(transport.producerState, "producing")

    def test_slow_client_pauses_upstream(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        [conn] = self.pool.conns
        proto.pauseProducing()
        self.assertTrue(conn.paused)
        proto.resumeProducing()
        self.assertFalse(conn.paused)

    def test_response_framing(self) -> None:
        """Length kept; chunked or until-close re-chunked for HTTP/1.1,
        sent raw and closed for HTTP/1.0."""
        rows = [
            (b"1.1", MODE_LENGTH, b"Content-Length: 3\r\n\r\nabc", False),
            (b"1.1", MODE_CHUNKED,
             b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", False),
            (b"1.1", MODE_EOF,
             b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", False),
            (b"1.0", MODE_EOF, b"Connection: close\r\n\r\nabc", True),
        ]
        for version, mode, tail, closed in rows:
            proto, transport = self.connect()
            proto.dataReceived(b"GET / HTTP/" + version + b"\r\nHost: h\r\n"
                               + AUTH + (b"Connection: keep-alive\r\n"
                                         if version == b"1.0" else b"")
                               + b"\r\n")
            self.pool.conns[-1].respond(
                200, b"abc", [(b"X-A", b"1")], mode)
            self.assertEqual(transport.value(),
                             b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + tail, mode)
            self.assertEqual(transport.disconnecting, closed, mode)

    def test_continue_relayed(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        [conn] = self.pool.conns
        self.assertIn(b"Expect: 100-continue\r\n", conn.head)
        proto.response_continue()
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_malformed_jwt_from_gate_is_not_forwarded(self) -> None:
        self.gate.decide = lambda auth: Forward(jwt="a.b\r\nX-Evil: 1")
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.assertEqual(self.pool.conns, [])
        self.assertEqual([r[0] for r in self.responses(transport)], [502])

    def test_upstream_failure_answers(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        proto.upstream_failed(504, "gateway_timeout", "slow")
        [(status, headers, body)] = self.responses(transport)
        self.assertEqual(status, 504)
        self.assertIn(b'"gateway_timeout"', body)
        self.assertFalse(transport.disconnecting)

    def test_response_aborted_aborts_client(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        [conn] = self.pool.conns
        proto.response_head(200, b"OK", [], MODE_LENGTH, 10, 0.0)
        proto.response_body(b"12345")
        proto.response_aborted()
        self.assertTrue(transport.disconnected)

    def test_access_log_and_metrics(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get(b"/a?b=c", b"X-Request-Id: r1\r\n"))
        self.reactor.advance(0.5)
        self.pool.conns[-1].respond(200, b"abc")
        [entry] = self.access
        self.assertEqual(entry, {
            "client": "192.168.1.1", "method": "GET", "path": "/a",
            "status": 200, "duration": 0.5,
            "upstream_duration": 0.001, "cache": "hit",
            "token_id": "abcdef012345", "request_id": "r1", "end": "ok",
            "bytes_sent": len(transport.value())})
        self.assertEqual(self.metrics.sample(
            "phantomd_requests_total", {"code": "2xx"}), 1)
        self.assertEqual(self.metrics.sample(
            "phantomd_request_duration_seconds_count"), 1)


def upstream_headers(head: bytes) -> list:
    """(lower-cased name, value) of each header line in ``head``."""
    seen: list = []

    class P:
        def on_header(s, n: bytes, v: bytes) -> None:
            seen.append((n.lower(), v))
    httptools.HttpRequestParser(P()).feed_data(head)
    return seen


SPOOFED = (b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n"
           b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
           b"X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=https\r\n")


class ForwardingHeaderTests(FrontCase):
    """X-Forwarded-* from clients are replaced, from trusted proxies kept
    and extended; X-Real-IP and Forwarded never pass."""

    def connect_from(self, host: str) -> tuple:
        from twisted.internet.address import IPv4Address, IPv6Address
        kind = IPv6Address if ":" in host else IPv4Address
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=kind("TCP", host, 40000))
        proto.makeConnection(transport)
        return proto, transport

    def forwarded(self, host: str, extra: bytes) -> list:
        proto, transport = self.connect_from(host)
        proto.dataReceived(get(b"/f", extra))
        return upstream_headers(self.pool.conns[-1].head)

    def only(self, headers: list, name: bytes) -> bytes:
        values = [v for n, v in headers if n == name]
        self.assertEqual(len(values), 1, (name, headers))
        return values[0]

    def assert_own(self, headers: list, peer: bytes) -> None:
        self.assertEqual(self.only(headers, b"x-forwarded-for"), peer)
        self.assertEqual(self.only(headers, b"x-forwarded-proto"), b"http")
        self.assertEqual(self.only(headers, b"x-forwarded-host"),
                         b"front.example")
        names = [n for n, _ in headers]
        self.assertNotIn(b"x-real-ip", names)
        self.assertNotIn(b"forwarded", names)
        self.assertNotIn(b"6.6.6.6", b"".join(v for _, v in headers))

    def test_untrusted_peers_get_phantomds_own(self) -> None:
        for peer in ("192.168.1.1", "2001:db8::7", "::ffff:192.168.1.1"):
            self.assert_own(self.forwarded(peer, SPOOFED), peer.encode())

    def test_underscore_spellings_are_dropped(self) -> None:
        """CGI/WSGI servers read X_Forwarded_For as X-Forwarded-For."""
        headers = self.forwarded("192.168.1.1", (
            b"X_Forwarded_For: 6.6.6.6\r\nx-forwarded_host: 6.6.6.6\r\n"
            b"X_Forwarded-Proto: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n"
            b"X_Request_Id: 6.6.6.6\r\nContent_Length: 6\r\n"
            b"Transfer_Encoding: 6.6.6.6\r\nProxy_Authorization: 6.6.6.6\r\n"
            b"X_Keep: yes\r\n"))
        self.assert_own(headers, b"192.168.1.1")
        self.assertEqual([n for n, _ in headers if b"_" in n], [b"x_keep"])

    def test_connection_option_drops_its_underscore_spelling(self) -> None:
        headers = self.forwarded("192.168.1.1", b"Connection: X-Secret\r\n"
                                 b"X_Secret: 1\r\nX-Secret: 2\r\n")
        self.assertEqual([v for n, v in headers if b"secret" in n], [])

    def test_content_length_is_sent_as_a_number(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Content-Length: 0005\r\n\r\nhello")
        [conn] = self.pool.conns
        self.assertEqual(self.only(upstream_headers(conn.head),
                                   b"content-length"), b"5")
        self.assertEqual(bytes(conn.body), b"hello")

    def trust(self, cidrs: str) -> None:
        self.factory.reconfigure(settings=settings(trusted_proxies=cidrs))

    def test_trusted_proxy_is_kept_and_extended(self) -> None:
        self.trust("192.168.0.0/16 2001:db8::/32")
        for peer in ("192.168.1.1", "::ffff:192.168.1.1", "2001:db8::7"):
            headers = self.forwarded(peer, SPOOFED)
            self.assertEqual(self.only(headers, b"x-forwarded-for"),
                             b"6.6.6.6, 7.7.7.7, " + peer.encode())
            self.assertEqual(self.only(headers, b"x-forwarded-proto"),
                             b"https")
            self.assertEqual(self.only(headers, b"x-forwarded-host"),
                             b"evil.example")
            names = [n for n, _ in headers]
            self.assertNotIn(b"x-real-ip", names)
            self.assertNotIn(b"forwarded", names)

    def test_trusted_proxy_sending_nothing_gets_phantomds_own(self) -> None:
        self.trust("192.168.0.0/16")
        self.assert_own(self.forwarded("192.168.1.1", b""), b"192.168.1.1")

    def test_peers_outside_the_networks_are_not_trusted(self) -> None:
        self.trust("192.168.0.0/16 2001:db8::/32")
        for peer in ("10.0.0.1", "2001:db9::7", "::ffff:10.0.0.1",
                     "::192.168.1.1"):
            self.assert_own(self.forwarded(peer, SPOOFED), peer.encode())

    def test_reload_changes_trust_on_open_connections(self) -> None:
        """A SIGHUP that removes a proxy stops trusting it at its next
        request, even on a keep-alive connection opened before."""
        self.trust("192.168.0.0/16")
        proto, transport = self.connect_from("192.168.1.1")
        proto.dataReceived(get(b"/1", SPOOFED))
        self.pool.conns[-1].respond()
        self.assertIn((b"x-forwarded-proto", b"https"),
                      upstream_headers(self.pool.conns[-1].head))
        self.trust("")
        proto.dataReceived(get(b"/2", SPOOFED))
        self.assert_own(upstream_headers(self.pool.conns[-1].head),
                        b"192.168.1.1")
        self.pool.conns[-1].respond()
        self.trust("192.168.1.1")
        proto.dataReceived(get(b"/3", SPOOFED))
        self.assertIn((b"x-forwarded-for", b"6.6.6.6, 7.7.7.7, 192.168.1.1"),
                      upstream_headers(self.pool.conns[-1].head))


class RejectTests(FrontCase):

    def test_reject_keeps_alive_when_body_consumed(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n"
                           b"Authorization: Bearer bad\r\n"
                           b"Content-Length: 3\r\n\r\nabc")
        [(status, headers, body)] = self.responses(transport)
        self.assertEqual(status, 401)
        self.assertIn(b'error="invalid_token"', headers[b"www-authenticate"])
        self.assertEqual(headers[b"content-length"], b"%d" % len(body))
        self.assertFalse(transport.disconnecting)

    def test_reject_closes_when_body_unread(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n"
                           b"Authorization: Bearer bad\r\n"
                           b"Content-Length: 30\r\n\r\nabc")
        [(status, headers, body)] = self.responses(transport)
        self.assertEqual(status, 401)
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)

    def test_head_request_gets_no_body(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
        value = transport.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 401 "))
        self.assertTrue(value.endswith(b"\r\n\r\n"))


class PipelineTests(FrontCase):

    def test_one_at_a_time_in_order(self) -> None:
        self.gate.hold = True
        proto, transport = self.connect()
        proto.dataReceived(get(b"/1") + get(b"/2") + get(b"/3", auth=b""))
        self.assertEqual(len(self.gate.calls), 1)
        self.assertEqual(transport.producerState, "paused")
        self.gate.release()
        self.pool.conns[0].respond(body=b"one")
        self.assertEqual(len(self.gate.calls), 2)
        self.gate.release()
        self.pool.conns[1].respond(body=b"two")
        self.gate.release()
        got = self.responses(transport)
        self.assertEqual([(s, b) for s, _, b in got][:2],
                         [(200, b"one"), (200, b"two")])
        self.assertEqual(got[2][0], 401)
        self.assertEqual(transport.producerState, "producing")

    def test_parse_ahead_is_bounded(self) -> None:
        """2000 pipelined requests in one read: only a slice's worth is
        parsed while the first is in flight; all are answered in order."""
        self.gate.hold = True
        proto, transport = self.connect()
        requests = b"".join(get(b"/%d" % i) for i in range(2000))
        proto.dataReceived(requests)
        self.assertLess(len(proto._queue), 4096 // len(get(b"/0")) + 2)
        self.assertEqual(transport.producerState, "paused")
        for i in range(2000):
            self.gate.release()
            conn = self.pool.conns[-1]
            self.assertTrue(conn.head.startswith(b"GET /%d " % i))
            conn.respond(body=b"%d" % i)
        got = self.responses(transport)
        self.assertEqual([b for _, _, b in got],
                         [b"%d" % i for i in range(2000)])
        self.assertEqual(transport.producerState, "producing")

    def test_many_synchronous_rejects_do_not_recurse(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get(auth=b"") * 3000)
        self.assertEqual(len(self.responses(transport)), 3000)


class DisconnectTests(FrontCase):

    def test_disconnect_cancels_gate(self) -> None:
        self.gate.hold = True
        proto, transport = self.connect()
        proto.dataReceived(get())
        proto.connectionLost(None)
        self.assertEqual(self.gate.cancelled, 1)
        self.assertEqual(self.factory.connections, set())

    def test_disconnect_cancels_connect(self) -> None:
        self.pool.immediate = False
        proto, transport = self.connect()
        proto.dataReceived(get())
        [(d, front, conn)] = self.pool.pending
        cancelled = []
        d.addErrback(cancelled.append)
        proto.connectionLost(None)
        self.assertEqual(len(cancelled), 1)

    def test_reading_on_while_bodyless_request_waits(self) -> None:
        """A disconnect shows at once, so the gate is cancelled then."""
        self.gate.hold = True
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.assertEqual(transport.producerState, "producing")

    def test_disconnect_aborts_upstream(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"PUT / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Content-Length: 100\r\n\r\nabc")
        [conn] = self.pool.conns
        proto.connectionLost(None)
        self.assertTrue(conn.aborted)


class TimeoutTests(FrontCase):
    keys = {"header_timeout": 5, "idle_timeout": 30}

    def test_partial_head_gets_408(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost")
        self.reactor.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertEqual([r[0] for r in self.responses(transport)], [408])
        self.assertTrue(transport.disconnecting)

    def test_silent_tls_connection_is_aborted(self) -> None:
        """Before any TLS handshake no 408 can be delivered: abort."""
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        proto.makeConnection(transport)
        self.reactor.advance(6)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")

    def test_idle_keep_alive_closed_silently(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.pool.conns[0].respond()
        transport.clear()
        self.reactor.advance(29)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_slow_next_head_after_keep_alive(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.pool.conns[0].respond()
        self.reactor.advance(20)
        proto.dataReceived(b"GET / HT")
        self.reactor.advance(6)
        self.assertEqual([r[0] for r in self.responses(transport)],
                         [200, 408])

    def post(self, proto: Any, length: int) -> None:
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Content-Length: %d\r\n\r\n" % length)

    def test_trickling_body_gets_408(self) -> None:
        """A byte a second (R-U-Dead-Yet): 408 once the body falls behind
        header_timeout plus 500 bytes/s; the upstream is aborted."""
        proto, transport = self.connect()
        self.post(proto, 100000)
        [conn] = self.pool.conns
        for _ in range(6):
            self.reactor.advance(1)
            proto.dataReceived(b"x")
        self.assertEqual([r[0] for r in self.responses(transport)], [408])
        self.assertTrue(conn.aborted)
        self.assertTrue(transport.disconnecting)

    def test_stalled_body_gets_408(self) -> None:
        proto, transport = self.connect()
        self.post(proto, 100)
        proto.dataReceived(b"abc")
        self.reactor.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertEqual([r[0] for r in self.responses(transport)], [408])

    def test_steady_body_is_not_timed_out(self) -> None:
        proto, transport = self.connect()
        self.post(proto, 200000)
        for _ in range(20):
            self.reactor.advance(1)
            proto.dataReceived(b"x" * 10000)
        [conn] = self.pool.conns
        self.assertTrue(conn.sent)
        self.assertFalse(conn.aborted)
        self.reactor.advance(100)
        self.assertEqual(transport.value(), b"")

    def test_body_held_back_by_the_upstream_is_not_the_clients_fault(self
                                                                     ) -> None:
        proto, transport = self.connect()
        self.post(proto, 100)
        proto.upstream_write_blocked(True)
        self.reactor.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(self.pool.conns[0].aborted)
        # Once the API reads again, the client's clock starts afresh.
        proto.upstream_write_blocked(False)
        self.reactor.advance(4)
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(2)
        self.assertEqual([r[0] for r in self.responses(transport)], [408])

    def test_no_timeout_while_upstream_works(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.reactor.advance(100)
        self.assertFalse(transport.disconnecting)
        self.pool.conns[0].respond()
        self.assertEqual([r[0] for r in self.responses(transport)], [200])


class HalfClosingTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class LingerTests(FrontCase):
    """Closing with unread request bytes makes the kernel send a reset that
    can destroy the answer in flight: phantomd stops sending, reads and
    discards for LINGER seconds, then closes."""

    def upload(self, transport: StringTransport) -> Any:
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(transport)
        proto.dataReceived(b"PUT / HTTP/1.1\r\nHost: h\r\n"
                           b"Authorization: Bearer bad\r\n"
                           b"Content-Length: 1000000\r\n\r\nabc")
        return proto

    def test_tcp_half_closes_then_discards(self) -> None:
        transport = HalfClosingTransport()
        proto = self.upload(transport)
        self.assertEqual([r[0] for r in self.responses(transport)], [401])
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.producerState, "producing")
        before = transport.value()
        proto.dataReceived(b"x" * 65536)
        self.assertEqual(transport.value(), before)
        self.reactor.advance(LINGER + 0.1)
        self.assertTrue(transport.disconnected)

    def test_tls_keeps_reading_then_closes(self) -> None:
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        proto = self.upload(transport)
        self.assertEqual([r[0] for r in self.responses(transport)], [401])
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"x" * 65536)
        self.reactor.advance(LINGER + 0.1)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)

    def test_idle_timeout_does_not_linger(self) -> None:
        transport = HalfClosingTransport()
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(transport)
        proto.dataReceived(get())
        self.pool.conns[0].respond()
        self.reactor.advance(61)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.write_closed)


class FactoryTests(FrontCase):
    keys = {"max_connections": 2}

    def test_max_connections(self) -> None:
        self.connect()
        self.connect()
        proto, transport = self.connect()
        [(status, headers, body)] = self.responses(transport)
        self.assertEqual(status, 503)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.factory.connections), 2)
        self.assertEqual(self.metrics.sample("phantomd_client_connections"),
                         2)

    def test_drain(self) -> None:
        idle, idle_t = self.connect()
        busy, busy_t = self.connect()
        busy.dataReceived(get() + get(b"/queued"))
        d = self.factory.drain()
        self.assertTrue(idle_t.disconnecting)
        idle.connectionLost(None)
        self.assertFalse(busy_t.disconnecting)
        self.assertNoResult(d)
        self.pool.conns[0].respond()
        [(status, headers, body)] = self.responses(busy_t)
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(busy_t.disconnecting)
        self.assertEqual(len(self.pool.conns), 1)
        busy.connectionLost(None)
        self.successResultOf(d)

    def test_drain_cancelled_by_timeout_then_abort(self) -> None:
        """A caller's timeout cancels the drain; abort() drops the rest."""
        busy, busy_t = self.connect()
        busy.dataReceived(get())
        d = self.factory.drain()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.factory.abort()
        self.assertTrue(busy_t.disconnected)
        busy.connectionLost(None)
        self.assertEqual(self.factory.connections, set())
        self.assertTrue(self.pool.conns[0].aborted)

    def test_reconfigure_applies_to_new_requests(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        other = FakeGate()
        self.factory.reconfigure(gate=other,
                                 settings=settings(realm="new"))
        self.pool.conns[0].respond()
        proto.dataReceived(get(auth=b""))
        self.assertEqual(len(other.calls), 1)
        [_, (status, headers, _)] = self.responses(transport)
        self.assertEqual(headers[b"www-authenticate"], b'Bearer realm="new"')


_name = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
_value = st.binary(max_size=40)


class NoInjectionTests(FrontCase):

    @hsettings(derandomize=True, max_examples=300, deadline=None)
    @given(st.lists(st.tuples(_name, _value), max_size=8))
    def test_forwarded_headers_are_exactly_the_kept_ones(self, headers: list
                                                         ) -> None:
        """Whatever bytes a client puts in header values, the upstream head
        carries the same values and no header the client did not send."""
        self.pool.conns = []
        self.gate.calls = []
        extra = b"".join(b"X-" + n.encode() + b": " + v + b"\r\n"
                         for n, v in headers)
        proto, transport = self.connect()
        proto.dataReceived(get(extra=extra))
        reference: list = []

        class Ref:
            def on_header(s, n: bytes, v: bytes) -> None:
                reference.append((n, v))

            def on_headers_complete(s) -> None:
                raise StopIteration()  # only the first request counts
        try:
            httptools.HttpRequestParser(Ref()).feed_data(get(extra=extra))
        except httptools.HttpParserCallbackError:
            pass
        except httptools.HttpParserError:
            self.assertEqual(self.pool.conns, [])
            self.assertEqual(self.responses(transport)[0][0], 400)
            return
        seen: list = []

        class P:
            def on_header(s, n: bytes, v: bytes) -> None:
                seen.append((n, v))
        [conn] = self.pool.conns
        httptools.HttpRequestParser(P()).feed_data(conn.head)

        def client_headers(hs: list) -> list:
            return [h for h in hs if h[0].startswith(b"X-")
                    and not h[0].startswith(b"X-Forwarded")
                    and h[0].lower() != b"x-request-id"]
        self.assertEqual(client_headers(seen), client_headers(reference))


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2:]


class StreamPropertyTests(FrontCase):

    @hsettings(derandomize=True, max_examples=150, deadline=None)
    @given(body=st.binary(max_size=20000),
           chunks=st.lists(st.integers(1, 9000), max_size=6),
           cuts=st.lists(st.integers(1, 30000), max_size=8),
           hold=st.booleans(), chunked=st.booleans())
    def test_bodies_arrive_whole_and_in_order(self, body: bytes, chunks: list,
                                             cuts: list, hold: bool,
                                             chunked: bool) -> None:
        """However the body is chunked and the bytes are split into reads,
        the upstream gets exactly the body, then the next request."""
        self.pool.conns = []
        self.gate.hold = hold
        if chunked:
            framed, rest = b"", body
            for size in chunks:
                piece, rest = rest[:size], rest[size:]
                if piece:
                    framed += b"%x\r\n%s\r\n" % (len(piece), piece)
            if rest:
                framed += b"%x\r\n%s\r\n" % (len(rest), rest)
            framed += b"0\r\n\r\n"
            head = b"Transfer-Encoding: chunked\r\n"
        else:
            framed = body
            head = b"Content-Length: %d\r\n" % len(body)
        data = (b"POST /1 HTTP/1.1\r\nHost: h\r\n" + AUTH + head + b"\r\n"
                + framed + get(b"/2"))
        proto, transport = self.connect()
        at = 0
        for cut in sorted(set(cuts)) + [len(data)]:
            if cut > at:
                proto.dataReceived(data[at:cut])
                at = cut
            self.gate.release()
        self.gate.release()
        first = self.pool.conns[0]
        sent = bytes(first.body)
        self.assertEqual(_dechunk(sent) if chunked else sent, body)
        self.assertTrue(first.sent)
        first.respond()
        self.gate.release()
        self.assertEqual(len(self.pool.conns), 2)
        self.assertTrue(self.pool.conns[1].head.startswith(b"GET /2 "))


_token = st.sampled_from([
    b"GET ", b"POST ", b"HEAD ", b"/", b"/x?y", b"*", b" HTTP/1.1\r\n",
    b" HTTP/1.0\r\n", b"Host: h\r\n", AUTH, b"Authorization: Bearer x\r\n",
    b"Content-Length: 3\r\n", b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n",
    b"Connection: keep-alive\r\n", b"Expect: 100-continue\r\n",
    b"Upgrade: h2c\r\n", b"\r\n", b"3\r\nabc\r\n", b"0\r\n\r\n", b"abc",
    b"\x00", b" ", b"\n", b":", b"zz\r\n"])


class RobustnessTests(FrontCase):

    @hsettings(derandomize=True, max_examples=400, deadline=None)
    @given(st.lists(_token, max_size=40), st.lists(st.integers(0, 400),
                                                   max_size=6),
           st.booleans())
    def test_any_input_gets_wellformed_answers(self, tokens: list,
                                              cuts: list, hold: bool) -> None:
        """Whatever arrives, however split: no exception, every byte written
        parses as HTTP/1.1 responses, and upstream exchanges are only those
        the gate allowed."""
        self.pool.conns = []
        self.gate.calls = []
        self.gate.hold = hold
        data = b"".join(tokens)
        proto, transport = self.connect()
        at = 0
        for cut in sorted(set(cuts)) + [len(data)]:
            if cut > at and not transport.disconnecting:
                proto.dataReceived(data[at:cut])
                at = cut
            self.gate.release()
            for conn in self.pool.conns:
                if conn.front is not None and conn.sent:
                    conn.respond()
                    conn.front = None
        self.reactor.advance(100)
        got = self.responses(transport)
        statuses = [r[0] for r in got]
        for status in statuses:
            self.assertIn(status, (200, 400, 401, 408, 414, 431, 501, 505))
        forwarded = [c for c in self.pool.conns]
        self.assertLessEqual(len(forwarded), len(
            [c for c in self.gate.calls if c == [AUTH[15:-2]]]))
        proto.connectionLost(None)
        self.assertEqual(self.factory.connections, set())
