"""``[shared_cache]`` and ``[revocation]`` wired for one process.

``Fleet.from_config`` reads the secret files (a bad one is a ``ConfigError``
naming its key), builds the Redis connections, the ``SharedTier`` and the
``Revoker``; ``wrap(introspector)`` puts them between the coalescer and the
introspector.  With neither section configured there is no ``Fleet`` and
nothing changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger

from phantomd.config import Config, ConfigError

log = Logger()

MIN_REVOCATION_TOKEN = 16


@dataclass(frozen=True)
class Secrets:
    fleet: Optional[bytes]
    redis_password: Optional[str]
    revocation: Optional[bytes]


def _read(config: Config, section: str, key: str, path: Optional[str]
          ) -> Optional[bytes]:
    from phantomd.config import read_secret_file
    try:
        return read_secret_file(path)
    except ValueError as e:
        raise ConfigError(config.path, section, key, str(e))


def read_secrets(config: Config) -> Secrets:
    """The secret files' contents; ConfigError (naming the key) when one
    cannot be read or is too short to be a secret."""
    from phantomd.fleet.sharedcache import MIN_SECRET_BYTES
    s = config.shared_cache
    fleet = _read(config, "shared_cache", "secret_file", s.secret_file) \
        if s.url else None
    if fleet is not None and len(fleet) < MIN_SECRET_BYTES:
        raise ConfigError(config.path, "shared_cache", "secret_file",
                          "%r holds %d bytes; at least %d are needed "
                          "(e.g. openssl rand -hex 32)"
                          % (s.secret_file, len(fleet), MIN_SECRET_BYTES))
    password = _read(config, "shared_cache", "password_file",
                     s.password_file) if s.url else None
    try:
        password_text = password.decode("utf-8") if password else None
    except UnicodeDecodeError:
        raise ConfigError(config.path, "shared_cache", "password_file",
                          "%r is not UTF-8 text" % s.password_file)
    bearer = _read(config, "revocation", "token_file",
                   config.revocation.token_file)
    if bearer is not None and len(bearer) < MIN_REVOCATION_TOKEN:
        raise ConfigError(config.path, "revocation", "token_file",
                          "%r holds %d bytes; at least %d are needed"
                          % (config.revocation.token_file, len(bearer),
                             MIN_REVOCATION_TOKEN))
    return Secrets(fleet, password_text, bearer)


def identity(config: Config) -> bytes:
    """A digest of every setting that decides what an answer means:
    ``config.identity`` (every ``trust=True`` key of the schema, and the
    contents of every such file).  Change it and the shared cache starts
    afresh: hosts on different settings never take each other's answers.

    The ``[cache]`` lifetimes count too: a Redis entry expires when its
    writer's rule said, so after a reload that lowers ``max_ttl`` or
    ``min_ttl`` the old entries must not be read again.
    """
    from phantomd import config as configmod
    c = config.cache
    limits = (c.max_ttl, c.default_ttl, c.negative_ttl, c.min_ttl)
    return hashlib.sha256(json.dumps((configmod.identity(config), limits),
                                     default=str).encode()).digest()


def check(config: Config) -> None:
    read_secrets(config)
    if config.shared_cache.url:
        _tls_options(config)


def _tls_options(config: Config):
    from phantomd.http import tls
    from phantomd.fleet.redisconn import parse_url
    target = parse_url(config.shared_cache.url)
    if not target.tls:
        return None
    try:
        return tls.client_tls_options(target.host,
                                      config.shared_cache.ca_file)
    except ValueError as e:
        raise ConfigError(config.path, "shared_cache", "ca_file", str(e))


def _connection_keys(config: Config):
    s = config.shared_cache
    return (s.url, s.password_file, s.key_prefix, s.timeout, s.ca_file)


class Fleet:
    def __init__(self, reactor: Any, config: Config, cache: Any,
                 metrics: Any) -> None:
        from phantomd.fleet.revocation import Revoker, RevokeResource
        self.reactor = reactor
        self.config = config
        self.metrics = metrics
        secrets = read_secrets(config)
        self._secrets = secrets
        self.shared = None
        self._clients: list = []
        if config.shared_cache.url:
            self.shared = self._shared_tier(config, secrets, cache)
        self.revoker = Revoker(reactor, cache, metrics,
                               config.cache.max_entries, shared=self.shared)
        self.revoke_resource = (
            RevokeResource(self.revoker, lambda: self._secrets.revocation)
            if secrets.revocation is not None else None)

    @classmethod
    def from_config(cls, reactor, config: Config, cache, metrics
                    ) -> Optional["Fleet"]:
        if not (config.shared_cache.url or config.revocation.token_file):
            return None
        return cls(reactor, config, cache, metrics)

    def _shared_tier(self, config: Config, secrets: Secrets, cache):
        from phantomd.fleet.redisconn import RedisClient, parse_url
        from phantomd.fleet.sharedcache import FleetKeys, SharedTier
        s = config.shared_cache
        target = parse_url(s.url)
        tls_options = _tls_options(config)
        keys = FleetKeys(secrets.fleet, identity(config), s.key_prefix)
        client = RedisClient(self.reactor, target, secrets.redis_password,
                             s.timeout, tls_options=tls_options,
                             on_connect=lambda: self._connected(1),
                             on_lost=lambda: self._connected(0))
        holder: list = []
        subscriber = RedisClient(
            self.reactor, target, secrets.redis_password, s.timeout,
            tls_options=tls_options,
            on_message=lambda c, msg: holder[0].message(c, msg),
            channels=(keys.channel,), on_connect=self._subscribed)
        tier = SharedTier(self.reactor, client, subscriber, keys, cache.ttl,
                          self.metrics,
                          lease_time=config.introspection.timeout + 1.0)
        holder.append(tier)
        self._clients = [client, subscriber]
        return tier

    def _connected(self, up: int) -> None:
        self.metrics.shared_connected.set(up)

    def _subscribed(self) -> None:
        # Revocations published while we were not listening are lost; the
        # first time too, as requests may have been served (and answers
        # read from Redis) before this connection subscribed.
        self.revoker.missed_events()

    def wrap(self, introspector: Any) -> Any:
        if self.shared is not None:
            introspector = self.shared.wrap(introspector)
        return self.revoker.wrap(introspector)

    def start(self) -> None:
        for c in self._clients:
            c.start()

    def stop(self) -> defer.Deferred:
        return defer.DeferredList([defer.maybeDeferred(c.stop)
                                   for c in self._clients])

    def reload(self, new: Config) -> None:
        """SIGHUP: the config identity, the fleet secret's content (a
        rotation) and the revocation bearer follow the new files at once;
        any other [shared_cache] change, and turning either section on or
        off, takes effect after a restart (logged)."""
        secrets = read_secrets(new)
        fleet_secret = self._secrets.fleet
        # A changed connection key waits for a restart (the Gateway's
        # reload names it); the secret, even at a new path, applies now.
        # The identity applies in any case: the local cache was emptied
        # for it, and Redis must not hand back what was just dropped.
        if self.shared is not None:
            from phantomd.fleet.sharedcache import FleetKeys
            if _connection_keys(new) == _connection_keys(self.config):
                fleet_secret = secrets.fleet
            self.shared.keys = FleetKeys(fleet_secret, identity(new),
                                         self.config.shared_cache.key_prefix)
            if fleet_secret != self._secrets.fleet:
                # The sub= index is keyed by digests of the old secret: a
                # later revocation could no longer find what it holds.
                log.info("fleet secret rotated; the local token cache is "
                         "emptied so that revocations still reach it")
                self.revoker.missed_events()
        bearer = self._secrets.revocation
        if (secrets.revocation is None) != (bearer is None):
            log.warn("[revocation] token_file set or unset in {path}; it "
                     "takes effect only after a restart", path=new.path)
        else:
            bearer = secrets.revocation
        self._secrets = Secrets(fleet_secret, self._secrets.redis_password,
                                bearer)
        self.revoker.max_entries = new.cache.max_entries
