"""A WebSocket tunnel (DESIGN section 13): after the upstream's ``101``,
bytes go both ways unread, with back-pressure, until something ends it.

The front and the upstream connection hand their transports over and pass
on what they read (``from_client``, ``from_upstream``) and their loss
(``client_lost``, ``upstream_lost``).  Each side's transport gets a
producer of the tunnel's: when one side's send buffer fills, the other side
stops being read, so a tunnel holds at most the two send buffers whatever
the peers send.

It ends when either side closes (the other is closed once what it was sent
is flushed, or aborted ``LINGER`` seconds later), when ``idle_timeout``
passes with no byte either way, or at ``expires_at`` -- the token's ``exp``:
a tunnel never outlives the token that opened it.  One ``Deadline`` times
all three.  ``done(why)`` is called once, with ``closed``, ``idle`` or
``expired``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from phantomd.http.deadline import Deadline

# Seconds a side gets to flush after the other closed, before it is cut.
LINGER = 2.0

_IDLE, _EXPIRED, _LINGER = "idle", "expired", "linger"


@implementer(IPushProducer)
class _Pauses:
    """Registered on one transport; its full send buffer pauses the other."""

    __slots__ = ("other",)

    def __init__(self, other: Any) -> None:
        self.other = other

    def pauseProducing(self) -> None:
        self.other.pauseProducing()

    def resumeProducing(self) -> None:
        self.other.resumeProducing()

    def stopProducing(self) -> None:
        pass


def hand_over(transport: Any, registered: bool, paused: bool) -> None:
    """Ready ``transport`` for a ``Tunnel``, which registers its own
    producer on it: the owner's producer goes (``registered``) and reading
    resumes (``paused``).  The owner clears its own flags."""
    if registered:
        transport.unregisterProducer()
    if paused:
        transport.resumeProducing()


class Tunnel:
    """Joins ``client`` and ``upstream`` (transports) until one of the
    ends above; ``gauge`` (``phantomd_tunnels_open``) counts it while open.
    """

    def __init__(self, clock: Any, client: Any, upstream: Any,
                 idle_timeout: float, expires_at: Optional[float],
                 gauge: Any, done: Callable[[str], None]) -> None:
        self.clock = clock
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.expires_at = expires_at
        self._gauge = gauge
        self._done = done
        self._deadline = Deadline(clock, self._timed_out)
        self.open = False
        self.ended: Optional[str] = None
        self._lost = 0  # sides whose connection is gone

    def start(self, from_client: bytes = b"", from_upstream: bytes = b"") -> None:
        """Begin relaying; ``from_client``/``from_upstream``: bytes each side
        sent after its handshake, before the tunnel existed."""
        self.open = True
        self._gauge.inc()
        for transport, other in ((self.client, self.upstream),
                                 (self.upstream, self.client)):
            transport.registerProducer(_Pauses(other), True)
        self._arm()
        if from_client:
            self.upstream.write(from_client)
        if from_upstream:
            self.client.write(from_upstream)

    # -- what the two sides call ---------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.open:
            self.upstream.write(data)
            self._arm()

    def from_upstream(self, data: bytes) -> None:
        if self.open:
            self.client.write(data)
            self._arm()

    def client_lost(self) -> None:
        self._end("closed", self.upstream)
        self._gone()

    def upstream_lost(self) -> None:
        self._end("closed", self.client)
        self._gone()

    def close(self, why: str) -> None:
        """End now, cutting both sides (``why`` is what ``done`` gets)."""
        self._end(why, None)

    # -- internals -----------------------------------------------------------

    def _gone(self) -> None:
        self._lost += 1
        if self._lost == 2:
            self._deadline.cancel()  # nothing left to linger for

    def _arm(self) -> None:
        seconds = self.idle_timeout
        kind = _IDLE
        if self.expires_at is not None:
            left = self.expires_at - self.clock.seconds()
            if left <= seconds:
                seconds, kind = max(left, 0.0), _EXPIRED
        self._deadline.arm(seconds, kind)

    def _timed_out(self, kind: Any) -> None:
        if kind == _LINGER:
            self.client.abortConnection()
            self.upstream.abortConnection()
        elif self.open:
            if kind == _IDLE and self.expires_at is not None and \
                    self.clock.seconds() >= self.expires_at:
                kind = _EXPIRED
            self._end(kind, None)

    def _end(self, why: str, flush: Any) -> None:
        """Close both sides once; ``flush``: the side still open that may
        send what it was given (the other closed), else both are cut."""
        if not self.open:
            return
        self.open = False
        self.ended = why
        self._gauge.dec()
        self._deadline.cancel()
        for transport in (self.client, self.upstream):
            # A TLS transport waits for its producer to go before closing.
            transport.unregisterProducer()
        if flush is None:
            self.client.abortConnection()
            self.upstream.abortConnection()
        else:
            flush.loseConnection()
            self._deadline.arm(LINGER, _LINGER)
        self._done(why)
