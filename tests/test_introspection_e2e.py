"""End-to-end: the introspector over real loopback sockets, through
``make_http_client`` (persistent pool, verified TLS, client certificates),
against a token service on TLS and against a raw HTTP server for framing
the in-memory tests cannot produce (no Content-Length, endless bodies)."""

from __future__ import annotations

import json
from typing import Any

from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest
from twisted.web.server import Site

from phantomd.token import introspection
from phantomd.token.introspection import Introspector, make_http_client
from phantomd.token.outcomes import Active, Inactive, IntrospectionFailed
from tests.helpers_http import listen_loopback
from tests.test_introspection import (TOKEN, TokenService, make_jwt,
                                      make_settings)
from tests.test_tls import PKI


class _Tracking:
    """Counts server connections and lets tests wait until all are gone."""

    def __init__(self) -> None:
        self.connections = 0
        self.lost: list[defer.Deferred] = []

    def track(self, proto: Any) -> Any:
        self.connections += 1
        gone: defer.Deferred = defer.Deferred()
        self.lost.append(gone)
        original = proto.connectionLost

        def connectionLost(reason: Any) -> None:
            original(reason)
            gone.callback(None)

        proto.connectionLost = connectionLost
        return proto

    def all_gone(self) -> defer.Deferred:
        return defer.gatherResults(self.lost)


class TrackingSite(Site):
    def __init__(self, resource: Any, tracking: _Tracking) -> None:
        super().__init__(resource)
        self.tracking = tracking

    def buildProtocol(self, addr: Any) -> Any:
        return self.tracking.track(super().buildProtocol(addr))


class E2ETestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.pki = PKI(self.mktemp())
        self.tracking = _Tracking()
        self.addCleanup(self.tracking.all_gone)

    def client(self, **settings: Any) -> Any:
        client = make_http_client(reactor, make_settings(**settings))
        self.addCleanup(client.close)
        return client, Introspector(reactor, client, make_settings(**settings),
                                    "x")

    def listen(self, factory: Any, tls_options: Any = None) -> int:
        return listen_loopback(self, reactor, factory, tls_options)


class PeerCertificateService(TokenService):
    """Records the subject of the client certificate on each request."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        cert = request.transport.getPeerCertificate()
        subject = cert.to_cryptography().subject if cert else None
        self.peers.append(subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)[0].value if subject else None)
        return super().render_POST(request)


class TLSTests(E2ETestCase):
    def serve(self, names=("localhost",), require_client_cert=False):
        cert, key, _ = self.pki.issue("token-service", dns=names)
        self.service = PeerCertificateService()
        return self.listen(TrackingSite(self.service, self.tracking),
                           self.pki.server_options(cert, key,
                                                   require_client_cert))

    @defer.inlineCallbacks
    def test_verified_and_persistent(self):
        port = self.serve()
        token = make_jwt(exp=int(reactor.seconds()) + 300)
        self.service.answer(200, token.encode(), Cache_Control="max-age=9")
        _, intro = self.client(url="https://localhost:%d/introspect" % port,
                               ca_file=self.pki.ca_file)
        first = yield intro.introspect(TOKEN)
        self.assertIsInstance(first, Active)
        self.assertEqual((first.jwt, first.lifetime), (token, 9.0))
        self.service.answer(204)
        second = yield intro.introspect(TOKEN)
        self.assertIsInstance(second, Inactive)
        self.assertEqual(self.tracking.connections, 1)

    @defer.inlineCallbacks
    def test_cookies_are_not_kept(self):
        port = self.serve()
        self.service.answer(204, Set_Cookie="session=abc; Path=/")
        _, intro = self.client(url="https://localhost:%d/introspect" % port,
                               ca_file=self.pki.ca_file)
        yield intro.introspect(TOKEN)
        yield intro.introspect(TOKEN)
        self.assertEqual([r.headers.get(b"cookie") for r in
                          self.service.requests], [None, None])

    @defer.inlineCallbacks
    def test_hostname_mismatch_refused(self):
        port = self.serve(names=("token.example",))
        self.service.answer(204)
        _, intro = self.client(url="https://localhost:%d/introspect" % port,
                               ca_file=self.pki.ca_file)
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertEqual(caught.exception.kind, "error")
        self.assertIn("TLS certificate is not valid for localhost",
                      caught.exception.description)
        self.assertEqual(self.service.requests, [])

    @defer.inlineCallbacks
    def test_unknown_ca_refused(self):
        port = self.serve()
        self.service.answer(204)
        other = PKI(self.mktemp(), "some other CA")
        _, intro = self.client(url="https://localhost:%d/introspect" % port,
                               ca_file=other.ca_file)
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertIn("certificate verify failed",
                      caught.exception.description)
        self.assertEqual(self.service.requests, [])

    @defer.inlineCallbacks
    def test_tls_client_auth(self):
        port = self.serve(require_client_cert=True)
        self.service.answer(204)
        cert, key, _ = self.pki.issue("gateway_client", client=True)
        _, intro = self.client(url="https://localhost:%d/introspect" % port,
                               ca_file=self.pki.ca_file,
                               auth_method="tls_client_auth",
                               client_cert=cert, client_key=key)
        result = yield intro.introspect(TOKEN)
        self.assertIsInstance(result, Inactive)
        self.assertEqual(self.service.peers, ["gateway_client"])
        [seen] = self.service.requests
        self.assertEqual(seen.form, [("token", TOKEN),
                                     ("client_id", "gateway client")])
        self.assertNotIn(b"authorization", seen.headers)

    @defer.inlineCallbacks
    def test_client_certificate_required(self):
        port = self.serve(require_client_cert=True)
        self.service.answer(204)
        _, intro = self.client(url="https://localhost:%d/introspect" % port,
                               ca_file=self.pki.ca_file)
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertIn("TLS handshake failed", caught.exception.description)
        self.assertEqual(self.service.requests, [])


    @defer.inlineCallbacks
    def test_oversize_answer_drops_tls_connection(self):
        port = self.serve()
        self.service.answer(200, [b"a" * 70000], finish=False)
        _, intro = self.client(url="https://localhost:%d/introspect" % port,
                               ca_file=self.pki.ca_file, timeout=30)
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertIn("max_response_bytes", caught.exception.description)
        yield self.tracking.all_gone()


class RawAnswer(protocol.Protocol):
    """Reads one request, then writes the factory's canned answer bytes
    (a list: written one by one; ``None`` in it: keep writing ``filler``
    until the peer goes away) and closes if ``close`` is set."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.answered = False
        self._next = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep or self.answered:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) < length:
            return
        self.answered = True
        self.factory.requests += 1
        for part in self.factory.answer:
            if part is None:
                self.flood()
                return
            self.transport.write(part)
        if self.factory.close:
            self.transport.loseConnection()

    def flood(self) -> None:
        if self.connected:
            self.transport.write(self.factory.filler)
            self.factory.flooded += len(self.factory.filler)
            self._next = reactor.callLater(0.001, self.flood)

    def connectionLost(self, reason: Any) -> None:
        self.connected = False
        if self._next is not None and self._next.active():
            self._next.cancel()


class RawFactory(protocol.Factory):
    protocol = RawAnswer

    def __init__(self, answer: list, close: bool, tracking: _Tracking):
        self.answer, self.close, self.tracking = answer, close, tracking
        self.requests = 0
        self.flooded = 0
        self.filler = b"%x\r\n%s\r\n" % (4096, b"a" * 4096)

    def buildProtocol(self, addr: Any) -> Any:
        return self.tracking.track(super().buildProtocol(addr))


class FramingTests(E2ETestCase):
    def serve(self, *answer: Any, close: bool = False, **settings: Any):
        self.factory = RawFactory(list(answer), close, self.tracking)
        port = self.listen(self.factory)
        return self.client(url="http://127.0.0.1:%d/introspect" % port,
                           **settings)[1]

    @defer.inlineCallbacks
    def test_no_content_length(self):
        """Curity's nginx module crashes on this; it is an ordinary answer."""
        token = make_jwt(exp=int(reactor.seconds()) + 300).encode()
        intro = self.serve(b"HTTP/1.1 200 OK\r\nContent-Type: application/jwt"
                           b"\r\nConnection: close\r\n\r\n", token[:20],
                           token[20:], close=True)
        result = yield intro.introspect(TOKEN)
        self.assertEqual(result.jwt, token.decode())

    @defer.inlineCallbacks
    def test_chunked(self):
        token = make_jwt(exp=int(reactor.seconds()) + 300).encode()
        intro = self.serve(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/jwt\r\n"
            b"Transfer-Encoding: chunked\r\nCache-Control: max-age=3\r\n\r\n",
            b"%x\r\n%s\r\n" % (10, token[:10]),
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(token) - 10, token[10:]))
        result = yield intro.introspect(TOKEN)
        self.assertEqual((result.jwt, result.lifetime), (token.decode(), 3))

    @defer.inlineCallbacks
    def test_answer_cut_short(self):
        intro = self.serve(b"HTTP/1.1 200 OK\r\nContent-Type: application/jwt"
                           b"\r\nContent-Length: 100\r\n\r\neyJhbGciOi",
                           close=True)
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertEqual(caught.exception.kind, "error")
        self.assertIn("cut short", caught.exception.description)

    @defer.inlineCallbacks
    def test_endless_body_cut_off(self):
        intro = self.serve(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/jwt\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n", None,
            max_response_bytes=65536, timeout=30)
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertIn("max_response_bytes", caught.exception.description)
        yield self.tracking.all_gone()
        self.assertLess(self.factory.flooded, 64 * 65536)

    @defer.inlineCallbacks
    def test_endless_head_cut_off(self):
        """Twisted's client parser would keep every header line; the
        connection is aborted once the answer passes its bound."""
        intro = self.serve(b"HTTP/1.1 200 OK\r\n", None,
                           max_response_bytes=4096, timeout=30)
        self.factory.filler = b"X-Many: header\r\n" * 256
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertEqual(caught.exception.kind, "error")
        self.assertIn("larger than %d bytes on the wire"
                      % (2 * 4096 + introspection.MAX_HEAD_BYTES),
                      caught.exception.description)
        yield self.tracking.all_gone()

    @defer.inlineCallbacks
    def test_no_answer_times_out(self):
        intro = self.serve(timeout=0.2)
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertEqual(caught.exception.kind, "timeout")
        yield self.tracking.all_gone()

    @defer.inlineCallbacks
    def test_connection_refused(self):
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        _, intro = self.client(url="http://127.0.0.1:%d/introspect" % number)
        with self.assertRaises(IntrospectionFailed) as caught:
            yield intro.introspect(TOKEN)
        self.assertEqual(caught.exception.kind, "error")
        self.assertIn("cannot reach", caught.exception.description)

    @defer.inlineCallbacks
    def test_close_drops_pooled_connections(self):
        client, intro = self.client(
            url="http://127.0.0.1:%d/introspect" % self.listen(
                RawFactory([b"HTTP/1.1 204 No Content\r\n\r\n"], False,
                           self.tracking)))
        result = yield intro.introspect(TOKEN)
        self.assertIsInstance(result, Inactive)
        yield client.close()
        yield self.tracking.all_gone()
        self.assertEqual(self.tracking.connections, 1)
        self.assertEqual(introspection.IDLE_CONNECTION_SECONDS,
                         client.pool.idle_timeout)


class KeycloakStandIn(TokenService):
    """Keycloak >= 25's introspection answer, as its documentation gives it
    (Keycloak does not install here): plain RFC 7662 JSON, plus a ``jwt``
    member holding the access token as a JWT, only when the request asks
    ``Accept: application/jwt``; inactive tokens get ``{"active": false}``.
    An empty-bodied 400 stands for servers that answer inactive tokens so.
    """

    def __init__(self) -> None:
        super().__init__()
        self.jwt = make_jwt(exp=int(reactor.seconds()) + 300)
        self.active = True
        self.empty_400 = False

    def render_POST(self, request: Any) -> Any:
        accept = request.getHeader("accept") or ""
        if self.empty_400:
            self.answer(400, b"", content_type=None)
        elif not self.active:
            self.answer(200, b'{"active": false}',
                        content_type="application/json")
        else:
            doc = {"active": True, "sub": "alice", "scope": "read",
                   "exp": int(reactor.seconds()) + 300}
            if "application/jwt" in accept:
                doc["jwt"] = self.jwt
            self.answer(200, json.dumps(doc).encode(),
                        content_type="application/json")
        return super().render_POST(request)


class TokenServiceShapeTests(E2ETestCase):
    """DESIGN section 14's keys over real sockets, against stand-ins for
    the shapes no installable server shows."""

    def intro(self, **settings: Any) -> Any:
        self.service = KeycloakStandIn()
        port = self.listen(TrackingSite(self.service, self.tracking))
        _, intro = self.client(url="http://127.0.0.1:%d/introspect" % port,
                               **settings)
        return intro

    @defer.inlineCallbacks
    def test_keycloak_jwt_member(self):
        intro = self.intro(response="phantom_token",
                           phantom_token_field="jwt",
                           accept="application/jwt")
        result = yield intro.introspect(TOKEN)
        self.assertIsInstance(result, Active)
        self.assertEqual(result.jwt, self.service.jwt)
        self.service.active = False
        result = yield intro.introspect(TOKEN)
        self.assertIsInstance(result, Inactive)

    @defer.inlineCallbacks
    def test_keycloak_without_accept_has_no_jwt(self):
        """The default Accept of response = phantom_token is
        application/json, for which Keycloak leaves the member out: 502,
        with a description naming the key."""
        intro = self.intro(response="phantom_token",
                           phantom_token_field="jwt")
        e = yield self.assertFailure(intro.introspect(TOKEN),
                                     IntrospectionFailed)
        self.assertIn("without a jwt member", e.description)

    @defer.inlineCallbacks
    def test_empty_400_as_inactive(self):
        intro = self.intro(inactive_statuses=frozenset({204, 400}))
        self.service.empty_400 = True
        result = yield intro.introspect(TOKEN)
        self.assertIsInstance(result, Inactive)
        intro = self.intro()
        self.service.empty_400 = True
        e = yield self.assertFailure(intro.introspect(TOKEN),
                                     IntrospectionFailed)
        self.assertIn("HTTP 400", e.description)
