"""The object graph of one phantomd process, and its life cycle.

``Gateway`` wires config → cache, coalescer, introspector, gate, upstream
pool, front and admin listener; ``start`` binds, ``reload`` applies a new
config in place, ``stop`` drains.  It takes the reactor as a parameter, so
tests run whole gateways on the real reactor over loopback.
"""

from __future__ import annotations

from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.logger import Logger

from phantomd.ops import admin

from phantomd.http import cors, routes
from phantomd.token.cache import TokenCache
from phantomd.token.coalescer import Coalescer
from phantomd import config as configmod
from phantomd.fleet.wiring import Fleet, check as check_fleet
from phantomd.config import Config, ConfigError
from phantomd.token.dpop import ProofChecker, SharedReplays
from phantomd.token.gate import Gate
from phantomd.http.listener import FrontFactory
from phantomd.http.upstream import UpstreamPool
from phantomd.ops.metrics import Metrics, files_backed
from phantomd.ops.sdnotify import where

log = Logger()


def _tls(config: Config, section: str, url: str, ca_file, client_cert,
         client_key, keys: tuple[str, str]):
    """TLS options for an https ``url``, None for http; a bad CA,
    certificate or key file is a ConfigError naming the key.  The files
    are checked even for an http ``url``: the token service's client also
    fetches its (possibly https) JWKS with them."""
    parts = urlsplit(url or "")
    from phantomd.http import tls
    ca_key, cert_key = keys
    try:
        trust_root = tls.load_trust_root(ca_file)
    except ValueError as e:
        raise ConfigError(config.path, section, ca_key, str(e))
    try:
        client = (tls.ClientCertificate(client_cert, client_key)
                  if client_cert else None)
    except ValueError as e:
        raise ConfigError(config.path, section, cert_key, str(e))
    if parts.scheme != "https":
        return None
    return tls.connection_creator(parts.hostname, trust_root, client)


def _upstream_tls(config: Config):
    s = config.phantomd
    return _tls(config, "phantomd", s.upstream, s.upstream_ca_file,
                s.upstream_client_cert, s.upstream_client_key,
                ("upstream_ca_file", "upstream_client_cert"))


def _introspection_tls(config: Config):
    i = config.introspection
    return _tls(config, "introspection", i.url, i.ca_file, i.client_cert,
                i.client_key, ("ca_file", "client_cert"))


def _minter(clock, config: Config):
    if config.introspection.response not in ("json", "token-introspection+jwt"):
        return None
    from phantomd.token import jose
    m = config.minting
    try:
        return jose.Minter.from_file(clock, m.key_file, m.issuer,
                                     m.audience, m.lifetime,
                                     force_audience=m.force_audience)
    except ValueError as e:
        raise ConfigError(config.path, "minting", "key_file", str(e))


def listen_error(path: str, section: str, description: str,
                 error: BaseException) -> ConfigError:
    """The one line for a ``[section] listen`` endpoint that cannot be
    bound: the endpoint and the system's reason, e.g. ``address already in
    use`` (another process, or another phantomd, serves it)."""
    reason = getattr(error, "socketError", error)  # CannotListenError
    if isinstance(reason, OSError) and reason.strerror:
        text = reason.strerror[:1].lower() + reason.strerror[1:]
    else:
        text = str(reason) or type(reason).__name__
    return ConfigError(path, section, "listen", "cannot listen on %s: %s"
                       % (description, text))


def _client_ca(config: Config) -> None:
    """``[phantomd] tls_client_ca_file`` must hold a CA certificate, and
    only ``ssl:`` listeners can ask for client certificates."""
    ca = config.phantomd.tls_client_ca_file
    if not ca:
        return
    from phantomd.token import mtls
    from phantomd.http import tls
    try:
        tls._pem_certificates(ca, "client CA file")
    except ValueError as e:
        raise ConfigError(config.path, "phantomd", "tls_client_ca_file",
                          str(e))
    if not any(mtls.is_ssl_endpoint(d) for d in config.phantomd.listen):
        raise ConfigError(config.path, "phantomd", "tls_client_ca_file",
                          "needs an ssl: listener in listen (behind a "
                          "proxy that terminates TLS, list it in "
                          "trusted_proxies and let it send Client-Cert)")


def check(config: Config) -> None:
    """Load every file the config names (keys, certificates) without a
    reactor, so ``twistd`` refuses a bad file before it starts anything."""
    from twisted.internet.task import Clock
    _upstream_tls(config)
    _minter(Clock(), config)
    _introspection_tls(config)
    check_fleet(config)
    _client_ca(config)
    _forward_auth_secret(config)
    i = config.introspection
    if i.auth_method == "private_key_jwt":
        from phantomd.token import clientauth
        try:
            clientauth.ClientAuth.from_settings(Clock(), i,
                                                config.client_secret)
        except ValueError as e:
            raise ConfigError(config.path, "introspection",
                              "private_key_file", str(e))


def _forward_auth_secret(config: Config) -> Optional[bytes]:
    from phantomd.http.forward_auth import read_secret
    try:
        return read_secret(config.forward_auth.secret_file)
    except ValueError as e:
        raise ConfigError(config.path, "forward_auth", "secret_file", str(e))


def warn_exposed_secrets(config: Config) -> None:
    """One warning per secret or private key file that group or others may
    read (the file names a credential: it should be mode 0600 or 0400)."""
    for section, key, path, mode in configmod.exposed_secret_files(config):
        log.warn("{file} ([{section}] {key}) holds a secret or private key "
                 "but is readable by group or others (mode {mode}); "
                 "chmod 600 it", file=path, section=section, key=key,
                 mode="%04o" % mode)


class _IntrospectionStack:
    """The introspector and what it needs (HTTP client, minter, keys);
    rebuilt as one piece on reload."""

    def __init__(self, reactor, config: Config) -> None:
        from phantomd.token import introspection
        i = config.introspection
        self.http = introspection.make_http_client(reactor, i)
        self.minter = _minter(reactor, config)
        keys = self.keys = response_verifier = jwt_verifier = None
        if i.response == "token-introspection+jwt" or i.verify_jwt:
            from phantomd.token import jose
            from phantomd.token.keysource import KeySource
            keys = KeySource(reactor, self.http, jwks_url=i.jwks_url,
                             issuer=i.issuer)
            if i.response == "token-introspection+jwt":
                response_verifier = jose.IntrospectionResponseVerifier(
                    reactor, keys, i.issuer, i.client_id)
            if i.verify_jwt:
                jwt_verifier = jose.JWTVerifier(reactor, keys)
        self.introspector = introspection.Introspector(
            reactor, self.http, i, config.client_secret,
            minter=self.minter, response_verifier=response_verifier,
            jwt_verifier=jwt_verifier)

    def jwks(self) -> Optional[bytes]:
        return self.minter.jwks_json() if self.minter is not None else None

    def close(self) -> defer.Deferred:
        return self.http.close()


#: Seconds between hand-overs of the per-request metric counts
#: (``Metrics.flush``) when no request was answered.
FLUSH_INTERVAL = 1.0
#: In a worker (values in files the parent reads): how long after an
#: answer its counts reach the files, at most.  One hand-over serves every
#: request answered meanwhile; with two workers sharing a core each turn
#: answers only a few, and a hand-over per turn (a lock, a getpid and a
#: file write per value) cost several microseconds per request.
WORKER_FLUSH_DELAY = 0.05


class Gateway:
    def __init__(self, reactor, config: Config,
                 metrics: Optional[Metrics] = None,
                 access_log: Optional[Callable[[dict], None]] = None,
                 admin_registry=None, probe: bool = True) -> None:
        check(config)
        self.reactor = reactor
        self.config = config
        # What the restart-only keys are, whatever reloads come after.
        self._started = config
        self.metrics = metrics if metrics is not None else Metrics()
        # Hand the per-request counts to prometheus_client: a scrape does
        # it first, and so does the flusher each second.  A worker's are
        # read from its files by the parent, so they go there within
        # WORKER_FLUSH_DELAY of an answer too.
        if files_backed():
            self.metrics.use_clock(reactor, WORKER_FLUSH_DELAY)
        self._flusher = task.LoopingCall(self.metrics.flush)
        self._flusher.clock = reactor
        self.readiness = admin.Readiness(reactor)
        c = config.cache
        self.cache = TokenCache(reactor, self.metrics, c.max_entries,
                                c.max_ttl, c.default_ttl, c.negative_ttl,
                                c.min_ttl)
        self.coalescer = Coalescer(self.metrics,
                                   config.introspection.max_in_flight)
        self._stack = _IntrospectionStack(reactor, config)
        # [shared_cache] / [revocation]: None when neither is configured.
        self._wrapped = None
        self.fleet = Fleet.from_config(reactor, config, self.cache,
                                       self.metrics)
        dp = config.dpop
        self.gate = Gate(reactor, self.cache, self.coalescer,
                         self._introspector(), self.metrics,
                         config.phantomd.realm,
                         config.phantomd.required_scopes, self.readiness,
                         dpop=ProofChecker(reactor, dp.algs, dp.max_age,
                                           dp.replay_cache_size))
        if self.fleet is not None and self.fleet.shared is not None:
            # DPoP jtis are remembered fleet-wide (DESIGN section 12).
            self.gate.dpop.shared = SharedReplays(
                self.fleet.shared.client, self.fleet.shared.keys.prefix)
        # Without an upstream ([forward_auth] only) there is no front.
        self.upstream = self.front = None
        self.route_pools: dict = {}
        if config.phantomd.upstream:
            self.upstream = UpstreamPool(reactor, config.phantomd,
                                         self.metrics,
                                         tls_options=_upstream_tls(config))
            self.route_pools, _ = _route_pools(reactor, config, self.metrics,
                                               {}, False)
            self.metrics.set_routes(config.routes)
            self.front = FrontFactory(reactor, self.gate, self.upstream,
                                      config.phantomd, self.metrics,
                                      access_log=access_log,
                                      routes=routes.from_config(config),
                                      pools=self.route_pools,
                                      cors=cors.from_config(config.cors))
        if self.front is not None and self.fleet is not None and \
                getattr(self.fleet, "revoker", None) is not None:
            self.fleet.revoker.listeners.append(self._revoked)
        self.forward_auth = None
        if config.forward_auth.listen:
            from phantomd.http import forward_auth
            self.forward_auth = forward_auth.ForwardAuthFactory(
                reactor, forward_auth.Checker(
                    self.gate, self.metrics, config.forward_auth,
                    _forward_auth_secret(config),
                    routes=routes.from_config(config, default=True)),
                self.metrics, idle_timeout=config.phantomd.idle_timeout,
                header_timeout=config.phantomd.header_timeout,
                access_log=access_log)
        self.forward_auth_ports: list = []
        self.admin_site = admin.make_admin_site(
            reactor, self.metrics, self.readiness,
            jwks=self._jwks,
            jwks_path=config.minting.jwks_path, registry=admin_registry,
            revoke=self.fleet.revoke_resource if self.fleet else None)
        self.front_ports: list = []
        self.admin_ports: list = []
        # /readyz waits for the token service; without traffic this asks it
        # once (phantomd.ops.probe).  Only where there is a /readyz to serve:
        # workers have no admin listener.  ``probe=False`` for tests that
        # script every token service call.
        self.probe = None
        if probe and config.metrics.listen:
            from phantomd.ops.probe import StartupProbe
            if self._stack.keys is not None:
                self.readiness.expect_keys()
            self.probe = StartupProbe(
                reactor, self.readiness,
                lambda token: self._stack.introspector.introspect(token),
                load_keys=(self._load_keys if self._stack.keys is not None
                           else None))

    def _load_keys(self) -> defer.Deferred:
        keys = self._stack.keys
        return keys.load() if keys is not None else defer.succeed(None)

    def _introspector(self):
        """The introspector the gate calls: the stack's own, behind the
        fleet's shared tier and revocation index when configured."""
        inner = self._stack.introspector
        if self.fleet is None:
            return inner
        if self._wrapped is None or self._wrapped[0] is not inner:
            self._wrapped = (inner, self.fleet.wrap(inner))
        return self._wrapped[1]

    def _jwks(self) -> Optional[bytes]:
        """The public keys phantomd signs with, None when it mints none;
        read per request so a reload that starts minting publishes them."""
        return self._stack.jwks()

    # -- life cycle -----------------------------------------------------------

    def _revoked(self, key: Optional[bytes], digest: Optional[str]) -> None:
        """A revocation reached this process: its tunnels close too."""
        revoker = self.fleet.revoker
        self.front.revoked(key, None if digest is None else (
            lambda sub: revoker.digest(sub) == digest))

    def start(self, front_ports=None) -> defer.Deferred:
        """Bind every listener; fail (and unbind) if any cannot bind.

        ``front_ports`` lets a worker process use listening ports adopted
        from its parent instead of binding ``[phantomd] listen`` itself.
        """
        ca = self.config.phantomd.tls_client_ca_file
        front = ([] if self.front is None else
                 [self._listen(d, self.front, "phantomd", ca)
                  for d in self.config.phantomd.listen]
                 if front_ports is None else
                 [defer.succeed(p) for p in front_ports])
        admin_ds = [self._listen(d, self.admin_site, "metrics")
                    for d in self.config.metrics.listen]
        # Workers have none (phantomd.ops.workers.worker_config): with
        # workers > 1 the parent answers the checks.
        checks = ([self._listen(d, self.forward_auth, "forward_auth")
                   for d in self.config.forward_auth.listen]
                  if self.forward_auth is not None else [])
        d = defer.DeferredList(front + admin_ds + checks, consumeErrors=True)

        def bound(results):
            ports = [r for ok, r in results if ok]
            failures = [r for ok, r in results if not ok]
            if failures:
                for p in ports:
                    p.stopListening()
                return failures[0]
            self.front_ports = ports[:len(front)]
            self.admin_ports = ports[len(front):len(front) + len(admin_ds)]
            self.forward_auth_ports = ports[len(front) + len(admin_ds):]
            if self.fleet is not None:
                self.fleet.start()  # connects to Redis in the background
            self.readiness.mark_listening()
            if self.probe is not None:
                self.probe.start()
            self._flusher.start(FLUSH_INTERVAL, now=False)
            log.info("phantomd listening on {front} (admin {admin}), "
                     "upstream {upstream}",
                     front=where(self.front_ports),
                     admin=where(self.admin_ports),
                     upstream=self.config.phantomd.upstream or
                     "none (forward-auth only)")
            if self.forward_auth_ports:
                log.info("forward-auth checks on {where} for {allow}",
                         where=where(self.forward_auth_ports),
                         allow=" ".join(
                             str(n) for n in
                             self.config.forward_auth.allow_from.networks))
            return self
        return d.addCallback(bound)

    def _listen(self, description: str, factory,
                section: str,
                client_ca: Optional[str] = None) -> defer.Deferred:
        """Bind one endpoint; a failure is ``listen_error``'s ConfigError.
        ``client_ca``: ``ssl:`` endpoints ask clients for certificates it
        signed (DESIGN section 12: certificate-bound tokens)."""
        from phantomd.http import tls
        try:
            endpoint = tls.server_endpoint(self.reactor, description)
            if client_ca:
                from phantomd.token import mtls
                if mtls.is_ssl_endpoint(description):
                    mtls.request_client_certificates(endpoint, client_ca)
            d = endpoint.listen(factory)
        except Exception:
            d = defer.fail()

        def failed(failure):
            raise listen_error(self.config.path, section, description,
                               failure.value)
        return d.addErrback(failed)

    def reload(self, new: Config) -> None:
        """Apply ``new`` without closing client connections.

        Raises ConfigError (and changes nothing) if the new config names a
        file that cannot be used.  Every file the config names is re-read:
        the introspection client (with its keys, secret and certificates)
        is rebuilt when any of its keys or files changed, the upstream pool
        when its URL or TLS files did.  The token cache is emptied when a
        key tagged ``trust=True`` in the schema, or such a file's contents,
        changed (``config.identity``): an answer cached under the old
        settings may not be one the new settings would trust.  Keys tagged
        ``restart=True`` are reported while they differ from what this
        process started with.
        """
        check(new)
        old = self.config
        if bool(new.phantomd.upstream) != (self.front is not None):
            # The front listener would have to appear or vanish.
            raise ConfigError(new.path, "phantomd", "upstream",
                              "cannot be %s by a reload (the [phantomd] "
                              "listen front would %s); restart phantomd" % (
                                  ("set", "start") if self.front is None
                                  else ("emptied", "stop")))
        pending = configmod.changed(self._started, new,
                                    lambda key: key.restart)
        if pending:
            log.warn("{keys} changed in {path}; this takes effect only "
                     "after a restart", path=new.path, keys=", ".join(
                         "[%s] %s" % (section, key) + (
                             "" if getattr(getattr(self._started, section),
                                           key)
                             != getattr(getattr(new, section), key)
                             else " (contents of the files it names)")
                         for section, key in pending))
        diff = [pair for pair in configmod.changed(old, new)
                if not configmod.SCHEMA[pair[0]][pair[1]].restart]
        trust = [pair for pair in diff
                 if configmod.SCHEMA[pair[0]][pair[1]].trust]
        old_stack = None
        if trust or new.client_secret != old.client_secret or any(
                section in ("introspection", "minting")
                for section, _ in diff):
            old_stack, self._stack = self._stack, _IntrospectionStack(
                self.reactor, new)
        secret = _forward_auth_secret(new)
        old_upstream = None
        if self.upstream is None:
            pass  # no front: [phantomd] upstream needs a restart
        elif any(pair in _UPSTREAM_KEYS for pair in diff):
            old_upstream, self.upstream = self.upstream, UpstreamPool(
                self.reactor, new.phantomd, self.metrics,
                tls_options=_upstream_tls(new))
        else:
            self.upstream.reconfigure(new.phantomd)
        retired: list = []
        if self.upstream is not None:
            self.route_pools, retired = _route_pools(
                self.reactor, new, self.metrics, self.route_pools,
                any(pair in _UPSTREAM_KEYS for pair in diff))
        c = new.cache
        if configmod.identity(new) != configmod.identity(old):
            dropped = len(self.cache)
            self.cache.clear()
            log.info("token cache emptied ({n} entries): {keys} changed, "
                     "which decides what is trusted", n=dropped,
                     keys=configmod.names(trust))
        self.cache.reconfigure(max_entries=c.max_entries, max_ttl=c.max_ttl,
                               default_ttl=c.default_ttl,
                               negative_ttl=c.negative_ttl,
                               min_ttl=c.min_ttl)
        self.coalescer.reconfigure(new.introspection.max_in_flight)
        if self.fleet is not None:
            self.fleet.reload(new)
        self.gate.reconfigure(realm=new.phantomd.realm,
                              required_scopes=new.phantomd.required_scopes,
                              introspector=self._introspector())
        self.gate.dpop.reconfigure(algs=new.dpop.algs,
                                   max_age=new.dpop.max_age,
                                   max_entries=new.dpop.replay_cache_size)
        if self.front is not None:
            self.metrics.set_routes(new.routes)
            self.front.reconfigure(gate=self.gate, upstream=self.upstream,
                                   settings=new.phantomd,
                                   routes=routes.from_config(new),
                                   pools=self.route_pools,
                                   cors=cors.from_config(new.cors))
        if self.forward_auth is not None:
            self.forward_auth.checker.reconfigure(
                new.forward_auth, secret, gate=self.gate,
                routes=routes.from_config(new, default=True))
            self.forward_auth.reconfigure(new.phantomd.idle_timeout,
                                          new.phantomd.header_timeout)
        self.config = new
        if old_stack is not None:
            old_stack.close()
        if old_upstream is not None:
            old_upstream.close()
        for pool in retired:
            pool.close()  # requests in flight on it finish first
        applied = configmod.names(diff)
        routes_changed = sorted(
            name for name in set(old.routes) | set(new.routes)
            if old.routes.get(name) != new.routes.get(name))
        if routes_changed:
            applied += (", " if applied else "") + ", ".join(
                "[route %s]" % name for name in routes_changed)
        log.info("configuration reloaded from {path}; applied: {keys}",
                 path=new.path, keys=applied or "no change")

    def stop(self) -> defer.Deferred:
        """Stop accepting, let in-flight requests finish for up to
        ``drain_timeout`` seconds, then close everything."""
        if self.probe is not None:
            self.probe.stop()
        if self._flusher.running:
            self._flusher.stop()
        stops = [defer.maybeDeferred(p.stopListening)
                 for p in self.front_ports]
        self.front_ports = []
        d = defer.DeferredList(stops)
        timeout = self.config.phantomd.drain_timeout

        stops += [defer.maybeDeferred(p.stopListening)
                  for p in self.forward_auth_ports]
        self.forward_auth_ports = []

        def drain(_):
            if self.front is None:
                return None
            drained = self.front.drain()
            drained.addTimeout(timeout, self.reactor)

            def overdue(f):
                log.warn("drain_timeout ({timeout}s) reached; closing the "
                         "connections still open", timeout=timeout)
                self.front.abort()
            return drained.addErrback(overdue)

        def close(_):
            # The drained requests' counts, before a worker's files close.
            self.metrics.flush()
            closing = [defer.maybeDeferred(self._stack.close)]
            if self.upstream is not None:
                closing.append(defer.maybeDeferred(self.upstream.close))
            closing += [defer.maybeDeferred(p.close)
                        for p in self.route_pools.values()]
            if self.fleet is not None:
                closing.append(defer.maybeDeferred(self.fleet.stop))
            closing += [defer.maybeDeferred(p.stopListening)
                        for p in self.admin_ports]
            self.admin_ports = []
            return defer.DeferredList(closing)

        return d.addCallback(drain).addCallback(close).addCallback(
            lambda _: None)


#: What the upstream pool is built from (the rest it reconfigures in place).
_UPSTREAM_KEYS = frozenset(("phantomd", key) for key in (
    "upstream", "upstream_ca_file", "upstream_client_cert",
    "upstream_client_key", "upstream_connect_timeout"))


class _RouteUpstream:
    """``[phantomd]``'s upstream settings (timeouts, TLS files) with a
    route's ``upstream`` URL."""

    def __init__(self, settings: Any, url: str) -> None:
        self._settings = settings
        self.upstream = url

    def __getattr__(self, name: str) -> Any:
        return getattr(self._settings, name)


def _route_pools(reactor: Any, config: Config, metrics: Any, old: dict,
                 rebuild: bool) -> tuple:
    """``(pools, retired)``: one ``UpstreamPool`` per distinct route
    upstream URL (the ``[phantomd]`` one excepted: it has its own), reusing
    the pools of ``old`` unless ``rebuild`` (the TLS or connect settings
    changed); ``retired`` are the old pools no longer used."""
    pools = {}
    for route in config.routes.values():
        url = route.upstream
        if not url or url in pools:
            continue
        settings = _RouteUpstream(config.phantomd, url)
        if url in old and not rebuild:
            pools[url] = old[url]
            pools[url].reconfigure(settings)
        else:
            pools[url] = UpstreamPool(reactor, settings, metrics)
    retired = [p for url, p in old.items() if pools.get(url) is not p]
    return pools, retired
