"""Idle HTTP/1.1 connections kept for reuse, per target.

One mechanism for both kinds of connection phantomd opens: the forwarding
connections to the API (``upstream.UpstreamPool``, one target) and the
token service client's (``client.HTTPClient``, one target per
(scheme, host, port)).  A connection kept here needs ``key`` (its target),
``idle_since`` (set here) and ``close()`` (which ends in ``lost`` being
called back); ``on_idle(conn)``, when given, is called once a connection
is kept (the client's connections arm their idle timer there).

Bounds:

* at most ``max_idle`` idle connections per target, most recently used
  last: one handed back beyond that is closed;
* one idle for longer than ``idle_timeout`` seconds is closed when next
  picked (and by its own timer where the connection has one);
* after ``close()`` every connection handed back is closed, and the
  Deferred ``close()`` returned fires once the idle ones are all gone.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS)


def endpoint_for(reactor: Any, host: str, port: int, timeout: float,
                 tls: Any = None) -> Any:
    """Where a connection attempt to ``host``:``port`` goes: straight to an
    IP literal (no resolver), else through ``HostnameEndpoint``; each
    attempt bounded by ``timeout`` seconds; over TLS with ``tls`` (a client
    connection creator) when given."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        endpoint: Any = HostnameEndpoint(reactor, host, port,
                                         timeout=timeout)
    else:
        kind = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
        endpoint = kind(reactor, host, port, timeout=timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return endpoint


class IdlePool:
    """Idle connections per target key; see the module docstring for the
    bounds.  The number of targets is bounded by the caller (one for the
    forwarder; ``client.MAX_TARGETS`` URLs for the token service client)."""

    def __init__(self, clock: Any, max_idle: int, idle_timeout: float,
                 on_idle: Optional[Callable[[Any], None]] = None) -> None:
        self.clock = clock
        self.on_idle = on_idle
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.closed = False
        self._idle: dict[Any, list] = {}
        self._closing: set = set()
        self._close_waiters: list[defer.Deferred] = []

    def reconfigure(self, max_idle: int, idle_timeout: float) -> None:
        """New bounds; idle connections beyond ``max_idle`` are closed
        (the oldest first)."""
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        for idle in list(self._idle.values()):
            while len(idle) > max_idle:
                idle.pop(0).close()

    def take(self, key: Any) -> Optional[Any]:
        """The most recently used idle connection to ``key``, or None;
        those idle for too long are closed on the way."""
        idle = self._idle.get(key)
        if not idle:
            return None
        horizon = self.clock.seconds() - self.idle_timeout
        while idle:
            conn = idle.pop()
            if conn.idle_since >= horizon:
                return conn
            conn.close()
        return None

    def put(self, conn: Any) -> None:
        """Keep ``conn`` for reuse, or close it (at the bound, or after
        ``close()``)."""
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        if self.closed or len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.clock.seconds()
        idle.append(conn)
        if self.on_idle is not None:
            self.on_idle(conn)

    def discard(self, conn: Any) -> None:
        """``conn`` is no longer idle (its timer closed it, say)."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def lost(self, conn: Any) -> None:
        """``conn``'s connection is gone: forget it; fire ``close()``'s
        Deferreds once the last idle one is gone."""
        self.discard(conn)
        self._closing.discard(conn)
        if self._close_waiters and not self._closing:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)

    def idle(self, key: Any) -> list:
        """The idle connections to ``key`` (a copy), oldest first."""
        return list(self._idle.get(key, ()))

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
