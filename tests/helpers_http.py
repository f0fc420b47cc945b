"""Fakes for the data-path tests: a gate, an upstream API, a raw client."""

from __future__ import annotations

from typing import Any, Callable, Optional

import httptools
from twisted.internet import defer, protocol

from phantomd import config
from phantomd.direct import then
from phantomd.token.outcomes import Forward, Reject

OPAQUE = "opaque-token-0123456789"
JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.c2ln"


def settings(upstream: str = "http://127.0.0.1:9", **keys: Any) -> Any:
    """A ``config.phantomd`` section with the given keys overridden."""
    lines = ["[phantomd]", "upstream = %s" % upstream]
    lines += ["%s = %s" % (k, v) for k, v in keys.items()]
    lines += ["[introspection]", "url = https://login.example/introspect",
              "client_id = gw", "client_secret = s"]
    return config.parse("\n".join(lines) + "\n").phantomd


class FakeGate:
    """Forwards ``Bearer OPAQUE`` with ``JWT`` and rejects anything else.

    With ``hold = True`` the Deferreds are kept in ``pending`` for the test
    to fire; ``calls`` records every list of Authorization values seen.
    """

    def __init__(self) -> None:
        self.calls: list = []
        self.hold = False
        self.pending: list = []
        self.cancelled = 0

    def decide(self, authorization: list) -> Any:
        if authorization == [b"Bearer " + OPAQUE.encode()]:
            return Forward(jwt=JWT, cache="hit", token_id="abcdef012345")
        if not authorization:
            return Reject(401, None, "no bearer token")
        return Reject(401, "invalid_token", "the token is not active",
                      token_id="0123456789ab", cache="miss")

    def authorize(self, authorization: list) -> defer.Deferred:
        self.calls.append(list(authorization))
        if self.hold:
            def cancel(d: defer.Deferred) -> None:
                self.cancelled += 1
            d: defer.Deferred = defer.Deferred(cancel)
            self.pending.append((d, authorization))
            return d
        return defer.succeed(self.decide(authorization))

    def authorize_to(self, done: Callable[[Any], None], authorization: list,
                     **evidence: Any) -> Any:
        """The real gate's contract, over ``authorize``."""
        return then(self.authorize(authorization, **evidence), done)

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, authorization in pending:
            if not d.called:
                d.callback(self.decide(authorization))


class _Recorded:
    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list = []
        self.body = bytearray()
        self.body_bytes = 0
        self.complete = False

    def header(self, name: bytes) -> list:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class UpstreamProtocol(protocol.Protocol):
    """A small HTTP/1.1 API: answers with ``factory.handler(request, self)``.

    The default handler answers 200 with a body naming the request target.
    A handler may return None and write the response itself.
    """

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.open.add(self)
        self.parser = httptools.HttpRequestParser(self)
        self.current: Optional[_Recorded] = None

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.discard(self)
        self.factory.lost.append(reason)

    def dataReceived(self, data: bytes) -> None:
        self.factory.raw.extend(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.factory.errors.append(e)
            self.transport.loseConnection()

    def on_message_begin(self) -> None:
        self.current = _Recorded()

    def on_url(self, url: bytes) -> None:
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method()
        self.factory.requests.append(self.current)
        if self.factory.on_head is not None:
            self.factory.on_head(self.current, self)

    def on_body(self, data: bytes) -> None:
        self.current.body_bytes += len(data)
        if self.factory.keep_bodies:
            self.current.body += data

    def on_message_complete(self) -> None:
        self.current.complete = True
        out = self.factory.handler(self.current, self)
        if out is not None:
            self.transport.write(out)


def echo_target(request: _Recorded, proto: Any) -> bytes:
    body = b"target=" + request.target
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class UpstreamFactory(protocol.Factory):
    protocol = UpstreamProtocol
    noisy = False

    def __init__(self, handler: Callable = echo_target) -> None:
        self.handler = handler
        self.on_head: Optional[Callable] = None
        self.requests: list = []
        self.connections = 0
        self.open: set = set()
        self.lost: list = []
        self.errors: list = []
        self.raw = bytearray()
        self.keep_bodies = True


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list = []
        self.body = bytearray()
        self.complete = False  # False: ended by the connection closing

    def header(self, name: bytes) -> list:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class RawClient(protocol.Protocol):
    """Sends raw bytes, parses the responses; ``done`` fires with the list
    of responses when the server closes (or after ``expect`` responses)."""

    def __init__(self, expect: Optional[int] = None,
                 head_methods: int = 0) -> None:
        self.expect = expect
        self.responses: list = []
        self.raw = bytearray()
        self.done: defer.Deferred = defer.Deferred()
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._cur: Optional[Response] = None
        self.on_body_hook: Optional[Callable] = None

    def dataReceived(self, data: bytes) -> None:
        self.raw.extend(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            pass

    def on_message_begin(self) -> None:
        self._cur = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._cur.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._cur.status = self._parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        if self.on_body_hook is not None:
            self.on_body_hook(self, data)
        else:
            self._cur.body += data

    def on_message_complete(self) -> None:
        if self._cur.status >= 200:
            self._cur.complete = True
            self.responses.append(self._cur)
        self._cur = None
        if self.expect is not None and len(self.responses) >= self.expect \
                and not self.done.called:
            self.done.callback(self.responses)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        cur = self._cur
        if cur is not None and cur.status >= 200 and \
                (not self.responses or self.responses[-1] is not cur):
            self.responses.append(cur)  # a body delimited by the close
        if not self.done.called:
            self.done.callback(self.responses)


def self_signed() -> tuple:
    """(key PEM, certificate PEM) for ``localhost`` and 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                           critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def buffered(transport: Any) -> int:
    """Bytes waiting in a Twisted TCP transport's send buffer."""
    return (len(transport.dataBuffer) - transport.offset
            + transport._tempDataLen)


def listen_loopback(test: Any, reactor: Any, factory: Any,
                    tls_options: Any = None) -> int:
    """Listen on a free loopback port (TLS with ``tls_options``) until
    ``test`` ends; the port number."""
    if tls_options is None:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    else:
        port = reactor.listenSSL(0, factory, tls_options,
                                 interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return port.getHost().port
