"""A lean, pooled HTTP/1.1 client for the token service and its key set.

``jose.KeySource`` calls it the way it would call treq: ``request(method,
url, data=..., headers=...)`` (and ``get``, ``post``) return a ``Deferred``
firing a ``Response`` with ``code``, ``headers``
(``twisted.web.http_headers.Headers``), ``length`` and
``deliverBody(protocol)``.  The introspector wants answers whole:
``fetch`` fires once with an ``Answer`` (code, decoded headers, bounded
body), with no Response, body protocol or Headers in between.  Underneath,
one ``httptools`` parser per connection and plain method calls replace
Agent, hyperlink and ``HTTP11ClientProtocol``: an introspection is on the
miss path of every new token, so its client must cost little.

What it never does: follow redirects (a 3xx is an answer like any other),
keep or send cookies, pipeline, retry (a POST may not be repeated).

Bounds:

* an answer's bytes on the wire (interim 1xx answers, head, body and chunk
  framing) are counted from the moment the request is written; past
  ``max_answer_bytes`` the connection is aborted and the exchange fails with
  ``AnswerTooLarge`` (so an endless header line or an endless head cannot
  grow memory: llhttp keeps a header it has not finished);
* body bytes that arrive before ``deliverBody`` is called are buffered,
  within that same bound;
* at most ``max_idle`` idle connections are kept per (scheme, host, port);
  one handed back beyond that is closed, and so is one idle for longer than
  ``idle_timeout`` seconds;
* at most ``MAX_TARGETS`` parsed URLs (with their endpoints) are kept; at the
  bound the map is emptied and refilled (phantomd talks to a handful).

Connections in use are bounded by the callers (the coalescer's
``max_in_flight``).  Cancelling the Deferred of a request aborts the
exchange: the connection attempt is cancelled or the connection closed,
never reused.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS)
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (ResponseDone, ResponseFailed,
                                ResponseNeverReceived)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from phantomd.http.fastio import writer_for

_DONE = Failure(ResponseDone())
"""Shared, as Twisted shares ``connectionDone``: a body's normal end."""

MAX_TARGETS = 16
"""Parsed URLs (and their endpoints) kept by a client."""

_BODY_METHODS = (b"POST", b"PUT", b"PATCH")
_is_token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z").match
_splits_head = re.compile(rb"[\r\n\0]").search
_OWN_HEADERS = frozenset((b"host", b"content-length", b"transfer-encoding",
                          b"connection"))


class AnswerTooLarge(Exception):
    """The server sent more bytes for one answer than phantomd reads (an
    endless response head, say); the connection was aborted."""

    def __str__(self) -> str:
        return ("answer larger than %d bytes on the wire (head and body)"
                % self.args[0])


class MalformedAnswer(Exception):
    """The server's answer is not HTTP/1.1 as phantomd reads it."""


class Response:
    """One answer: ``code``, ``phrase``, ``headers``, ``length`` (an int, or
    ``UNKNOWN_LENGTH`` for chunked and close-delimited bodies), and
    ``deliverBody``.

    The body protocol gets ``makeConnection(transport)`` (whose
    ``stopProducing`` or ``loseConnection`` drops the connection),
    ``dataReceived`` for each piece, then ``connectionLost`` once: with
    ``ResponseDone`` when the body is complete, with ``ResponseFailed``
    when it is cut short, garbled or too large.
    """

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, conn: "_Connection", code: int, phrase: bytes,
                 headers: Headers, length: Any) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._conn: Optional[_Connection] = conn
        self._protocol: Any = None
        self._parts: list[bytes] = []
        self._end: Optional[Failure] = None
        self._told = False

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body of a response is delivered once")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self))
        parts, self._parts = self._parts, []
        for part in parts:
            if self._told:
                return
            protocol.dataReceived(part)
        if self._end is not None:
            self._tell()

    def setPreviousResponse(self, response: Any) -> None:
        pass  # never called: redirects are not followed

    # -- what the connection calls ------------------------------------------

    def _data(self, data: bytes) -> None:
        if self._told or self._end is not None:
            return
        if self._protocol is None:
            self._parts.append(data)
        else:
            self._protocol.dataReceived(data)

    def _ended(self, reason: Failure) -> None:
        self._conn = None
        if self._end is None:
            self._end = reason
        if self._protocol is not None:
            self._tell()

    def _tell(self) -> None:
        if not self._told:
            self._told = True
            self._parts = []
            self._protocol.connectionLost(self._end)

    def _stop(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.abort()
            # As with Twisted's client: the protocol hears of it later,
            # never from inside its own stopProducing call.
            conn.client.reactor.callLater(
                0, self._ended, _failed_body(ConnectionAborted()))


class _BodyTransport:
    """The transport a body protocol sees: stopping it drops the
    connection, which is never reused."""

    def __init__(self, response: Response) -> None:
        self._response = response

    def stopProducing(self) -> None:
        self._response._stop()

    loseConnection = stopProducing

    def pauseProducing(self) -> None:
        conn = self._response._conn
        if conn is not None and not conn.lost:
            conn.transport.pauseProducing()

    def resumeProducing(self) -> None:
        conn = self._response._conn
        if conn is not None and not conn.lost:
            conn.transport.resumeProducing()


def _failed_body(e: BaseException) -> Failure:
    return Failure(ResponseFailed([Failure(e)]))


class Answer:
    """A whole answer from ``fetch``: ``code``, ``headers`` (lower-case
    names to every value, both ``str``, decoded as Latin-1) and ``body``
    (``b""`` for a status whose body was not kept)."""

    __slots__ = ("code", "headers", "body")

    def __init__(self, code: int, headers: dict[str, list[str]],
                 body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body


class BodyTooLarge(Exception):
    """A kept body passed ``max_body``; the connection was dropped."""

    def __init__(self, code: int, max_body: int) -> None:
        super().__init__(code, max_body)
        self.code = code
        self.max_body = max_body


class BodyFailed(Exception):
    """The head of the answer arrived, its whole body did not: the
    connection ended early, or the body was garbled or too long on the
    wire.  ``reason`` is the underlying Failure."""

    def __init__(self, code: int, reason: Failure) -> None:
        super().__init__(code)
        self.code = code
        self.reason = reason


class _Overflow(Exception):
    """Internal: raised from ``on_body`` to stop the parser."""


class _Collect:
    """What a ``fetch`` gathers of an answer, in the place of a
    ``Response``: the connection calls ``_data`` and ``_ended`` on it."""

    __slots__ = ("code", "headers", "max_body", "keep", "result", "_parts",
                 "_size")

    def __init__(self, code: int, headers: dict[str, list[str]],
                 max_body: int, keep: bool, result: defer.Deferred) -> None:
        self.code = code
        self.headers = headers
        self.max_body = max_body
        self.keep = keep
        self.result: Optional[defer.Deferred] = result
        self._parts: list[bytes] = []
        self._size = 0

    def _data(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.max_body:
            raise _Overflow()
        if self.keep:
            self._parts.append(data)

    def _ended(self, reason: Failure) -> None:
        d, self.result = self.result, None
        if d is None:
            return
        if reason is _DONE:
            d.callback(Answer(self.code, self.headers,
                              b"".join(self._parts)))
            return
        inner = reason.value.reasons[0] if isinstance(
            reason.value, ResponseFailed) and reason.value.reasons else reason
        if inner.check(_Overflow):
            if self.keep:
                d.errback(BodyTooLarge(self.code, self.max_body))
            else:
                # A body nobody reads need not be read to its end.
                d.callback(Answer(self.code, self.headers, b""))
            return
        d.errback(BodyFailed(self.code, inner))


class _Call:
    """One request from ``request()`` to its response head (or failure);
    its ``result`` is what the caller holds."""

    def __init__(self, payload: bytes, head_method: bool,
                 max_body: int = -1, keep: tuple = ()) -> None:
        self.payload = payload
        self.head_method = head_method
        self.max_body = max_body  # -1: a streamed Response, else fetch
        self.keep = keep
        self.result: defer.Deferred = defer.Deferred(self._cancel)
        self.conn: Optional[_Connection] = None
        self._connecting: Optional[defer.Deferred] = None
        self._cancelled = False

    def connect(self, endpoint: Any, factory: Factory) -> None:
        d = self._connecting = endpoint.connect(factory)
        d.addCallbacks(self._connected, self._not_connected)

    def _connected(self, conn: "_Connection") -> None:
        self._connecting = None
        if self._cancelled:
            conn.close()
        else:
            conn.send(self)

    def _not_connected(self, failure: Failure) -> None:
        self._connecting = None
        if not self._cancelled:
            self.result.errback(failure)

    def _cancel(self, result: defer.Deferred) -> None:
        self._cancelled = True
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.conn is not None:
            self.conn.abort()


class _Connection(Protocol):
    """One HTTP/1.1 connection; one exchange at a time on it.

    httptools callbacks only collect; what reaches callers (the response,
    its end) happens after ``feed_data`` returns, so a caller that starts
    its next request from a callback never meets a parser mid-feed.
    """

    def __init__(self, client: "HTTPClient", key: tuple) -> None:
        self.client = client
        self.key = key
        self.lost = False
        self.idle_since = 0.0
        self._parser = HttpResponseParser(self)
        self._write: Any = None
        self._timer: Any = None
        self._broken = False
        self._call: Optional[_Call] = None
        self._response: Optional[Response] = None
        self._reset()

    def _reset(self) -> None:
        self._received = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._phrase = b""
        self._fire: Optional[Response] = None
        self._complete = False
        self._keep_alive = False
        self._eof_body = False

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._write = writer_for(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._call is None and self._response is None:
            # Bytes nobody asked for: never reuse this connection.
            self._broken = True
            self.transport.abortConnection()
            return
        self._received += len(data)
        if self._received > self.client.max_answer_bytes:
            self._fail(AnswerTooLarge(self.client.max_answer_bytes))
            return
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            self._fail(MalformedAnswer("it switched protocols, which "
                                       "phantomd never asks for"))
            return
        except HttpParserError as e:
            cause = e.__context__
            self._fail(cause if isinstance(cause, (MalformedAnswer,
                                                   _Overflow)) else
                       MalformedAnswer("malformed HTTP answer: %s" % e))
            return
        response = self._fire
        if response is not None:
            self._fire = None
            call, self._call = self._call, None
            if call is not None:
                call.result.callback(response)
        if self._complete and self._response is not None:
            self._finish(self._keep_alive)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self.client.pool.lost(self)
        if self._response is not None and self._eof_body and \
                self._fire is None and reason.check(ConnectionDone):
            self._finish(False)
        else:
            self._fail(reason.value)

    # -- what the client calls -----------------------------------------------

    def send(self, call: _Call) -> None:
        """Write ``call``'s request; its result fires with the head."""
        if self.lost:
            call.result.errback(ResponseNeverReceived(
                [Failure(ConnectionDone("the connection closed"))]))
            return
        call.conn = self
        self._call = call
        self._head_method = call.head_method
        self._reset()
        self._write(call.payload)

    def close(self) -> None:
        """Close cleanly; the connection is never reused."""
        self._broken = True
        if not self.lost:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Give up on the exchange: drop the connection, tell nobody."""
        self._call = None
        self._response = None
        self._fire = None
        self._broken = True
        if not self.lost:
            self.transport.abortConnection()

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._broken = True  # bytes past the answer: never reuse

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        code = parser.get_status_code()
        headers, self._headers = self._headers, []
        phrase, self._phrase = self._phrase, b""
        if self._call is None or self._response is not None:
            self._broken = True  # an answer nobody asked for
            return
        if code < 200:
            if code == 101:
                raise MalformedAnswer("101 Switching Protocols, which "
                                      "phantomd never asks for")
            return  # interim: the real answer follows
        call = self._call
        collect = call.max_body >= 0
        if collect:
            decoded: dict[str, list[str]] = {}
        else:
            raw = Headers()
        length: Any = UNKNOWN_LENGTH
        chunked = False
        for name, value in headers:
            lower = name.lower()
            if collect:
                key = lower.decode("latin-1")
                if key in decoded:
                    decoded[key].append(value.decode("latin-1"))
                else:
                    decoded[key] = [value.decode("latin-1")]
            else:
                raw.addRawHeader(name, value)
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # gzip and friends would reach the caller undeclared.
                    raise MalformedAnswer("a transfer coding other than "
                                          "chunked")
                chunked = True
        if self._head_method or code == 204 or code == 304:
            length = 0
            if self._head_method:
                # llhttp cannot be told that a HEAD answer has no body.
                self._complete = True
                self._broken = True
        elif chunked:
            length = UNKNOWN_LENGTH
        elif length is UNKNOWN_LENGTH:
            self._eof_body = True
        if collect:
            # Nothing fires before the whole answer is in.
            self._response = _Collect(  # type: ignore[assignment]
                code, decoded, call.max_body, code in call.keep, call.result)
            return
        self._response = self._fire = Response(self, code, phrase, raw,
                                               length)

    def on_body(self, data: bytes) -> None:
        response = self._response
        if response is not None:
            response._data(data)

    def on_message_complete(self) -> None:
        if self._response is not None:
            self._complete = True
            # Asked here: once the message is done, llhttp says False.
            self._keep_alive = self._parser.should_keep_alive()

    # -- internals -----------------------------------------------------------

    def _finish(self, reuse: bool) -> None:
        """The body is complete: pool or close, then tell the body
        protocol."""
        response, self._response = self._response, None
        self._call = None  # a fetch holds its call until the end
        self._reset()
        if not self.lost:
            if reuse and not self._broken:
                self.client.pool.put(self)
            else:
                self.close()
        if response is not None:
            response._ended(_DONE)

    def _fail(self, e: BaseException) -> None:
        """The exchange failed: drop the connection, tell whoever waits."""
        call, response = self._call, self._response
        got_head = self._fire is None and response is not None
        self.abort()
        if got_head:
            response._ended(_failed_body(e))
        elif call is not None and not call.result.called:
            kind = ResponseFailed if self._received else ResponseNeverReceived
            call.result.errback(kind([Failure(e)]))

    def arm_idle_timer(self) -> None:
        """One DelayedCall per connection, rarely moved: it wakes up, sees
        the connection was used since, and sleeps again."""
        if self._timer is None:
            self._timer = self.client.reactor.callLater(
                self.client.pool.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._timer = None
        if self.lost or self._call is not None or self._response is not None:
            return
        left = self.idle_since + self.client.pool.idle_timeout \
            - self.client.reactor.seconds()
        if left > 0:
            self._timer = self.client.reactor.callLater(left,
                                                        self._idle_check)
            return
        self.client.pool.discard(self)
        self.close()


class _ConnectionFactory(Factory):
    def __init__(self, client: "HTTPClient", key: tuple) -> None:
        self.client = client
        self.key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.client, self.key)


class ConnectionPool:
    """Idle connections per (scheme, host, port), most recently used first.

    At most ``max_idle`` per key: one handed back beyond that is closed.
    One idle longer than ``idle_timeout`` seconds is closed (by its timer,
    or when next picked).  After ``close()`` every connection handed back
    is closed.
    """

    def __init__(self, reactor: Any, max_idle: int,
                 idle_timeout: float) -> None:
        self.reactor = reactor
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.closed = False
        self._idle: dict[tuple, list[_Connection]] = {}
        self._closing: set[_Connection] = set()
        self._close_waiters: list[defer.Deferred] = []

    @property
    def cachedConnectionTimeout(self) -> float:
        """``idle_timeout`` under the name Twisted's pool gives it."""
        return self.idle_timeout

    def take(self, key: tuple) -> Optional[_Connection]:
        idle = self._idle.get(key)
        if not idle:
            return None
        horizon = self.reactor.seconds() - self.idle_timeout
        while idle:
            conn = idle.pop()
            if conn.idle_since >= horizon:
                return conn
            conn.close()
        del self._idle[key]
        return None

    def put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self.closed or len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.reactor.seconds()
        idle.append(conn)
        conn.arm_idle_timer()

    def discard(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def lost(self, conn: _Connection) -> None:
        self.discard(conn)
        self._closing.discard(conn)
        if self._close_waiters and not self._closing:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> defer.Deferred:
        """Close the idle connections; fires once they are all gone.
        Connections in use are closed when their exchange ends."""
        self.closed = True
        idle = [c for conns in self._idle.values() for c in conns]
        self._idle.clear()
        self._closing.update(idle)
        if not self._closing:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._close_waiters.append(d)
        for conn in idle:
            conn.close()
        return d


class _Target:
    """A parsed URL: where to connect and what to write."""

    def __init__(self, key: tuple, endpoint: Any, factory: Factory,
                 authority: bytes, path: bytes) -> None:
        self.key = key
        self.endpoint = endpoint
        self.factory = factory
        self.authority = authority
        self.path = path


class HTTPClient:
    """Pooled HTTP/1.1 over TCP, or TLS per ``tls_policy`` (an
    ``IPolicyForHTTPS`` such as ``phantomd.tls.ClientPolicy``).

    ``connect_timeout`` bounds each connection attempt; ``max_idle`` and
    ``idle_timeout`` bound the pool (``ConnectionPool``);
    ``max_answer_bytes`` bounds each answer on the wire.
    """

    def __init__(self, reactor: Any, tls_policy: Any, connect_timeout: float,
                 max_idle: int, idle_timeout: float,
                 max_answer_bytes: int) -> None:
        self.reactor = reactor
        self.pool = ConnectionPool(reactor, max_idle, idle_timeout)
        self.max_answer_bytes = max_answer_bytes
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._targets: dict[str, _Target] = {}

    @property
    def client(self) -> "HTTPClient":
        """This client itself, for callers that hold a (client, pool) pair
        under ``.client``."""
        return self

    def get(self, url: str, **kwargs: Any) -> defer.Deferred:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, data: Optional[bytes] = None,
             **kwargs: Any) -> defer.Deferred:
        return self.request("POST", url, data=data, **kwargs)

    def request(self, method: Union[str, bytes], url: str,
                data: Optional[bytes] = None, headers: Any = None,
                allow_redirects: bool = False, unbuffered: bool = True,
                reactor: Any = None) -> defer.Deferred:
        """``Deferred[Response]``; ``allow_redirects``, ``unbuffered`` and
        ``reactor`` are accepted for treq's sake and change nothing (no
        redirect is ever followed, bodies are always streamed, the client
        has its own reactor)."""
        return self._send(method, url, data, headers, -1, ())

    def fetch(self, method: Union[str, bytes], url: str,
              data: Optional[bytes] = None, headers: Any = None,
              max_body: int = 65536, keep: tuple = (200,)
              ) -> defer.Deferred:
        """``Deferred[Answer]``: the whole answer at once, for callers that
        want it whole (the introspector) rather than streamed.

        The body of a status in ``keep`` is kept, up to ``max_body`` bytes:
        past that the connection is dropped and the result fails with
        ``BodyTooLarge``.  Other bodies are counted, not kept: past
        ``max_body`` the connection is dropped and the answer is given
        with an empty body.  A failure after the head is ``BodyFailed``;
        before it, as for ``request``.  Cancelling drops the connection.
        """
        return self._send(method, url, data, headers, max(max_body, 0), keep)

    def _send(self, method: Union[str, bytes], url: str,
              data: Optional[bytes], headers: Any, max_body: int,
              keep: tuple) -> defer.Deferred:
        try:
            target = self._target(url)
            if isinstance(method, str):
                method = method.encode("ascii")
            payload = _request_bytes(method, target, headers, data)
        except Exception:
            return defer.fail()
        call = _Call(payload, method == b"HEAD", max_body, keep)
        conn = self.pool.take(target.key)
        if conn is not None:
            conn.send(call)
        else:
            call.connect(target.endpoint, target.factory)
        return call.result

    def close(self) -> defer.Deferred:
        """Close every idle connection; fires when they are closed.
        Connections still carrying a request close when it ends (a reload
        replaces the client while introspections are in flight)."""
        return self.pool.close()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is not None:
            return target
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise SchemeNotSupported("unsupported scheme %r" % scheme)
        host = parts.hostname or ""
        if not host:
            raise ValueError("no host in %r" % url)
        port = parts.port or (443 if scheme == "https" else 80)
        host = host if host.isascii() else host.encode("idna").decode("ascii")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
            endpoint: Any = HostnameEndpoint(self.reactor, host, port,
                                             timeout=self._connect_timeout)
        else:
            kind = TCP6ClientEndpoint if ip.version == 6 else \
                TCP4ClientEndpoint
            endpoint = kind(self.reactor, host, port,
                            timeout=self._connect_timeout)
        if scheme == "https":
            endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(
                host.encode("ascii"), port), endpoint)
        authority = ("[%s]" % host if ip is not None and ip.version == 6
                     else host)
        if parts.port is not None:
            authority += ":%d" % port
        path = (parts.path or "/") + ("?" + parts.query if parts.query
                                      else "")
        if re.search(r"[\s\0]", path):
            raise ValueError("blank or control character in %r" % url)
        key = (scheme, host, port)
        if len(self._targets) >= MAX_TARGETS:
            self._targets.clear()
        target = self._targets[url] = _Target(
            key, endpoint, _ConnectionFactory(self, key),
            authority.encode("ascii"), path.encode("ascii"))
        return target


class EncodedHeaders:
    """Request headers checked and encoded once, for a caller that sends
    the same ones on every request (``encode_headers``)."""

    __slots__ = ("block",)

    def __init__(self, block: bytes) -> None:
        self.block = block


def encode_headers(headers: Any) -> EncodedHeaders:
    """``headers`` (as ``request`` takes them) checked and encoded; raises
    ValueError as ``request`` would fail."""
    lines: list[bytes] = []
    _header_lines(headers, lines)
    return EncodedHeaders(b"".join(lines))


def _request_bytes(method: bytes, target: _Target, headers: Any,
                   data: Optional[bytes]) -> bytes:
    """The whole request, head and body.  Raises ValueError for a header
    name that is not a token, a value that could split the head (CR, LF,
    NUL), or a header the client sets itself (Host, Content-Length,
    Transfer-Encoding, Connection)."""
    if data is not None and type(data) is not bytes:
        raise TypeError("data must be bytes")
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (
        method, target.path, target.authority)]
    if type(headers) is EncodedHeaders:
        lines.append(headers.block)
    elif headers:
        _header_lines(headers, lines)
    if data is not None:
        lines.append(b"Content-Length: %d\r\n\r\n" % len(data))
        lines.append(data)
    elif method in _BODY_METHODS:
        lines.append(b"Content-Length: 0\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines)


def _header_lines(headers: Any, lines: list[bytes]) -> None:
    if not headers:
        return
    items = (headers.getAllRawHeaders() if isinstance(headers, Headers)
             else headers.items())
    for name, values in items:
        if type(name) is not bytes:
            name = name.encode("ascii")
        if type(values) is bytes or type(values) is str:
            values = [values]
        if _is_token(name) is None or name.lower() in _OWN_HEADERS:
            raise ValueError("header %r cannot be set" % name)
        for value in values:
            if type(value) is not bytes:
                value = value.encode("utf-8")
            if _splits_head(value) is not None:
                raise ValueError("header %r has a line break" % name)
            lines.append(b"%s: %s\r\n" % (name, value))
