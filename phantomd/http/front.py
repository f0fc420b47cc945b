"""The front: an HTTP/1.1 server that asks the gate about every request and
forwards the ones it allows through the upstream pool.

One request at a time per connection.  While a request is in flight the
client's socket is not read once anything beyond that request has arrived
(pipelined requests wait in the kernel), nor while its body waits for the
gate; its body is read only while it streams upstream.  Input is parsed
4 KiB at a time and the rest of a read is kept raw while a request waits.
So what phantomd holds per connection is bounded by one read (64 KiB), one
slice's worth of parsed requests and the transports' send buffers (64 KiB
each, after which the other side is paused), whatever the body sizes.

Timers, one per connection: ``header_timeout`` for a request head (408),
``idle_timeout`` between requests (closed silently), a minimum body rate
(408), and a short linger after an answer that closes the connection.

A WebSocket upgrade (DESIGN section 13) is the one request after which
nothing is parsed: what follows is held (``Input.HELD``: socket paused,
``MAX_HELD`` at most) until the upstream's 101, then the connection is in
``State.TUNNEL`` and its bytes are ``tunnel.Tunnel``'s to relay.

The connection's state is two machines (``states.py``): ``State``, where
the exchange is, and ``Input``, what becomes of the client's bytes.  What
else it keeps are facts about its transport (TLS, registered as producer,
the client's send buffer full, why reading is paused), two guards against
re-entry (``_advancing``, ``_feeding``) and the request in flight, whose
own fields (``ParsedRequest``) carry its answer's status and framing.
``admission.admit`` decides what a request gets; ``listener.FrontFactory``
holds what all connections share.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from phantomd.http.admission import (
    GATE as _ASK_GATE, NOT_FOUND as _NOT_FOUND, OPEN as _OPEN_ROUTE,
    REFUSE as _REFUSE, admit, evidence)
from phantomd.http.answers import REJECTED_REASON, head as _head, own_answer
from phantomd.http.deadline import Deadline
from phantomd.http.fastio import writer_for
from phantomd.http.interfaces import IExchange
from phantomd.http.tunnel import Tunnel, hand_over
from phantomd.http.wire import IRequestConsumer, ParsedRequest, RequestReader
from phantomd.http.requestid import from_headers as _request_id
from phantomd.http.states import (
    INPUT_TRANSITIONS, TRANSITIONS, Input, State, StateError)
from phantomd.http.forwarding import (
    WEBSOCKET_LINES, forwarded_lines, own_forwarded, retryable, upstream_head,
    upstream_target)
from phantomd.token.mtls import peer_thumbprint
from phantomd.http.wire import MODE_CHUNKED, MODE_EOF, MODE_LENGTH
from phantomd.token.outcomes import Forward, error_response
from phantomd.token.tokens import jwt_shaped
from phantomd.http.cors import without_cors
from phantomd.http.routes import claim_lines

if TYPE_CHECKING:
    from phantomd.http.listener import FrontFactory

log = Logger()


_IDLE, _GATE, _CONNECT, _UPSTREAM, _RESPONSE, _TUNNEL, _CLOSED = (
    State.IDLE, State.GATE, State.CONNECT, State.UPSTREAM, State.RESPONSE,
    State.TUNNEL, State.CLOSED)
_OPEN, _HELD, _ENDED = Input.OPEN, Input.HELD, Input.ENDED


# Why the client's socket is not being read (bits of FrontProtocol._paused).
_BUSY, _UPSTREAM_FULL = 1, 2
# What the connection timer is measuring.
_HEADER, _IDLE_KA, _LINGER, _LINGER_TLS, _BODY = 1, 2, 3, 4, 5
# Bytes per second a request body must average once it streams, after a
# grace of header_timeout (as Apache's mod_reqtimeout MinRate): a body
# trickling in a byte at a time cannot hold an upstream connection for ever.
MIN_BODY_RATE = 500
# Seconds a closing connection discards what the client still sends.
LINGER = 2.0
# Bytes a client may send after a WebSocket upgrade request before the 101.
MAX_HELD = 128 * 1024


_UNKNOWN = object()


@implementer(IExchange, IRequestConsumer)
class FrontProtocol(Protocol):
    """One client connection.

    It is also its transport's streaming producer (registered once): when
    the client reads slowly and the send buffer fills, the upstream
    connection feeding it is paused, so a response is never held whole.
    """

    def __init__(self, factory: "FrontFactory") -> None:
        self.factory = factory
        self.reactor = factory.reactor
        self._reader = RequestReader(self, factory, self.reactor)
        self._queue: deque = deque()
        self._req: Optional[ParsedRequest] = None
        #: The exchange's ``State``; moved only by ``_to``.
        self.state = _IDLE
        #: What becomes of the client's bytes (``Input``); moved only by
        #: ``_input_to``.
        self.input = _OPEN
        self._paused = 0
        self._deadline = Deadline(self.reactor, self._timed_out)
        self._advancing = False
        self._client_full = False
        self._gate_d: Any = None
        self._connect_d: Any = None
        self._upstream: Any = None
        self._fwd = b""
        self._peer: Optional[str] = None
        self._proxies: Any = None
        self._peer_trusted = False
        self._x5t: Any = _UNKNOWN  # the TLS client certificate's thumbprint
        self._registered = False
        self._tls = False
        self._stash = b""
        self._feeding = False
        self._any_bytes = False
        self._body_base = 0.0
        self._body_bytes = 0
        self._blocked_at = 0.0
        self._out: list = []
        self._write: Any = None
        self._peer = "-"
        self._cut: Optional[str] = None
        # DESIGN section 13: the client's bytes after a WebSocket upgrade
        # request (never parsed, ``Input.HELD``), then the Tunnel relaying
        # them.
        self._held: list = []
        self._tunnel: Any = None

    def _to(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise StateError("%s -> %s" % (self.state.name, state.name))
        self.state = state

    def _input_to(self, to: Input) -> None:
        if to not in INPUT_TRANSITIONS[self.input]:
            raise StateError("input %s -> %s" % (self.input.name, to.name))
        self.input = to

    def _end_input(self) -> None:
        """Nothing the client sends from now on is read."""
        self.input = _ENDED  # allowed from every input state

    # -- connection lifetime -------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        transport = self.transport
        f.connections.add(self)
        f.metrics.connections.inc()
        transport.registerProducer(self, True)
        self._registered = True
        self._write = writer_for(transport)
        self._tls = ISSLTransport.providedBy(transport)
        host = getattr(transport.getPeer(), "host", None)
        self._peer = host
        self._fwd = own_forwarded(host, self._tls)
        self._deadline.arm(f.header_timeout, _HEADER)

    def connectionLost(self, reason: Any = None) -> None:
        self._deadline.cancel()
        if self._tunnel is not None:
            self._tunnel.client_lost()
        self._end_input()
        self._to(_CLOSED)
        f = self.factory
        f.connections.discard(self)
        f.metrics.connections.dec()
        r, self._req = self._req, None
        if r is not None:
            # Cut before its answer was complete: by the client, or by
            # phantomd when drain_timeout ran out.
            self._log_access(r, self._cut or "client_closed")
        if f.draining:
            for queued in self._queue:
                if queued.head_done:
                    self._log_access(queued, "drain")
        self._queue.clear()
        self._drop_pending()
        f._gone(self)

    def abort(self) -> None:
        """Drop the connection now (``drain_timeout`` ran out)."""
        self._cut = "drain"
        self.transport.abortConnection()

    def _drop_pending(self) -> None:
        """Forget the request in flight: the gate's answer, a pending
        upstream connection attempt and the upstream connection itself
        (aborted, never handed back to the pool half-used)."""
        d, self._gate_d = self._gate_d, None
        if d is not None:
            d.cancel()
        d, self._connect_d = self._connect_d, None
        if d is not None:
            d.cancel()
        conn, self._upstream = self._upstream, None
        if conn is not None:
            conn.abort()

    def drain(self) -> None:
        """The factory is draining (``FrontFactory.draining``): close now
        if idle, else after the current response."""
        if self._req is None:
            self._close(linger=False)

    def _close(self, linger: bool = True, unread: bool = False) -> None:
        """Close after what was written is sent.

        With ``linger``, a plain TCP connection first shuts down only its
        sending side and discards what the client still sends for
        ``LINGER`` seconds: closing with unread bytes makes the kernel send
        a reset that can destroy the answer before the client reads it
        (a 401 to an upload, say).  ``unread``: the client may still be
        sending (a body not read, or input that ended unparsed)."""
        self._end_input()
        self._to(_CLOSED)
        transport = self.transport
        if self._registered:
            # TLS transports wait for the producer to go before closing.
            self._registered = False
            transport.unregisterProducer()
        if linger and not self._tls and \
                getattr(transport, "loseWriteConnection", None) is not None:
            transport.loseWriteConnection()
            if self._paused:
                self._paused = 0
                transport.resumeProducing()
            self._deadline.arm(LINGER, _LINGER)
        elif linger and self._tls and unread:
            # TLS has no half-close: keep reading (and discarding) while
            # the answer goes out, then close.
            if self._paused:
                self._paused = 0
                transport.resumeProducing()
            self._deadline.arm(LINGER, _LINGER_TLS)
        else:
            transport.loseConnection()

    # -- IPushProducer: the client's send buffer -----------------------------

    def pauseProducing(self) -> None:
        self._client_full = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resumeProducing(self) -> None:
        self._client_full = False
        if self._upstream is not None:
            self._upstream.resume_reading()

    def stopProducing(self) -> None:
        pass

    # -- reading -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._any_bytes = True
        if self.input is not _OPEN:
            if self.input is _HELD:
                self._hold(data)
            return
        if self._stash:
            # Arrived before the pause took effect; parsed in its turn.
            self._stash += data
            return
        self._feed(data)
        self._advance()

    def _feed(self, data: bytes) -> None:
        """Parse ``data``; as soon as a request has to wait behind the one
        in flight, keep the rest unparsed (``_stash``, at most one read)."""
        self._feeding = True
        try:
            rest = self._reader.feed(data)
        finally:
            self._feeding = False
        if rest:
            if self.input is _OPEN:
                self._stash = rest
            elif self.input is _HELD:
                self._hold(rest)  # after a WebSocket upgrade request

    def slice_parsed(self) -> bool:
        if self.input is not _OPEN:
            return True
        self._advance()
        return self._must_wait()

    def _must_wait(self) -> bool:
        """Whether more input must not be parsed yet."""
        if self._queue:
            return True
        r = self._req
        return r is not None and not r.complete and (
            self.state < _UPSTREAM or self._upstream is None)

    def _unstash(self) -> None:
        if self._stash and not self._feeding and self.input is _OPEN \
                and not self._must_wait():
            data, self._stash = self._stash, b""
            self._feed(data)
            if not self._feeding:
                self._advance()

    # -- what the request reader calls (wire.IRequestConsumer) --------------

    def request_begun(self) -> None:
        if self._req is None and self._deadline.kind == _IDLE_KA:
            self._deadline.arm(self.factory.header_timeout, _HEADER)

    def request_head(self, r: ParsedRequest) -> None:
        self._queue.append(r)

    def request_body(self, r: ParsedRequest, data: bytes) -> None:
        if r is self._req and self.state >= _UPSTREAM:
            self._body_bytes += len(data)
            if self._upstream is not None:
                self._send_body(r, data)
        elif r.body is None:
            r.body = [data]
        else:
            r.body.append(data)

    def request_complete(self, r: ParsedRequest) -> None:
        if r is self._req and self._upstream is not None:
            self._end_body(r)
            self._update_reading()

    def request_refused(self, r: ParsedRequest, queued: bool) -> None:
        self._end_input()
        if not queued:
            self._queue.append(r)
        if r is self._req:
            self._broken_mid_request(r)

    def input_ended(self) -> None:
        if self.input is _OPEN:  # held input stays the tunnel's
            self._end_input()

    def request_upgrade(self, r: ParsedRequest, rest: bytes) -> bool:
        """Whether ``r`` asks for a WebSocket (DESIGN section 13): a GET
        over HTTP/1.1 with ``Upgrade: websocket`` alone (``h2c`` and the
        rest go on as plain requests).  Then nothing the client sends after
        it is parsed as HTTP: ``rest`` and what follows are held, the socket
        paused, for the tunnel; any answer but a 101 closes the
        connection."""
        if r.method != b"GET" or r.version != "1.1":
            return False
        upgrade = [v for n, v in r.headers if n.lower() == b"upgrade"]
        if len(upgrade) != 1 or upgrade[0].strip().lower() != b"websocket":
            return False
        r.upgrade = True
        r.keep_alive = False
        self._input_to(_HELD)
        self._held.append(rest)
        return True

    # -- the request state machine -------------------------------------------

    def _advance(self) -> None:
        if self._advancing:
            return
        self._advancing = True
        try:
            # Not after a close (a refusal): requests parsed behind the
            # refused one in the same read are never started.
            while self._req is None and self._queue and \
                    self.state is not _CLOSED and not self.factory.draining:
                r = self._queue.popleft()
                self._req = r
                self._start(r)
        finally:
            self._advancing = False
        if self._stash:
            self._unstash()
        self._update_reading()

    def _update_reading(self) -> None:
        if self.state >= _TUNNEL:
            return
        r = self._req
        if self.input is not _OPEN or self._stash:
            busy = True
        elif r is None:
            busy = False
        elif r.complete:
            # Reading on costs nothing until the client sends more (and
            # shows a disconnect at once): the read that brings a pipelined
            # request pauses the socket.
            busy = self._reader.parsing is not None or len(self._queue) > 0
        else:
            busy = self.state < _UPSTREAM or self._upstream is None
        paused = self._paused
        if busy:
            if not paused & _BUSY:
                self._paused = paused | _BUSY
                if not paused:
                    self.transport.pauseProducing()
        elif paused & _BUSY:
            self._paused = paused & ~_BUSY
            if not self._paused:
                self.transport.resumeProducing()

    def upstream_write_blocked(self, blocked: bool) -> None:
        if self.state >= _TUNNEL:
            return
        paused = self._paused
        if blocked:
            if not paused & _UPSTREAM_FULL:
                self._paused = paused | _UPSTREAM_FULL
                self._blocked_at = self.reactor.seconds()
                if not paused:
                    self.transport.pauseProducing()
        elif paused & _UPSTREAM_FULL:
            self._paused = paused & ~_UPSTREAM_FULL
            # Time the API held the body back does not count against the
            # client's body rate.
            self._body_base += self.reactor.seconds() - self._blocked_at
            if not self._paused:
                self.transport.resumeProducing()

    def _start(self, r: ParsedRequest) -> None:
        f = self.factory
        kind, what = admit(r, f.routes, f.cors)
        if kind != _ASK_GATE:
            if kind == _OPEN_ROUTE:
                self._forward(r, None, None)
            elif kind == _REFUSE:
                self._refuse(r, *what)
            elif kind == _NOT_FOUND:
                self._answer_error(r, 404, "not_found",
                                   "no route for this path",
                                   close=not r.complete)
            else:
                self._answer(r, 204, what, b"", close=not r.complete)
            return
        self._to(_GATE)
        auth, proofs = what
        scopes = r.route.required_scopes
        done = partial(self._authorized, r)
        if proofs is None and not self._tls:
            if scopes is None:
                waiting = f.gate.authorize_to(done, auth)
            else:
                waiting = f.gate.authorize_to(done, auth,
                                              required_scopes=scopes)
        else:
            more = evidence(proofs or (), r, self._tls, self._trusted(),
                            self._peer_cert)
            if scopes is not None:
                more["required_scopes"] = scopes
            waiting = f.gate.authorize_to(done, auth, **more)
        if waiting is not None and self._req is r and self.state is _GATE:
            self._gate_d = waiting  # cancelled if the client goes away

    def _peer_cert(self) -> Any:
        """The thumbprint of the certificate the client presented on this
        connection (None without one), worked out once."""
        if self._x5t is _UNKNOWN:
            self._x5t = peer_thumbprint(self.transport)
        return self._x5t

    def _trusted(self) -> bool:
        """Whether the peer is a trusted proxy, by the settings in force
        now (worked out again after a reload changed them)."""
        proxies = self.factory.proxies
        if proxies is not self._proxies:
            self._proxies = proxies
            self._peer_trusted = proxies.trusts(self._peer)
        return self._peer_trusted

    def _gate_failed(self, failure: Any, r: ParsedRequest) -> None:
        if failure.check(defer.CancelledError) or r is not self._req:
            return
        self._gate_d = None
        log.failure("the gate failed", failure)
        self._answer_error(r, 500, "server_error", "internal error",
                           close=not r.complete)

    def _authorized(self, r: ParsedRequest, outcome: Any) -> None:
        """The gate's decision for ``r`` (a ``Failure`` only for a bug)."""
        if isinstance(outcome, Failure):
            self._gate_failed(outcome, r)
            return
        if r is not self._req:
            return
        self._gate_d = None
        r.outcome = outcome
        if type(outcome) is not Forward:
            self._answer(r, outcome.status,
                         outcome.headers(self.factory.realm),
                         outcome.body(r.rid.decode("ascii")),
                         close=not r.complete)
            return
        jwt = outcome.jwt.encode("ascii", "replace")
        if not jwt_shaped(jwt):
            log.error("the gate produced a malformed JWT for {token_id}",
                      token_id=outcome.token_id)
            self._answer_error(r, 502, "bad_gateway",
                               "the token service returned an unusable token",
                               close=not r.complete)
            return
        self._forward(r, jwt, outcome.claims)

    def _forward(self, r: ParsedRequest, jwt: Optional[bytes],
                 claims: Any) -> None:
        """Send ``r`` to its route's upstream, with ``jwt`` (None: with no
        Authorization at all) and the route's claim headers from
        ``claims``."""
        route = r.route
        claimed = ()
        if route.claim_headers and claims is not None:
            claimed = claim_lines(route, claims)
            if claimed is None:
                # A claim with CR, LF, a control or non-ASCII character
                # (or an object) cannot become a header: not the client's
                # fault, and the API must not get half its headers.
                log.error("a claim of {token_id} cannot be sent as a "
                          "header of route {route}",
                          token_id=getattr(r.outcome, "token_id", ""),
                          route=route.name)
                self._answer_error(r, 502, "bad_gateway",
                                   "the token's claims cannot be forwarded",
                                   close=not r.complete)
                return
        pool = (self.factory.upstream if route.upstream is None
                else self.factory.pools.get(route.upstream))
        if pool is None:
            self._answer_error(r, 502, "bad_gateway", "no upstream pool",
                               close=not r.complete)
            return
        r.head = upstream_head(
            r.method, upstream_target(pool.base_path, r.sent), pool.authority,
            jwt, r.rid, r.kept, route.drop, claimed,
            forwarded_lines(r.fwd, r.fwd is not None and self._trusted(),
                            self._peer, self._tls, r.host, self._fwd,
                            route.drop),
            r.chunked, r.length, websocket=r.upgrade)
        r.kept = []
        r.fwd = None
        self._to(_CONNECT)
        d = pool.connect(self)
        if d is not None:  # None: connected from the pool at once
            self.upstream_connecting(d)

    # -- what the upstream pool and connection call --------------------------

    def upstream_connecting(self, d: Any) -> None:
        if d is not None and self.state is _CONNECT and not d.called:
            self._connect_d = d

    def upstream_retry(self) -> None:
        self._upstream = None
        self._to(_CONNECT)

    def upstream_ready(self, conn: Any) -> None:
        r = self._req
        self._connect_d = None
        if r is None or self.state is not _CONNECT:
            conn.abort()
            return
        self._upstream = conn
        self._to(_UPSTREAM)
        conn.send(self, r.head, r.method == b"HEAD",
                  retryable(r.method, r.chunked, r.length))
        if self._client_full:
            conn.pause_reading()
        if not r.complete:
            self._body_base = self.reactor.seconds()
            self._body_bytes = 0
            self._deadline.arm(self.factory.header_timeout, _BODY)
        body = r.body
        if body is not None:
            r.body = None
            for chunk in body:
                self._send_body(r, chunk)
        if r.complete:
            self._end_body(r, with_head=True)
        if not self._advancing:  # else its caller updates the reading
            self._advance()

    def upstream_switched(self, upstream: Any, headers: list,
                          rest: bytes) -> Any:
        """The upstream answered 101 on ``upstream`` (its transport), with
        ``headers`` (hop-by-hop ones gone) and ``rest`` read after it.  For
        a WebSocket request: send the 101 on and return the ``Tunnel`` both
        transports now belong to; else None (the pool answers 502)."""
        r = self._req
        if r is None or not r.upgrade or self.state is not _UPSTREAM:
            return None
        f = self.factory
        self._upstream = None
        r.status = 101
        self._to(_TUNNEL)
        head = b"".join(_head(101, b"Switching Protocols", headers,
                              WEBSOCKET_LINES, False, True))
        r.bytes_sent = len(head)
        r.took = self.reactor.seconds() - r.started_at
        f.metrics.request_duration.observe(r.took)
        self._deadline.cancel()
        client = self.transport
        hand_over(client, self._registered, bool(self._paused))
        self._registered = False
        self._paused = 0
        client.write(head)
        claims = getattr(r.outcome, "claims", None)
        exp = (claims or {}).get("exp")
        if type(exp) not in (int, float):
            exp = None  # no token (auth = none or optional), or no exp
        held, self._held = self._held, []
        self._tunnel = Tunnel(self.reactor, client, upstream,
                              f.tunnel_idle_timeout, exp, f.metrics.tunnels,
                              self._tunnel_ended)
        f.tunnel_opened(self._tunnel, r.auth, claims)
        self._tunnel.start(b"".join(held), rest)
        return self._tunnel

    def _hold(self, data: bytes) -> None:
        """Client bytes after a WebSocket upgrade request: to the tunnel,
        else kept until the 101.  A client may not send before it (RFC 6455
        section 4.1) and the socket is paused, so at most ``MAX_HELD``
        bytes are kept: beyond, the connection is cut."""
        if self._tunnel is not None:
            self._tunnel.from_client(data)
            return
        held = self._held
        held.append(data)
        if sum(map(len, held)) > MAX_HELD:
            held.clear()
            self.transport.abortConnection()

    def _tunnel_ended(self, why: str) -> None:
        self.factory.tunnels.pop(self._tunnel, None)
        r, self._req = self._req, None
        if r is not None:
            self._log_access(r, self._cut or "tunnel_" + why)

    def _send_body(self, r: ParsedRequest, data: bytes) -> None:
        if not data:
            return
        if r.chunked:
            self._upstream.write_sequence(
                [b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self._upstream.write(data)

    def _end_body(self, r: ParsedRequest, with_head: bool = False) -> None:
        """The request is all written (``with_head``: in the same turn as
        its head)."""
        if r.chunked:
            self._upstream.write(b"0\r\n\r\n")
        self._upstream.request_sent(with_head)

    def upstream_failed(self, status: int, error: str,
                        description: str) -> None:
        r = self._req
        self._upstream = None
        self._connect_d = None
        if r is None or self.state >= _RESPONSE:
            return
        self._answer_error(r, status, error, description,
                           close=not r.complete)

    def response_continue(self) -> None:
        r = self._req
        if r is not None and r.version == "1.1" and self.state is _UPSTREAM:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def response_head(self, status: int, reason: bytes, headers: list,
                      mode: int, length: Optional[int],
                      duration: float) -> None:
        r = self._req
        self._to(_RESPONSE)
        r.upstream_duration = duration
        r.status = status
        close = self.factory.draining or not r.keep_alive
        http11 = r.version == "1.1"
        if r.cors is not None:
            # Replaced, never duplicated: browsers refuse two.
            headers = without_cors(headers) + r.cors
        chunk_out = False
        framing = b""
        if mode == MODE_LENGTH:
            framing = b"Content-Length: %d\r\n" % length
        elif mode == MODE_CHUNKED or mode == MODE_EOF:
            if http11:
                chunk_out = True
                framing = b"Transfer-Encoding: chunked\r\n"
            else:
                close = True
        r.chunk_out = chunk_out
        r.close_after = close
        head = b"".join(_head(status, reason, headers, framing, close,
                              http11))
        r.bytes_sent = len(head)
        self._out.append(head)
        r.took = self.reactor.seconds() - r.started_at
        self.factory.metrics.request_duration.observe(r.took)

    def response_body(self, data: bytes) -> None:
        r = self._req
        if r is None:
            return  # cut meanwhile (the upstream is being aborted)
        if r.chunk_out:
            size = b"%x\r\n" % len(data)
            self._out += (size, data, b"\r\n")
            r.bytes_sent += len(size) + len(data) + 2
        else:
            self._out.append(data)
            r.bytes_sent += len(data)

    def flush_output(self) -> None:
        """Send what this upstream read produced, in one write."""
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self._write(data)

    def response_end(self) -> None:
        r = self._req
        self._upstream = None
        if r is None:
            return
        if r.chunk_out:
            self._out.append(b"0\r\n\r\n")
            r.bytes_sent += 5
        self.flush_output()
        self._finish(r, r.close_after or not r.complete)

    def response_aborted(self) -> None:
        """The upstream broke off after the response head went out: the
        client must see a broken response, not a short one."""
        r = self._req
        self._upstream = None
        if r is None:
            return
        self._log_access(r, "aborted")
        self.flush_output()
        self._req = None
        self._end_input()
        self.transport.abortConnection()

    def _broken_mid_request(self, r: ParsedRequest) -> None:
        """The body of the request in flight turned out malformed."""
        self.factory.metrics.rejected[
            REJECTED_REASON.get(r.error[0], "bad_request")].inc()
        self._drop_pending()
        if self.state >= _RESPONSE:
            self.response_aborted()
        else:
            self._answer_error(r, *r.error, close=True)

    # -- answering -----------------------------------------------------------

    def _refuse(self, r: ParsedRequest, status: int, error: str,
                description: str, reason: Optional[str] = None) -> None:
        """Answer a request phantomd will not serve, and close."""
        reason = reason or REJECTED_REASON.get(status, "bad_request")
        self.factory.metrics.rejected[reason].inc()
        self._answer_error(r, status, error, description, close=True)

    def _rid(self, r: ParsedRequest) -> bytes:
        if r.rid is None:
            r.rid = _request_id(r.headers)
        return r.rid

    def _answer_error(self, r: ParsedRequest, status: int, error: str,
                      description: str, close: bool) -> None:
        reject = error_response(status, error, description)
        self._answer(r, status, reject.headers(self.factory.realm),
                     reject.body(self._rid(r).decode("ascii")), close)

    def _answer(self, r: ParsedRequest, status: int, headers: list, body: bytes,
                close: bool) -> None:
        """Send an answer phantomd makes itself (never the upstream's)."""
        close = close or self.factory.draining or not r.keep_alive
        data = own_answer(status, headers, body, self.factory.date(),
                          self._rid(r), r.cors, close, r.version == "1.1",
                          r.method == b"HEAD")
        r.status = status
        r.bytes_sent = len(data)
        self._to(_RESPONSE)
        self._write(data)
        r.took = self.reactor.seconds() - r.started_at
        self.factory.metrics.request_duration.observe(r.took)
        self._finish(r, close)

    def _finish(self, r: ParsedRequest, close: bool) -> None:
        self._log_access(r)
        self._req = None
        self._to(_IDLE)
        if close or self.factory.draining:
            self._close(unread=not r.complete or self.input is not _OPEN)
            return
        f = self.factory
        if self._reader.parsing is not None:
            self._deadline.arm(f.header_timeout, _HEADER)
        else:
            self._deadline.arm(f.idle_timeout, _IDLE_KA)
        self._advance()

    def _log_access(self, r: ParsedRequest, end: str = "ok") -> None:
        """Count and log request ``r``, however it ended: ``ok`` (answered),
        ``aborted`` (its response broken off), ``client_closed``, ``drain``
        (cut by the shutdown), ``tunnel_closed``/``_idle``/``_expired`` (a
        WebSocket tunnel's end).  ``status`` is None when no status line went
        out."""
        f = self.factory
        status = r.status
        outcome = r.outcome
        if status:
            f.metrics.request_answered(status)
            # Refused before a route was chosen: counted as default.
            f.metrics.route_answered(
                r.route.name if r.route is not None else "default", status,
                r.took)
        access_log = f.access_log
        if access_log is None:
            return
        url = r.url
        q = url.find(b"?")
        access_log({
            "client": self._peer,
            "method": r.method.decode("ascii", "replace"),
            "path": (url if q < 0 else url[:q]).decode("latin-1") or "-",
            "status": status or None,
            "duration": self.reactor.seconds() - r.started_at,
            "upstream_duration": r.upstream_duration,
            "cache": getattr(outcome, "cache", None) or None,
            "token_id": getattr(outcome, "token_id", None) or None,
            "bytes_sent": r.bytes_sent,
            "request_id": self._rid(r).decode("ascii"),
            "end": end,
        })

    # -- timers --------------------------------------------------------------

    def _timed_out(self, kind: int) -> None:
        """The connection's one wait (``self._deadline``) ran out."""
        if kind == _LINGER:
            self.transport.abortConnection()
            return
        if kind == _LINGER_TLS:
            self.transport.loseConnection()
            return
        if kind == _BODY:
            self._body_timed_out()
            return
        if self._req is not None or self.input is not _OPEN or self._queue:
            return
        if kind == _IDLE_KA:
            self._close(linger=False)
            return
        if self._tls and not self._any_bytes:
            # No TLS handshake completed: a 408 could never be delivered,
            # and a TLS transport would wait for it forever.
            self._end_input()
            self.factory.metrics.rejected["header_timeout"].inc()
            self.transport.abortConnection()
            return
        r = self._reader.take_partial()
        self._end_input()
        if not r.started_at:
            r.started_at = self.reactor.seconds()
        self._req = r
        self._refuse(r, 408, "request_timeout",
                     "the request head did not arrive within "
                     "header_timeout", reason="header_timeout")

    def _body_timed_out(self) -> None:
        """The body must average ``MIN_BODY_RATE`` after ``header_timeout``
        of grace; a slow or stalled client is answered 408 (its fault, not
        the API's) and the upstream connection is aborted."""
        r = self._req
        if r is None or r.complete or self.input is not _OPEN or \
                self.state < _UPSTREAM:
            return
        now = self.reactor.seconds()
        grace = self.factory.header_timeout
        if self._paused & _UPSTREAM_FULL:
            # The upstream is not reading: not the client's fault (the
            # base moves on when it reads again).
            self._deadline.arm(grace, _BODY)
            return
        due = self._body_base + grace + self._body_bytes / MIN_BODY_RATE
        if now < due:
            self._deadline.arm(due - now, _BODY)
            return
        self._end_input()
        r.error = (408, "request_timeout",
                   "the request body did not arrive in time")
        self._broken_mid_request(r)
