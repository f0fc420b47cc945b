"""What goes upstream, as pure functions: no protocol, no socket."""

from twisted.trial import unittest

from phantomd.http import forwarding as fw


def sort(*lines):
    return fw.sort_headers(list(lines))


class SortHeadersTests(unittest.TestCase):
    def test_kept_and_used_lines(self) -> None:
        h = sort((b"Host", b"api"), (b"Authorization", b"Bearer a"),
                 (b"authorization", b"Bearer b"), (b"Accept", b"*/*"),
                 (b"Content-Length", b"5"), (b"DPoP", b"proof"),
                 (b"X-Forwarded-For", b"1.2.3.4"), (b"Upgrade", b"h2c"),
                 (b"X-Real-IP", b"1.1.1.1"), (b"X_Forwarded_For", b"6.6.6.6"))
        self.assertEqual(h.kept, [(b"Accept", b"*/*")])
        self.assertEqual(h.auth, [b"Bearer a", b"Bearer b"])
        self.assertEqual((h.host, h.hosts, h.length), (b"api", 1, b"5"))
        self.assertEqual(h.proofs, [(b"DPoP", b"proof")])
        self.assertEqual(h.fwd, [(b"X-Forwarded-For", b"1.2.3.4")])

    def test_every_transfer_encoding_line_counts(self) -> None:
        h = sort((b"Transfer-Encoding", b"gzip"),
                 (b"Transfer-Encoding", b"chunked"))
        self.assertEqual(h.te, b"gzip,chunked")
        self.assertEqual(fw.head_problem(b"POST", "1.1", sort(
            (b"Host", b"a"), (b"Transfer-Encoding", b"gzip"),
            (b"Transfer-Encoding", b"chunked")))[0], 501)

    def test_connection_named_lines_dropped(self) -> None:
        h = sort((b"Connection", b"close, X-Secret"), (b"X_Secret", b"1"),
                 (b"X-Secret", b"2"), (b"X-Other", b"3"))
        self.assertEqual(h.kept, [(b"X-Other", b"3")])

    def test_what_proxies_report_is_set_apart(self) -> None:
        """Only a trusted proxy's are forwarded (``forwarded_lines``), so
        they must never land in ``kept``: any X-Forwarded-* spelling, and
        the client-address and original-URL headers frameworks read."""
        reported = [(b"X-Forwarded-Port", b"1"), (b"x_forwarded_prefix", b"/p"),
                    (b"X-Forwarded-Uri", b"/u"), (b"X-Original-URL", b"/o"),
                    (b"X_Rewrite_Url", b"/r"), (b"True-Client-IP", b"6"),
                    (b"X-Client-IP", b"6"), (b"CF-Connecting-IP", b"6"),
                    (b"Fastly-Client-IP", b"6")]
        h = sort((b"Accept", b"*/*"), (b"X-Forwarded-For", b"1.2.3.4"),
                 (b"X-Forwardedness", b"kept"), (b"Client-IP-Hint", b"k"),
                 *reported)
        self.assertEqual(h.kept, [(b"Accept", b"*/*"),
                                  (b"X-Forwardedness", b"kept"),
                                  (b"Client-IP-Hint", b"k")])
        self.assertEqual(h.fwd, [(b"X-Forwarded-For", b"1.2.3.4")] + reported)

    def test_host_loses_trailing_whitespace(self) -> None:
        self.assertEqual(sort((b"Host", b"api:80 \t")).host, b"api:80")

    def test_request_id(self) -> None:
        self.assertEqual(sort((b"X-Request-Id", b"abc")).rid, b"abc")
        for lines in ([], [(b"X-Request-Id", b"a"), (b"X-Request-Id", b"b")],
                      [(b"X-Request-Id", b"has space")]):
            rid = fw.sort_headers(lines).rid
            self.assertEqual(len(rid), 32, lines)
        self.assertNotEqual(sort().rid, sort().rid)


class HeadProblemTests(unittest.TestCase):
    def test_rows(self) -> None:
        host = (b"Host", b"a")
        rows = [
            (b"GET", "1.1", [host], None),
            (b"GET", "1.0", [], None),
            (b"GET", "1.1", [], 400),
            (b"GET", "1.1", [host, host], 400),
            (b"GET", "0.9", [host], 400),
            (b"GET", "2.0", [host], 505),
            (b"CONNECT", "1.1", [host], 501),
            (b"POST", "1.1", [host, (b"Transfer-Encoding", b" Chunked ")],
             None),
            # RFC 9112 section 6.1: TE in HTTP/1.0 is faulty framing.
            (b"POST", "1.0", [host, (b"Transfer-Encoding", b"chunked")], 400),
            (b"POST", "1.0", [host, (b"Transfer-Encoding", b"gzip")], 400),
        ]
        # A Host phantomd would vouch for in X-Forwarded-Host, or a 400.
        for value, status in ((b"api.example", None), (b"api:8443", None),
                              (b"api:", None), (b"10.1.2.3", None),
                              (b"[2001:db8::1]:80", None), (b"my_host", None),
                              (b"a, b", 400), (b"a,b", 400), (b"a@b", 400),
                              (b"a/b", 400), (b"a?b", 400), (b"a#b", 400),
                              (b"", 400), (b"a b", 400), (b"a:1:2", 400),
                              (b"a:123456", 400), (b"[::1", 400),
                              (b"a%2fb", 400), (b"\xff", 400)):
            rows.append((b"GET", "1.1", [(b"Host", value)], status))
            rows.append((b"GET", "1.0", [(b"Host", value)], status))
        for method, version, lines, status in rows:
            problem = fw.head_problem(method, version, fw.sort_headers(lines))
            self.assertEqual(problem and problem[0], status,
                             (method, version, lines))


class TargetTests(unittest.TestCase):
    def test_rows(self) -> None:
        rows = [
            (b"GET", b"/a?b", b"/a?b"),
            (b"OPTIONS", b"*", b"*"),
            (b"GET", b"*", None),
            (b"GET", b"http://h/p?q", b"/p?q"),
            (b"GET", b"HTTPS://h:8443?q", b"/?q"),
            (b"GET", b"http://h", b"/"),
            # RFC 9112 section 3.2.4: an OPTIONS of no path is of "*".
            (b"OPTIONS", b"http://h", b"*"),
            (b"OPTIONS", b"http://h:80?q", b"/?q"),
            (b"OPTIONS", b"http://h/", b"/"),
            # A fragment ends the authority (RFC 3986 section 3.2): /, not
            # /public; refused rather than guessed.
            (b"GET", b"http://h#/public", None),
            (b"GET", b"http://h/a#x", None),
            (b"GET", b"ftp://h/p", None),
            (b"GET", b"p", None),
        ]
        for method, url, target in rows:
            self.assertEqual(fw.target_of(method, url), target, url)

    def test_upstream_target(self) -> None:
        self.assertEqual(fw.upstream_target(b"", b"/a"), b"/a")
        self.assertEqual(fw.upstream_target(b"/base", b"/a"), b"/base/a")
        self.assertEqual(fw.upstream_target(b"/base", b"*"), b"/base")

    def test_canonical_length(self) -> None:
        self.assertEqual(fw.canonical_length(b"0005"), b"5")


class ForwardedTests(unittest.TestCase):
    def test_own(self) -> None:
        own = fw.own_forwarded("10.0.0.1", tls=True)
        self.assertEqual(own, b"X-Forwarded-For: 10.0.0.1\r\n"
                              b"X-Forwarded-Proto: https\r\n")
        self.assertEqual(fw.own_forwarded(None, tls=False),
                         b"X-Forwarded-Proto: http\r\n")

    def test_an_untrusted_peers_lines_are_not_believed(self) -> None:
        own = fw.own_forwarded("10.0.0.1", tls=False)
        lines = fw.forwarded_lines([(b"X-Forwarded-For", b"6.6.6.6")], False,
                                   "10.0.0.1", False, b"api", own)
        self.assertEqual(lines, own + b"X-Forwarded-Host: api\r\n")

    def test_what_an_untrusted_peer_reports_is_dropped(self) -> None:
        own = fw.own_forwarded("10.0.0.1", tls=False)
        h = sort((b"X-Forwarded-Prefix", b"/evil"),
                 (b"X-Original-URL", b"/admin"))
        self.assertEqual(fw.forwarded_lines(h.fwd, False, "10.0.0.1", False,
                                            b"api", own),
                         own + b"X-Forwarded-Host: api\r\n")

    def test_what_a_trusted_proxy_reports_goes_on(self) -> None:
        """As the proxy wrote it, after phantomd's own three; a route's
        claim header names are never taken from it."""
        h = sort((b"X-Forwarded-Prefix", b"/app"),
                 (b"X-Forwarded-For", b"1.2.3.4"),
                 (b"X-Forwarded-User", b"mallory"),
                 (b"X_Forwarded_User", b"mallory"),
                 (b"True-Client-IP", b"1.2.3.4"))
        lines = fw.forwarded_lines(h.fwd, True, "10.0.0.1", True, b"api",
                                   b"unused", frozenset((b"x-forwarded-user",)))
        self.assertEqual(lines, b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\n"
                                b"X-Forwarded-Proto: https\r\n"
                                b"X-Forwarded-Host: api\r\n"
                                b"X-Forwarded-Prefix: /app\r\n"
                                b"True-Client-IP: 1.2.3.4\r\n")

    def test_a_trusted_proxys_lines_are_extended(self) -> None:
        lines = fw.forwarded_lines([(b"X-Forwarded-For", b"1.2.3.4")], True,
                                   "10.0.0.1", False, b"api", b"unused")
        self.assertIn(b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\n", lines)


class UpstreamHeadTests(unittest.TestCase):
    def test_head(self) -> None:
        head = fw.upstream_head(
            b"POST", b"/x", b"api:8080", b"j.w.t", b"rid1",
            [(b"Accept", b"*/*"), (b"X-Drop", b"1")],
            frozenset((b"x-drop",)), [(b"X-User", b"alice")],
            b"X-Forwarded-Proto: http\r\n", False, b"3")
        self.assertEqual(head, b"POST /x HTTP/1.1\r\nHost: api:8080\r\n"
                               b"Authorization: Bearer j.w.t\r\n"
                               b"X-Request-Id: rid1\r\nAccept: */*\r\n"
                               b"X-User: alice\r\n"
                               b"X-Forwarded-Proto: http\r\n"
                               b"Content-Length: 3\r\n\r\n")

    def test_no_token_and_chunked(self) -> None:
        head = fw.upstream_head(b"PUT", b"/", b"a", None, b"r", [], None, (),
                                b"", True, None)
        self.assertNotIn(b"Authorization", head)
        self.assertTrue(head.endswith(b"Transfer-Encoding: chunked\r\n\r\n"))

    def test_a_websocket_upgrade_gets_exactly_its_two_lines(self) -> None:
        """DESIGN section 13: the client's own Connection/Upgrade lines
        were dropped by sort_headers; the upstream gets these two."""
        sorted_ = fw.sort_headers([
            (b"Host", b"h"), (b"Connection", b"keep-alive, Upgrade"),
            (b"Upgrade", b"websocket, h2c"), (b"Sec-WebSocket-Key", b"k")])
        head = fw.upstream_head(b"GET", b"/ws", b"a", None, b"r",
                                sorted_.kept, None, (), b"", False, None,
                                websocket=True)
        self.assertEqual(head, b"GET /ws HTTP/1.1\r\nHost: a\r\n"
                               b"X-Request-Id: r\r\nSec-WebSocket-Key: k\r\n"
                               b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                               b"\r\n")
        plain = fw.upstream_head(b"GET", b"/ws", b"a", None, b"r",
                                 sorted_.kept, None, (), b"", False, None)
        self.assertNotIn(b"pgrade", plain)

    def test_retryable(self) -> None:
        self.assertTrue(fw.retryable(b"GET", False, None))
        self.assertTrue(fw.retryable(b"HEAD", False, b"0"))
        self.assertFalse(fw.retryable(b"GET", False, b"1"))
        self.assertFalse(fw.retryable(b"GET", True, None))
        self.assertFalse(fw.retryable(b"DELETE", False, None))
