"""Request smuggling and header spoofing, as a regression suite.

The payload families a security review threw at phantomd (CL.TE, TE.CL,
obfuscated Transfer-Encoding, bare CR/LF, NUL, obs-fold, chunk-size games,
hop-by-hop abuse, h2c upgrades, absolute-form targets, duplicate Host,
spoofed forwarding headers), each sent as raw bytes to a real phantomd in
front of a fake API on a loopback socket that keeps every request head
byte for byte.

Whatever a payload gets, every head that reaches the API must be clean:
one request line in origin-form, field lines with nothing but visible
characters, exactly one ``Authorization: Bearer <jwt>`` (the JWT the token
service issued, never the opaque token), exactly one ``Host`` (the
upstream's) and exactly one of each ``X-Forwarded-*`` as phantomd saw the
client, and no forwarding header the client wrote in any spelling.  Every
byte the API received belongs to a request it parsed (nothing smuggled
behind one).  A refused payload forwards nothing at all.
"""

from __future__ import annotations

import re

from twisted.internet import reactor
from twisted.trial import unittest

from .fakes import Scene, async_test, exchange

#: Values only a client's spoofed header carries: never in a forwarded head.
SPOOF = (b"6.6.6.6", b"spoof.example", b"spoofed")

_REQUEST_LINE = re.compile(
    rb"(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) /[\x21-\x7e]* HTTP/1\.1\Z")
_FIELD_LINE = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: (?:[\x21-\x7e\x80-\xff]"
    rb"(?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?\Z")

#: Set by phantomd, once per head (X-Request-Id: at most once).
_ONCE = (b"authorization", b"host", b"x-forwarded-for", b"x-forwarded-proto",
         b"x-forwarded-host")
#: Never from a client, in any spelling (``_`` read as ``-``).
_NEVER = (b"forwarded", b"x-real-ip", b"proxy-authorization", b"upgrade",
          b"http2-settings", b"keep-alive", b"te", b"trailer",
          b"proxy-connection")

HOST = b"api.example.test"

# Outcomes of a row.
REFUSED = "refused"   # an error answer, the connection closed, nothing forwarded


def row(name: str, data: bytes, outcome, statuses=None, body=None):
    """``outcome``: REFUSED, or the list of targets the API must get (in
    order); ``statuses``: the acceptable first answers; ``body``: what the
    API must receive as the (dechunked) body of the first request."""
    if statuses is None:
        statuses = (400,) if outcome == REFUSED else (200,)
    return (name, data, outcome, statuses, body)


class Suite(unittest.TestCase):
    timeout = 60

    async def run_rows(self, rows) -> None:
        self.s = await Scene.build(self, reactor)
        self.token, self.jwt = self.s.good_token()
        for name, data, outcome, statuses, body in rows:
            data = data.replace(b"{token}", self.token.encode())
            await self.check(name, data, outcome, statuses, body)

    async def check(self, name, data, outcome, statuses, body) -> None:
        api = self.s.api
        before, bytes_before = len(api.requests), api.bytes_received
        client = await exchange(reactor, self.s.front, data, 3.0)
        responses = client.responses()
        self.assertTrue(responses, "%s: no answer (%r)" % (
            name, client.received[:100]))
        self.assertIn(responses[0].status, statuses, "%s: %r" % (
            name, responses[0].body))
        self.assertFalse(client.aborted_by_us, "%s: left open" % name)
        new = api.requests[before:]
        if outcome == REFUSED:
            self.assertEqual(len(responses), 1, "%s: answered more" % name)
            self.assertEqual(responses[0].first(b"cache-control"),
                             b"no-store", name)
            self.assertEqual(api.bytes_received, bytes_before,
                             "%s: refused, yet bytes reached the API" % name)
        else:
            self.assertEqual([r.target for r in new], outcome, name)
            if body is not None:
                self.assertEqual(new[0].body, body, name)
        for request in new:
            self.assert_clean(name, request)
        self.assertEqual(api.framing_errors, [], name)
        self.assertEqual(api.unparsed(), [], name)

    def assert_clean(self, name: str, request) -> None:
        lines = request.head_raw.split(b"\r\n")
        self.assertRegex(lines[0], _REQUEST_LINE, name)
        names = []
        for line in lines[1:]:
            self.assertRegex(line, _FIELD_LINE, name)
            field, _, value = line.partition(b": ")
            names.append(field.lower().replace(b"_", b"-"))
            for marker in SPOOF:
                self.assertNotIn(marker, line, "%s: %r" % (name, line))
        self.assertNotIn(self.token.encode(), request.head_raw, name)
        for field in _ONCE:
            self.assertEqual(names.count(field), 1, "%s: %s in %r" % (
                name, field, request.head_raw))
        self.assertLessEqual(names.count(b"x-request-id"), 1, name)
        never = _NEVER
        if getattr(self, "websocket", False):
            # The one upgrade phantomd forwards, as phantomd spells it.
            never = tuple(f for f in _NEVER if f != b"upgrade")
            self.assertEqual(request.header(b"upgrade"), [b"websocket"], name)
            self.assertEqual(request.header(b"connection"), [b"Upgrade"],
                             name)
        for field in never:
            self.assertNotIn(field, names, "%s: %r" % (name, request.head_raw))
        self.assertEqual(request.header(b"authorization"),
                         [b"Bearer " + self.jwt.encode()], name)
        self.assertEqual(request.header(b"host"),
                         [b"127.0.0.1:%d" % self.s.api.portnum], name)
        self.assertEqual(request.header(b"x-forwarded-for"), [b"127.0.0.1"],
                         name)
        self.assertEqual(request.header(b"x-forwarded-proto"), [b"http"],
                         name)
        self.assertEqual(request.header(b"x-forwarded-host"), [HOST], name)
        framing = [n for n in names
                   if n in (b"content-length", b"transfer-encoding")]
        self.assertLessEqual(len(framing), 1, "%s: %r" % (
            name, request.head_raw))
        for value in request.header(b"content-length"):
            self.assertRegex(value, rb"(0|[1-9][0-9]*)\Z", name)
        for value in request.header(b"transfer-encoding"):
            self.assertEqual(value, b"chunked", name)


def req(*lines: bytes, body: bytes = b"", token: bool = True,
        close: bool = True) -> bytes:
    """A request: its first line, Host, the client's token, ``lines``."""
    head = [lines[0], b"Host: " + HOST]
    if token:
        head.append(b"Authorization: Bearer {token}")
    head += lines[1:]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


HIDDEN = (b"GET /smuggled HTTP/1.1\r\nHost: " + HOST + b"\r\n"
          b"X-Forwarded-For: 6.6.6.6\r\n\r\n")
CHUNKED_HIDDEN = b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN)


class Framing(Suite):
    """CL.TE, TE.CL and Transfer-Encoding obfuscation: refused before
    anything is forwarded, or framed one way only."""

    @async_test
    async def test_cl_te(self):
        await self.run_rows([
            row("CL.TE", req(b"POST /a HTTP/1.1",
                             b"Content-Length: %d" % (5 + len(HIDDEN)),
                             b"Transfer-Encoding: chunked",
                             body=b"0\r\n\r\n" + HIDDEN), REFUSED),
            row("TE.CL", req(b"POST /a HTTP/1.1", b"Transfer-Encoding: chunked",
                             b"Content-Length: 4", body=CHUNKED_HIDDEN),
                REFUSED),
            row("CL.TE, CL 0", req(b"POST /a HTTP/1.1", b"Content-Length: 0",
                                   b"Transfer-Encoding: chunked",
                                   body=CHUNKED_HIDDEN), REFUSED),
            row("two CLs", req(b"POST /a HTTP/1.1", b"Content-Length: 5",
                               b"Content-Length: 6", body=b"hello!"),
                REFUSED),
            row("two equal CLs", req(b"POST /a HTTP/1.1", b"Content-Length: 5",
                                     b"Content-Length: 5", body=b"hello"),
                REFUSED),
            row("CL list", req(b"POST /a HTTP/1.1", b"Content-Length: 5, 5",
                               body=b"hello"), REFUSED),
            row("CL sign", req(b"POST /a HTTP/1.1", b"Content-Length: +5",
                               body=b"hello"), REFUSED),
            row("CL leading zeros go as a number",
                req(b"POST /a HTTP/1.1", b"Content-Length: 0005",
                    body=b"hello"), [b"/a"], body=b"hello"),
            row("CL with a request hidden in the body stays a body",
                req(b"POST /a HTTP/1.1", b"Content-Length: %d" % len(HIDDEN),
                    body=HIDDEN), [b"/a"], body=HIDDEN),
            row("chunked with a request hidden in the body stays a body",
                req(b"POST /a HTTP/1.1", b"Transfer-Encoding: chunked",
                    body=CHUNKED_HIDDEN), [b"/a"], body=HIDDEN),
            row("Content_Length is not a Content-Length",
                req(b"POST /a HTTP/1.1", b"Content_Length: 99",
                    b"Content-Length: 5", body=b"hello"), [b"/a"],
                body=b"hello"),
            row("HTTP/1.0 with Transfer-Encoding",
                req(b"POST /a HTTP/1.0", b"Transfer-Encoding: chunked",
                    body=CHUNKED_HIDDEN), REFUSED),
            row("HTTP/1.0 keep-alive with Transfer-Encoding",
                req(b"POST /a HTTP/1.0", b"Connection: keep-alive",
                    b"Transfer-Encoding: chunked", close=False,
                    body=b"0\r\n\r\n") + HIDDEN, REFUSED),
            row("Transfer_Encoding is not a Transfer-Encoding",
                req(b"POST /a HTTP/1.1", b"Transfer_Encoding: chunked",
                    b"Content-Length: %d" % len(CHUNKED_HIDDEN),
                    body=CHUNKED_HIDDEN), [b"/a"], body=CHUNKED_HIDDEN),
        ])

    @async_test
    async def test_obfuscated_transfer_encoding(self):
        body = b"5\r\nhello\r\n0\r\n\r\n"
        refused = (400, 501)
        rows = [row(te.decode("latin-1"), req(b"POST /a HTTP/1.1", te,
                                              body=body), REFUSED, refused)
                for te in (b"Transfer-Encoding: xchunked",
                           b"Transfer-Encoding: chunked, identity",
                           b"Transfer-Encoding: identity, chunked, x",
                           b"Transfer-Encoding: gzip, chunked, gzip",
                           b"Transfer-Encoding: \"chunked\"",
                           b"Transfer-Encoding: \x0bchunked",
                           b"Transfer-Encoding : chunked",
                           b"Transfer-Encoding\t: chunked",
                           b" Transfer-Encoding: chunked",
                           b"Transfer-Encoding: chunked\r\n"
                           b"Transfer-Encoding: x",
                           b"Transfer-Encoding: chunked\x00",
                           b"Transfer-Encoding: chunked \t")]
        rows += [row(te.decode("latin-1"), req(b"POST /a HTTP/1.1", te,
                                               body=body), [b"/a"],
                     body=b"hello")
                 for te in (b"Transfer-Encoding: CHUNKED",
                            b"transfer-encoding:\tchunked")]
        await self.run_rows(rows)

    @async_test
    async def test_chunk_size_games(self):
        def chunked(body: bytes) -> bytes:
            return req(b"POST /a HTTP/1.1", b"Transfer-Encoding: chunked",
                       body=body)
        rows = [row("chunk %r" % body[:12], chunked(body), REFUSED)
                for body in (b"zz\r\nhello\r\n0\r\n\r\n",
                             b"-5\r\nhello\r\n0\r\n\r\n",
                             b"0x5\r\nhello\r\n0\r\n\r\n",
                             b" 5\r\nhello\r\n0\r\n\r\n",
                             b"5 5\r\nhello\r\n0\r\n\r\n",
                             b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n",
                             b"5\r\nhelloXX0\r\n\r\n",
                             b"3\r\nhello\r\n0\r\n\r\n",
                             b"\r\nhello\r\n0\r\n\r\n",
                             b"5\nhello\n0\n\n",
                             b"5\rhello\r0\r\r")]
        rows += [
            row("leading zeros", chunked(b"005\r\nhello\r\n0\r\n\r\n"),
                [b"/a"], body=b"hello"),
            row("extension", chunked(b"5;a=b\r\nhello\r\n0;x\r\n\r\n"),
                [b"/a"], body=b"hello"),
            row("trailers naming what phantomd sets are dropped",
                chunked(b"5\r\nhello\r\n0\r\nAuthorization: Bearer {token}"
                        b"\r\nX-Forwarded-For: 6.6.6.6\r\nHost: "
                        b"spoof.example\r\n\r\n"), [b"/a"], body=b"hello"),
            row("zero-size first chunk ends the body",
                chunked(b"0\r\n\r\n"), [b"/a"], body=b""),
        ]
        await self.run_rows(rows)


class Lines(Suite):
    """Bare CR or LF, NUL and obs-fold: a line break the API might read
    differently from phantomd is refused."""

    @async_test
    async def test_bare_cr_lf_and_nul(self):
        await self.run_rows([
            row("bare CR in a value",
                req(b"GET /a HTTP/1.1", b"X-A: a\rX-Forwarded-For: 6.6.6.6"),
                REFUSED),
            row("bare CR ends a line",
                req(b"GET /a HTTP/1.1\rX-Forwarded-For: 6.6.6.6"), REFUSED),
            row("bare LF ends a header line",
                req(b"GET /a HTTP/1.1",
                    b"X-A: a\nX-Forwarded-For: 6.6.6.6"), REFUSED),
            row("bare LF after the request line",
                b"GET /a HTTP/1.1\nHost: " + HOST + b"\r\n"
                b"Authorization: Bearer {token}\r\nX-Forwarded-For: 6.6.6.6"
                b"\r\nConnection: close\r\n\r\n", REFUSED),
            row("NUL in a value", req(b"GET /a HTTP/1.1", b"X-A: a\x00b"),
                REFUSED),
            row("NUL in a name", req(b"GET /a HTTP/1.1", b"X-\x00A: b"),
                REFUSED),
            row("NUL in the target", req(b"GET /a\x00b HTTP/1.1"), REFUSED),
            row("NUL in the token",
                req(b"GET /a HTTP/1.1",
                    b"Authorization: Bearer {token}\x00", token=False),
                REFUSED),
        ])

    @async_test
    async def test_obs_fold(self):
        await self.run_rows([
            row("fold hiding X-Forwarded-For",
                req(b"GET /a HTTP/1.1", b"X-A: a", b" X-Forwarded-For: 6.6.6.6"),
                REFUSED),
            row("tab fold", req(b"GET /a HTTP/1.1", b"X-A: a",
                                b"\tspoofed"), REFUSED),
            row("fold in Authorization",
                req(b"GET /a HTTP/1.1", b"Authorization: Bearer",
                    b" {token}", token=False), REFUSED),
            row("fold in Transfer-Encoding",
                req(b"POST /a HTTP/1.1", b"Transfer-Encoding:",
                    b" chunked", body=b"5\r\nhello\r\n0\r\n\r\n"), REFUSED),
        ])


class Headers(Suite):
    """Hop-by-hop abuse and forwarding headers the client writes itself."""

    @async_test
    async def test_hop_by_hop_abuse(self):
        """Naming phantomd's own headers in ``Connection`` must not make it
        drop them (a request without Authorization or X-Forwarded-For
        could pass an API's own checks differently)."""
        rows = [row(c.decode(), req(b"GET /a HTTP/1.1", c), [b"/a"])
                for c in (b"Connection: Authorization",
                          b"Connection: X-Forwarded-For, X-Forwarded-Host",
                          b"Connection: X-Forwarded-Proto",
                          b"Connection: Host",
                          b"Connection: close, X_Forwarded_For",
                          b"Connection: Content-Length",
                          b"Connection: Transfer-Encoding")]
        rows += [
            row("Connection names Content-Length of a body",
                req(b"POST /a HTTP/1.1", b"Connection: Content-Length",
                    b"Content-Length: 5", body=b"hello"), [b"/a"],
                body=b"hello"),
            row("Connection names a spoofing header of the client's",
                req(b"GET /a HTTP/1.1", b"Connection: X-Spoof",
                    b"X-Spoof: spoofed", b"X_Spoof: spoofed"), [b"/a"]),
            row("Proxy-Authorization and Keep-Alive",
                req(b"GET /a HTTP/1.1", b"Proxy-Authorization: Basic spoofed",
                    b"Keep-Alive: timeout=spoofed", b"TE: trailers",
                    b"Trailer: X-Forwarded-For"), [b"/a"]),
        ]
        await self.run_rows(rows)

    @async_test
    async def test_spoofed_forwarding_headers(self):
        rows = [row(h.decode(), req(b"GET /a HTTP/1.1", h), [b"/a"])
                for h in (b"X-Forwarded-For: 6.6.6.6",
                          b"X-Forwarded-For: 6.6.6.6\r\n"
                          b"X-Forwarded-For: 6.6.6.6",
                          b"X-Forwarded-Host: spoof.example",
                          b"X-Forwarded-Proto: spoofed",
                          b"x-forwarded-for: 6.6.6.6",
                          b"X-FORWARDED-FOR: 6.6.6.6",
                          b"X_Forwarded_For: 6.6.6.6",
                          b"X-Forwarded_For: 6.6.6.6",
                          b"X_Forwarded_Host: spoof.example",
                          b"X_Forwarded-Proto: spoofed",
                          b"Forwarded: for=6.6.6.6;host=spoof.example",
                          b"X-Real-IP: 6.6.6.6",
                          b"X_Real_IP: 6.6.6.6",
                          b"x-real_ip: 6.6.6.6",
                          b"X_Request_Id: spoofed",
                          b"Proxy_Authorization: Basic spoofed",
                          # What other proxies report, which frameworks
                          # believe (Spring, ProxyFix, IIS rewrite).
                          b"X-Forwarded-Port: 6.6.6.6",
                          b"X-Forwarded-Prefix: /spoofed",
                          b"X_Forwarded_Prefix: /spoofed",
                          b"X-Forwarded-Server: spoof.example",
                          b"X-Forwarded-Uri: /spoofed",
                          b"X-Forwarded-Scheme: spoofed",
                          b"X-Forwarded-Ssl: spoofed",
                          b"X-Original-URL: /spoofed",
                          b"X_Original_URL: /spoofed",
                          b"X-Rewrite-URL: /spoofed",
                          b"X-Original-Host: spoof.example",
                          b"True-Client-IP: 6.6.6.6",
                          b"X-Client-IP: 6.6.6.6",
                          b"X-Cluster-Client-IP: 6.6.6.6",
                          b"CF-Connecting-IP: 6.6.6.6",
                          b"Fastly-Client-IP: 6.6.6.6")]
        await self.run_rows(rows)

    @async_test
    async def test_credentials(self):
        await self.run_rows([
            row("two Authorization lines",
                req(b"GET /a HTTP/1.1", b"authorization: Bearer {token}"),
                REFUSED, (400,)),
            row("no token, pipelined behind a good request",
                req(b"GET /a HTTP/1.1", close=False)
                + req(b"GET /b HTTP/1.1", token=False), [b"/a"]),
            row("a second request's token is its own",
                req(b"GET /a HTTP/1.1", close=False)
                + req(b"GET /b HTTP/1.1", b"Authorization: Bearer spoofed",
                      token=False), [b"/a"]),
        ])


class Targets(Suite):
    """h2c upgrades, absolute-form targets and duplicate Host."""

    @async_test
    async def test_upgrade_h2c(self):
        await self.run_rows([
            row("h2c upgrade goes as a plain request",
                req(b"GET /a HTTP/1.1", b"Upgrade: h2c",
                    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                    b"Connection: Upgrade, HTTP2-Settings"), [b"/a"]),
            row("h2c upgrade with a body",
                req(b"POST /a HTTP/1.1", b"Upgrade: h2c",
                    b"Connection: Upgrade", b"Content-Length: %d"
                    % len(HIDDEN), body=HIDDEN), REFUSED),
            row("h2c upgrade then a pipelined request",
                req(b"GET /a HTTP/1.1", b"Upgrade: h2c",
                    b"Connection: Upgrade", close=False)
                + req(b"GET /b HTTP/1.1"), [b"/a", b"/b"]),
            row("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                REFUSED, (400, 505)),
            row("CONNECT", b"CONNECT spoof.example:443 HTTP/1.1\r\nHost: "
                b"spoof.example:443\r\nAuthorization: Bearer {token}\r\n\r\n",
                REFUSED, (400, 501)),
        ])

    @async_test
    async def test_upgrade_websocket(self):
        """DESIGN section 13: a WebSocket upgrade is forwarded with exactly
        its two upgrade lines; what the client pipelines behind it is never
        parsed (the fake API answers 200, not 101: the connection closes)."""
        self.websocket = True
        await self.run_rows([
            row("websocket upgrade is forwarded as one",
                req(b"GET /a HTTP/1.1", b"Upgrade: websocket",
                    b"Connection: Upgrade"), [b"/a"]),
            row("websocket upgrade then a pipelined request",
                req(b"GET /a HTTP/1.1", b"Upgrade: websocket",
                    b"Connection: Upgrade", close=False)
                + req(b"GET /b HTTP/1.1"), [b"/a"]),
            row("websocket upgrade then a tokenless pipelined request",
                req(b"GET /a HTTP/1.1", b"Upgrade: websocket",
                    b"Connection: Upgrade", close=False)
                + req(b"GET /b HTTP/1.1", token=False), [b"/a"]),
        ])

    @async_test
    async def test_absolute_form(self):
        await self.run_rows([
            row("absolute-form", req(b"GET http://spoof.example/x?y HTTP/1.1"),
                [b"/x?y"]),
            row("absolute-form https with port",
                req(b"GET https://spoof.example:8443/x HTTP/1.1"), [b"/x"]),
            row("absolute-form without path",
                req(b"GET http://spoof.example HTTP/1.1"), [b"/"]),
            row("absolute-form with userinfo",
                req(b"GET http://user@spoof.example/x HTTP/1.1"), [b"/x"]),
            row("authority-form", req(b"GET spoof.example:80 HTTP/1.1"),
                REFUSED),
            row("asterisk with GET", req(b"GET * HTTP/1.1"), REFUSED),
        ])

    @async_test
    async def test_duplicate_host(self):
        await self.run_rows([
            row("two Host lines", req(b"GET /a HTTP/1.1",
                                      b"Host: spoof.example"), REFUSED),
            row("two equal Host lines", req(b"GET /a HTTP/1.1",
                                            b"Host: " + HOST), REFUSED),
            row("Host and host", req(b"GET /a HTTP/1.1",
                                     b"host: spoof.example"), REFUSED),
            row("no Host in HTTP/1.1",
                b"GET /a HTTP/1.1\r\nAuthorization: Bearer {token}\r\n"
                b"Connection: close\r\n\r\n", REFUSED),
            row("Host folded", req(b"GET /a HTTP/1.1", b" spoof.example"),
                REFUSED),
        ])

    @async_test
    async def test_host_values(self):
        def with_host(value: bytes) -> bytes:
            return (b"GET /a HTTP/1.1\r\nHost: " + value +
                    b"\r\nAuthorization: Bearer {token}\r\n"
                    b"Connection: close\r\n\r\n")
        # Each would go on as the X-Forwarded-Host phantomd vouches for: a
        # list of hosts, another URL's userinfo or path, or nothing.
        await self.run_rows([
            row(repr(v), with_host(v), REFUSED)
            for v in (b"api.example.test, spoof.example",
                      b"api.example.test,spoof.example",
                      b"spoof.example@api.example.test",
                      b"api.example.test/spoofed", b"api.example.test?x",
                      b"api example", b"", b"api.example.test:80:80",
                      b"api.\xffexample", b"[::1]x")])
        self.assertEqual(len(self.s.api.requests), 0)

    @async_test
    async def test_host_values_that_go_on(self):
        for value, forwarded in ((HOST + b":8443", HOST + b":8443"),
                                 (HOST + b" \t", HOST),
                                 (b"[2001:db8::1]:8080", b"[2001:db8::1]:8080"),
                                 (b"10.0.0.1", b"10.0.0.1")):
            s = await Scene.build(self, reactor)
            token, _ = s.good_token()
            client = await exchange(reactor, s.front, (
                b"GET /a HTTP/1.1\r\nHost: " + value +
                b"\r\nAuthorization: Bearer " + token.encode() +
                b"\r\nConnection: close\r\n\r\n"), 3.0)
            self.assertEqual(client.responses()[0].status, 200, value)
            self.assertEqual(s.api.requests[-1].header(b"x-forwarded-host"),
                             [forwarded], value)

    @async_test
    async def test_fragment_in_the_target(self):
        # An API that cuts the fragment off serves /admin for /admin#x:
        # matched here as another path, it would dodge /admin's route.
        await self.run_rows([
            row("fragment", req(b"GET /a#x HTTP/1.1"), REFUSED),
            row("fragment then path", req(b"GET /a#/b?c HTTP/1.1"), REFUSED),
            row("fragment in the query", req(b"GET /a?b#c HTTP/1.1"),
                REFUSED),
            row("fragment in absolute-form",
                req(b"GET http://spoof.example/a#x HTTP/1.1"), REFUSED),
        ])
