"""Fault-injecting fakes for the robustness suite, on real loopback sockets.

* ``TokenService``: an RFC 7662 endpoint whose answer each test chooses
  (``Reply``, ``Raw``, ``Hang``, ``Dribble``, ``Reset``, ``Stream``,
  ``Delayed``), counting calls and concurrent in-flight requests.
* ``FakeAPI``: records every request it receives and answers as told
  (echo, reset mid-response, hang, stream a huge or endless body).
* ``RawClient``: connect, send bytes, read until the peer closes or a bound.
* ``HTTPClient``: a small keep-alive HTTP/1.1 client for the common path.
* ``start_gateway``: a phantomd ``Gateway`` from ini text, listening on
  ``tcp:0:interface=127.0.0.1`` for both front and metrics.

These are plain Protocols with their own small HTTP parser so that they can
misbehave in ways a real HTTP library refuses to.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import parse_qs

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SkipTest

LOOPBACK = "127.0.0.1"
#: Distinctive, so a leak check cannot miss it.
CLIENT_SECRET = "Robust-S3cret!zq"


# -- JWTs and tokens ----------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims: Optional[dict] = None, lifetime: int = 3600,
             now: Optional[float] = None, **extra) -> str:
    """A hand-made JWT (signature is random bytes; phantomd does not verify
    it with ``verify_jwt = no``).  ``exp`` is ``lifetime`` seconds ahead."""
    now = time.time() if now is None else now
    payload = {"iss": "https://login.example.test", "sub": "user-%s" % (
        os.urandom(4).hex()), "aud": "api", "iat": int(now),
        "exp": int(now + lifetime), "scope": "read write",
        "jti": os.urandom(8).hex()}
    payload.update(claims or {})
    payload.update(extra)
    header = {"alg": "RS256", "typ": "JWT", "kid": "robust-1"}
    return ".".join((b64url(json.dumps(header).encode()),
                     b64url(json.dumps(payload).encode()),
                     b64url(os.urandom(64))))


def jwt_claims(jwt: str) -> dict:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(
        payload + "=" * (-len(payload) % 4)))


def new_token(prefix: str = "opq") -> str:
    """An opaque token: unique, long enough to be found in any capture."""
    return "%s-%s" % (prefix, os.urandom(16).hex())


# -- a small HTTP/1.1 request parser for the fakes ----------------------------

class BadFraming(Exception):
    pass


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list  # [(name bytes as sent, value bytes)]
    body: bytes = b""
    received_at: float = 0.0
    trailers: bytes = b""
    head_raw: bytes = b""  # the head exactly as received, up to CRLFCRLF

    def header(self, name: bytes) -> list:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def header_names(self) -> list:
        return [k.lower() for k, _ in self.headers]

    @property
    def form(self) -> dict:
        return parse_qs(self.body.decode("utf-8", "replace"),
                        keep_blank_values=True)

    @property
    def token(self) -> Optional[str]:
        values = self.form.get("token")
        return values[0] if values else None

    def raw(self) -> bytes:
        """Everything received for this request, for leak checks."""
        return b"".join([self.method, b" ", self.target, b" ", self.version,
                         b"\r\n"] + [k + b": " + v + b"\r\n"
                                     for k, v in self.headers]
                        + [b"\r\n", self.body, self.trailers])


class RequestParser:
    """Incremental, strict-enough HTTP/1.1 request parser (Content-Length
    and chunked bodies).  ``feed`` returns completed ``Request`` objects."""

    MAX_HEAD = 1 << 20

    def __init__(self) -> None:
        self.buf = b""
        self.current: Optional[Request] = None
        self.remaining = 0
        self.chunked = False

    def feed(self, data: bytes) -> list:
        self.buf += data
        out = []
        while True:
            if self.current is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > self.MAX_HEAD:
                        raise BadFraming("head too large")
                    return out
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                self.current = self._head(head)
                if self.current is None:
                    continue
                self.current.head_raw = head
            if self.chunked:
                if not self._chunks():
                    return out
            else:
                take = min(self.remaining, len(self.buf))
                self.current.body += self.buf[:take]
                self.buf = self.buf[take:]
                self.remaining -= take
                if self.remaining:
                    return out
            out.append(self.current)
            self.current = None

    def _head(self, head: bytes) -> Optional[Request]:
        lines = head.split(b"\r\n")
        while lines and not lines[0]:
            lines.pop(0)  # tolerated empty lines before a request
        if not lines:
            return None
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise BadFraming("bad request line %r" % lines[0][:80])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise BadFraming("bad header line")
            headers.append((name, value.strip(b" \t")))
        req = Request(parts[0], parts[1], parts[2], headers,
                      received_at=time.monotonic())
        te = b",".join(req.header(b"transfer-encoding")).lower()
        cls = req.header(b"content-length")
        if te and cls:
            raise BadFraming("Content-Length with Transfer-Encoding")
        self.chunked = b"chunked" in te
        if not self.chunked:
            if len(set(cls)) > 1:
                raise BadFraming("two Content-Lengths")
            self.remaining = int(cls[0]) if cls else 0
        return req

    def _chunks(self) -> bool:
        while True:
            if self.remaining > 0:
                take = min(self.remaining, len(self.buf))
                self.current.body += self.buf[:take]
                self.buf = self.buf[take:]
                self.remaining -= take
                if self.remaining:
                    return False
                if len(self.buf) < 2:
                    self.remaining = -1  # waiting for the CRLF after data
                    return False
                self.buf = self.buf[2:]
            if self.remaining == -1:
                if len(self.buf) < 2:
                    return False
                self.buf = self.buf[2:]
                self.remaining = 0
            end = self.buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(self.buf[:end].split(b";")[0], 16)
            if size == 0:
                trailer_end = self.buf.find(b"\r\n\r\n", end)
                if self.buf[end:end + 4] == b"\r\n\r\n":
                    self.buf = self.buf[end + 4:]
                elif trailer_end >= 0:
                    self.current.trailers = self.buf[end + 2:trailer_end]
                    self.buf = self.buf[trailer_end + 4:]
                else:
                    return False
                self.chunked = False
                return True
            self.buf = self.buf[end + 2:]
            self.remaining = size


def response_head(status: int, headers=(), reason: bytes = b"") -> bytes:
    reason = reason or {200: b"OK", 204: b"No Content"}.get(status, b"Status")
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    for k, v in headers:
        lines.append(_b(k) + b": " + _b(v))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _b(v) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode("latin-1")


# -- what a fake server does with one request ---------------------------------

class Behaviour:
    """One way to answer.  ``run(conn, request)`` writes to ``conn`` and
    calls ``conn.done(close=...)`` when the answer is complete (or never)."""

    def run(self, conn: "ServerConnection", request: Request) -> None:
        raise NotImplementedError


@dataclass
class Reply(Behaviour):
    """A well-framed answer (Content-Length added unless given or 204)."""

    status: int = 200
    headers: tuple = ()
    body: bytes = b""
    close: bool = False

    def run(self, conn, request):
        headers = list(self.headers)
        names = {_b(k).lower() for k, _ in headers}
        if self.status != 204 and b"content-length" not in names \
                and b"transfer-encoding" not in names:
            headers.append((b"Content-Length", len(self.body)))
        if self.close:
            headers.append((b"Connection", b"close"))
        conn.write(response_head(self.status, headers) + self.body)
        conn.done(close=self.close)


@dataclass
class Raw(Behaviour):
    """Exact bytes, then ``then``: ``keep`` (ready for the next request),
    ``close`` (FIN), ``reset`` (RST) or ``hang`` (keep the socket, say
    nothing more)."""

    data: bytes
    then: str = "close"

    def run(self, conn, request):
        conn.write(self.data)
        if self.then == "keep":
            conn.done(close=False)
        elif self.then == "close":
            conn.done(close=True)
        elif self.then == "reset":
            conn.reactor.callLater(0.05, conn.reset)
        # hang: nothing


class Hang(Behaviour):
    """Accept the request and never answer."""

    def run(self, conn, request):
        pass


@dataclass
class Dribble(Behaviour):
    """Send ``data`` ``step`` bytes every ``interval`` seconds, after sending
    ``prefix`` at once (e.g. a complete head, to dribble only the body)."""

    data: bytes
    interval: float = 1.0
    step: int = 1
    prefix: bytes = b""

    def run(self, conn, request):
        if self.prefix:
            conn.write(self.prefix)
        pending = [self.data]

        def tick():
            if conn.lost:
                return
            chunk, pending[0] = pending[0][:self.step], pending[0][self.step:]
            conn.write(chunk)
            if pending[0]:
                conn.later(self.interval, tick)
            else:
                conn.done(close=True)
        conn.later(self.interval, tick)


@dataclass
class Delayed(Behaviour):
    """Answer with ``then`` after ``seconds``."""

    seconds: float
    then: Behaviour

    def run(self, conn, request):
        conn.later(self.seconds, lambda: None if conn.lost
                   else self.then.run(conn, request))


@dataclass
class Stream(Behaviour):
    """Stream a body of ``total`` bytes (``None``: endless) as fast as the
    peer reads it, honouring backpressure; ``conn.server.written`` counts
    the body bytes handed to the transport.  ``chunked`` frames it chunked,
    else with Content-Length (``total`` must then be given).
    ``reset_after`` resets the connection after that many body bytes."""

    total: Optional[int] = None
    chunked: bool = True
    status: int = 200
    headers: tuple = ((b"Content-Type", b"application/octet-stream"),)
    block: int = 65536
    reset_after: Optional[int] = None
    prefix: Optional[bytes] = None  # raw bytes instead of a response head
    filler: bytes = b"x"  # what the body (or endless head) is made of

    def run(self, conn, request):
        if self.prefix is not None:
            conn.write(self.prefix)
            _Pump(conn, self).start()
            return
        headers = list(self.headers)
        if self.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        else:
            headers.append((b"Content-Length", self.total))
        conn.write(response_head(self.status, headers))
        _Pump(conn, self).start()


class _Pump:
    """A push producer writing a Stream's body while not paused."""

    def __init__(self, conn, spec: Stream) -> None:
        self.conn, self.spec = conn, spec
        self.paused = self.stopped = False
        self.sent = 0

    def start(self):
        self.conn.transport.registerProducer(self, True)
        self.conn.pump = self
        self.conn.later(0, self.resumeProducing)

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.stopped = True

    def resumeProducing(self):
        self.paused = False
        spec, conn = self.spec, self.conn
        while not (self.paused or self.stopped or conn.lost):
            if spec.reset_after is not None and self.sent >= spec.reset_after:
                self.stopped = True
                conn.reactor.callLater(0.05, conn.reset)
                return
            n = spec.block if spec.total is None else min(
                spec.block, spec.total - self.sent)
            if n <= 0:
                self.stopped = True
                conn.transport.unregisterProducer()
                if spec.chunked:
                    conn.write(b"0\r\n\r\n")
                conn.done(close=False)
                return
            data = (spec.filler * (n // len(spec.filler) + 1))[:n]
            self.sent += n
            conn.server.written += n
            conn.write(b"%x\r\n%s\r\n" % (n, data) if spec.chunked else data)


# -- the fake servers ---------------------------------------------------------

class ServerConnection(protocol.Protocol):
    """One connection to a fake server; parses requests one at a time."""

    def __init__(self, server: "FakeServer") -> None:
        self.server = server
        self.reactor = server.reactor
        self.parser = RequestParser()
        self.queue: list = []
        self.busy = False
        self.lost = False
        self.calls: list = []
        self.pump = None

    def connectionMade(self):
        self.server.connections.add(self)
        self.server.connections_made += 1
        self.server.every_connection.append(self)

    def dataReceived(self, data):
        self.server.bytes_received += len(data)
        if self.server.stop_reading_after_head and b"\r\n\r\n" in data:
            self.transport.pauseProducing()
        try:
            self.queue.extend(self.parser.feed(data))
        except (BadFraming, ValueError) as e:
            self.server.framing_errors.append(str(e))
            self.transport.write(response_head(400, [
                (b"Content-Length", 0), (b"Connection", b"close")]))
            self.transport.loseConnection()
            return
        self._next()

    def _next(self):
        if self.busy or self.lost or not self.queue:
            return
        request = self.queue.pop(0)
        self.busy = True
        self.server.request_started(request)
        self.server.behaviour_for(request).run(self, request)

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    def later(self, seconds: float, f: Callable) -> None:
        self.calls = [c for c in self.calls if c.active()]
        self.calls.append(self.reactor.callLater(seconds, f))

    def done(self, close: bool) -> None:
        if not self.busy:
            return
        self.busy = False
        self.server.request_finished()
        if close:
            self.transport.loseConnection()
        else:
            self._next()

    def reset(self) -> None:
        """Abort with an RST, not a FIN."""
        if self.lost:
            return
        try:
            self.transport.getHandle().setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.lost = True
        for c in self.calls:
            if c.active():
                c.cancel()
        if self.busy:
            self.busy = False
            self.server.request_finished()
        self.server.connections.discard(self)
        self.server.connections_lost += 1
        for d in self.server._lost_waiters:
            d.callback(None)
        self.server._lost_waiters = []


class FakeServer(protocol.Factory):
    """Common machinery: listening, counting, cleanup."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.port = None
        self.connections: set = set()
        self.connections_made = 0
        self.connections_lost = 0
        self.requests: list = []
        self.framing_errors: list = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.written = 0
        self.bytes_received = 0
        self.stop_reading_after_head = False
        self._lost_waiters: list = []
        self.every_connection: list = []  # open or closed, in order

    def unparsed(self) -> list:
        """Bytes some connection received that are not part of a complete
        request (a smuggled remainder, or a request cut short)."""
        return [c.parser.buf or b"<request cut short>"
                for c in self.every_connection
                if c.parser.buf or c.parser.current is not None]

    def buildProtocol(self, addr):
        return ServerConnection(self)

    def behaviour_for(self, request: Request) -> Behaviour:
        raise NotImplementedError

    def request_started(self, request: Request) -> None:
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def request_finished(self) -> None:
        self.in_flight -= 1

    @property
    def calls(self) -> int:
        return len(self.requests)

    def listen(self, port: int = 0):
        self.port = self.reactor.listenTCP(port, self, interface=LOOPBACK)
        return self.port.getHost().port

    def listen_tls(self, cert_path: str, key_path: str) -> int:
        """Listen with TLS (certificate and key from PEM files)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from twisted.internet import ssl
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        options = ssl.CertificateOptions(privateKey=key, certificate=cert)
        self.port = self.reactor.listenSSL(0, self, options,
                                           interface=LOOPBACK)
        return self.port.getHost().port

    @property
    def portnum(self) -> int:
        return self.port.getHost().port

    def connection_lost_once(self) -> defer.Deferred:
        d = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    def close_all(self) -> None:
        for c in list(self.connections):
            c.transport.abortConnection()

    def stop(self) -> defer.Deferred:
        """Stop listening and drop every connection; fires when all gone."""
        ds = []
        if self.port is not None:
            ds.append(defer.maybeDeferred(self.port.stopListening))
            self.port = None
        for c in list(self.connections):
            d = defer.Deferred()
            # fire when this connection is really gone
            orig = c.connectionLost

            def lost(reason, orig=orig, d=d):
                orig(reason)
                d.callback(None)
            c.connectionLost = lost
            c.transport.abortConnection()
            ds.append(d)
        return defer.DeferredList(ds)


def jwt_reply(jwt: str, cache_control: Optional[str] = "max-age=300",
              content_type: bytes = b"application/jwt", status: int = 200,
              extra=()) -> Reply:
    headers = [(b"Content-Type", content_type)]
    if cache_control is not None:
        headers.append((b"Cache-Control", cache_control))
    headers.extend(extra)
    return Reply(status, tuple(headers), jwt.encode("ascii"))


def json_reply(document, cache_control: Optional[str] = "max-age=300",
               status: int = 200) -> Reply:
    body = document if isinstance(document, bytes) else json.dumps(
        document).encode()
    headers = [(b"Content-Type", b"application/json")]
    if cache_control is not None:
        headers.append((b"Cache-Control", cache_control))
    return Reply(status, tuple(headers), body)


class TokenService(FakeServer):
    """The RFC 7662 endpoint.  ``behaviour`` is either a ``Behaviour`` for
    every call or a callable ``request -> Behaviour``.  ``tokens`` maps an
    opaque token to a JWT it answers as active (``answer_active`` decides
    the form); anything else gets ``default`` (204: inactive).

    ``issued`` maps each token to the JWT handed out for it, so tests can
    check which JWT reached the API."""

    def __init__(self, reactor, response: str = "jwt") -> None:
        super().__init__(reactor)
        self.response = response
        self.behaviour = None
        self.tokens: dict = {}
        self.default: Behaviour = Reply(
            204, ((b"Cache-Control", b"no-store"),))
        self.cache_control = "max-age=300"

    def activate(self, token: str, jwt: Optional[str] = None,
                 **claims) -> str:
        jwt = jwt or make_jwt(claims)
        self.tokens[token] = jwt
        return jwt

    def active_reply(self, jwt: str) -> Behaviour:
        if self.response == "phantom_token":
            claims = jwt_claims(jwt)
            return json_reply(dict(claims, active=True, phantom_token=jwt),
                              self.cache_control)
        return jwt_reply(jwt, self.cache_control)

    def behaviour_for(self, request):
        b = self.behaviour
        if b is not None:
            return b(request) if callable(b) and not isinstance(
                b, Behaviour) else b
        jwt = self.tokens.get(request.token)
        return self.active_reply(jwt) if jwt else self.default

    def calls_for(self, token: str) -> int:
        return sum(1 for r in self.requests if r.token == token)


class FakeAPI(FakeServer):
    """The API behind phantomd.  Records every request; by default answers
    200 with a small JSON body naming the method and target."""

    def __init__(self, reactor) -> None:
        super().__init__(reactor)
        self.behaviour: Optional[Behaviour] = None

    def behaviour_for(self, request):
        b = self.behaviour
        if b is not None:
            return b(request) if callable(b) and not isinstance(
                b, Behaviour) else b
        body = json.dumps({"ok": True, "method": request.method.decode(
            "latin-1"), "target": request.target.decode("latin-1")}).encode()
        return Reply(200, ((b"Content-Type", b"application/json"),), body)


def closed_port(reactor) -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    p = reactor.listenTCP(0, protocol.Factory(), interface=LOOPBACK)
    n = p.getHost().port
    p.stopListening()
    return n


# -- clients ------------------------------------------------------------------

@dataclass
class Response:
    status: int
    reason: bytes
    headers: list
    body: bytes = b""
    version: bytes = b"HTTP/1.1"

    def header(self, name: bytes) -> list:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def first(self, name: bytes, default: Optional[bytes] = None):
        v = self.header(name)
        return v[0] if v else default

    def json(self):
        return json.loads(self.body)


class ResponseParser:
    """Incremental HTTP/1.1 response parser; bodies by Content-Length,
    chunked, or until close (``finish``).  Raises ValueError on garbage."""

    def __init__(self, head_requests: int = 0) -> None:
        self.buf = b""
        self.current: Optional[Response] = None
        self.mode = None
        self.remaining = 0
        self.head_requests = head_requests

    def feed(self, data: bytes) -> list:
        self.buf += data
        out = []
        while True:
            if self.current is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return out
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                lines = head.split(b"\r\n")
                version, _, rest = lines[0].partition(b" ")
                code, _, reason = rest.partition(b" ")
                if not version.startswith(b"HTTP/1.") or len(code) != 3:
                    raise ValueError("bad status line %r" % lines[0][:80])
                headers = []
                for line in lines[1:]:
                    k, sep, v = line.partition(b":")
                    if not sep:
                        raise ValueError("bad header line %r" % line[:80])
                    headers.append((k, v.strip()))
                self.current = r = Response(int(code), reason, headers,
                                            version=version)
                te = b",".join(r.header(b"transfer-encoding")).lower()
                if r.status in (204, 304) or 100 <= r.status < 200:
                    self.mode = "none"
                elif b"chunked" in te:
                    self.mode, self.remaining = "chunked", 0
                elif r.header(b"content-length"):
                    self.mode = "length"
                    self.remaining = int(r.header(b"content-length")[0])
                else:
                    self.mode = "close"
            if self.mode == "none" or (self.mode == "length"
                                       and self.remaining == 0):
                out.append(self._complete())
                continue
            if self.mode == "length":
                take = self.buf[:self.remaining]
                self.buf = self.buf[len(take):]
                self.current.body += take
                self.remaining -= len(take)
                if self.remaining:
                    return out
                out.append(self._complete())
            elif self.mode == "chunked":
                if not self._chunk():
                    return out
                if self.mode == "done":
                    out.append(self._complete())
            else:  # until close
                self.current.body += self.buf
                self.buf = b""
                return out

    def _chunk(self) -> bool:
        if self.remaining:
            need = self.remaining + 2
            if len(self.buf) < need:
                return False
            self.current.body += self.buf[:self.remaining]
            self.buf = self.buf[need:]
            self.remaining = 0
            return True
        end = self.buf.find(b"\r\n")
        if end < 0:
            return False
        size = int(self.buf[:end].split(b";")[0], 16)
        if size == 0:
            tend = self.buf.find(b"\r\n\r\n", end)
            if self.buf[end:end + 4] == b"\r\n\r\n":
                self.buf = self.buf[end + 4:]
            elif tend >= 0:
                self.buf = self.buf[tend + 4:]
            else:
                return False
            self.mode = "done"
            return True
        self.buf = self.buf[end + 2:]
        self.remaining = size
        return True

    def _complete(self) -> Response:
        r, self.current, self.mode = self.current, None, None
        return r

    def finish(self) -> list:
        """The peer closed: a body-until-close response is complete."""
        if self.current is not None and self.mode == "close":
            return [self._complete()]
        return []


class RawClient(protocol.Protocol):
    """Sends whatever bytes a test gives it; keeps everything received.
    ``closed`` fires (with the bytes received) when the peer closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = defer.Deferred()
        self.is_closed = False
        self.close_reason = None
        self.data_waiters: list = []
        self.aborted_by_us = False

    def dataReceived(self, data):
        self.received += data
        waiters, self.data_waiters = self.data_waiters, []
        for d in waiters:
            d.callback(None)

    def connectionLost(self, reason):
        self.is_closed = True
        self.close_reason = reason
        self.closed.callback(self.received)
        waiters, self.data_waiters = self.data_waiters, []
        for d in waiters:
            d.callback(None)

    @property
    def was_reset(self) -> bool:
        return self.close_reason is not None and not \
            self.close_reason.check(ConnectionDone)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def responses(self) -> list:
        p = ResponseParser()
        out = p.feed(self.received)
        if self.is_closed:
            out += p.finish()
        return out


async def connect_raw(reactor, port: int) -> RawClient:
    client = RawClient()
    ep = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=5)
    await ep.connect(protocol.Factory.forProtocol(lambda: client))
    return client


async def wait_closed(reactor, client: RawClient, timeout: float) -> bool:
    """Wait until the peer closes, at most ``timeout`` seconds; True if it
    closed.  Aborts the connection at the bound."""
    if client.is_closed:
        return True
    d = defer.Deferred()
    client.closed.addBoth(lambda r: d.called or d.callback(True))
    timer = reactor.callLater(timeout, lambda: d.called or d.callback(False))
    closed = await d
    if timer.active():
        timer.cancel()
    if not closed:
        client.aborted_by_us = True
        client.transport.abortConnection()
        await client.closed
    return closed


async def drip_until_closed(reactor, client: RawClient, pieces,
                            timeout: float, every: float = 0.2) -> bool:
    """Send the next of ``pieces`` every ``every`` seconds until the peer
    closes (or they run out); True if it closed within ``timeout``, as
    ``wait_closed``."""
    def drip() -> None:
        if not client.is_closed:
            piece = next(pieces, None)
            if piece is not None:
                client.send(piece)
    loop = task.LoopingCall(drip)
    loop.clock = reactor
    loop.start(every)
    try:
        return await wait_closed(reactor, client, timeout)
    finally:
        if loop.running:
            loop.stop()


async def wait_for(reactor, predicate: Callable[[], bool], timeout: float,
                   interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            return False
        await task.deferLater(reactor, interval, lambda: None)
    return True


async def wait_stalled(reactor, measure: Callable[[], int],
                       limit: float = 10.0) -> int:
    """Wait until ``measure()`` (bytes moved so far) stops growing for half
    a second, or ``limit`` passes; return its value."""
    last = [-1]

    def stalled() -> bool:
        value = measure()
        if value == last[0] and value > 0:
            return True
        last[0] = value
        return False
    await wait_for(reactor, stalled, limit, interval=0.5)
    return measure()


async def sleep(reactor, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def exchange(reactor, port: int, data: bytes, timeout: float = 3.0):
    """Connect, send ``data``, read until the peer closes or ``timeout``.
    Returns the client (``.received``, ``.responses()``, ``.is_closed``)."""
    client = await connect_raw(reactor, port)
    client.send(data)
    await wait_closed(reactor, client, timeout)
    return client


class UploadPump:
    """Streams ``total`` body bytes (chunked) into a RawClient's transport
    as fast as the peer takes them; ``sent`` counts what the transport
    accepted."""

    def __init__(self, client: "RawClient", total: int,
                 block: int = 65536, unit: Optional[bytes] = None) -> None:
        """With ``unit``, send that (e.g. a whole request) over and over
        instead of body chunks."""
        self.client, self.total, self.block = client, total, block
        self.unit = unit
        self.sent = 0
        self.paused = self.stopped = False

    def start(self, reactor) -> None:
        self.client.transport.registerProducer(self, True)
        reactor.callLater(0, self.resumeProducing)

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.stopped = True

    def resumeProducing(self):
        self.paused = False
        data = b"x" * self.block
        while not (self.paused or self.stopped or self.client.is_closed):
            if self.sent >= self.total:
                self.stopped = True
                self.client.transport.unregisterProducer()
                if self.unit is None:
                    self.client.send(b"0\r\n\r\n")
                return
            if self.unit is not None:
                self.sent += len(self.unit)
                self.client.send(self.unit)
                continue
            self.sent += len(data)
            self.client.send(b"%x\r\n%s\r\n" % (len(data), data))


def request_bytes(method: str = "GET", target: str = "/resource",
                  token: Optional[str] = None, headers=(), body: bytes = b"",
                  close: bool = False,
                  host: str = "api.example.test") -> bytes:
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: %s" % host]
    out = [l.encode("latin-1") for l in lines]
    if token is not None:
        out.append(b"Authorization: Bearer " + _b(token) if isinstance(
            token, str) else b"Authorization: Bearer " + token)
    for k, v in headers:
        out.append(_b(k) + b": " + _b(v))
    if body and not any(_b(k).lower() in (b"content-length",
                                           b"transfer-encoding")
                        for k, _ in headers):
        out.append(b"Content-Length: %d" % len(body))
    if close:
        out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n" + body


class HTTPClient(protocol.Protocol):
    """One keep-alive connection; ``request(raw) -> Deferred[Response]``,
    one at a time.  Fails the pending Deferred if the peer closes first."""

    def __init__(self) -> None:
        self.parser = ResponseParser()
        self.pending: Optional[defer.Deferred] = None
        self.lost = False
        self.closed = defer.Deferred()
        self.interim: list = []

    def request(self, raw: bytes) -> defer.Deferred:
        assert self.pending is None
        self.pending = defer.Deferred()
        if self.lost:
            d, self.pending = self.pending, None
            d.errback(ConnectionDone("closed before the request"))
            return d
        self.transport.write(raw)
        return self.pending

    def dataReceived(self, data):
        try:
            done = self.parser.feed(data)
        except ValueError as e:
            self._fail(e)
            self.transport.abortConnection()
            return
        for r in done:
            if 100 <= r.status < 200 and r.status != 101:
                self.interim.append(r)  # informational; the answer follows
                continue
            if self.pending is not None:
                d, self.pending = self.pending, None
                d.callback(r)

    def connectionLost(self, reason):
        self.lost = True
        for r in self.parser.finish():
            if self.pending is not None:
                d, self.pending = self.pending, None
                d.callback(r)
        self._fail(reason)
        self.closed.callback(None)

    def _fail(self, reason):
        if self.pending is not None:
            d, self.pending = self.pending, None
            d.errback(reason)


async def connect_http(reactor, port: int) -> HTTPClient:
    client = HTTPClient()
    ep = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=5)
    await ep.connect(protocol.Factory.forProtocol(lambda: client))
    return client


async def get(reactor, port: int, token: Optional[str] = None,
              target: str = "/resource", method: str = "GET", headers=(),
              body: bytes = b"", timeout: float = 5.0,
              host: str = "api.example.test") -> Response:
    """One request on a fresh connection (``Connection: close``)."""
    return await one_request(reactor, port, request_bytes(
        method, target, token, headers, body, close=True, host=host),
        timeout)


async def one_request(reactor, port: int, request: bytes,
                   timeout: float = 5.0) -> Response:
    """Send ``request`` on a fresh connection and read its answer; the
    connection is closed afterwards whatever happened."""
    client = await connect_http(reactor, port)
    d = client.request(request)
    timer = reactor.callLater(timeout, d.cancel)
    try:
        return await d
    finally:
        if timer.active():
            timer.cancel()
        if not client.lost:
            client.transport.abortConnection()
            await client.closed


# -- phantomd itself ----------------------------------------------------------

BASE_INI = """\
[phantomd]
listen = tcp:0:interface=127.0.0.1
upstream = http://127.0.0.1:{api_port}
realm = api
header_timeout = 0.5
idle_timeout = 1
drain_timeout = 0.5
upstream_timeout = 1
upstream_connect_timeout = 1

[introspection]
url = http://127.0.0.1:{ts_port}/oauth/v2/introspect
client_id = gateway_client
client_secret = {secret}
response = {response}
timeout = 0.5
max_in_flight = 64
max_response_bytes = 4096

[cache]
max_entries = 1000
max_ttl = 3600
default_ttl = 0
negative_ttl = 10

[metrics]
listen = tcp:0:interface=127.0.0.1
"""


@dataclass
class RunningGateway:
    gateway: object
    metrics: object
    config: object
    front: int
    admin: Optional[int]
    extra: dict = field(default_factory=dict)


def gateway_ini(ts_port: int, api_port: int, response: str = "jwt",
                **sections) -> str:
    """``BASE_INI`` with keys replaced or added: ``phantomd={"key": "v"}``."""
    return set_keys(BASE_INI.format(api_port=api_port, ts_port=ts_port,
                                    secret=CLIENT_SECRET, response=response),
                    sections)


def set_keys(text: str, sections: dict) -> str:
    """``text`` (ini) with ``sections`` (section -> key -> value) set:
    a key replaced where it stands, else added, with its section."""
    for section, keys in sections.items():
        for key, value in keys.items():
            lines = text.split("\n")
            if "[%s]" % section not in lines:
                lines += ["", "[%s]" % section]
            start = lines.index("[%s]" % section)
            end = start + 1
            while end < len(lines) and not lines[end].startswith("["):
                end += 1
            for i in range(start + 1, end):
                if lines[i].split("=")[0].strip() == key:
                    lines[i] = "%s = %s" % (key, value)
                    break
            else:
                lines.insert(start + 1, "%s = %s" % (key, value))
            text = "\n".join(lines)
    return text


async def start_gateway(testcase, reactor, ini_text: str,
                        overrides=None, access_log=None,
                        probe: bool = False) -> RunningGateway:
    """Build and start a Gateway; ``testcase.addCleanup`` stops it.

    Without the readiness probe unless ``probe``: these scenes script and
    count every token service call (tests/test_readiness_e2e.py has it)."""
    try:
        from phantomd.app import Gateway
    except ImportError as e:
        raise SkipTest("phantomd.app has not landed yet (%s)" % e)
    from phantomd import config as configmod
    from phantomd.ops.metrics import Metrics

    config = configmod.parse(ini_text, "<robustness.ini>", overrides)
    metrics = Metrics()
    gw = Gateway(reactor, config, metrics, access_log=access_log,
                 probe=probe)
    await gw.start()
    testcase.addCleanup(gw.stop)
    front = gw.front_ports[0].getHost().port
    admin = gw.admin_ports[0].getHost().port if gw.admin_ports else None
    return RunningGateway(gw, metrics, config, front, admin)


class Scene:
    """A token service, an API and a gateway between them, for one test.

    ``await Scene.build(testcase, reactor, response=..., phantomd={...})``.
    """

    ts: TokenService
    api: FakeAPI
    gw: RunningGateway

    @classmethod
    async def build(cls, testcase, reactor, response: str = "jwt",
                    api_port: Optional[int] = None, access_log=None,
                    **sections) -> "Scene":
        self = cls()
        self.reactor = reactor
        self.ts = TokenService(reactor, response)
        self.api = FakeAPI(reactor)
        ts_port = self.ts.listen()
        testcase.addCleanup(self.ts.stop)
        if api_port is None:
            api_port = self.api.listen()
            testcase.addCleanup(self.api.stop)
        self.ini = gateway_ini(ts_port, api_port, response, **sections)
        self.gw = await start_gateway(testcase, reactor, self.ini,
                                      access_log=access_log)
        return self

    @property
    def front(self) -> int:
        return self.gw.front

    async def get(self, token=None, **kw) -> Response:
        return await get(self.reactor, self.gw.front, token, **kw)

    def good_token(self, **claims) -> tuple:
        token = new_token()
        return token, self.ts.activate(token, **claims)


def async_test(f):
    """Let trial run an ``async def`` test method (it wants a Deferred)."""
    import functools

    @functools.wraps(f)
    def run(*args, **kwargs):
        return defer.ensureDeferred(f(*args, **kwargs))
    return run


# -- phantomd in a process of its own (floods: its RSS is then its own) -------

def serve_gateway(ini_path: str) -> None:
    """Entry point of the child process: run a Gateway from ``ini_path``
    and print ``READY <front> <admin>`` once it listens.  Warnings and
    errors go to stderr."""
    import sys

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
        globalLogBeginner, textFileLogObserver)

    from phantomd import config as configmod
    from phantomd.app import Gateway

    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])],
        redirectStandardIO=False)
    gw = Gateway(reactor, configmod.load(ini_path))

    def ready(_):
        print("READY %d %d" % (gw.front_ports[0].getHost().port,
                               gw.admin_ports[0].getHost().port),
              flush=True)
        reactor.addSystemEventTrigger("before", "shutdown", gw.stop)

    def failed(f):
        print("FAILED %s" % f.getErrorMessage(), flush=True)
        reactor.stop()
    reactor.callWhenRunning(lambda: gw.start().addCallbacks(ready, failed))
    reactor.run()


class GatewayProcess(protocol.ProcessProtocol):
    """A child process running ``serve_gateway``; ``ready`` fires with
    (front, admin) ports, ``ended`` when it exits."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.pid = None
        self.front = self.admin = None

    def connectionMade(self):
        self.pid = self.transport.pid

    def outReceived(self, data):
        self.out += data
        if not self.ready.called and b"\n" in self.out:
            line = self.out.split(b"\n", 1)[0].split()
            if line[:1] == [b"READY"]:
                self.front, self.admin = int(line[1]), int(line[2])
                self.ready.callback((self.front, self.admin))
            else:
                self.ready.errback(RuntimeError(self.out.decode(
                    "utf-8", "replace")))

    def errReceived(self, data):
        self.err = (self.err + data)[-20000:]

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError("gateway exited: %s" % (
                self.err[-2000:].decode("utf-8", "replace"))))
        self.ended.callback(None)

    def rss_bytes(self) -> int:
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    async def stop(self, reactor) -> None:
        from twisted.internet.error import ProcessExitedAlready
        if self.ended.called:
            return
        try:
            self.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            pass

        def kill():
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        timer = reactor.callLater(5, lambda: self.ended.called or kill())
        await self.ended
        if timer.active():
            timer.cancel()


async def spawn_gateway(testcase, reactor, ini_text: str) -> GatewayProcess:
    import sys
    path = os.path.abspath(testcase.mktemp() + ".ini")
    with open(path, "w") as f:
        f.write(ini_text)
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    proc = GatewayProcess()
    reactor.spawnProcess(proc, sys.executable, [
        sys.executable, "-c",
        "import sys; from tests.robustness.fakes import serve_gateway; "
        "serve_gateway(sys.argv[1])", path], env=env, path=root)
    testcase.addCleanup(lambda: defer.ensureDeferred(proc.stop(reactor)))
    timer = reactor.callLater(15, lambda: proc.ready.called or
                              proc.ready.errback(RuntimeError("not ready")))
    try:
        await proc.ready
    finally:
        if timer.active():
            timer.cancel()
    return proc


# -- TLS ----------------------------------------------------------------------

def self_signed(directory: str) -> tuple:
    """A throw-away self-signed certificate for 127.0.0.1, generated now;
    returns (cert_path, key_path).  No key is ever committed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "front.crt")
    key_path = os.path.join(directory, "front.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


async def connect_tls(reactor, port: int, client=None):
    """A TLS connection (no certificate check: the fake is self-signed)
    carrying a RawClient (or ``client``)."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ClientEndpoint
    client = client or RawClient()
    ep = SSL4ClientEndpoint(reactor, LOOPBACK, port, ssl.CertificateOptions(),
                            timeout=5)
    await ep.connect(protocol.Factory.forProtocol(lambda: client))
    return client
