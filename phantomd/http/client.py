"""A lean, pooled HTTP/1.1 client for the token service and its key set.

The introspector and ``keysource.KeySource`` want answers whole:
``fetch(method, url, data, headers, max_body, keep)`` returns a
``Deferred`` that fires once, with an ``Answer`` (code, decoded headers,
bounded body) -- no Response object, body protocol or Twisted ``Headers``
in between; ``request(..., done)`` gives it to a callable instead, for
the introspector (``phantomd.direct``).  Underneath, one
``wire.BareResponseReader`` (httptools) per connection, idle connections
in a ``pool.IdlePool``, and plain method calls replace Agent, hyperlink
and ``HTTP11ClientProtocol``: an introspection is on the miss path of
every new token, so its client must cost little.  (The unit tests give
the introspector the same ``request`` over treq's ``StubTreq``:
``tests/helpers_fetch.TreqFetcher``.)

What it never does: follow redirects (a 3xx is an answer like any other),
keep or send cookies, pipeline, retry (a POST may not be repeated).

Bounds:

* an answer's bytes on the wire (interim 1xx answers, head, body and chunk
  framing) are counted from the moment the request is written; past
  ``max_answer_bytes`` the connection is aborted and the exchange fails with
  ``AnswerTooLarge`` (so an endless header line or an endless head cannot
  grow memory: llhttp keeps a header it has not finished);
* a body is kept up to ``max_body`` bytes (see ``HTTPClient.fetch``);
* at most ``max_idle`` idle connections are kept per (scheme, host, port);
  one handed back beyond that is closed, and so is one idle for longer than
  ``idle_timeout`` seconds;
* at most ``MAX_TARGETS`` parsed URLs (with their endpoints) are kept; at the
  bound the map is emptied and refilled (phantomd talks to a handful).

Connections in use are bounded by the callers (the coalescer's
``max_in_flight``).  Cancelling a request (its Deferred, or the call
``request`` returns) aborts the exchange: the connection attempt is
cancelled or the connection closed, never reused.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers

from phantomd.direct import as_deferred
from phantomd.http.deadline import Deadline
from phantomd.http.fastio import writer_for
from phantomd.http.pool import IdlePool, endpoint_for
from phantomd.http.wire import MODE_EOF, BadResponse, BareResponseReader

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
    """Internal: raised from ``answer_body`` to stop the parser."""


class _Collect:
    """What a request gathers of an answer once its head is in: the
    connection calls ``_data`` with each piece of the body, then
    ``_ended`` once, which tells the caller (``_Call.finish``)."""

    __slots__ = ("code", "headers", "max_body", "keep", "call", "_parts",
                 "_size")

    def __init__(self, code: int, headers: dict[str, list[str]],
                 max_body: int, keep: bool, call: "_Call") -> None:
        self.code = code
        self.headers = headers
        self.max_body = max_body
        self.keep = keep
        self.call: Optional[_Call] = call
        self._parts: list[bytes] = []
        self._size = 0

    def _data(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.max_body:
            raise _Overflow()
        if self.keep:
            self._parts.append(data)

    def _ended(self, error: Optional[BaseException] = None) -> None:
        """The answer is complete, or (``error``) it never will be."""
        call, self.call = self.call, None
        if call is None:
            return
        if error is None:
            call.finish(Answer(self.code, self.headers,
                               b"".join(self._parts)))
        elif not isinstance(error, _Overflow):
            call.finish(Failure(BodyFailed(self.code, Failure(error))))
        elif self.keep:
            call.finish(Failure(BodyTooLarge(self.code, self.max_body)))
        else:
            # A body nobody reads need not be read to its end.
            call.finish(Answer(self.code, self.headers, b""))


class _Call:
    """One request from ``request()`` to its whole answer (or failure),
    which goes to ``done`` once; the caller's handle (``cancel``)."""

    __slots__ = ("payload", "head_method", "max_body", "keep", "conn",
                 "_done", "_connecting")

    def __init__(self, payload: bytes, head_method: bool, max_body: int,
                 keep: tuple, done: Callable[[Any], None]) -> None:
        self.payload = payload
        self.head_method = head_method
        self.max_body = max_body
        self.keep = keep
        self.conn: Optional[_Connection] = None
        #: None once the answer was given or the caller cancelled.
        self._done: Optional[Callable[[Any], None]] = done
        self._connecting: Optional[defer.Deferred] = None

    @property
    def finished(self) -> bool:
        return self._done is None

    def finish(self, result: Any) -> None:
        """The answer (or a ``Failure``) for the caller, once."""
        done, self._done = self._done, None
        if done is not None:
            done(result)

    def connect(self, endpoint: Any, factory: Factory) -> None:
        d = self._connecting = endpoint.connect(factory)
        d.addCallbacks(self._connected, self._not_connected)

    def _connected(self, conn: "_Connection") -> None:
        self._connecting = None
        if self._done is None:  # cancelled meanwhile
            conn.close()
        else:
            conn.send(self)

    def _not_connected(self, failure: Failure) -> None:
        self._connecting = None
        self.finish(failure)

    def cancel(self) -> None:
        """The caller gave up: drop the attempt or the connection; nothing
        is delivered after this."""
        if self._done is None:
            return
        self._done = None
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.conn is not None:
            self.conn.abort()


class _Connection(Protocol):
    """One HTTP/1.1 connection; one exchange at a time on it.

    The ``ResponseReader``'s calls only collect; the caller hears of the
    answer after ``feed`` returns, so a caller that starts its next request
    from a callback never meets a parser mid-feed.
    """

    def __init__(self, client: "HTTPClient", key: tuple) -> None:
        self.client = client
        self.key = key
        self.lost = False
        self.idle_since = 0.0
        self._reader = BareResponseReader(self, client.max_answer_bytes)
        self._write: Any = None
        self._idle_deadline = Deadline(client.reactor, self._idle_expired)
        self._broken = False
        self._call: Optional[_Call] = None
        self._collect: Optional[_Collect] = None
        #: Bytes of this exchange's answer so far (reset by ``send``).
        self._received = 0
        #: The answer's body ends with the connection (set with its head).
        self._eof_body = False

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._write = writer_for(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._call is None and self._collect is None:
            # Bytes nobody asked for: never reuse this connection, and out
            # of the pool now -- the abort's connectionLost comes a turn
            # later, and a request meanwhile must not be given it.
            self._broken = True
            self.client.pool.discard(self)
            self.transport.abortConnection()
            return
        self._received += len(data)
        if self._received > self.client.max_answer_bytes:
            self._fail(AnswerTooLarge(self.client.max_answer_bytes))
            return
        reader = self._reader
        try:
            reader.feed(data)
        except BadResponse as e:
            self._fail(MalformedAnswer("%s" % e))
            return
        except _Overflow as e:
            self._fail(e)
            return
        if reader.complete and self._collect is not None:
            self._finish(reader.keep_alive)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._idle_deadline.cancel()
        self.client.pool.lost(self)
        if self._collect is not None and self._eof_body and \
                reason.check(ConnectionDone):
            self._finish(False)
        else:
            self._fail(reason.value)

    # -- what the client calls -----------------------------------------------

    def send(self, call: _Call) -> None:
        """Write ``call``'s request; it finishes with the whole answer."""
        if self.lost:
            call.finish(Failure(ResponseNeverReceived(
                [Failure(ConnectionDone("the connection closed"))])))
            return
        call.conn = self
        self._call = call
        self._reader.start(call.head_method)
        self._received = 0
        self._write(call.payload)

    def close(self) -> None:
        """Close cleanly; the connection is never reused."""
        self._broken = True
        if not self.lost:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Give up on the exchange: drop the connection, tell nobody."""
        self._call = None
        self._collect = None
        self._broken = True
        if not self.lost:
            self.transport.abortConnection()

    # -- what the ResponseReader calls ---------------------------------------

    def answer_interim(self, status: int) -> None:
        pass  # the real answer follows

    def answer_switch(self, headers: list, rest: bytes) -> bool:
        return False  # never asked for: the answer is unusable

    def answer_head(self, status: int, reason: bytes, headers: list,
                    mode: int, length: Optional[bytes],
                    connection: Optional[list]) -> None:
        call = self._call
        if call is None or self._collect is not None:
            self._broken = True  # an answer nobody asked for
            return
        decoded: dict[str, list[str]] = {}
        for name, value in headers:
            key = name.lower().decode("latin-1")
            if key in decoded:
                decoded[key].append(value.decode("latin-1"))
            else:
                decoded[key] = [value.decode("latin-1")]
        self._eof_body = mode == MODE_EOF
        # Nothing fires before the whole answer is in.
        self._collect = _Collect(status, decoded, call.max_body,
                                 status in call.keep, call)

    def answer_body(self, data: bytes) -> None:
        collect = self._collect
        if collect is not None:
            collect._data(data)

    # -- internals -----------------------------------------------------------

    def _finish(self, reuse: bool) -> None:
        """The answer is complete: pool or close, then tell the caller."""
        collect, self._collect = self._collect, None
        self._call = None
        if not self.lost:
            if reuse and not self._broken and not self._reader.broken:
                self.client.pool.put(self)
            else:
                self.close()
        if collect is not None:
            collect._ended()

    def _fail(self, e: BaseException) -> None:
        """The exchange failed: drop the connection, tell whoever waits."""
        call, collect = self._call, self._collect
        self.abort()
        if collect is not None:
            collect._ended(e)
        elif call is not None and not call.finished:
            kind = ResponseFailed if self._received else ResponseNeverReceived
            call.finish(Failure(kind([Failure(e)])))

    def went_idle(self) -> None:
        """Kept by the pool: closed after ``idle_timeout`` unless taken.
        One ``Deadline`` per connection, armed once: when it runs out it
        looks at ``idle_since`` and sleeps again if the connection was
        used since (cheaper than moving it on every exchange)."""
        if self._idle_deadline.at is None:  # not armed
            self._idle_deadline.arm(self.client.pool.idle_timeout)

    def _idle_expired(self, kind: Any) -> None:
        if self.lost or self._call is not None or self._collect is not None:
            return
        left = self.idle_since + self.client.pool.idle_timeout \
            - self.client.reactor.seconds()
        if left > 0:
            self._idle_deadline.arm(left)
            return
        self.client.pool.discard(self)
        self.close()


class _ConnectionFactory(Factory):
    def __init__(self, client: "HTTPClient", key: tuple) -> None:
        self.client = client
        self.key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.client, self.key)


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
    ``IPolicyForHTTPS`` such as ``phantomd.http.tls.ClientPolicy``).

    ``connect_timeout`` bounds each connection attempt; ``max_idle`` and
    ``idle_timeout`` bound the pool (``pool.IdlePool``, keyed by scheme,
    host and port);
    ``max_answer_bytes`` bounds each answer on the wire.
    """

    def __init__(self, reactor: Any, tls_policy: Any, connect_timeout: float,
                 max_idle: int, idle_timeout: float,
                 max_answer_bytes: int) -> None:
        self.reactor = reactor
        self.pool = IdlePool(reactor, max_idle, idle_timeout,
                             _Connection.went_idle)
        self.max_answer_bytes = max_answer_bytes
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._targets: dict[str, _Target] = {}

    def fetch(self, method: Union[str, bytes], url: str,
              data: Optional[bytes] = None, headers: Any = None,
              max_body: int = 65536, keep: tuple = (200,)
              ) -> defer.Deferred:
        """``Deferred[Answer]``: the whole answer, once it is all in
        (``request`` with a Deferred; cancelling it cancels the call)."""
        return as_deferred(lambda done: self.request(
            method, url, data, headers, max_body, keep, done))

    def request(self, method: Union[str, bytes], url: str,
                data: Optional[bytes], headers: Any, max_body: int,
                keep: tuple, done: Callable[[Any], None]
                ) -> Optional[_Call]:
        """Send a request; ``done`` gets the whole answer (an ``Answer``)
        or a ``Failure``, once (``phantomd.direct``).  Returns the call,
        whose ``cancel()`` drops the connection, or None when ``done``
        was already given a failure.

        The body of a status in ``keep`` is kept, up to ``max_body`` bytes:
        past that the connection is dropped and the result fails with
        ``BodyTooLarge``.  Other bodies are counted, not kept: past
        ``max_body`` the connection is dropped and the answer is given
        with an empty body.  A failure after the head is ``BodyFailed``;
        before it, ``ResponseNeverReceived`` (nothing came back) or
        ``ResponseFailed`` (something unusable did), wrapping the cause as
        Twisted's client does.  A bad URL or header fails at once, before
        anything is sent.  Cancelling drops the connection.
        """
        try:
            target = self._target(url)
            if isinstance(method, str):
                method = method.encode("ascii")
            payload = _request_bytes(method, target, headers, data)
        except Exception:
            done(Failure())
            return None
        call = _Call(payload, method == b"HEAD", max(max_body, 0), keep,
                     done)
        conn = self.pool.take(target.key)
        if conn is not None:
            conn.send(call)
        else:
            call.connect(target.endpoint, target.factory)
        return call

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
        endpoint = endpoint_for(
            self.reactor, host, port, self._connect_timeout,
            self._tls_policy.creatorForNetloc(host.encode("ascii"), port)
            if scheme == "https" else None)
        authority = "[%s]" % host if ":" in host else host
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
    """``headers`` (as ``fetch`` takes them) checked and encoded; raises
    ValueError where ``fetch`` would fail."""
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
