"""The core issue end to end: a real phantomd ``Gateway`` on loopback between
a fake token service and a fake API (``tests.robustness.fakes``).

Every row of DESIGN section 2 is exercised here through the whole stack
(front, gate, cache, coalescer, introspector, upstream pool), with the
status, the exact RFC 6750 challenge, the JSON error body and
``Cache-Control: no-store`` the client sees; plus both token-service answer
forms, both client-secret methods, streaming, upstream keep-alive and the
cache's use of the token service's ``Cache-Control``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Iterator, Optional
from urllib.parse import unquote_plus

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from tests.robustness.fakes import (
    CLIENT_SECRET, LOOPBACK, FakeAPI, Hang, Raw, Reply, RequestParser, Scene,
    ServerConnection, Stream, async_test, closed_port, connect_http,
    exchange, json_reply, new_token, request_bytes, response_head, wait_for)

CLIENT_ID = "gateway_client"
REALM = "api"
MiB = 1 << 20

# RFC 7235: challenge = auth-scheme [ 1*SP #auth-param ]; RFC 6750 section 3
# wants every value of the Bearer challenge as a quoted-string.
_PARAM = r'([A-Za-z0-9_\-]+)="((?:[^"\\]|\\.)*)"'
_CHALLENGE = re.compile(r"Bearer (%s(?:[ \t]*,[ \t]*%s)*)\Z" % (_PARAM,
                                                                 _PARAM))


# The fakes' ini has sub-second timeouts, made for fault tests; on two busy
# shared cores a healthy introspection or API answer may take longer.  Only
# the tests of a timeout row shorten it again.
LENIENT = {"phantomd": {"header_timeout": "5", "idle_timeout": "10",
                        "upstream_timeout": "5"},
           "introspection": {"timeout": "5"}}


async def build(testcase, response: str = "jwt", api_port=None,
                **sections) -> Scene:
    merged = {name: dict(keys) for name, keys in LENIENT.items()}
    for name, keys in sections.items():
        merged.setdefault(name, {}).update(keys)
    return await Scene.build(testcase, reactor, response=response,
                             api_port=api_port, **merged)


def challenge_params(value: bytes) -> list:
    """``[(name, value)]`` of a ``Bearer`` challenge, or AssertionError."""
    text = value.decode("ascii")
    if _CHALLENGE.match(text) is None:
        raise AssertionError("not an RFC 6750 Bearer challenge: %r" % text)
    return re.findall(_PARAM, text[len("Bearer "):])


class GatewayCase(unittest.TestCase):
    timeout = 15

    def assertError(self, r, status: int, error: Optional[str] = None,
                    challenge: Optional[str] = "absent",
                    scope: Optional[str] = None):
        """The documented error answer: status, JSON body, no-store, and
        the challenge: ``"absent"`` (none), ``None`` (exactly
        ``Bearer realm="api"``) or the RFC 6750 error code it must carry."""
        self.assertEqual(r.status, status, r.body[:300])
        self.assertEqual(r.first(b"cache-control"), b"no-store")
        self.assertTrue(r.first(b"content-type", b"").startswith(
            b"application/json"), r.headers)
        doc = json.loads(r.body)
        self.assertIsInstance(doc.get("error"), str)
        self.assertIsInstance(doc.get("error_description", ""), str)
        if error is not None:
            self.assertEqual(doc["error"], error)
        challenges = r.header(b"www-authenticate")
        if challenge == "absent":
            self.assertEqual(challenges, [])
            return doc
        self.assertEqual(len(challenges), 1, challenges)
        if challenge is None:
            self.assertEqual(challenges[0], b'Bearer realm="%s"' % (
                REALM.encode()))
            return doc
        params = challenge_params(challenges[0])
        names = [k for k, _ in params]
        self.assertEqual(len(names), len(set(names)), params)
        got = dict(params)
        self.assertEqual(names[0], "realm")
        self.assertEqual(got["realm"], REALM)
        self.assertEqual(got["error"], challenge)
        self.assertLessEqual(set(names), {"realm", "error",
                                          "error_description", "scope"})
        if scope is None:
            self.assertNotIn("scope", got)
        else:
            self.assertEqual(set(got["scope"].split()), set(scope.split()))
        return doc

    def assertNothingForwarded(self, scene):
        self.assertEqual(scene.api.requests, [],
                         "a request reached the API")


def forwarded_with(testcase, api_request, token: str, jwt: str) -> None:
    """The API got exactly the JWT, and the opaque token nowhere."""
    testcase.assertEqual(api_request.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
    testcase.assertNotIn(token.encode(), api_request.raw())


# -- the happy path -----------------------------------------------------------


class HappyPath(GatewayCase):
    """Both answer forms of DESIGN section 3 with both client-secret
    methods: the token service sees our credentials and ``token=<opaque>``,
    the API sees ``Bearer <jwt>`` and never the opaque token."""

    async def check(self, response: str, auth_method: str):
        scene = await build(self, response=response,
                            introspection={"auth_method": auth_method})
        token, jwt = scene.good_token()
        body = b'{"item": "a"}'
        r = await scene.get(token, method="POST", target="/v1/items?x=1",
                            headers=[(b"Content-Type", b"application/json"),
                                     (b"X-Custom", b"kept"),
                                     (b"X-Forwarded-For", b"6.6.6.6"),
                                     (b"Forwarded", b"for=6.6.6.6")],
                            body=body)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json(), {"ok": True, "method": "POST",
                                    "target": "/v1/items?x=1"})

        [ts] = scene.ts.requests
        self.assertEqual(ts.method, b"POST")
        self.assertEqual(ts.target, b"/oauth/v2/introspect")
        self.assertEqual(ts.header(b"content-type"),
                         [b"application/x-www-form-urlencoded"])
        if response == "jwt":
            self.assertEqual(ts.header(b"accept"), [b"application/jwt"])
        form = ts.form
        self.assertEqual(form["token"], [token])
        if auth_method == "client_secret_basic":
            [auth] = ts.header(b"authorization")
            scheme, _, b64 = auth.partition(b" ")
            self.assertEqual(scheme, b"Basic")
            cid, _, secret = base64.b64decode(b64).decode().partition(":")
            self.assertEqual((unquote_plus(cid), unquote_plus(secret)),
                             (CLIENT_ID, CLIENT_SECRET))
            self.assertEqual(set(form), {"token"})
        else:
            self.assertEqual(ts.header(b"authorization"), [])
            self.assertEqual(form, {"token": [token],
                                    "client_id": [CLIENT_ID],
                                    "client_secret": [CLIENT_SECRET]})

        [api] = scene.api.requests
        forwarded_with(self, api, token, jwt)
        self.assertEqual((api.method, api.target, api.body),
                         (b"POST", b"/v1/items?x=1", body))
        self.assertEqual(api.header(b"x-custom"), [b"kept"])
        # what phantomd sets upstream, a client cannot spoof
        self.assertEqual(api.header(b"x-forwarded-for"), [LOOPBACK.encode()])
        self.assertEqual(api.header(b"forwarded"), [])

    @async_test
    async def test_jwt_answer_client_secret_basic(self):
        await self.check("jwt", "client_secret_basic")

    @async_test
    async def test_jwt_answer_client_secret_post(self):
        await self.check("jwt", "client_secret_post")

    @async_test
    async def test_phantom_token_answer_client_secret_basic(self):
        await self.check("phantom_token", "client_secret_basic")

    @async_test
    async def test_phantom_token_answer_client_secret_post(self):
        await self.check("phantom_token", "client_secret_post")

    @async_test
    async def test_scheme_name_is_case_insensitive(self):
        scene = await build(self)
        token, jwt = scene.good_token()
        r = await scene.get(headers=[(b"Authorization",
                                      b"bEaReR " + token.encode())])
        self.assertEqual(r.status, 200, r.body)
        forwarded_with(self, scene.api.requests[0], token, jwt)


# -- DESIGN section 2: what clients see when the gate says no -----------------


class CredentialRows(GatewayCase):

    @async_test
    async def test_no_or_other_scheme_is_401_bare_challenge(self):
        scene = await build(self)
        for headers in ([], [(b"Authorization", b"Basic dXNlcjpwYXNz")],
                        [(b"Authorization", b"Digest username=\"u\"")]):
            r = await scene.get(headers=headers)
            self.assertError(r, 401, challenge=None)
        self.assertEqual(scene.ts.calls, 0)
        self.assertNothingForwarded(scene)

    @async_test
    async def test_malformed_bearer_is_400_invalid_request(self):
        scene = await build(self)
        token, _ = scene.good_token()
        cases = [
            [(b"Authorization", b"Bearer")],
            [(b"Authorization", b"Bearer ")],
            [(b"Authorization", b"Bearer tok@en")],
            [(b"Authorization", b"Bearer %s, Bearer %s" % (
                token.encode(), token.encode()))],
            [(b"Authorization", b"Bearer %s extra" % token.encode())],
            [(b"Authorization", b"Bearer " + token.encode()),
             (b"Authorization", b"Bearer " + token.encode())],
        ]
        for headers in cases:
            r = await scene.get(headers=headers)
            self.assertError(r, 400, "invalid_request",
                             challenge="invalid_request")
        self.assertEqual(scene.ts.calls, 0,
                         "a malformed token reached the token service")
        self.assertNothingForwarded(scene)

    @async_test
    async def test_inactive_204_is_401_invalid_token(self):
        scene = await build(self)
        r = await scene.get(new_token())  # the fake answers 204
        self.assertError(r, 401, "invalid_token", challenge="invalid_token")
        self.assertEqual(scene.ts.calls, 1)
        self.assertNothingForwarded(scene)

    @async_test
    async def test_inactive_json_is_401_invalid_token_in_both_forms(self):
        for response in ("jwt", "phantom_token"):
            scene = await build(self, response=response)
            scene.ts.default = json_reply({"active": False}, "no-store")
            r = await scene.get(new_token())
            self.assertError(r, 401, "invalid_token",
                             challenge="invalid_token")
            self.assertEqual(scene.ts.calls, 1)
            self.assertNothingForwarded(scene)

    @async_test
    async def test_insufficient_scope_is_403_also_on_a_cache_hit(self):
        scene = await build(
            self, phantomd={"required_scopes": "read admin"})
        weak = new_token()
        scene.ts.activate(weak, scope="read write")
        for _ in range(2):
            r = await scene.get(weak)
            self.assertError(r, 403, "insufficient_scope",
                             challenge="insufficient_scope",
                             scope="read admin")
        self.assertEqual(scene.ts.calls_for(weak), 1,
                         "the second request was not a cache hit")
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_cache_lookups_total", {"result": "hit"}), 1)
        self.assertNothingForwarded(scene)

        strong = new_token()
        jwt = scene.ts.activate(strong, scope="admin read")
        r = await scene.get(strong)
        self.assertEqual(r.status, 200, r.body)
        forwarded_with(self, scene.api.requests[0], strong, jwt)


class TokenServiceRows(GatewayCase):
    """Failures of the token service: never forwarded, never cached (the
    next request introspects again and, the service recovered, passes)."""

    async def check_fault(self, behaviour, status: int, response="jwt",
                          **sections):
        scene = await build(self, response=response, **sections)
        token, jwt = scene.good_token()
        scene.ts.behaviour = behaviour
        r = await scene.get(token)
        doc = self.assertError(r, status)
        self.assertNothingForwarded(scene)
        self.assertEqual(scene.ts.calls, 1)
        self.assertEqual(scene.gw.metrics.sample("phantomd_cache_entries"),
                         0)
        scene.ts.behaviour = None
        ok = await scene.get(token)
        self.assertEqual(ok.status, 200, ok.body)
        self.assertEqual(scene.ts.calls, 2, "the failure was cached")
        forwarded_with(self, scene.api.requests[0], token, jwt)
        return r, doc

    @async_test
    async def test_500_is_502(self):
        await self.check_fault(Reply(500, body=b"oops"), 502)

    @async_test
    async def test_401_to_our_credentials_is_502(self):
        await self.check_fault(Reply(401, ((b"WWW-Authenticate",
                                            b'Basic realm="ts"'),)), 502)

    @async_test
    async def test_unreadable_answers_are_502(self):
        await self.check_fault(Reply(200, ((b"Content-Type",
                                            b"application/jwt"),),
                                     b"not-a-jwt"), 502)
        await self.check_fault(json_reply(b"{not json"), 502,
                               response="phantom_token")
        await self.check_fault(json_reply({"active": True}), 502,
                               response="phantom_token")

    @async_test
    async def test_unreachable_is_502(self):
        scene = await build(self)
        token, jwt = scene.good_token()
        port = scene.ts.portnum
        await scene.ts.stop()
        r = await scene.get(token)
        self.assertError(r, 502)
        self.assertNothingForwarded(scene)
        self.assertEqual(scene.gw.metrics.sample("phantomd_cache_entries"),
                         0)
        scene.ts.listen(port)
        ok = await scene.get(token)
        self.assertEqual(ok.status, 200, ok.body)
        forwarded_with(self, scene.api.requests[0], token, jwt)

    @async_test
    async def test_too_slow_is_504(self):
        await self.check_fault(Hang(), 504,
                               introspection={"timeout": "0.3"})

    @async_test
    async def test_service_503_is_503_with_retry_after(self):
        r, _ = await self.check_fault(
            Reply(503, ((b"Retry-After", b"7"),), b"busy"), 503)
        self.assertEqual(r.header(b"retry-after"), [b"7"])

    @async_test
    async def test_too_many_in_flight_is_503_with_retry_after(self):
        scene = await build(self, introspection={"max_in_flight": "1",
                                                 "timeout": "0.5"})
        slow, _ = scene.good_token()
        other, _ = scene.good_token()
        scene.ts.behaviour = Hang()
        pending = defer.ensureDeferred(scene.get(slow))
        self.assertTrue(await wait_for(reactor,
                                       lambda: scene.ts.in_flight == 1, 3))
        r = await scene.get(other)
        self.assertError(r, 503, "temporarily_unavailable")
        [retry] = r.header(b"retry-after")
        self.assertGreaterEqual(int(retry), 1)
        self.assertEqual(scene.ts.calls_for(other), 0,
                         "the shed request reached the token service")
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_introspections_total", {"outcome": "shed"}), 1)
        slow_answer = await pending
        self.assertError(slow_answer, 504)
        self.assertNothingForwarded(scene)


class UpstreamRows(GatewayCase):

    @async_test
    async def test_upstream_unreachable_is_502(self):
        scene = await build(self, api_port=closed_port(reactor))
        token, _ = scene.good_token()
        r = await scene.get(token)
        self.assertError(r, 502)

    @async_test
    async def test_upstream_timeout_is_504(self):
        scene = await build(self, phantomd={"upstream_timeout": "0.3"})
        token, _ = scene.good_token()
        scene.api.behaviour = Hang()
        r = await scene.get(token)
        self.assertError(r, 504)
        self.assertEqual(len(scene.api.requests), 1)


class DataPathRows(GatewayCase):
    """Limits and framing: answered, then closed; nothing forwarded."""

    async def answered_then_closed(self, scene, data: bytes, status: int,
                                   timeout: float = 3.0):
        client = await exchange(reactor, scene.front, data, timeout)
        self.assertTrue(client.is_closed and not client.aborted_by_us,
                        "the connection was left open")
        responses = client.responses()
        self.assertEqual([r.status for r in responses], [status],
                         client.received[:300])
        self.assertNothingForwarded(scene)
        return responses[0]

    @async_test
    async def test_request_line_too_long_is_414(self):
        scene = await build(self)
        token, _ = scene.good_token()
        r = await self.answered_then_closed(scene, request_bytes(
            target="/" + "a" * 9000, token=token), 414)
        self.assertError(r, 414)

    @async_test
    async def test_header_section_too_large_is_431(self):
        scene = await build(self)
        token, _ = scene.good_token()
        headers = [("X-Pad-%d" % i, "p" * 1000) for i in range(70)]
        r = await self.answered_then_closed(scene, request_bytes(
            token=token, headers=headers), 431)
        self.assertError(r, 431)

    @async_test
    async def test_incomplete_head_is_408_then_closed(self):
        scene = await build(self, phantomd={"header_timeout": "0.3"})
        token, _ = scene.good_token()
        head = request_bytes(token=token)
        r = await self.answered_then_closed(scene, head[:-4], 408)
        self.assertError(r, 408)

    @async_test
    async def test_ambiguous_framing_is_400_then_closed(self):
        scene = await build(self)
        token, _ = scene.good_token()
        cases = {
            "CL+TE": request_bytes("POST", token=token, headers=[
                ("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
                body=b"0\r\n\r\n"),
            "two CLs": request_bytes("POST", token=token, headers=[
                ("Content-Length", "5"), ("Content-Length", "6")],
                body=b"hello!"),
            "bad chunk size": request_bytes("POST", token=token, headers=[
                ("Transfer-Encoding", "chunked")], body=b"zz\r\nhello\r\n"),
        }
        for name, data in cases.items():
            r = await self.answered_then_closed(scene, data, 400)
            self.assertEqual(r.status, 400, name)
            self.assertEqual(r.first(b"cache-control"), b"no-store", name)
            self.assertIsInstance(json.loads(r.body)["error"], str)

    @async_test
    async def test_framing_400_has_no_bearer_challenge(self):
        """A framing error is not about the token: like 408/414/431 it must
        not tell the client its bearer request was invalid."""
        scene = await build(self)
        token, _ = scene.good_token()
        r = await self.answered_then_closed(scene, request_bytes(
            "POST", token=token, headers=[("Content-Length", "5"),
                                          ("Transfer-Encoding", "chunked")],
            body=b"0\r\n\r\n"), 400)
        self.assertError(r, 400, "invalid_request")


# -- streaming ----------------------------------------------------------------


class _HashedBody:
    """Stands in for ``Request.body`` in the fake API: keeps a length and a
    running SHA-256 instead of the bytes."""

    def __init__(self) -> None:
        self.length = 0
        self.sha = hashlib.sha256()

    def __iadd__(self, data: bytes) -> "_HashedBody":
        self.length += len(data)
        self.sha.update(data)
        return self


class _HashingParser(RequestParser):
    def _head(self, head):
        req = super()._head(head)
        if req is not None:
            req.body = _HashedBody()
        return req


class HashingAPI(FakeAPI):
    """The fake API, with request bodies hashed as they arrive."""

    def buildProtocol(self, addr):
        conn = ServerConnection(self)
        conn.parser = _HashingParser()
        return conn


class StreamingClient(protocol.Protocol):
    """Sends one request (a body from ``blocks``, chunked, as fast as the
    peer takes it) and hashes the response body as it arrives.
    ``done`` fires with (status, headers, body length, SHA-256 hex)."""

    def __init__(self, head: bytes, blocks: Optional[Iterator[bytes]] = None):
        self.head, self.blocks = head, blocks
        self.done: defer.Deferred = defer.Deferred()
        self.buf = b""
        self.status: Optional[int] = None
        self.headers: list = []
        self.mode = None
        self.remaining = 0
        self.length = 0
        self.sha = hashlib.sha256()
        self.paused = self.stopped = False

    def connectionMade(self):
        self.transport.write(self.head)
        if self.blocks is not None:
            self.transport.registerProducer(self, True)
            reactor.callLater(0, self.resumeProducing)

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.stopped = True

    def resumeProducing(self):
        self.paused = False
        while not (self.paused or self.stopped):
            block = next(self.blocks, None)
            if block is None:
                self.stopped = True
                self.transport.unregisterProducer()
                self.transport.write(b"0\r\n\r\n")
                return
            self.transport.write(b"%x\r\n%s\r\n" % (len(block), block))

    def dataReceived(self, data):
        if self.status is None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data, self.buf = self.buf[:end], self.buf[end + 4:], b""
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split(b" ")[1])
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                self.headers.append((k.strip().lower(), v.strip()))
            h = dict(self.headers)
            if b"chunked" in h.get(b"transfer-encoding", b"").lower():
                self.mode = "chunked"
            else:
                self.mode = "length"
                self.remaining = int(h.get(b"content-length", b"0"))
        if self.mode == "length":
            take = data[:self.remaining]
            self._eat(take)
            self.remaining -= len(take)
            if self.remaining == 0:
                self._finish()
            return
        self.buf += data
        while self.mode == "chunked":
            if self.remaining:
                take = self.buf[:self.remaining]
                self.buf = self.buf[len(take):]
                self._eat(take)
                self.remaining -= len(take)
                if self.remaining:
                    return
                self.remaining = -2  # the CRLF after the data
            if self.remaining == -2:
                if len(self.buf) < 2:
                    return
                self.buf, self.remaining = self.buf[2:], 0
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            size = int(self.buf[:end].split(b";")[0], 16)
            self.buf = self.buf[end + 2:]
            if size == 0:
                self._finish()
                return
            self.remaining = size

    def _eat(self, data: bytes) -> None:
        self.length += len(data)
        self.sha.update(data)

    def _finish(self) -> None:
        self.mode = "done"
        if not self.done.called:
            self.done.callback((self.status, self.headers, self.length,
                                self.sha.hexdigest()))

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(reason)


class Streaming(GatewayCase):
    """32 MiB each way, generated on the fly and checked by length and a
    running hash where it arrives (neither side holds it whole)."""

    timeout = 60
    SIZE = 32 * MiB

    async def connect(self, scene, client: StreamingClient):
        ep = TCP4ClientEndpoint(reactor, LOOPBACK, scene.front, timeout=5)
        await ep.connect(protocol.Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.transport.abortConnection())

    @async_test
    async def test_upload(self):
        api = HashingAPI(reactor)
        scene = await build(self, api_port=api.listen())
        self.addCleanup(api.stop)
        scene.api = api
        token, jwt = scene.good_token()
        base = os.urandom(65536)
        sent = hashlib.sha256()

        def blocks():
            for i in range(self.SIZE // len(base)):
                k = (i * 7919) % len(base)
                block = base[k:] + base[:k]  # each block differs
                sent.update(block)
                yield block
        client = StreamingClient(request_bytes(
            "PUT", "/upload", token, [("Transfer-Encoding", "chunked")]),
            blocks())
        await self.connect(scene, client)
        status, _, _, _ = await client.done
        self.assertEqual(status, 200)
        [req] = api.requests
        self.assertEqual(req.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        self.assertEqual(req.body.length, self.SIZE)
        self.assertEqual(req.body.sha.hexdigest(), sent.hexdigest())

    @async_test
    async def test_download(self):
        scene = await build(self)
        token, _ = scene.good_token()
        block = os.urandom(65536)
        scene.api.behaviour = Stream(total=self.SIZE, chunked=False,
                                     block=len(block), filler=block)
        expected = hashlib.sha256()
        for _ in range(self.SIZE // len(block)):
            expected.update(block)
        client = StreamingClient(request_bytes("GET", "/download", token))
        await self.connect(scene, client)
        status, _, length, digest = await client.done
        self.assertEqual(status, 200)
        self.assertEqual(length, self.SIZE)
        self.assertEqual(digest, expected.hexdigest())


# -- keep-alive and the cache -------------------------------------------------


class KeepAlive(GatewayCase):

    @async_test
    async def test_twenty_requests_one_upstream_connection(self):
        scene = await build(self)
        token, jwt = scene.good_token()
        client = await connect_http(reactor, scene.front)
        self.addCleanup(lambda: client.lost or
                        client.transport.abortConnection())
        for i in range(20):
            r = await client.request(request_bytes(target="/r/%d" % i,
                                                   token=token))
            self.assertEqual(r.status, 200, r.body)
            self.assertEqual(r.json()["target"], "/r/%d" % i)
        self.assertFalse(client.lost)
        self.assertEqual(len(scene.api.requests), 20)
        self.assertEqual(scene.api.connections_made, 1)
        self.assertEqual(scene.ts.calls, 1)
        for req in scene.api.requests:
            forwarded_with(self, req, token, jwt)


def chunked(data: bytes, size: int = 16) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]),
                                       data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


class Cache(GatewayCase):

    @async_test
    async def test_max_age_answer_is_reused(self):
        scene = await build(self)  # fake sends max-age=300
        token, jwt = scene.good_token()
        for _ in range(3):
            r = await scene.get(token)
            self.assertEqual(r.status, 200, r.body)
        self.assertEqual(scene.ts.calls_for(token), 1)
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_cache_lookups_total", {"result": "hit"}), 2)
        for req in scene.api.requests:
            forwarded_with(self, req, token, jwt)

    @async_test
    async def test_inactive_answer_is_remembered(self):
        """DESIGN section 4: a client hammering a bad token does not hammer
        the token service."""
        scene = await build(self)
        scene.ts.default = Reply(204, ((b"Cache-Control", b"max-age=60"),))
        bad = new_token()
        for _ in range(3):
            r = await scene.get(bad)
            self.assertError(r, 401, "invalid_token",
                             challenge="invalid_token")
        self.assertEqual(scene.ts.calls_for(bad), 1)
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_cache_lookups_total", {"result": "negative_hit"}), 2)

    @async_test
    async def test_no_store_answer_is_introspected_again(self):
        for response in ("jwt", "phantom_token"):
            scene = await build(self, response=response)
            scene.ts.cache_control = "no-store"
            token, jwt = scene.good_token()
            for _ in range(2):
                r = await scene.get(token)
                self.assertEqual(r.status, 200, r.body)
            self.assertEqual(scene.ts.calls_for(token), 2, response)
            for req in scene.api.requests:
                forwarded_with(self, req, token, jwt)

    @async_test
    async def test_answer_without_content_length(self):
        """Chunked, and delimited by close: both read, and cached."""
        headers = [(b"Content-Type", b"application/jwt"),
                   (b"Cache-Control", b"max-age=300")]
        framings = {
            "chunked": lambda jwt: Raw(response_head(200, headers + [
                (b"Transfer-Encoding", b"chunked")]) + chunked(jwt.encode()),
                then="keep"),
            "until close": lambda jwt: Raw(response_head(200, headers)
                                           + jwt.encode(), then="close"),
        }
        for name, framing in framings.items():
            scene = await build(self)
            token, jwt = scene.good_token()
            scene.ts.behaviour = lambda req, framing=framing, jwt=jwt: (
                framing(jwt))
            for _ in range(2):
                r = await scene.get(token)
                self.assertEqual(r.status, 200, (name, r.body))
            self.assertEqual(scene.ts.calls_for(token), 1, name)
            forwarded_with(self, scene.api.requests[0], token, jwt)
