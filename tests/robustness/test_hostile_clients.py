"""Hostile clients as raw bytes (DESIGN section 2).

Every request below carries a token the token service says is active, so a
wrong answer cannot hide behind a 401: what is refused is refused for its
framing.  The fake API only counts a request it received completely, so
"the API saw nothing" means no request, smuggled or not, got through.
"""

from __future__ import annotations

import itertools
import os

from twisted.internet import reactor
from twisted.trial import unittest

from .fakes import (
    Scene, async_test, connect_http, connect_raw, connect_tls,
    drip_until_closed, exchange, request_bytes, sleep, wait_closed, wait_for,
    wait_stalled,
)


class Hostile(unittest.TestCase):
    timeout = 10
    limits = {"max_request_line": "1024", "max_header_bytes": "8192",
              "max_headers": "20"}

    async def scene(self, **phantomd):
        settings = dict(self.limits, **phantomd)
        self.s = await Scene.build(self, reactor, phantomd=settings)
        self.token, self.jwt = self.s.good_token()
        return self.s

    async def send(self, data: bytes, timeout: float = 3.0):
        return await exchange(reactor, self.s.front, data, timeout)

    async def refused(self, data: bytes, statuses=(400,), closed=True):
        """``data`` gets one error answer from ``statuses``, then (if
        ``closed``) the connection is closed; the API sees nothing."""
        if not hasattr(self, "s"):
            await self.scene()
        client = await self.send(data)
        responses = client.responses()
        self.assertTrue(responses, "no answer at all (silent drop); got %r"
                        % client.received[:200])
        self.assertIn(responses[0].status, statuses, responses[0].body)
        self.assertEqual(responses[0].first(b"cache-control"), b"no-store")
        if closed:
            self.assertFalse(client.aborted_by_us,
                             "the connection stayed open after the error")
            self.assertEqual(len(responses), 1,
                             "answered more after a framing error")
        self.assertEqual(self.s.api.requests, [],
                         "a request reached the API")
        return responses[0]

    def head(self, *lines: bytes, token: bool = True) -> bytes:
        out = list(lines)
        out.insert(1, b"Host: api.example.test")
        if token:
            out.insert(2, b"Authorization: Bearer " + self.token.encode())
        return b"\r\n".join(out) + b"\r\n\r\n"


class MalformedRequestLines(Hostile):

    @async_test
    async def test_malformed_request_lines(self):
        await self.scene()
        for line in (b"GET /resource", b"GET /resource HTTP/1.1 extra",
                     b"GET\t/ HTTP/1.1",
                     b"G@T / HTTP/1.1", b"GET / HTTP/1.1x",
                     b"GET / FTP/1.1", b"\x16\x03\x01\x02\x00\x01\x00",
                     b"GET /a b HTTP/1.1", b"GET /\x00 HTTP/1.1"):
            await self.refused(self.head(line), statuses=(400, 505))

    @async_test
    async def test_extra_spaces_are_refused_or_normalised(self):
        """RFC 9112 section 3 lets a server split the request line on any
        run of whitespace; then the API must get one clean request line."""
        await self.scene()
        client = await self.send(self.head(b"GET  /resource  HTTP/1.1",
                                           b"Connection: close"))
        self.assertIn(client.responses()[0].status, (400, 200))
        self.assertEqual(self.s.api.framing_errors, [])
        for req in self.s.api.requests:
            self.assertEqual(req.target, b"/resource")

    @async_test
    async def test_unsupported_version(self):
        await self.scene()
        await self.refused(self.head(b"GET / HTTP/2.0"), statuses=(400, 505))
        await self.refused(self.head(b"GET / HTTP/9.9"), statuses=(400, 505))

    @async_test
    async def test_request_line_too_long(self):
        await self.scene()
        await self.refused(self.head(
            b"GET /" + b"a" * 20000 + b" HTTP/1.1"), statuses=(414,))
        self.assertEqual(self.s.ts.calls, 0)


class HeaderSection(Hostile):

    @async_test
    async def test_header_section_too_large(self):
        await self.scene()
        await self.refused(self.head(
            b"GET / HTTP/1.1", b"X-Big: " + b"b" * 20000), statuses=(431,))

    @async_test
    async def test_too_many_headers(self):
        await self.scene()
        await self.refused(self.head(
            b"GET / HTTP/1.1", *[b"X-H%d: v" % i for i in range(60)]),
            statuses=(431,))

    @async_test
    async def test_100kb_bearer_token_is_431(self):
        await self.scene(max_header_bytes="65536")
        await self.refused(request_bytes(token="t" * 100_000, close=True),
                           statuses=(431,))
        self.assertEqual(self.s.ts.calls, 0)

    @async_test
    async def test_10kb_bearer_token_is_400_without_introspection(self):
        await self.scene(max_header_bytes="65536")
        client = await self.send(request_bytes(token="t" * 10_000,
                                               close=True))
        r = client.responses()[0]
        self.assertEqual(r.status, 400)
        self.assertIn(b'error="invalid_request"',
                      r.first(b"www-authenticate", b""))
        self.assertEqual(self.s.ts.calls, 0)
        self.assertEqual(self.s.api.requests, [])

    @async_test
    async def test_nul_in_header_value(self):
        await self.scene()
        await self.refused(self.head(b"GET / HTTP/1.1", b"X-A: a\x00b"))

    @async_test
    async def test_del_in_header_value(self):
        """DEL is not a field-vchar (RFC 9110 section 5.5): a framing
        error, whatever header carries it -- the token included."""
        await self.scene()
        await self.refused(self.head(b"GET / HTTP/1.1",
                                     b"X-A: tok\x7fen"))
        await self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: "
                           b"Bearer tok\x7fen\r\n\r\n")
        self.assertEqual(self.s.ts.calls, 0)

    @async_test
    async def test_bare_cr_in_header_value(self):
        await self.scene()
        await self.refused(self.head(b"GET / HTTP/1.1", b"X-A: a\rb"))

    @async_test
    async def test_space_before_colon(self):
        await self.scene()
        await self.refused(self.head(b"GET / HTTP/1.1",
                                     b"Content-Length : 0"))

    @async_test
    async def test_obs_fold(self):
        """RFC 9112 section 5.2: reject with 400, or unfold to SP.  A fold
        must never reach the API as a header line of its own."""
        await self.scene()
        client = await self.send(self.head(
            b"GET / HTTP/1.1", b"X-Folded: first", b" second",
            b"Connection: close"))
        status = client.responses()[0].status
        self.assertIn(status, (400, 200))
        self.assertEqual(self.s.api.framing_errors, [])
        for req in self.s.api.requests:
            for v in req.header(b"x-folded"):
                self.assertNotIn(b"\r", v)
                self.assertNotIn(b"\n", v)

    @async_test
    async def test_obs_fold_in_authorization(self):
        await self.scene()
        data = (b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n "
                + self.token.encode() + b"\r\nConnection: close\r\n\r\n")
        client = await self.send(data)
        self.assertIn(client.responses()[0].status, (400, 401))
        self.assertEqual(self.s.api.requests, [])


class Credentials(Hostile):
    """Token syntax (RFC 6750): every case answered without asking the
    token service or the API."""

    async def answered(self, auth_lines, status, error):
        client = await self.send(self.head(
            b"GET / HTTP/1.1", *auth_lines, b"Connection: close",
            token=False))
        r = client.responses()[0]
        self.assertEqual(r.status, status, (auth_lines, r.body))
        challenge = r.first(b"www-authenticate", b"")
        self.assertTrue(challenge.startswith(b"Bearer realm="), challenge)
        if error:
            self.assertIn(b'error="%s"' % error, challenge)
        else:
            self.assertNotIn(b"error=", challenge)
        self.assertEqual(self.s.ts.calls, 0)
        self.assertEqual(self.s.api.requests, [])

    @async_test
    async def test_token_syntax(self):
        await self.scene()
        await self.answered([], 401, None)
        await self.answered([b"Authorization: Basic dXNlcjpwYXNz"], 401,
                            None)
        await self.answered([b"Authorization: Bearer"], 400,
                            b"invalid_request")
        await self.answered([b"Authorization: Bearer "], 400,
                            b"invalid_request")
        await self.answered(["Authorization: Bearer t\u00f6k\u20acn".encode(
            "utf-8")], 400, b"invalid_request")
        await self.answered([b"Authorization: Bearer a b"], 400,
                            b"invalid_request")
        await self.answered([b"Authorization: Bearer a,b"], 400,
                            b"invalid_request")
        await self.answered([b"Authorization: Bearer abc",
                             b"Authorization: Bearer abc"], 400,
                            b"invalid_request")
        await self.answered([b"Authorization: Bearer " + self.token.encode(),
                             b"Authorization: Basic dXNlcjpwYXNz"], 400,
                            b"invalid_request")

    @async_test
    async def test_latin1_token(self):
        await self.scene()
        await self.answered([b"Authorization: Bearer caf\xe9"], 400,
                            b"invalid_request")

    @async_test
    async def test_header_spelling_variants_are_one_credential(self):
        """Header names are case-insensitive and OWS is optional: each of
        these is the same token, introspected once, and forwarded."""
        await self.scene()
        for line in (b"AUTHORIZATION: Bearer %s", b"authorization:Bearer %s",
                     b"Authorization: Bearer  %s",
                     b"Authorization:\tBearer %s",
                     b"Authorization: Bearer %s \t"):
            client = await self.send(self.head(
                b"GET /v HTTP/1.1", line % self.token.encode(),
                b"Connection: close", token=False))
            self.assertEqual([r.status for r in client.responses()], [200],
                             line)
        self.assertEqual(self.s.ts.calls, 1)
        for up in self.s.api.requests:
            self.assertEqual(up.header(b"authorization"),
                             [b"Bearer " + self.jwt.encode()])

    @async_test
    async def test_proxy_authorization_is_not_forwarded(self):
        await self.scene()
        client = await self.send(self.head(
            b"GET /p HTTP/1.1", b"Proxy-Authorization: Basic c2VjcmV0",
            b"Connection: close"))
        self.assertEqual([r.status for r in client.responses()], [200])
        self.assertEqual(
            self.s.api.requests[0].header(b"proxy-authorization"), [])

    @async_test
    async def test_scheme_is_case_insensitive(self):
        await self.scene()
        client = await self.send(self.head(
            b"GET / HTTP/1.1", b"Authorization: bEaReR " + self.token.encode(),
            b"Connection: close", token=False))
        self.assertEqual(client.responses()[0].status, 200)


class AmbiguousFraming(Hostile):
    """CL with TE, two CLs, bad chunk sizes: 400, closed, nothing forwarded
    (DESIGN section 2) -- the classic request-smuggling openings."""

    def post(self, *headers: bytes, body: bytes = b"") -> bytes:
        return self.head(b"POST /upload HTTP/1.1", *headers) + body

    @async_test
    async def test_content_length_with_transfer_encoding(self):
        await self.scene()
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        await self.refused(self.post(
            b"Content-Length: %d" % (5 + len(smuggled)),
            b"Transfer-Encoding: chunked",
            body=b"0\r\n\r\n" + smuggled))
        await self.refused(self.post(
            b"Transfer-Encoding: chunked", b"Content-Length: 4",
            body=b"5c\r\n" + smuggled + b"\r\n0\r\n\r\n"))

    @async_test
    async def test_two_different_content_lengths(self):
        await self.scene()
        await self.refused(self.post(b"Content-Length: 5",
                                     b"Content-Length: 41",
                                     body=b"hello" + b"x" * 36))
        await self.refused(self.post(b"Content-Length: 5, 41",
                                     body=b"hello" + b"x" * 36))

    @async_test
    async def test_bad_content_length_values(self):
        await self.scene()
        for value in (b"-1", b"+5", b"0x5", b"5.0", b"five",
                      b"99999999999999999999999999"):
            await self.refused(self.post(b"Content-Length: " + value,
                                         body=b"hello"))

    @async_test
    async def test_bad_chunk_sizes(self):
        await self.scene()
        for chunk in (b"zz\r\nhello\r\n0\r\n\r\n",
                      b"-5\r\nhello\r\n0\r\n\r\n",
                      b"0x5\r\nhello\r\n0\r\n\r\n",
                      b"5 5\r\nhello\r\n0\r\n\r\n",
                      b"ffffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
                      b"5\r\nhelloXX0\r\n\r\n",
                      b"\r\nhello\r\n0\r\n\r\n"):
            await self.refused(self.post(b"Transfer-Encoding: chunked",
                                         body=chunk))

    @async_test
    async def test_unknown_or_misplaced_transfer_codings(self):
        """RFC 9112 section 6.3: a request whose final coding is not chunked
        cannot be framed; ``xchunked`` and friends must not be guessed."""
        await self.scene()
        for te in (b"Transfer-Encoding: xchunked",
                   b"Transfer-Encoding: chunked, identity",
                   b"Transfer-Encoding: gzip",
                   b"Transfer-Encoding: identity",
                   b"Transfer-Encoding: \x0bchunked"):
            await self.refused(self.post(
                te, body=b"5\r\nhello\r\n0\r\n\r\n"), statuses=(400, 501))


class Smuggling(Hostile):

    @async_test
    async def test_request_hidden_in_a_body_stays_a_body(self):
        """A well-framed body that looks like a request is forwarded as
        that body, never as a second request."""
        await self.scene()
        hidden = (b"GET /smuggled HTTP/1.1\r\nHost: x\r\nAuthorization: "
                  b"Bearer " + self.token.encode() + b"\r\n\r\n")
        client = await self.send(self.head(
            b"POST /upload HTTP/1.1", b"Content-Length: %d" % len(hidden),
            b"Connection: close") + hidden)
        self.assertEqual([r.status for r in client.responses()], [200])
        self.assertEqual([r.target for r in self.s.api.requests],
                         [b"/upload"])
        self.assertEqual(self.s.api.requests[0].body, hidden)

    @async_test
    async def test_request_hidden_in_a_chunked_body_stays_a_body(self):
        await self.scene()
        hidden = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(hidden), hidden)
        client = await self.send(self.head(
            b"POST /upload HTTP/1.1", b"Transfer-Encoding: chunked",
            b"Connection: close") + body)
        self.assertEqual([r.status for r in client.responses()], [200])
        self.assertEqual([r.target for r in self.s.api.requests],
                         [b"/upload"])
        self.assertEqual(self.s.api.requests[0].body, hidden)

    @async_test
    async def test_pipelined_requests_are_each_authorized(self):
        """Pipelining: every request needs its own token; answers come in
        order; an unauthorised one in the middle is not forwarded."""
        await self.scene()
        good = self.head(b"GET /one HTTP/1.1")
        bad = (b"GET /two HTTP/1.1\r\nHost: x\r\n"
               b"Authorization: Bearer not-active\r\n\r\n")
        anon = b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n"
        last = self.head(b"GET /four HTTP/1.1", b"Connection: close")
        client = await self.send(good + bad + anon + last)
        self.assertEqual([r.status for r in client.responses()],
                         [200, 401, 401, 200])
        self.assertEqual([r.target for r in self.s.api.requests],
                         [b"/one", b"/four"])

    @async_test
    async def test_pipelined_after_framing_error_is_dropped(self):
        """Bytes after a framing error are never parsed as a request."""
        await self.scene()
        bad = self.head(b"POST /x HTTP/1.1", b"Content-Length: 1",
                        b"Content-Length: 2") + b"ab"
        follow = self.head(b"GET /after HTTP/1.1")
        await self.refused(bad + follow)


class SlowAndIdle(Hostile):
    """Timeouts here are ``header_timeout = 0.5``, ``idle_timeout = 1``."""

    @async_test
    async def test_slowloris_gets_408_and_close(self):
        """A header byte every 0.2 s: faster than any per-read timer, but
        the head is never complete within header_timeout."""
        await self.scene()
        client = await connect_raw(reactor, self.s.front)
        head = self.head(b"GET / HTTP/1.1", b"X-Slow: " + b"s" * 200)
        closed = await drip_until_closed(
            reactor, client, (bytes([b]) for b in head), 4.0)
        self.assertTrue(closed, "slowloris connection still open after 4 s")
        self.assertEqual([r.status for r in client.responses()], [408])
        self.assertEqual(self.s.api.requests, [])

    async def trickle_body(self, headers, unit):
        await self.scene()
        client = await connect_raw(reactor, self.s.front)
        client.send(request_bytes("POST", "/slow", self.token,
                                  headers=headers))
        closed = await drip_until_closed(reactor, client,
                                         itertools.repeat(unit), 8.0)
        self.assertTrue(closed, "a request body trickling in at 5 bytes/s "
                        "held the connection for 8 s (header_timeout 0.5, "
                        "idle_timeout 1, upstream_timeout 1)")
        self.assertTrue(await wait_for(
            reactor, lambda: not self.s.api.connections, 2.0),
            "the upstream connection stayed tied to the slow body")
        self.assertEqual(self.s.api.requests, [])

    @async_test
    async def test_slow_body_content_length(self):
        """Slow POST (R-U-Dead-Yet): a valid head, then the body a byte at
        a time.  Each byte arrives long before any per-read timer would
        fire, so only a bound on the whole body (or a minimum rate) keeps
        a few such clients from tying up upstream connections for ever."""
        await self.trickle_body([("Content-Length", "100000")], b"x")

    @async_test
    async def test_slow_body_chunked(self):
        await self.trickle_body([("Transfer-Encoding", "chunked")],
                                b"1\r\nx\r\n")

    @async_test
    async def test_stalled_body_is_the_clients_fault(self):
        """A client that stops sending its body half-way is timed out as a
        client (408, a 4xx on the dashboards), not as a 504 that blames
        the API, which is only waiting for that body too."""
        await self.scene()
        for headers, part in (([("Content-Length", "100")], b"abc"),
                              ([("Transfer-Encoding", "chunked")],
                               b"3\r\nabc\r\n")):
            client = await self.send(request_bytes(
                "POST", "/stall", self.token, headers=headers) + part, 6.0)
            self.assertFalse(client.aborted_by_us)
            self.assertEqual([r.status for r in client.responses()][:1],
                             [408], client.received[:100])
        self.assertEqual(self.s.api.requests, [])

    @async_test
    async def test_silent_connection_is_closed(self):
        await self.scene()
        client = await connect_raw(reactor, self.s.front)
        self.assertTrue(await wait_closed(reactor, client, 4.0),
                        "a connection that sends nothing stays open")
        for r in client.responses():
            self.assertEqual(r.status, 408)

    @async_test
    async def test_idle_keep_alive_is_closed(self):
        await self.scene()
        client = await connect_http(reactor, self.s.front)
        r = await client.request(request_bytes(token=self.token))
        self.assertEqual(r.status, 200)
        closed = await wait_for(reactor, lambda: client.lost, 4.0)
        if not closed:
            client.transport.abortConnection()
        self.assertTrue(closed, "idle keep-alive connection still open "
                        "after 4 s (idle_timeout = 1)")

    @async_test
    async def test_keep_alive_within_idle_timeout_is_kept(self):
        await self.scene(idle_timeout="3")
        client = await connect_http(reactor, self.s.front)
        self.addCleanup(client.transport.abortConnection)
        for _ in range(3):
            r = await client.request(request_bytes(token=self.token))
            self.assertEqual(r.status, 200)
            await sleep(reactor, 0.3)
        self.assertFalse(client.lost)

    @async_test
    async def test_max_connections(self):
        """With max_connections = 4, a fifth client is not served while
        four are open; once they go, new clients are served again."""
        await self.scene(max_connections="4", idle_timeout="5",
                         header_timeout="5")
        held = []
        for _ in range(4):
            c = await connect_http(reactor, self.s.front)
            self.addCleanup(c.transport.abortConnection)
            self.assertEqual((await c.request(
                request_bytes(token=self.token))).status, 200)
            held.append(c)
        extra = await connect_raw(reactor, self.s.front)
        self.addCleanup(extra.transport.abortConnection)
        extra.send(request_bytes(token=self.token))
        await sleep(reactor, 0.5)
        statuses = [r.status for r in extra.responses()]
        self.assertNotIn(200, statuses,
                         "served a fifth connection with max_connections=4")
        self.assertEqual(len(self.s.api.requests), 4)
        for c in held:
            c.transport.loseConnection()
        await wait_for(reactor, lambda: all(c.lost for c in held), 2.0)
        await sleep(reactor, 0.2)
        fresh = await exchange(reactor, self.s.front, request_bytes(
            token=self.token, close=True), 3.0)
        self.assertEqual([r.status for r in fresh.responses()], [200])


class Desync(Hostile):
    """A request refused before its body was read must not let that body
    be parsed as the next request: behind a shared front proxy that is a
    desync, whatever token the hidden request carries."""

    def hidden(self) -> bytes:
        return (b"GET /smuggled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + self.token.encode() + b"\r\n\r\n")

    async def not_smuggled(self, data: bytes, expected=(401,)):
        client = await self.send(data)
        statuses = [r.status for r in client.responses()]
        self.assertTrue(statuses, "no answer")
        self.assertIn(statuses[0], expected, statuses)
        self.assertEqual([r.target for r in self.s.api.requests], [],
                         "the body of a refused request was forwarded as "
                         "a request of its own; answers %s" % statuses)
        self.assertEqual(statuses[1:], [], "answered the hidden request")

    @async_test
    async def test_body_of_unauthenticated_request(self):
        await self.scene()
        hidden = self.hidden()
        await self.not_smuggled(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % len(hidden) + hidden)

    @async_test
    async def test_body_of_request_with_inactive_token(self):
        await self.scene()
        hidden = self.hidden()
        await self.not_smuggled(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            b"inactive-token\r\nContent-Length: %d\r\n\r\n" % len(hidden)
            + hidden)

    @async_test
    async def test_chunked_body_of_request_with_malformed_token(self):
        await self.scene()
        hidden = self.hidden()
        await self.not_smuggled(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a,b"
            b"\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(hidden), hidden), expected=(400,))

    @async_test
    async def test_body_sent_after_an_early_401_with_expect_continue(self):
        """The client announces a body with ``Expect: 100-continue``, is
        refused, and sends the body anyway (RFC 9110 lets it)."""
        await self.scene()
        hidden = self.hidden()
        client = await connect_raw(reactor, self.s.front)
        client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue"
                    b"\r\nContent-Length: %d\r\n\r\n" % len(hidden))
        await wait_for(reactor, lambda: b"\r\n\r\n" in client.received
                       or client.is_closed, 2.0)
        if not client.is_closed:
            client.send(hidden)
        await wait_closed(reactor, client, 2.5)
        statuses = [r.status for r in client.responses()]
        self.assertEqual(statuses[:1], [401], client.received[:200])
        self.assertEqual(self.s.api.requests, [])

    @async_test
    async def test_trailers_cannot_carry_credentials_or_forwarding(self):
        """Chunked trailers naming Authorization or X-Forwarded-For must
        not reach the API (they would override what phantomd set)."""
        await self.scene()
        client = await self.send(self.head(
            b"POST /upload HTTP/1.1", b"Transfer-Encoding: chunked",
            b"Connection: close") + b"5\r\nhello\r\n0\r\nAuthorization: "
            b"Bearer " + self.token.encode() + b"\r\nX-Forwarded-For: 6.6.6.6"
            b"\r\n\r\n")
        statuses = [r.status for r in client.responses()]
        self.assertIn(statuses[:1], ([200], [400]))
        for req in self.s.api.requests:
            raw = req.raw()
            self.assertNotIn(self.token.encode(), raw)
            self.assertNotIn(b"6.6.6.6", raw)

    @async_test
    async def test_two_host_headers(self):
        """RFC 9112 section 3.2: more than one Host is a 400."""
        await self.scene()
        await self.refused(self.head(b"GET / HTTP/1.1", b"Host: other.test"))

    @async_test
    async def test_upgrade_headers_are_not_forwarded(self):
        """Upgrade is hop-by-hop: an h2c or websocket upgrade request goes
        upstream as a plain request (no tunnel can bypass the gate)."""
        await self.scene()
        client = await self.send(self.head(
            b"GET /ws HTTP/1.1", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABk",
            b"Connection: Upgrade, HTTP2-Settings, close"))
        self.assertEqual([r.status for r in client.responses()], [200])
        up = self.s.api.requests[0]
        self.assertEqual(up.header(b"upgrade"), [])
        self.assertEqual(up.header(b"http2-settings"), [])


class EndlessInput(Hostile):
    """Parts of a request that have no natural end must be cut off: the
    connection is closed, after a bounded number of bytes where phantomd
    would otherwise have to keep them."""

    async def cut_off(self, head: bytes, unit: bytes, what: str,
                      bounded: bool = True):
        from .fakes import UploadPump
        client = await connect_raw(reactor, self.s.front)
        self.addCleanup(lambda: client.is_closed or
                        client.transport.abortConnection())
        client.send(head)
        pump = UploadPump(client, 256 << 20, unit=unit)
        pump.start(reactor)
        closed = await wait_closed(reactor, client, 6.0)
        self.assertTrue(closed, "still accepting an endless %s after %d MB"
                        % (what, pump.sent >> 20))
        if bounded:
            self.assertLess(pump.sent, 64 << 20, "accepted %d MB of an "
                            "endless %s (Node.js caps chunk extensions at "
                            "16 KiB: CVE-2024-22019)" % (pump.sent >> 20,
                                                         what))
        self.assertEqual(self.s.api.requests, [])
        for r in client.responses():
            self.assertGreaterEqual(r.status, 400)

    @async_test
    async def test_endless_trailers(self):
        await self.scene()
        await self.cut_off(self.head(
            b"POST /upload HTTP/1.1", b"Transfer-Encoding: chunked")
            + b"5\r\nhello\r\n0\r\n", b"X-Trailer: " + b"t" * 50 + b"\r\n",
            "trailer section")

    @async_test
    async def test_endless_chunk_extension(self):
        await self.scene()
        await self.cut_off(self.head(
            b"POST /upload HTTP/1.1", b"Transfer-Encoding: chunked")
            + b"5;ext=", b"e" * 1024, "chunk extension")

    @async_test
    async def test_endless_chunk_size(self):
        await self.scene()
        await self.cut_off(self.head(
            b"POST /upload HTTP/1.1", b"Transfer-Encoding: chunked"),
            b"0" * 1024, "chunk size line")

    @async_test
    async def test_endless_header_lines(self):
        await self.scene()
        await self.cut_off(b"GET / HTTP/1.1\r\nHost: x\r\n",
                           b"X-Many: header\r\n", "header section")

    @async_test
    async def test_endless_empty_lines_before_a_request(self):
        """RFC 9112 section 2.2 lets a server skip empty lines before a
        request; skipping keeps nothing, so only the time is bounded
        (header_timeout)."""
        await self.scene()
        await self.cut_off(b"", b"\r\n" * 512, "run of empty lines",
                           bounded=False)


class OverTLS(unittest.TestCase):
    """The same timeouts hold before and inside TLS: a TLS slowloris or a
    silent TLS connection is closed after header_timeout."""

    timeout = 15

    async def scene(self):
        from .fakes import self_signed
        cert, key = self_signed(os.path.abspath(self.mktemp()))
        listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
            key, cert)
        self.s = await Scene.build(self, reactor, phantomd={
            "listen": listen})
        self.token, self.jwt = self.s.good_token()

    @async_test
    async def test_silent_connection_before_handshake_is_closed(self):
        await self.scene()
        client = await connect_raw(reactor, self.s.front)
        self.assertTrue(await wait_closed(reactor, client, 4.0),
                        "a TCP connection that never starts TLS stays open")

    @async_test
    async def test_dribbled_client_hello_is_closed(self):
        await self.scene()
        client = await connect_raw(reactor, self.s.front)
        hello = (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
                 + b"\x00" * 400)
        closed = await drip_until_closed(
            reactor, client, (bytes([b]) for b in hello), 4.0)
        self.assertTrue(closed, "a dribbled ClientHello keeps the "
                        "connection open")

    @async_test
    async def test_plain_http_to_tls_port(self):
        await self.scene()
        client = await exchange(reactor, self.s.front, request_bytes(
            token=self.token, close=True), 3.0)
        self.assertFalse(client.aborted_by_us)
        self.assertEqual(self.s.api.requests, [])
        tls = await connect_tls(reactor, self.s.front)
        tls.send(request_bytes(token=self.token, close=True))
        await wait_closed(reactor, tls, 3.0)
        self.assertEqual([r.status for r in tls.responses()], [200])

    @async_test
    async def test_slowloris_inside_tls_gets_408(self):
        await self.scene()
        client = await connect_tls(reactor, self.s.front)
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
        closed = await drip_until_closed(
            reactor, client, (bytes([b]) for b in head), 4.0)
        self.assertTrue(closed)
        self.assertEqual([r.status for r in client.responses()], [408])

    @async_test
    async def test_forwarded_proto_is_https_whatever_the_client_says(self):
        await self.scene()
        client = await connect_tls(reactor, self.s.front)
        client.send(request_bytes(token=self.token, close=True, headers=[
            ("X-Forwarded-Proto", "http"), ("X-Forwarded-For", "6.6.6.6")]))
        await wait_closed(reactor, client, 3.0)
        self.assertEqual([r.status for r in client.responses()], [200])
        up = self.s.api.requests[0]
        self.assertEqual(up.header(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(up.header(b"x-forwarded-for"), [b"127.0.0.1"])


    async def tls_client_not_reading(self):
        """A TLS client past its handshake (one request answered first:
        TLS buffers whatever is written before the handshake without
        pausing anyone, which would measure the client, not phantomd)."""
        await self.scene()
        client = await connect_tls(reactor, self.s.front)
        self.addCleanup(lambda: client.is_closed or
                        client.transport.abortConnection())
        client.send(request_bytes(target="/warm", token=self.token))
        self.assertTrue(await wait_for(
            reactor, lambda: client.responses(), 3.0))
        return client

    @async_test
    async def test_response_buffering_is_bounded_over_tls(self):
        """As over plain TCP: a TLS client that reads nothing makes the
        API's response stall at socket buffers, not in phantomd."""
        from .fakes import Stream
        client = await self.tls_client_not_reading()
        self.s.api.behaviour = Stream(total=256 << 20, chunked=True)
        client.send(request_bytes(token=self.token))
        await wait_for(reactor, lambda: self.s.api.requests, 3.0)
        client.transport.pauseProducing()
        written = await wait_stalled(reactor, lambda: self.s.api.written)
        self.assertLess(written, 64 << 20, "phantomd took %d MB for a TLS "
                        "client that reads nothing" % (written >> 20))

    @async_test
    async def test_upload_buffering_is_bounded_over_tls(self):
        from .fakes import UploadPump
        client = await self.tls_client_not_reading()
        self.s.api.stop_reading_after_head = True
        self.s.api.bytes_received = 0
        client.send(request_bytes("POST", "/upload", token=self.token,
                                  headers=[("Transfer-Encoding", "chunked")]))
        pump = UploadPump(client, 256 << 20)
        pump.start(reactor)
        sent = await wait_stalled(reactor, lambda: pump.sent)
        self.assertLess(sent, 64 << 20, "phantomd took %d MB of upload over "
                        "TLS that the API did not read" % (sent >> 20))


class RequestTargets(Hostile):
    """Request-target forms (RFC 9112 section 3.2): what reaches the API is
    always origin-form, so an upstream that is itself a proxy (a mesh
    sidecar, say) cannot be steered to another host."""

    async def target(self, method: bytes, target: bytes):
        client = await self.send(self.head(
            method + b" " + target + b" HTTP/1.1", b"Connection: close"))
        return client.responses()[0].status

    @async_test
    async def test_absolute_form_goes_upstream_as_origin_form(self):
        await self.scene()
        for target, expected in ((b"http://evil.example/x?y=1", b"/x?y=1"),
                                 (b"https://evil.example:8443/x", b"/x"),
                                 (b"HTTP://EVIL/x", b"/x"),
                                 (b"http://evil.example", b"/")):
            before = len(self.s.api.requests)
            status = await self.target(b"GET", target)
            if status == 400:
                continue  # refusing absolute-form is also safe
            self.assertEqual(status, 200)
            self.assertEqual(self.s.api.requests[before].target, expected)
            self.assertEqual(self.s.api.requests[before].header(b"host"),
                             [b"127.0.0.1:%d" % self.s.api.portnum])

    @async_test
    async def test_authority_and_asterisk_forms_are_not_tunnels(self):
        await self.scene()
        self.assertIn(await self.target(b"GET", b"evil.example:443"),
                      (400,))
        self.assertIn(await self.target(b"CONNECT", b"evil.example:443"),
                      (400, 405, 501))
        self.assertIn(await self.target(b"GET", b"*"), (400,))
        self.assertEqual([r.method for r in self.s.api.requests], [])

