"""The metrics and health listener: /metrics, /healthz, /readyz, the JWKS.

Everything renders on the reactor thread: generating the Prometheus text for
phantomd's few dozen series takes well under a millisecond, so the thread
pool prometheus_client's own ``MetricsResource`` uses would cost more than it
saves (and would read the metrics while the reactor is changing them).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger
from twisted.web import resource, server

from phantomd.http.headers import http_date

__all__ = ["make_admin_site", "Readiness"]

log = Logger()

_IDLE_TIMEOUT = 60


class Readiness:
    """What ``/readyz`` reports: should a load balancer send traffic here?

    Not ready until every one of these has happened once: the listeners are
    bound (``mark_listening``), the token service gave an answer that was not
    a failure (``token_service_ok``: from the startup probe, phantomd.ops.probe,
    or from real traffic), the token service's keys were loaded when
    phantomd needs them (``expect_keys`` then ``keys_loaded``), and every
    check added with ``add_check`` passes.

    After that it stays ready whatever the token service does.  A token
    service outage hits every phantomd of a fleet at the same moment; if
    each went unready, the load balancer would pull the whole fleet at once
    and clients would get its connection errors instead of phantomd's 502
    with a ``WWW-Authenticate`` challenge, and traffic would come back only
    as fast as the health checks notice.  The outage still shows: while every
    token service request of the last ``window`` seconds failed, the reason
    says so (and the alerts in etc/alerts.yml fire on the failure counters).

    ``refuse(reason)`` is the exception: a token service that calls a random
    token active would let anyone in, and that never goes away by itself.
    Holds a handful of fields and a list of checks set at start-up.
    """

    def __init__(self, clock: Any, window: float = 60) -> None:
        if not window > 0:
            raise ValueError("window must be > 0 seconds, not %r" % (window,))
        self._clock = clock
        self.window = window
        self._listening = False
        self._first_ok: Optional[float] = None
        self._last_ok: Optional[float] = None
        self._last_failure: Optional[float] = None
        self._failure_reason: Optional[str] = None
        self._keys_expected = False
        self._keys_loaded = False
        self._keys_error: Optional[str] = None
        self._refused: Optional[str] = None
        self._checks: list[Callable[[], Optional[str]]] = []

    def mark_listening(self) -> None:
        self._listening = True

    def token_service_ok(self) -> None:
        now = self._clock.seconds()
        if self._first_ok is None:
            self._first_ok = now
        self._last_ok = now

    def token_service_failed(self, reason: Optional[str] = None) -> None:
        self._last_failure = self._clock.seconds()
        if reason:
            self._failure_reason = reason

    @property
    def token_service_reached(self) -> bool:
        return self._first_ok is not None

    def expect_keys(self) -> None:
        """The token service's key set is needed (RFC 9701, verify_jwt)."""
        self._keys_expected = True

    def keys_loaded(self) -> None:
        self._keys_loaded = True

    def keys_failed(self, reason: str) -> None:
        self._keys_error = reason

    @property
    def keys_ready(self) -> bool:
        return self._keys_loaded or not self._keys_expected

    def refuse(self, reason: str) -> None:
        """Never ready again in this process."""
        self._refused = reason

    def add_check(self, check: Callable[[], Optional[str]]) -> None:
        """``check()`` returns None when fine, else why not ready."""
        self._checks.append(check)

    def __call__(self) -> tuple[bool, str]:
        if self._refused is not None:
            return False, self._refused
        missing = []
        if not self._listening:
            missing.append("listeners are not bound yet")
        if self._first_ok is None:
            missing.append("token service not reached yet" + (
                " (last attempt: %s)" % self._failure_reason
                if self._failure_reason else ""))
        if not self.keys_ready:
            missing.append("token service keys not loaded yet" + (
                " (%s)" % self._keys_error if self._keys_error else ""))
        for check in self._checks:
            why = check()
            if why:
                missing.append(why)
        if missing:
            return False, "; ".join(missing)
        now = self._clock.seconds()
        if (self._last_failure is not None
                and now - self._last_failure < self.window
                and now - (self._last_ok or 0) >= self.window):
            return True, ("ok, but every token service request in the last "
                          "%g s failed (last success %.0f s ago)"
                          % (self.window, now - (self._last_ok or 0)))
        return True, "ok"


class AdminResource(resource.Resource):
    """One leaf resource routing on the exact path; anything else is 404."""

    isLeaf = True

    def __init__(self, metrics: Any, ready: Callable[[], tuple[bool, str]],
                 jwks: Optional[Callable[[], bytes]] = None,
                 jwks_path: str = "/.well-known/jwks.json",
                 registry: Any = None, revoke: Any = None) -> None:
        super().__init__()
        # POST /revoke ([revocation], phantomd.fleet.revocation) answers itself.
        self._revoke = revoke
        self._registry = registry if registry is not None else \
            metrics.registry
        self._ready = ready
        self._jwks = jwks
        self._routes: dict[bytes, Callable[[server.Request], bytes]] = {
            b"/metrics": self._metrics,
            b"/healthz": self._healthz,
            b"/readyz": self._readyz,
        }
        if jwks is not None:
            self._routes[jwks_path.encode("ascii")] = self._jwks_document

    def render(self, request: server.Request) -> bytes:
        body = self._answer(request)
        if request.method == b"HEAD":
            # The headers of the GET, no body: returning one would make
            # twisted.web log a warning per HEAD and eat it itself.
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b""
        return body

    def _answer(self, request: server.Request) -> bytes:
        if request.path == b"/revoke" and self._revoke is not None:
            return self._revoke.render(request)
        route = self._routes.get(request.path)
        if route is None:
            return _text(request, 404, "not found")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _text(request, 405, "method not allowed")
        return route(request)

    def _metrics(self, request: server.Request) -> bytes:
        body = generate_latest(self._registry)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    def _healthz(self, request: server.Request) -> bytes:
        return _text(request, 200, "ok")

    def _readyz(self, request: server.Request) -> bytes:
        try:
            ready, reason = self._ready()
        except Exception:
            log.failure("readiness check raised")
            ready, reason = False, "readiness check failed"
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps({"ready": bool(ready), "reason": reason},
                          sort_keys=True).encode("utf-8") + b"\n"

    def _jwks_document(self, request: server.Request) -> bytes:
        assert self._jwks is not None
        try:
            body = self._jwks()
        except Exception:
            log.failure("building the JWKS failed")
            return _text(request, 503, "key set unavailable")
        if body is None:  # phantomd mints nothing (a reload may change that)
            return _text(request, 404, "not found")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"max-age=300")
        return body


def _text(request: server.Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return (message + "\n").encode("utf-8")


#: The largest request body the admin listener reads (POST /revoke needs
#: 8 KiB; nothing else takes one).
MAX_ADMIN_BODY = 65536
_TOO_LARGE = (b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
              b"Content-Length: 0\r\n\r\n")


class _AdminRequest(server.Request):
    """A request whose body is bounded: past ``MAX_ADMIN_BODY`` bytes
    (announced or received) the client gets 413 and the connection is
    closed; the body is not stored and no resource sees the request.
    twisted.web alone spools a body of any size to a temporary file, and
    it arrives before /revoke can check a bearer."""

    _received = 0
    _refused = False

    def _refuse(self) -> None:
        self._refused = True
        self.channel.transport.write(_TOO_LARGE)
        self.channel.transport.loseConnection()

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > MAX_ADMIN_BODY:
            length = 0  # no temporary file for a body never stored
            self._refuse()
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_ADMIN_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes,
                        version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)


class AdminSite(server.Site):
    """A ``Site`` that keeps no access log: scrapes every few seconds would
    drown the log, and the request counters live in /metrics anyway."""

    displayTracebacks = False

    def log(self, request: server.Request) -> None:
        pass

    def getResourceFor(self, request: server.Request) -> Any:
        # twisted.web stamps Date from the system clock; use ours.
        request.setHeader(b"Date", http_date(self.reactor.seconds()))
        return super().getResourceFor(request)


def make_admin_site(clock: Any, metrics: Any,
                    ready: Callable[[], tuple[bool, str]],
                    jwks: Optional[Callable[[], bytes]] = None,
                    jwks_path: str = "/.well-known/jwks.json",
                    registry: Any = None, revoke: Any = None) -> server.Site:
    """The admin listener's factory.

    ``registry`` (anything with ``collect()``, default ``metrics.registry``)
    is what /metrics renders; in multiprocess mode it is the collector that
    aggregates the workers.  ``jwks`` returns the JSON key set to publish
    at ``jwks_path``; without it that path is 404 like any other.
    """
    root = AdminResource(metrics, ready, jwks=jwks, jwks_path=jwks_path,
                         registry=registry, revoke=revoke)
    return AdminSite(root, requestFactory=_AdminRequest,
                     timeout=_IDLE_TIMEOUT, reactor=clock)
