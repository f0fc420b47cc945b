"""What an operator meets at the front's edges: clean refusals (HTTP/2
preface, Date on every answer of phantomd's own), request ids, an access
log line for every request however it ended, and the refusal counters."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import directlyProvides

from phantomd.ops.admin import make_admin_site
from phantomd.ops.metrics import REJECT_REASONS, Metrics
from tests.helpers_http import JWT, RawClient
from tests.test_http_e2e import ProxyCase
from tests.test_http_server import AUTH, FrontCase, get

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Sun, 06 Nov 1994 08:49:37 GMT: RFC 9110's own example.
T0 = 784111777
IMF_T0 = b"Sun, 06 Nov 1994 08:49:37 GMT"
GENERATED = re.compile(rb"[0-9a-f]{32}\Z")


class EdgeCase(FrontCase):
    keys = {"max_request_line": 300, "max_header_bytes": 1024,
            "header_timeout": 5}

    def setUp(self) -> None:
        super().setUp()
        self.reactor.advance(T0)

    def answer(self, data: bytes) -> tuple:
        proto, transport = self.connect()
        proto.dataReceived(data)
        [(status, headers, body)] = self.responses(transport)
        return status, headers, body, transport

    def rejected(self, reason: str) -> float:
        return self.metrics.sample("phantomd_connections_rejected_total",
                                   {"reason": reason})


class Http2PrefaceTests(EdgeCase):

    def test_prior_knowledge_preface_gets_a_clean_505(self) -> None:
        status, headers, body, transport = self.answer(PREFACE)
        self.assertEqual(status, 505)
        self.assertEqual(json.loads(body)["error_description"],
                         "HTTP/2 is not supported: use HTTP/1.1")
        self.assertNotIn(b"Pause", transport.value())
        self.assertNotIn(b"PRI/Upgrade", transport.value())
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.gate.calls, [])
        self.assertEqual(self.pool.conns, [])
        self.assertEqual(self.rejected("unsupported"), 1)
        [entry] = self.access
        self.assertEqual((entry["method"], entry["path"], entry["status"]),
                         ("PRI", "*", 505))

    def test_preface_in_pieces(self) -> None:
        proto, transport = self.connect()
        for i in range(len(PREFACE)):
            proto.dataReceived(PREFACE[i:i + 1])
        self.assertEqual([r[0] for r in self.responses(transport)], [505])

    def test_preface_with_frames_behind_it(self) -> None:
        """A real h2 client sends its SETTINGS frame right after."""
        settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        status, _, _, _ = self.answer(PREFACE + settings_frame)
        self.assertEqual(status, 505)


class DateTests(EdgeCase):
    """Every answer phantomd makes itself carries Date, from its clock."""

    def rows(self) -> list:
        return [
            ("401 from the gate", get(auth=b""), 401),
            ("400 malformed", b"GET / HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n",
             400),
            ("400 no Host", b"GET / HTTP/1.1\r\n" + AUTH + b"\r\n", 400),
            ("414", b"GET /" + b"a" * 400 + b" HTTP/1.1\r\n\r\n", 414),
            ("431", get(extra=b"X-Big: " + b"b" * 2000 + b"\r\n"), 431),
            ("501", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
            ("505 HTTP/2 preface", PREFACE, 505),
        ]

    def test_every_own_answer_has_date(self) -> None:
        for name, data, want in self.rows():
            status, headers, _, _ = self.answer(data)
            self.assertEqual(status, want, name)
            self.assertEqual(headers.get(b"date"), IMF_T0, name)

    def test_408_has_date(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HT")
        self.reactor.advance(6)
        [(status, headers, _)] = self.responses(transport)
        self.assertEqual(status, 408)
        self.assertEqual(headers[b"date"], b"Sun, 06 Nov 1994 08:49:43 GMT")

    def test_503_at_the_connection_cap_has_date(self) -> None:
        self.factory.max_connections = 3
        for _ in range(3):
            self.connect()
        proto, transport = self.connect()
        [(status, headers, body)] = self.responses(transport)
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"date"], IMF_T0)
        self.assertEqual(headers[b"retry-after"], b"1")
        self.assertEqual(json.loads(body)["error"], "temporarily_unavailable")

    def test_date_follows_the_clock(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get(auth=b""))
        self.reactor.advance(1.5)
        proto.dataReceived(get(auth=b""))
        [(_, first, _), (_, second, _)] = self.responses(transport)
        self.assertEqual(first[b"date"], IMF_T0)
        self.assertEqual(second[b"date"], b"Sun, 06 Nov 1994 08:49:38 GMT")

    def test_upstream_answer_is_passed_as_it_is(self) -> None:
        """The API's own answer is not phantomd's: its headers are its own."""
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.pool.conns[0].respond(200, b"ok", [(b"Date", b"upstream's")])
        [(_, headers, _)] = self.responses(transport)
        self.assertEqual(headers[b"date"], b"upstream's")
        self.assertNotIn(b"x-request-id", headers)

    def test_admin_answers_have_date_from_the_clock(self) -> None:
        clock = Clock()
        clock.advance(T0)
        site = make_admin_site(clock, Metrics(), lambda: (True, "ok"))
        for path in (b"/healthz", b"/readyz", b"/metrics", b"/nowhere"):
            proto = site.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n"
                               b"Connection: close\r\n\r\n")
            [(_, headers, _)] = self.responses(transport)
            self.assertEqual(headers[b"date"], IMF_T0, path)


class RequestIdTests(EdgeCase):

    def forwarded_ids(self, extra: bytes) -> list:
        self.pool.conns = []
        proto, transport = self.connect()
        proto.dataReceived(get(extra=extra))
        [conn] = self.pool.conns
        conn.respond()
        return re.findall(rb"(?im)^x-request-id: *(.*?)\r$", conn.head)

    def test_a_good_client_id_goes_upstream_once(self) -> None:
        for value in (b"a", b"req-42", b"0" * 128, b"!~{}\"'=;,/?:@[]",
                      b"550e8400-e29b-41d4-a716-446655440000"):
            self.assertEqual(self.forwarded_ids(b"X-Request-Id: " + value
                                                 + b"\r\n"), [value])
            self.assertEqual(self.access[-1]["request_id"],
                             value.decode())

    def test_bad_client_ids_are_replaced(self) -> None:
        rows = [
            ("none", b""),
            ("empty", b"X-Request-Id: \r\n"),
            ("129 characters", b"X-Request-Id: " + b"a" * 129 + b"\r\n"),
            ("a space", b"X-Request-Id: a b\r\n"),
            ("a tab", b"X-Request-Id: a\tb\r\n"),
            ("non-ASCII", b"X-Request-Id: caf\xc3\xa9\r\n"),
            ("latin-1", b"X-Request-Id: caf\xe9\r\n"),
            ("two copies", b"X-Request-Id: a\r\nX-Request-Id: b\r\n"),
            ("two equal copies", b"X-Request-Id: a\r\nx-request-id: a\r\n"),
        ]
        seen = set()
        for name, extra in rows:
            [rid] = self.forwarded_ids(extra)
            self.assertTrue(GENERATED.match(rid), (name, rid))
            self.assertNotIn(rid, seen, name)
            seen.add(rid)
            self.assertEqual(self.access[-1]["request_id"], rid.decode(),
                             name)

    def test_control_characters_never_echo(self) -> None:
        """llhttp refuses a control character in a value: the 400 names a
        fresh id, never the client's bytes."""
        for value in (b"a\x01b", b"a\x00b", b"a\x1bb", b"a\x7fb"):
            status, headers, body, _ = self.answer(
                get(extra=b"X-Request-Id: " + value + b"\r\n"))
            self.assertEqual(status, 400)
            self.assertTrue(GENERATED.match(headers[b"x-request-id"]))
            self.assertEqual(json.loads(body)["request_id"],
                             headers[b"x-request-id"].decode())

    def test_own_answers_name_the_id_in_header_body_and_log(self) -> None:
        rows = [
            (get(auth=b"", extra=b"X-Request-Id: r-401\r\n"), 401, b"r-401"),
            (b"GET / HTTP/1.1\r\nX-Request-Id: r-400\r\n\r\n", 400, b"r-400"),
            (get(extra=b"X-Request-Id: r-431\r\nX-Big: " + b"b" * 2000
                 + b"\r\n"), 431, None),
        ]
        for data, want, rid in rows:
            status, headers, body, _ = self.answer(data)
            self.assertEqual(status, want)
            got = headers[b"x-request-id"]
            if rid is not None:
                self.assertEqual(got, rid)
            self.assertEqual(json.loads(body)["request_id"], got.decode())
            self.assertEqual(self.access[-1]["request_id"], got.decode())

    def test_framing_error_keeps_the_clients_id(self) -> None:
        status, headers, body, _ = self.answer(
            b"POST / HTTP/1.1\r\nHost: h\r\nX-Request-Id: cl-te\r\n"
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(status, 400)
        self.assertEqual(headers[b"x-request-id"], b"cl-te")
        self.assertEqual(json.loads(body)["request_id"], "cl-te")

    def test_upstream_failure_names_the_id(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get(extra=b"X-Request-Id: up-1\r\n"))
        proto.upstream_failed(502, "bad_gateway", "the API is unreachable")
        [(status, headers, body)] = self.responses(transport)
        self.assertEqual((status, headers[b"x-request-id"]), (502, b"up-1"))
        self.assertEqual(json.loads(body)["request_id"], "up-1")


class AccessLogHoleTests(EdgeCase):
    """One line per request, whoever answered it and however it ended."""

    def assertLine(self, entry: dict, method: str, status: Any, end: str
                   ) -> None:
        self.assertEqual((entry["method"], entry["status"], entry["end"]),
                         (method, status, end))
        self.assertEqual(entry["client"], "192.168.1.1")
        self.assertTrue(entry["request_id"])
        self.assertIsInstance(entry["duration"], float)

    def test_refusals_are_logged_with_the_method_read(self) -> None:
        rows = [
            (b"DELETE /" + b"a" * 400 + b" HTTP/1.1\r\n\r\n", "DELETE", 414),
            (b"PUT / HTTP/1.1\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n", "PUT",
             431),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n"
             b"Content-Length: 2\r\n\r\n", "POST", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "-",
             400),
            (b"GET /a\x01 HTTP/1.1\r\n\r\n", "GET", 400),
        ]
        for data, method, status in rows:
            got, _, _, transport = self.answer(data)
            self.assertEqual(got, status)
            self.assertLine(self.access[-1], method, status, "ok")
            self.assertEqual(self.access[-1]["bytes_sent"],
                             len(transport.value()))
        self.assertEqual(len(self.access), len(rows))

    def test_requests_behind_a_refused_one_are_never_started(self) -> None:
        """A head refused after parsing (two Host lines, a bad Host) with
        more requests behind it in the same read: one 400, then closed.
        Starting the next one on the closed connection used to raise, so
        the client got a reset instead of its 400."""
        for refused in (get(b"/a", b"Host: other.example\r\n"),
                        b"GET /a HTTP/1.1\r\nHost: a b\r\n" + AUTH + b"\r\n",
                        b"POST /a HTTP/1.0\r\nHost: h\r\n" + AUTH +
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):
            status, headers, _, transport = self.answer(
                refused + get(b"/b") + get(b"/c"))
            self.assertEqual(status, 400, refused)
            self.assertEqual(headers[b"connection"], b"close")
            self.assertTrue(transport.disconnecting)
            self.assertEqual(self.gate.calls, [], refused)
            self.assertEqual(self.pool.conns, [], refused)

    def test_408_with_nothing_read_has_no_invented_method(self) -> None:
        proto, transport = self.connect()
        self.reactor.advance(6)
        [entry] = self.access
        self.assertLine(entry, "-", 408, "ok")
        self.assertEqual(entry["path"], "-")
        self.assertEqual(self.rejected("header_timeout"), 1)

    def test_408_on_a_partial_request_line_names_its_method(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"OPTIONS /sl")
        self.reactor.advance(6)
        [entry] = self.access
        self.assertLine(entry, "OPTIONS", 408, "ok")

    def test_503_at_the_connection_cap(self) -> None:
        self.factory.max_connections = 3
        for _ in range(3):
            self.connect()
        proto, transport = self.connect()
        [entry] = self.access
        self.assertLine(entry, "-", 503, "ok")
        self.assertEqual(entry["bytes_sent"], len(transport.value()))
        self.assertEqual(self.rejected("connection_cap"), 1)
        self.assertEqual(self.metrics.sample(
            "phantomd_requests_total", {"code": "5xx"}), 1)
        # Its connectionLost changes nothing.
        proto.connectionLost(None)
        self.assertEqual(len(self.access), 1)
        self.assertEqual(self.metrics.sample("phantomd_client_connections"),
                         3)

    def test_cut_by_the_drain_while_the_gate_decides(self) -> None:
        self.gate.hold = True
        proto, transport = self.connect()
        proto.dataReceived(get(b"/slow", b"X-Request-Id: cut-1\r\n"))
        self.factory.drain()
        self.reactor.advance(30)
        self.factory.abort()
        self.assertTrue(transport.disconnected)
        proto.connectionLost(None)
        [entry] = self.access
        self.assertLine(entry, "GET", None, "drain")
        self.assertEqual((entry["path"], entry["request_id"],
                          entry["bytes_sent"], entry["duration"]),
                         ("/slow", "cut-1", 0, 30.0))
        # Nothing was answered: no status class counted.
        self.assertEqual(self.metrics.sample("phantomd_requests_total",
                                             {"code": "5xx"}), 0)

    def test_cut_by_the_drain_mid_response(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.factory.drain()
        proto.response_head(200, b"OK", [], 1, 10, 0.002)  # MODE_LENGTH
        proto.response_body(b"12345")
        proto.flush_output()
        self.factory.abort()
        proto.connectionLost(None)
        [entry] = self.access
        self.assertLine(entry, "GET", 200, "drain")
        self.assertEqual(entry["bytes_sent"], len(transport.value()))
        self.assertEqual((entry["cache"], entry["token_id"],
                          entry["upstream_duration"]),
                         ("hit", "abcdef012345", 0.002))

    def test_pipelined_requests_dropped_by_the_drain(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get(b"/1") + get(b"/2"))
        self.factory.drain()
        self.pool.conns[0].respond()
        proto.connectionLost(None)
        self.assertEqual([(e["path"], e["status"], e["end"])
                          for e in self.access],
                         [("/1", 200, "ok"), ("/2", None, "drain")])

    def test_client_gone_before_the_answer(self) -> None:
        self.gate.hold = True
        proto, transport = self.connect()
        proto.dataReceived(get())
        proto.connectionLost(None)
        [entry] = self.access
        self.assertLine(entry, "GET", None, "client_closed")

    def test_aborted_response(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        proto.response_head(200, b"OK", [], 1, 10, 0.0)
        proto.response_aborted()
        proto.connectionLost(None)
        [entry] = self.access
        self.assertLine(entry, "GET", 200, "aborted")

    def test_a_request_after_a_cut_one_does_not_inherit_its_status(self
                                                                  ) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.pool.conns[0].respond(201)
        self.gate.hold = True
        proto.dataReceived(get())
        proto.connectionLost(None)
        self.assertEqual([(e["status"], e["end"]) for e in self.access],
                         [(201, "ok"), (None, "client_closed")])

    def test_the_token_digest_never_the_token(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get(auth=b"Authorization: Bearer nope\r\n"))
        [entry] = self.access
        self.assertEqual(entry["token_id"], "0123456789ab")
        self.assertNotIn("nope", repr(entry))


class RejectedMetricTests(EdgeCase):

    def test_every_reason_is_exported_from_the_start(self) -> None:
        for reason in REJECT_REASONS:
            self.assertEqual(self.metrics.registry.get_sample_value(
                "phantomd_connections_rejected_total", {"reason": reason}),
                0.0, reason)

    def test_reasons(self) -> None:
        rows = [
            (b"GET /" + b"a" * 400 + b" HTTP/1.1\r\n\r\n", "head_too_large"),
            (get(extra=b"X-Big: " + b"b" * 2000 + b"\r\n"), "head_too_large"),
            (b"GET / HTTP/1.1\r\n\r\n", "bad_request"),
            (b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
             b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "bad_request"),
            (PREFACE, "unsupported"),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", "unsupported"),
        ]
        for data, reason in rows:
            before = self.rejected(reason)
            proto, transport = self.connect()
            proto.dataReceived(data)
            self.assertTrue(transport.disconnecting, data)
            self.assertEqual(self.rejected(reason), before + 1, data)
            proto.connectionLost(None)

    def test_gate_rejections_are_not_connection_refusals(self) -> None:
        self.answer(get(auth=b""))
        self.answer(get(auth=b"Authorization: Bearer nope\r\n"))
        for reason in REJECT_REASONS:
            self.assertEqual(self.rejected(reason), 0, reason)

    def test_body_timeout(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\n" + AUTH +
                           b"Content-Length: 100\r\n\r\n")
        self.reactor.advance(6)
        self.assertEqual([r[0] for r in self.responses(transport)], [408])
        self.assertEqual(self.rejected("body_timeout"), 1)
        self.assertEqual(self.rejected("header_timeout"), 0)

    def test_tls_connection_without_a_handshake(self) -> None:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        proto.makeConnection(transport)
        self.reactor.advance(6)
        self.assertEqual(self.rejected("header_timeout"), 1)


class LoopbackTests(ProxyCase):
    """The same over real sockets, through the real upstream pool."""

    @defer.inlineCallbacks
    def test_preface_over_a_socket(self) -> Any:
        client, [resp] = yield self.exchange(PREFACE)
        self.assertEqual(resp.status, 505)
        self.assertTrue(client.closed)
        self.assertNotIn(b"Pause", bytes(client.raw))
        self.assertEqual(self.api.requests, [])

    @defer.inlineCallbacks
    def test_request_id_reaches_the_api_once(self) -> Any:
        _, [resp] = yield self.exchange(
            get(b"/x", b"X-Request-Id: e2e-1\r\nX-Request-Id: e2e-2\r\n"),
            expect=1)
        _, [resp2] = yield self.exchange(
            get(b"/y", b"X-Request-Id: e2e-3\r\n"), expect=1)
        self.assertEqual((resp.status, resp2.status), (200, 200))
        first, second = self.api.requests
        [generated] = first.header(b"x-request-id")
        self.assertTrue(GENERATED.match(generated))
        self.assertEqual(second.header(b"x-request-id"), [b"e2e-3"])
        self.assertEqual([e["request_id"] for e in self.access],
                         [generated.decode(), "e2e-3"])
        self.assertEqual(second.header(b"authorization"),
                         [b"Bearer " + JWT.encode()])


class GeneratedIdTests(unittest.SynchronousTestCase):

    def test_unique_across_batches(self) -> None:
        from phantomd.http.requestid import RequestIds
        ids = RequestIds()
        made = [ids() for _ in range(1000)]
        self.assertEqual(len(set(made)), 1000)
        for rid in made:
            self.assertTrue(GENERATED.match(rid), rid)

    def test_a_forked_child_does_not_repeat_the_parents_ids(self) -> None:
        import os
        from phantomd.http.requestid import RequestIds
        ids = RequestIds()
        ids()  # a batch is held now
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                os.write(w, ids())
            finally:
                os._exit(0)
        os.close(w)
        child = os.read(r, 64)
        os.close(r)
        os.waitpid(pid, 0)
        self.assertEqual(len(child), 32)
        self.assertNotEqual(child, ids())


class LoopbackLimitTests(ProxyCase):
    front_keys = {"max_connections": 1}

    @defer.inlineCallbacks
    def test_503_at_the_cap_and_a_drain_cut_over_sockets(self) -> Any:
        self.gate.hold = True
        first = RawClient()
        yield self.connect(first)
        first.transport.write(get(b"/held", b"X-Request-Id: held-1\r\n"))
        while not self.gate.pending:
            yield task.deferLater(reactor, 0.01, lambda: None)
        second, [resp] = yield self.exchange(get())
        self.assertEqual(resp.status, 503)
        headers = dict((n.lower(), v) for n, v in resp.headers)
        self.assertIn(b"date", headers)
        self.assertTrue(GENERATED.match(headers[b"x-request-id"]))
        self.assertEqual(self.metrics.sample(
            "phantomd_connections_rejected_total",
            {"reason": "connection_cap"}), 1)
        self.assertEqual(self.metrics.sample("phantomd_client_connections"),
                         1)
        # Shutdown: the held request outlives drain_timeout and is cut.
        drained = self.front.drain()
        drained.addTimeout(0.05, reactor)
        drained.addErrback(lambda _: self.front.abort())
        yield first.done
        while len(self.access) < 2:
            yield task.deferLater(reactor, 0.01, lambda: None)
        cap, cut = self.access
        self.assertEqual((cap["method"], cap["status"], cap["end"],
                          cap["client"]), ("-", 503, "ok", "127.0.0.1"))
        self.assertEqual((cut["method"], cut["path"], cut["status"],
                          cut["end"], cut["request_id"]),
                         ("GET", "/held", None, "drain", "held-1"))


class CurlTests(ProxyCase):
    """What curl users see."""

    def setUp(self) -> None:
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl is not installed (apt-get install "
                                    "curl)")
        super().setUp()

    def curl(self, *args: str) -> defer.Deferred:
        url = "http://127.0.0.1:%d/c" % self.port.getHost().port
        return threads.deferToThread(
            subprocess.run, ["curl", "-sS", "-i", "-m", "10", *args, url],
            capture_output=True)

    @defer.inlineCallbacks
    def test_own_answer_headers(self) -> Any:
        done = yield self.curl("-H", "X-Request-Id: curl-1")
        self.assertEqual(done.returncode, 0, done.stderr)
        head = done.stdout.split(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 401"), head)
        self.assertIn(b"\r\nX-Request-Id: curl-1\r\n", head)
        self.assertRegex(head, rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} "
                               rb"\d\d:\d\d:\d\d GMT\r\n")

    @defer.inlineCallbacks
    def test_http2_prior_knowledge_is_refused_not_hung(self) -> Any:
        done = yield self.curl("--http2-prior-knowledge")
        self.assertNotEqual(done.returncode, 0)
        self.assertNotIn(b"Pause", done.stdout + done.stderr)
        [entry] = self.access
        self.assertEqual((entry["method"], entry["path"], entry["status"]),
                         ("PRI", "*", 505))
        self.assertEqual(self.api.requests, [])
