"""phantomd.http.client: parsing rows over StringTransport (a memory
reactor stands in for the network), then pooling and TLS over real
loopback sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from phantomd.http import tls
from phantomd.http.client import (AnswerTooLarge, BodyFailed,
                                  BodyTooLarge, HTTPClient, MalformedAnswer,
                                  encode_headers)
from tests.helpers_http import listen_loopback
from tests.test_tls import PKI

URL = "http://127.0.0.1:8080/introspect?x=1"


class MemoryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = HTTPClient(self.reactor, None, connect_timeout=7,
                                 max_idle=2, idle_timeout=4,
                                 max_answer_bytes=4096)

    def start(self, method: str = "POST", url: str = URL,
              **kwargs: Any) -> tuple[defer.Deferred, Any, StringTransport]:
        """A fetch on a new connection: its Deferred, the connection and
        its transport (what the client wrote is in ``value()``)."""
        kwargs.setdefault("data", b"token=x" if method == "POST" else None)
        connecting = len(self.reactor.tcpClients)
        d = self.client.fetch(method, url, **kwargs)
        self.assertEqual(len(self.reactor.tcpClients), connecting + 1,
                         "a pooled connection was used")
        factory = self.reactor.tcpClients[-1][2]
        conn = factory.buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        return d, conn, transport

    def drain(self) -> None:
        """Forget the pooled connections, so the next request connects."""
        self.client.pool.close()
        self.client.pool.closed = False

    def answer(self, pieces: list, lose: Any = None, max_body: int = 10,
               method: str = "POST") -> tuple[Any, Any, StringTransport]:
        """Answer a fetch on a new connection with ``pieces`` (then lose
        the connection with ``lose``); its result (an Answer or a
        Failure), the connection, the transport.  Nothing may fire before
        the last piece."""
        self.drain()
        d, conn, transport = self.start(method, max_body=max_body)
        results: list = []
        d.addBoth(results.append)
        for piece in pieces:
            self.assertEqual(results, [], "fired before the answer ended")
            conn.dataReceived(piece)
        if lose is not None:
            conn.connectionLost(Failure(lose))
        [result] = results
        return result, conn, transport

    # -- the request --------------------------------------------------------

    def test_request_bytes(self) -> None:
        _, _, transport = self.start(
            headers={b"Accept": [b"application/jwt"], "X-Two": ["a", "b"]})
        self.assertEqual(transport.value(),
                         b"POST /introspect?x=1 HTTP/1.1\r\n"
                         b"Host: 127.0.0.1:8080\r\n"
                         b"Accept: application/jwt\r\n"
                         b"X-Two: a\r\nX-Two: b\r\n"
                         b"Content-Length: 7\r\n\r\ntoken=x")
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.1", 8080))
        self.assertEqual(self.reactor.tcpClients[-1][3], 7)  # connect timeout

    def test_encoded_headers_same_bytes(self) -> None:
        headers = {b"Accept": [b"application/jwt"], "X-Two": ["a", "b"]}
        _, _, plain = self.start(headers=headers)
        _, _, encoded = self.start(headers=encode_headers(headers))
        self.assertEqual(encoded.value(), plain.value())
        for bad in ({b"Host": [b"x"]}, {b"X-Split": [b"a\r\nb: c"]},
                    {b"bad name": [b"v"]}):
            self.assertRaises(ValueError, encode_headers, bad)

    def test_get_default_port(self) -> None:
        _, _, transport = self.start("GET", "http://127.0.0.1/keys")
        self.assertEqual(transport.value(), b"GET /keys HTTP/1.1\r\n"
                         b"Host: 127.0.0.1\r\n\r\n")

    def test_ipv6_literal(self) -> None:
        _, _, transport = self.start("GET", "http://[::1]:8080/k")
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("::1", 8080))
        self.assertEqual(transport.value(), b"GET /k HTTP/1.1\r\n"
                         b"Host: [::1]:8080\r\n\r\n")

    def test_refused_requests(self) -> None:
        for url, headers in [
                ("ftp://127.0.0.1/x", None),
                ("http:///x", None),
                ("http://127.0.0.1/a b", None),
                ("http://127.0.0.1/a\r\nX: 1", None),
                (URL, {b"X-Evil": [b"a\r\nInjected: 1"]}),
                (URL, {b"Bad\nName": [b"a"]}),
                (URL, {b"Host": [b"elsewhere"]}),
                (URL, {b"Content-Length": [b"1"]})]:
            d = self.client.fetch("POST", url, data=b"", headers=headers)
            self.failureResultOf(d)
        self.assertEqual(self.reactor.tcpClients, [])

    # -- answers, row by row --------------------------------------------------

    ROWS = [
        # name, pieces, lost with, (code, headers subset, body) or the
        # failure, connection pooled afterwards
        ("content-length",
         [b"HTTP/1.1 200 OK\r\nContent-Type: application/jwt\r\n"
          b"X-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n\r\nab", b"c"], None,
         (200, {"content-type": ["application/jwt"], "x-a": ["1", "2"]},
          b"abc"), True),
        ("content-length, byte by byte",
         [bytes([c]) for c in
          b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"],
         None, (200, {}, b"abc"), True),
        ("chunked",
         [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
          b"2\r\nab\r\n", b"1\r\nc\r\n0\r\n\r\n"],
         None, (200, {}, b"abc"), True),
        ("close-delimited",
         [b"HTTP/1.1 200 OK\r\n\r\nab", b"c"],
         ConnectionDone(), (200, {}, b"abc"), False),
        ("close-delimited, reset",
         [b"HTTP/1.1 200 OK\r\n\r\nab", b"c"],
         ConnectionLost(), BodyFailed, False),
        ("content-length cut short",
         [b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"],
         ConnectionDone(), BodyFailed, False),
        ("chunked cut short",
         [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc"],
         ConnectionDone(), BodyFailed, False),
        ("garbled chunk",
         [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
         None, BodyFailed, False),
        ("interim 100 skipped",
         [b"HTTP/1.1 100 Continue\r\n\r\n",
          b"HTTP/1.1 204 No Content\r\n\r\n"],
         None, (204, {}, b""), True),
        ("304 has no body",
         [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"],
         None, (304, {}, b""), True),
        ("redirect is an answer",
         [b"HTTP/1.1 302 Found\r\nLocation: http://evil/\r\n"
          b"Content-Length: 0\r\n\r\n"],
         None, (302, {"location": ["http://evil/"]}, b""), True),
        ("connection: close",
         [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n"
          b"\r\nx"],
         None, (200, {}, b"x"), False),
        ("HTTP/1.0",
         [b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"],
         None, (200, {}, b"x"), False),
        ("an extra answer nobody asked for",
         [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
          b"HTTP/1.1 200 OK\r\n"],
         None, (200, {}, b"x"), False),
        ("other status: body not kept",
         [b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nfail"],
         None, (500, {}, b""), True),
        ("other status: long body given up",
         [b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 99\r\n"
          b"\r\n" + b"x" * 11],
         None, (503, {"retry-after": ["7"]}, b""), False),
        ("kept body too large",
         [b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + b"x" * 11],
         None, BodyTooLarge, False),
        ("no head", [], ConnectionDone(), ResponseNeverReceived, False),
        ("garbled head", [b"SMTP ready\r\n"], None, ResponseFailed, False),
    ]

    def test_rows(self) -> None:
        for name, pieces, lose, expected, pooled in self.ROWS:
            result, _, transport = self.answer(pieces, lose)
            if isinstance(expected, tuple):
                code, headers, body = expected
                self.assertFalse(isinstance(result, Failure), (name, result))
                self.assertEqual((result.code, result.body), (code, body),
                                 name)
                for key, values in headers.items():
                    self.assertEqual(result.headers[key], values, name)
            else:
                self.assertIsInstance(result, Failure, name)
                self.assertTrue(result.check(expected), (name, result))
            self.assertEqual(self.client.pool.idle_count(), int(pooled),
                             name)
            if lose is None:  # else the server closed it
                self.assertEqual(transport.disconnecting, not pooled, name)

    def test_every_header_value_kept(self) -> None:
        answer, _, _ = self.answer([
            b"HTTP/1.1 200 OK\r\nContent-Type: application/jwt\r\n"
            b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: 2\r\n"
            b"\r\nok"])
        self.assertEqual(answer.headers["set-cookie"], ["a=1", "b=2"])
        self.assertEqual(answer.headers["content-type"], ["application/jwt"])
        self.assertEqual(answer.headers["content-length"], ["2"])

    def test_head_has_no_body(self) -> None:
        answer, _, transport = self.answer(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], method="HEAD")
        self.assertEqual((answer.code, answer.body), (200, b""))
        self.assertTrue(transport.disconnecting)  # llhttp would wait

    def test_garbled_answers_fail(self) -> None:
        for pieces in ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"],
                       [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"],
                       [b"SMTP ready\r\n"],
                       [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
                        b"Content-Length: 2\r\n\r\n"]):
            failure, _, transport = self.answer(pieces)
            self.assertIsInstance(failure, Failure)
            self.assertTrue(failure.check(ResponseFailed), failure)
            [inner] = failure.value.reasons
            self.assertTrue(inner.check(MalformedAnswer), inner)
            self.assertTrue(transport.disconnecting)

    def test_too_large_says_the_bound(self) -> None:
        failure, _, _ = self.answer([b"HTTP/1.1 200 OK\r\nContent-Length: 11"
                                     b"\r\n\r\n" + b"x" * 11])
        self.assertEqual((failure.value.code, failure.value.max_body),
                         (200, 10))

    # -- bounds on the wire --------------------------------------------------

    def test_endless_head_cut_off(self) -> None:
        d, conn, transport = self.start()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        sent = 0
        while not transport.disconnecting:
            conn.dataReceived(b"X-Many: header\r\n" * 16)
            sent += 1
            self.assertLess(sent, 100)
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(failure.value.reasons[0].check(AnswerTooLarge))
        self.assertIn("4096 bytes", str(failure.value.reasons[0].value))

    def test_endless_header_line_cut_off(self) -> None:
        d, conn, transport = self.start()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Long: ")
        while not transport.disconnecting:
            conn.dataReceived(b"a" * 1000)
        self.failureResultOf(d, ResponseFailed)

    def test_body_past_the_bound(self) -> None:
        failure, _, transport = self.answer([
            b"HTTP/1.1 200 OK\r\nContent-Length: 9000\r\n\r\n" + b"a" * 4000,
            b"a" * 4000], max_body=65536)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(failure.check(BodyFailed))
        self.assertTrue(failure.value.reason.check(AnswerTooLarge))

    def test_bound_counts_each_answer(self) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + \
            b"a" * 3000
        first, conn, _ = self.answer([answer], max_body=65536)
        self.assertEqual(first.body, b"a" * 3000)
        d = self.client.fetch("POST", URL, data=b"t", max_body=65536)
        conn.dataReceived(answer)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # reused

    # -- cancelling ----------------------------------------------------------

    def test_cancel_while_connecting(self) -> None:
        d = self.client.fetch("POST", URL, data=b"t")
        connector = self.reactor.connectors[-1]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(connector.stoppedConnecting)

    def test_cancel_drops_the_connection(self) -> None:
        for arrived, rest in [
                (b"", b"HTTP/1.1 204 No Content\r\n\r\n"),
                (b"HTTP/1.1 200 OK\r\n", b"Content-Length: 0\r\n\r\n"),
                (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", b"cd")]:
            self.drain()
            d, conn, transport = self.start()
            if arrived:
                conn.dataReceived(arrived)
            d.cancel()
            self.failureResultOf(d, CancelledError)
            self.assertTrue(transport.disconnecting, arrived)
            conn.dataReceived(rest)
            self.assertEqual(self.client.pool.idle_count(), 0, arrived)

    def test_request_cancelled_never_calls_done(self) -> None:
        got: list = []
        call = self.client.request(b"POST", URL, b"t", None, 100, (200,),
                                   got.append)
        conn = self.reactor.tcpClients[-1][2].buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        call.cancel()
        self.assertTrue(transport.disconnecting)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(got, [])
        self.assertEqual(self.client.pool.idle_count(), 0)

    def test_request_refused_at_once_gives_no_handle(self) -> None:
        got: list = []
        self.assertIsNone(self.client.request(
            b"POST", "ftp://127.0.0.1/x", b"t", None, 100, (200,),
            got.append))
        [f] = got
        self.assertIsInstance(f, Failure)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_request_answer_delivered_once(self) -> None:
        got: list = []
        self.client.request(b"POST", URL, b"t", None, 100, (200,),
                            got.append)
        conn = self.reactor.tcpClients[-1][2].buildProtocol(None)
        conn.makeConnection(StringTransport())
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.connectionLost(Failure(ConnectionDone()))
        [answer] = got
        self.assertEqual((answer.code, answer.body), (200, b"ok"))

    # -- the pool -------------------------------------------------------------

    def test_reuse_and_no_cookies(self) -> None:
        _, conn, transport = self.answer([
            b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1\r\nContent-Length: 0\r\n\r\n"])
        transport.clear()
        d = self.client.fetch("POST", URL, data=b"t")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertNotIn(b"cookie", transport.value().lower())
        conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 204)

    def test_idle_connections_bounded(self) -> None:
        started = [self.start() for _ in range(3)]
        for d, conn, _ in started:
            conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
            self.successResultOf(d)
        self.assertEqual(self.client.pool.idle_count(), 2)
        self.assertEqual([t.disconnecting for _, _, t in started],
                         [False, False, True])

    def test_idle_connections_expire(self) -> None:
        _, conn, transport = self.answer(
            [b"HTTP/1.1 204 No Content\r\n\r\n"])
        self.reactor.advance(3)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.pool.idle_count(), 0)

    def test_idle_age_counts_from_the_last_exchange(self) -> None:
        _, conn, transport = self.answer(
            [b"HTTP/1.1 204 No Content\r\n\r\n"])
        self.reactor.advance(3)
        d = self.client.fetch("POST", URL, data=b"t")  # reused at 3 s
        conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(d)
        self.reactor.advance(2)  # 5 s after the first, 2 s idle
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.client.pool.idle_count(), 1)
        self.reactor.advance(2)  # 4 s idle
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.pool.idle_count(), 0)

    def test_idle_connection_expired_when_picked(self) -> None:
        _, conn, transport = self.answer(
            [b"HTTP/1.1 204 No Content\r\n\r\n"])
        self.reactor.rightNow += 5  # the timer has not run yet
        self.client.fetch("POST", URL, data=b"t")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_unasked_bytes_on_idle_connection(self) -> None:
        _, conn, transport = self.answer(
            [b"HTTP/1.1 204 No Content\r\n\r\n"])
        conn.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        # Out of the pool before its connectionLost (a turn later): an
        # introspection meanwhile gets a new connection, not this one.
        self.assertEqual(self.client.pool.idle_count(), 0)
        clients = len(self.reactor.tcpClients)
        self.client.fetch("POST", URL, data=b"t")
        self.assertEqual(len(self.reactor.tcpClients), clients + 1)
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.pool.idle_count(), 0)

    def test_close(self) -> None:
        first, idle, idle_transport = self.start()
        d, busy, busy_transport = self.start()
        idle.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(first)
        closed = self.client.close()
        self.assertTrue(idle_transport.disconnecting)
        self.assertNoResult(closed)
        idle.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
        busy.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 204)
        self.assertTrue(busy_transport.disconnecting)
        self.assertEqual(self.client.pool.idle_count(), 0)


class Counting(protocol.Factory):
    """A raw HTTP/1.1 server: answers every request with 200 and a body;
    counts connections."""

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.connections += 1
        return Answering()


class Answering(protocol.Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            self.buffer = self.buffer[length:]
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                 b"\r\nhello")


class LoopbackTests(unittest.TestCase):
    def client(self, policy: Any = None) -> HTTPClient:
        client = HTTPClient(reactor, policy, connect_timeout=5, max_idle=4,
                            idle_timeout=4, max_answer_bytes=65536)
        self.addCleanup(client.close)
        return client

    def listen(self, factory: Any, tls_options: Any = None) -> int:
        return listen_loopback(self, reactor, factory, tls_options)

    @defer.inlineCallbacks
    def post(self, client: HTTPClient, url: str) -> Any:
        answer = yield client.fetch("POST", url, data=b"token=x")
        return answer.code, answer.body

    @defer.inlineCallbacks
    def test_sequential_requests_share_a_connection(self):
        factory = Counting()
        url = "http://127.0.0.1:%d/introspect" % self.listen(factory)
        client = self.client()
        for _ in range(3):
            result = yield self.post(client, url)
            self.assertEqual(result, (200, b"hello"))
        self.assertEqual(factory.connections, 1)
        self.assertEqual(client.pool.idle_count(), 1)
        yield client.close()
        self.assertEqual(client.pool.idle_count(), 0)

    @defer.inlineCallbacks
    def test_concurrent_requests_and_no_delay(self):
        factory = Counting()
        url = "http://127.0.0.1:%d/" % self.listen(factory)
        client = self.client()
        results = yield defer.gatherResults(
            [self.post(client, url) for _ in range(3)])
        self.assertEqual(results, [(200, b"hello")] * 3)
        self.assertEqual(client.pool.idle_count(), 3)
        conn = client.pool.take(("http", "127.0.0.1", int(url.split(":")[2]
                                                           .strip("/"))))
        self.assertTrue(conn.transport.getTcpNoDelay())
        conn.close()

    @defer.inlineCallbacks
    def test_tls_verified_with_client_certificate(self):
        pki = PKI(self.mktemp())
        cert, key, _ = pki.issue("token-service", dns=("localhost",))
        port = self.listen(Counting(), pki.server_options(cert, key, True))
        ccert, ckey, _ = pki.issue("gateway_client", client=True)
        client = self.client(tls.ClientPolicy(pki.ca_file, ccert, ckey))
        url = "https://localhost:%d/introspect" % port
        result = yield self.post(client, url)
        self.assertEqual(result, (200, b"hello"))
        result = yield self.post(client, url)
        self.assertEqual(client.pool.idle_count(), 1)

    @defer.inlineCallbacks
    def test_tls_wrong_name_refused(self):
        pki = PKI(self.mktemp())
        cert, key, _ = pki.issue("token-service", dns=("elsewhere.example",))
        port = self.listen(Counting(), pki.server_options(cert, key, False))
        client = self.client(tls.ClientPolicy(pki.ca_file))
        with self.assertRaises(ResponseNeverReceived):
            yield client.fetch("POST", "https://localhost:%d/" % port,
                               data=b"x")
        self.assertEqual(client.pool.idle_count(), 0)

    @defer.inlineCallbacks
    def test_connection_refused(self):
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        with self.assertRaises(Exception):
            yield self.client().fetch("GET", "http://127.0.0.1:%d/" % number)
