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

from phantomd.ops.logs import Throttle

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
    #: ``redis-sentinel://``: the sentinels' addresses and the service name.
    sentinels: tuple = ()
    service: Optional[str] = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    def describe(self) -> str:
        if self.sentinels:
            return "sentinel service %s (%s)" % (self.service, ",".join(
                "%s:%d" % a for a in self.sentinels))
        if self.path:
            return "unix:%s" % self.path
        return "%s://%s:%d/%d" % (self.scheme, self.host, self.port, self.db)


def _parse_sentinel(url: str) -> Target:
    rest = url[len("redis-sentinel://"):]
    netloc, _, path = rest.partition("/")
    password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        password = unquote(userinfo.partition(":")[2]) or None
    sentinels = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "",
                                                                   "26379")
        try:
            n = int(port)
        except ValueError:
            raise ValueError("%r: sentinel port %r is not a number"
                             % (url, port))
        if not host or not 0 < n < 65536:
            raise ValueError("%r: bad sentinel address %r" % (url, item))
        sentinels.append((host.strip("[]"), n))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError("%r is not redis-sentinel://host:port[,host:port]"
                         "/service[/db]" % url)
    try:
        db = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError("%r: database %r is not a number" % (url, parts[1]))
    return Target(scheme="redis-sentinel", db=db, password=password,
                  sentinels=tuple(sentinels), service=unquote(parts[0]))


def parse_url(url: str) -> Target:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
    ``unix:///path/redis.sock[?db=N]``,
    ``redis-sentinel://[:password@]host:port[,host:port...]/service[/db]``
    (the password is the master's); raises ValueError saying what is
    wrong."""
    if url.startswith("redis-sentinel://"):
        return _parse_sentinel(url)
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
        raise ValueError("%r is not a redis://, rediss://, unix:// or "
                         "redis-sentinel:// URL" % url)
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


class _Ask(txredisapi.BaseRedisProtocol):
    def __init__(self, reactor) -> None:
        super().__init__(charset=None, replyTimeout=None,
                         convertNumbers=False)
        self.callLater = reactor.callLater


class SentinelEndpoint:
    """Asks the sentinels, in order, where the service's master is, before
    every connection attempt (so a reconnection after a failover finds the
    new master: Sentinel closes the clients of a demoted master).
    txredisapi's own Sentinel support runs on the global reactor."""

    def __init__(self, reactor, target: Target, timeout: float) -> None:
        self.reactor = reactor
        self.target = target
        self.timeout = max(timeout, 0.5)

    def connect(self, factory) -> defer.Deferred:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory):
        from twisted.internet.endpoints import connectProtocol
        errors = []
        for host, port in self.target.sentinels:
            proto = _Ask(self.reactor)
            try:
                d = connectProtocol(HostnameEndpoint(
                    self.reactor, host, port, timeout=CONNECT_TIMEOUT), proto)
                await d
                await proto.whenConnected()
                ask = proto.execute_command(
                    b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME",
                    self.target.service)
                ask.addTimeout(self.timeout, self.reactor)
                addr = await ask
            except Exception as e:
                errors.append("%s:%d: %s" % (host, port, e))
                continue
            finally:
                if proto.transport is not None:
                    proto.transport.loseConnection()
            if isinstance(addr, list) and len(addr) == 2:
                master = HostnameEndpoint(
                    self.reactor, addr[0].decode("ascii"), int(addr[1]),
                    timeout=CONNECT_TIMEOUT)
                return await master.connect(factory)
            errors.append("%s:%d knows no master %r" % (
                host, port, self.target.service))
        raise Unavailable("no sentinel gave a master: %s"
                          % "; ".join(errors))


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
        if target.sentinels:
            endpoint = SentinelEndpoint(reactor, target, timeout)
        elif target.path:
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
        return d.addErrback(self._readonly, proto)

    def _readonly(self, failure, proto):
        """A primary demoted to replica (failover) answers writes with
        READONLY: drop the connection, so the next one finds the new
        primary (through Sentinel, or DNS)."""
        if failure.check(txredisapi.ResponseError) and \
                str(failure.value).startswith("READONLY") and \
                proto.transport is not None:
            self._warn("%s is a replica now; reconnecting"
                       % self.target.describe())
            proto.transport.loseConnection()
        return failure

    # -- from the protocol ---------------------------------------------------

    def _usable(self, proto) -> None:
        if proto.transport is None or not proto.connected:
            return
        if self.target.sentinels and not getattr(proto, "_role_checked",
                                                 False):
            # Sentinel may answer with a primary it is demoting right now.
            proto._role_checked = True
            role = proto.execute_command(b"ROLE")
            role.addTimeout(max(self.timeout, 0.5), self.reactor)

            def checked(reply):
                if isinstance(reply, list) and reply and \
                        reply[0] == b"master":
                    self._usable(proto)
                else:
                    self._warn("%s gave a replica; reconnecting"
                               % self.target.describe())
                    proto.transport.loseConnection()

            def failed(f):
                if proto.transport is not None:
                    proto.transport.loseConnection()
            role.addCallbacks(checked, failed)
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
