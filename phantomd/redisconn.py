"""One Redis connection that reconnects by itself, on the reactor it is given.

txredisapi speaks the protocol (its ``BaseRedisProtocol`` and
``SubscriberProtocol``), but its connection helpers use the global reactor;
here the endpoint, the reconnecting ``ClientService`` and every timer run on
the reactor passed in, as everything in phantomd does.

``RedisClient.call(*args)`` sends one command on the shared connection: calls
made while earlier ones are unanswered are pipelined on it.  A call never
waits for a connection: with none up it fails at once with ``Unavailable``,
and each call fails with ``TimeoutError`` after ``timeout`` seconds.  The
caller (the shared cache) treats any failure as a miss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, protocol
from twisted.internet.endpoints import (
    HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS)
from twisted.logger import Logger

from phantomd.logs import Throttle

__all__ = ["Target", "parse_url", "RedisClient", "Unavailable"]

log = Logger()

#: Commands awaiting an answer on one connection; past this a call fails at
#: once (a wedged Redis must not pile up an unbounded reply queue).
MAX_PENDING = 1024
CONNECT_TIMEOUT = 2.0
_LOG_INTERVAL = 30.0


class Unavailable(Exception):
    """No usable connection to Redis right now (or too many calls pending)."""


@dataclass(frozen=True)
class Target:
    """Where Redis is: ``host``/``port`` or ``path`` (unix socket)."""

    scheme: str
    host: Optional[str] = None
    port: int = 6379
    path: Optional[str] = None
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    def describe(self) -> str:
        if self.path:
            return "unix:%s" % self.path
        return "%s://%s:%d/%d" % (self.scheme, self.host, self.port, self.db)


def parse_url(url: str) -> Target:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
    ``unix:///path/redis.sock[?db=N]``; raises ValueError saying what is
    wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError("%r is not a valid URL (%s)" % (url, e))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    query = parse_qs(parts.query)
    db_text = query.get("db", [""])[0]
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError("%r has no host" % url)
        path = parts.path.strip("/")
        db_text = path or db_text
        host = parts.hostname
        path_sock = None
    elif parts.scheme == "unix":
        if not parts.path or parts.netloc:
            raise ValueError("%r is not unix:///absolute/path" % url)
        host, path_sock, port = None, parts.path, None
    else:
        raise ValueError("%r is not a redis://, rediss:// or unix:// URL"
                         % url)
    try:
        db = int(db_text) if db_text else 0
    except ValueError:
        raise ValueError("%r: database %r is not a number" % (url, db_text))
    if not 0 <= db < 1 << 16:
        raise ValueError("%r: database %d is out of range" % (url, db))
    return Target(scheme=parts.scheme, host=host, port=port or 6379,
                  path=path_sock, db=db, username=user, password=password)


class _Commands(txredisapi.BaseRedisProtocol):
    """txredisapi's protocol, with its timers on our reactor and no
    conversion of answers (values stay bytes)."""

    def __init__(self, owner: "RedisClient") -> None:
        target = owner.target
        super().__init__(charset=None, replyTimeout=None,
                         password=owner.password, dbid=target.db or None,
                         convertNumbers=False, username=target.username)
        self.callLater = owner.reactor.callLater
        self._owner = owner

    def connectionLost(self, why) -> None:
        self._owner._lost(self)
        super().connectionLost(why)


class _Subscriber(txredisapi.SubscriberProtocol):
    def __init__(self, owner: "RedisClient") -> None:
        target = owner.target
        txredisapi.SubscriberProtocol.__init__(
            self, charset=None, replyTimeout=None, password=owner.password,
            dbid=None, convertNumbers=False, username=target.username)
        self.callLater = owner.reactor.callLater
        self._owner = owner

    def messageReceived(self, pattern, channel, message) -> None:
        self._owner._message(channel, message)

    def connectionLost(self, why) -> None:
        self._owner._lost(self)
        super().connectionLost(why)


class _Factory(protocol.Factory):
    """What txredisapi's protocol asks of its factory when AUTH or SELECT
    fails: the connection is closed and ClientService retries with
    backoff, with one (throttled) error line."""

    isLazy = False
    noisy = False

    def __init__(self, owner: "RedisClient") -> None:
        self._owner = owner

    def buildProtocol(self, addr):
        p = self._owner._protocol_class(self._owner)
        p.factory = self
        p.whenConnected().addCallback(self._owner._usable)
        return p

    def stopTrying(self) -> None:
        pass

    def connectionError(self, message: str) -> None:
        self._owner._warn(message)


class RedisClient:
    """One reconnecting connection to ``target``.

    ``on_message(channel, message)`` given: this is a subscriber connection
    that (re)subscribes to ``channels`` each time it connects; else a
    command connection.  ``connected`` says whether it is usable now.
    """

    def __init__(self, reactor: Any, target: Target,
                 password: Optional[str], timeout: float,
                 tls_options: Any = None,
                 on_message: Optional[Callable[[bytes, bytes], None]] = None,
                 channels: tuple[bytes, ...] = (),
                 on_connect: Optional[Callable[[], None]] = None,
                 on_lost: Optional[Callable[[], None]] = None) -> None:
        self.reactor = reactor
        self.target = target
        self.password = password if password is not None else target.password
        self.timeout = timeout
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_lost = on_lost
        self._channels = channels
        self._protocol_class = _Subscriber if on_message else _Commands
        self._proto: Optional[Any] = None
        self._throttle = Throttle(reactor, _LOG_INTERVAL, max_keys=4)
        if target.path:
            endpoint = UNIXClientEndpoint(reactor, target.path,
                                          timeout=CONNECT_TIMEOUT)
        else:
            endpoint = HostnameEndpoint(reactor, target.host, target.port,
                                        timeout=CONNECT_TIMEOUT)
            if target.tls:
                endpoint = wrapClientTLS(tls_options, endpoint)
        self._service = ClientService(
            endpoint, _Factory(self),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=5.0),
            clock=reactor)

    @property
    def connected(self) -> bool:
        return self._proto is not None

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> defer.Deferred:
        return self._service.stopService()

    def call(self, *args: Any) -> defer.Deferred:
        """The answer to one command (bytes, int, list, None), or a failure:
        ``Unavailable``, ``TimeoutError``, txredisapi's ``ResponseError``."""
        proto = self._proto
        if proto is None:
            return defer.fail(Unavailable("not connected to %s"
                                          % self.target.describe()))
        if len(proto.replyQueue.waiting) >= MAX_PENDING:
            return defer.fail(Unavailable("%d calls pending" % MAX_PENDING))
        try:
            d = proto.execute_command(*args)
        except Exception:
            return defer.fail()
        d.addTimeout(self.timeout, self.reactor)
        return d

    # -- from the protocol ---------------------------------------------------

    def _usable(self, proto) -> None:
        if proto.transport is None or not proto.connected:
            return
        log.info("connected to Redis at {where}",
                 where=self.target.describe())
        if self._channels:
            proto.subscribe(list(self._channels)).addCallbacks(
                lambda _: self._subscribed(proto),
                lambda f: self._warn("subscribe failed: %s"
                                     % f.getErrorMessage()))
        else:
            self._proto = proto
            if self._on_connect is not None:
                self._on_connect()

    def _subscribed(self, proto) -> None:
        if proto.connected:
            self._proto = proto
            if self._on_connect is not None:
                self._on_connect()

    def _lost(self, proto) -> None:
        if self._proto is proto:
            self._proto = None
            if self._on_lost is not None:
                self._on_lost()
            self._warn("lost the connection to Redis at %s; reconnecting"
                       % self.target.describe())

    def _message(self, channel: bytes, message: bytes) -> None:
        if self._on_message is not None:
            self._on_message(channel, message)

    def _warn(self, message: str) -> None:
        if self._throttle.admit(message) is not None:
            log.warn("{message}", message=message)
