"""Persistent HTTP/1.1 connections to the API, and the pool that reuses them.

The pool hands a connection to a *front* (one client request in flight, see
``front.FrontProtocol``) and the connection reports the response back to it
through plain method calls, no Deferred per request:

* ``front.upstream_ready(conn)``: send the request on ``conn`` now;
* ``front.upstream_failed(status, error, description)``: no response head
  will come (502: refused, reset or garbled; 504: timed out);
* ``front.response_head(status, reason, headers, mode, length, duration)``,
  then ``front.response_body(data)`` any number of times, then
  ``front.response_end()`` (or ``front.response_aborted()`` when the
  upstream breaks off mid-response);
* ``front.flush_output()`` after each read from the upstream, so that
  what one read produced goes to the client in one write;
* ``front.upstream_write_blocked(flag)``: the upstream's socket buffer is
  full (or has drained), so stop (or resume) reading the request body.

``mode`` is one of ``MODE_NONE`` (no body follows), ``MODE_LENGTH``
(``length`` bytes), ``MODE_CHUNKED`` or ``MODE_EOF`` (read until close).
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from phantomd.http.deadline import Deadline
from phantomd.http.fastio import writer_for
from phantomd.http.pool import IdlePool, endpoint_for
from phantomd.http.tunnel import hand_over
from phantomd.http.interfaces import IUpstreamConnection, IUpstreamPool
from phantomd.http.headers import (
    PLAIN_CONNECTION_OPTIONS, drop_connection_options)
from phantomd.http.headers import RESPONSE_DROP
from phantomd.http.wire import (
    MODE_EOF, MODE_NONE, BadResponse,
    ResponseReader)
from phantomd.ops.logs import Throttle

# Bytes of response head (interim 1xx responses included) read before giving
# up with 502: llhttp itself would accumulate a header without bound.
MAX_RESPONSE_HEAD = 256 * 1024

# Seconds between two log lines about upstream faults.
WARN_INTERVAL = 10.0

log = Logger()


@implementer(IUpstreamConnection)
class UpstreamConnection(Protocol):
    """One HTTP/1.1 connection to the API; one request at a time on it.

    The connection is its transport's streaming producer (registered once):
    a full upstream send buffer pauses the client's request body, through
    ``front.upstream_write_blocked``.
    """

    #: The pool's target key (one target per UpstreamPool).
    key = None

    def __init__(self, pool: "UpstreamPool") -> None:
        self.pool = pool
        self.front: Any = None
        self.reused = False
        self.idle_since = 0.0
        self.lost = False
        self._reader = ResponseReader(self, MAX_RESPONSE_HEAD)
        self._deadline = Deadline(pool.reactor, self._timed_out)
        self._write_blocked = False
        self._read_paused = False
        self._broken = False
        self._registered = False
        self._write: Any = None
        self._tunnel: Any = None  # DESIGN section 13, after a 101
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._retryable = False
        self._got_bytes = False
        self._request_sent = False
        self._sent_at = 0.0

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self._registered = True
        self._write = writer_for(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.front is None:
            if self._tunnel is not None:
                self._tunnel.from_upstream(data)
                return
            # Bytes on an idle connection: the server is not speaking
            # HTTP/1.1 as we understand it, so never reuse it, and out of
            # the pool now -- the abort's connectionLost comes a turn
            # later, and a request meanwhile must not be given it.
            self._broken = True
            self.pool._unusable(self)
            self.transport.abortConnection()
            return
        self._got_bytes = True
        front = self.front
        reader = self._reader
        try:
            reader.feed(data)
        except BadResponse as e:
            self._garbled("the upstream sent %s" % e)
        if self.front is front:
            if reader.complete:
                # Only now, with this read parsed to its end: finishing
                # inside feed_data would pool the connection while llhttp
                # still hands the rest of the read -- a smuggled second
                # response -- to the next request.
                self._finished(front, reuse=reader.keep_alive)
            elif reader.head_done:
                # Progress on the answer (its head, some body): the
                # upstream has upstream_timeout again.  Not armed for a
                # read that ends the answer: the deadline is left for the
                # next exchange (_finished).
                self._touch()
        front.flush_output()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self._deadline.cancel()
        front = self.front
        self.front = None
        self.pool._lost(self)
        if front is None:
            if self._tunnel is not None:
                self._tunnel.upstream_lost()
            return
        if self._reader.head_done:
            if self._reader.mode == MODE_EOF and reason is not None and \
                    reason.check(error.ConnectionDone):
                self._finished(front, reuse=False)
            else:
                front.response_aborted()
        elif not self._got_bytes and self.reused and self._retryable:
            self.pool._retry(front)
        else:
            # Not on the hot path; says why (a TLS verification failure
            # looks like this too).
            self.pool._warn("upstream connection lost before a response: "
                            "{reason}", reason.getErrorMessage()
                            if reason is not None else "unknown")
            if self._got_bytes:
                front.upstream_failed(502, "bad_gateway",
                                      "the upstream sent an incomplete response")
            else:
                front.upstream_failed(502, "bad_gateway",
                                      "the upstream closed the connection "
                                      "without responding")

    # -- IPushProducer, for our transport's send buffer ----------------------

    def pauseProducing(self) -> None:
        self._write_blocked = True
        if self.front is not None:
            self._touch()  # the upstream stopped reading: time it
            self.front.upstream_write_blocked(True)

    def resumeProducing(self) -> None:
        self._write_blocked = False
        if self.front is not None:
            self.front.upstream_write_blocked(False)

    def stopProducing(self) -> None:
        pass

    # -- what the front calls ------------------------------------------------

    def send(self, front: Any, head: bytes, head_method: bool,
             retryable: bool) -> None:
        """Start an exchange: write the request head for ``front``."""
        self.front = front
        self._reader.start(head_method)
        self._retryable = retryable
        self._sent_at = self.pool.reactor.seconds()
        self._write(head)
        self._touch()
        if self._write_blocked:
            front.upstream_write_blocked(True)

    def write(self, data: bytes) -> None:
        self._write(data)

    def write_sequence(self, parts: list) -> None:
        self._write(b"".join(parts))

    def request_sent(self, with_head: bool = False) -> None:
        """The whole request (head and body) has been written: from now on
        the upstream has ``upstream_timeout`` for its response head (as
        ``send`` started it, when the body went ``with_head``)."""
        self._request_sent = True
        if not with_head:
            self._touch()

    def pause_reading(self) -> None:
        if not self._read_paused:
            self._read_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self.transport.resumeProducing()
            if self.front is not None:
                self._touch()

    def close(self) -> None:
        """Close cleanly; the connection is never reused."""
        self._broken = True
        if not self.lost and self._registered:
            # A TLS transport waits for its producer to go before closing.
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort(self) -> None:
        """Give up on the exchange; the connection is never reused."""
        self.front = None
        self._broken = True
        self._deadline.cancel()
        if not self.lost:
            self.transport.abortConnection()

    # -- what the ResponseReader calls ---------------------------------------

    def answer_interim(self, status: int) -> None:
        if status == 100 and self.front is not None:
            self.front.response_continue()

    def answer_switch(self, headers: list, rest: bytes) -> bool:
        """A 101 (DESIGN section 13): handed to a front that asked for a
        WebSocket, and then True; False (a 502) for any other front or a
        101 to anything but ``websocket``.  A handed-over connection is the
        tunnel's: never pooled, no timer, its reads and loss go there."""
        switched = getattr(self.front, "upstream_switched", None)
        if switched is None:
            return False
        upgrade = [v for n, v in headers if n.lower() == b"upgrade"]
        if [v.strip().lower() for v in upgrade] != [b"websocket"]:
            return False
        connection = [t for n, v in headers if n.lower() == b"connection"
                      for t in v.split(b",")]
        kept = drop_connection_options(
            [h for h in headers if h[0].lower() not in RESPONSE_DROP],
            connection)
        self._broken = True
        self._deadline.cancel()
        transport = self.transport
        hand_over(transport, self._registered, self._read_paused)
        self._registered = False
        self._read_paused = False
        tunnel = switched(transport, kept, rest)
        if tunnel is None:
            return False
        self.front = None
        self._tunnel = tunnel
        return True

    def answer_head(self, status: int, reason: bytes, headers: list,
                    mode: int, length: Optional[bytes],
                    connection: Optional[list]) -> None:
        kept = [item for item in headers
                if item[0].lower() not in RESPONSE_DROP]
        if connection and (len(connection) > 1 or connection[0].strip()
                           .lower() not in PLAIN_CONNECTION_OPTIONS):
            kept = drop_connection_options(kept, connection)
        if mode == MODE_NONE and status != 204 and length is not None:
            kept.append((b"Content-Length", length))
        duration = self.pool.reactor.seconds() - self._sent_at
        self.pool.metrics.upstream_duration.observe(duration)
        front = self.front
        if front is not None:
            front.response_head(status, reason, kept, mode,
                                None if length is None else int(length),
                                duration)

    def answer_body(self, data: bytes) -> None:
        front = self.front
        if front is None:
            self._broken = True
            return
        front.response_body(data)

    # -- internals -----------------------------------------------------------

    def _finished(self, front: Any, reuse: bool) -> None:
        """The response is complete: pool or close, then tell the front
        (which may start its next request on this very connection).

        The deadline is left armed: ``_timed_out`` ignores an idle
        connection, and moving it is cheaper than a new call per request."""
        self.front = None
        reuse = reuse and self._request_sent and not self._broken and \
            not self._reader.broken
        self._reset_exchange()
        if self._read_paused:
            self._read_paused = False
            self.transport.resumeProducing()
        if not self.lost:
            if reuse:
                self.pool._release(self)
            else:
                self.close()
        front.response_end()

    def _garbled(self, description: str) -> None:
        front = self.front
        self.abort()
        if front is None:
            return
        if self._reader.head_done:
            front.response_aborted()
        else:
            front.upstream_failed(502, "bad_gateway", description)

    def _touch(self) -> None:
        """Progress: the upstream has ``upstream_timeout`` from now."""
        self._deadline.arm(self.pool.timeout)

    def _timed_out(self, kind: Any) -> None:
        front = self.front
        head_done = self._reader.head_done
        if front is None or (self._read_paused and head_done):
            return  # idle, or a slow client holds the response back
        if not (head_done or self._request_sent or self._write_blocked):
            return  # the client is still sending the body: the front times it
        self.abort()
        if head_done:
            front.response_aborted()
        else:
            front.upstream_failed(
                504, "gateway_timeout",
                "the upstream did not respond within upstream_timeout")


class _ConnectionFactory(Factory):
    def __init__(self, pool: "UpstreamPool") -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self.pool)


@implementer(IUpstreamPool)
class UpstreamPool:
    """Persistent connections to the ``upstream`` URL.

    Idle connections are kept in a ``pool.IdlePool`` (one target), at
    most ``upstream_max_idle`` of them: a connection released beyond that
    bound is closed.  One idle for longer than ``upstream_idle_timeout`` is
    closed when next picked instead of used.  Connections in use are bounded
    by the requests in flight (the front's ``max_connections``).
    """

    def __init__(self, reactor: Any, settings: Any, metrics: Any,
                 tls_options: Any = None) -> None:
        self.reactor = reactor
        self.metrics = metrics
        url = urlsplit(settings.upstream)
        self.secure = url.scheme == "https"
        host = url.hostname or ""
        port = url.port or (443 if self.secure else 80)
        if host.isascii():
            self.authority = url.netloc.encode("ascii")
        else:
            self.authority = host.encode("idna") + (
                b":%d" % url.port if url.port else b"")
        self.base_path = url.path.rstrip("/").encode("ascii")
        self._idle = IdlePool(reactor, settings.upstream_max_idle,
                              settings.upstream_idle_timeout)
        self.reconfigure(settings)
        self._throttle = Throttle(reactor, WARN_INTERVAL, max_keys=1)
        self._factory = _ConnectionFactory(self)
        if self.secure and tls_options is None:
            tls_options = _default_tls(host, settings)
        self.endpoint = endpoint_for(reactor, host, port,
                                     settings.upstream_connect_timeout,
                                     tls_options if self.secure else None)

    def reconfigure(self, settings: Any) -> None:
        """Apply new timeouts and idle bound (the upstream URL and TLS
        settings need a new pool)."""
        self.timeout = settings.upstream_timeout
        self._idle.reconfigure(settings.upstream_max_idle,
                               settings.upstream_idle_timeout)

    def connect(self, front: Any) -> Optional[defer.Deferred]:
        """Attach ``front`` to a connection.

        With an idle connection at hand, ``front.upstream_ready`` is called
        before this returns ``None``; otherwise the returned Deferred is the
        pending connection attempt, which the front cancels if its client
        goes away.
        """
        conn = self._idle.take(None)
        if conn is not None:
            conn.reused = True
            front.upstream_ready(conn)
            return None
        return self._connect(front)

    def _connect(self, front: Any) -> defer.Deferred:
        d = self.endpoint.connect(self._factory)
        d.addCallbacks(self._connected, self._connect_failed,
                       callbackArgs=(front,), errbackArgs=(front,))
        return d

    def _connected(self, conn: UpstreamConnection, front: Any) -> None:
        front.upstream_ready(conn)

    def _connect_failed(self, failure: Any, front: Any) -> None:
        if failure.check(defer.CancelledError, error.ConnectingCancelledError):
            return None
        if failure.check(error.TimeoutError):
            front.upstream_failed(
                504, "gateway_timeout", "could not connect to the upstream "
                "within upstream_connect_timeout")
        else:
            self._warn("cannot connect to the upstream: {reason}",
                       failure.getErrorMessage())
            front.upstream_failed(502, "bad_gateway",
                                  "cannot connect to the upstream")
        return None

    def _warn(self, message: str, reason: str) -> None:
        """Log an upstream fault at most once per ``WARN_INTERVAL`` seconds
        (an outage fails every request: one line per request would flood
        the log), with how many were not logged since."""
        unlogged = self._throttle.admit()
        if unlogged is not None:
            log.warn(message + " ({unlogged} more since the last such line)",
                     reason=reason, unlogged=unlogged)

    def _retry(self, front: Any) -> None:
        """A reused connection closed before answering a safe request
        without a body (the front decides which may be retried): the server
        had timed it out; send once more, on a new one (itself never
        retried)."""
        front.upstream_retry()
        front.upstream_connecting(self._connect(front))

    def _release(self, conn: UpstreamConnection) -> None:
        self._idle.put(conn)

    def _lost(self, conn: UpstreamConnection) -> None:
        self._idle.lost(conn)

    def _unusable(self, conn: UpstreamConnection) -> None:
        """``conn`` may not be handed out again, though not yet lost."""
        self._idle.discard(conn)

    def idle_count(self) -> int:
        return self._idle.idle_count()

    def close(self) -> defer.Deferred:
        """Close the idle connections; fires once they are all gone.

        Connections still in use are closed when their response ends."""
        return self._idle.close()


def _default_tls(host: str, settings: Any) -> Any:
    if settings.upstream_ca_file or settings.upstream_client_cert:
        from phantomd.http.tls import client_tls_options
        return client_tls_options(host, settings.upstream_ca_file,
                                  settings.upstream_client_cert,
                                  settings.upstream_client_key)
    from twisted.internet.ssl import optionsForClientTLS
    return optionsForClientTLS(host)
