"""The metrics and health listener: /metrics, /healthz, /readyz, the JWKS.

Everything renders on the reactor thread: generating the Prometheus text for
phantomd's few dozen series takes well under a millisecond, so the thread
pool prometheus_client's own ``MetricsResource`` uses would cost more than it
saves (and would read the metrics while the reactor is changing them).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger
from twisted.web import resource, server

from phantomd.http.headers import http_date

__all__ = ["make_admin_site", "Readiness"]

log = Logger()

_IDLE_TIMEOUT = 60


class Readiness:
    """What ``/readyz`` reports: can this process serve traffic right now?

    Ready once ``mark_listening()`` was called and the token service either
    has not been asked yet or answered at least once in the last ``window``
    seconds of attempts; not ready while every attempt in the last
    ``window`` seconds failed.  A quiet spell with no attempts at all (all
    answers cached) keeps it ready; one good answer makes it ready again at
    once.
    """

    def __init__(self, clock: Any, window: float = 60) -> None:
        if not window > 0:
            raise ValueError("window must be > 0 seconds, not %r" % (window,))
        self._clock = clock
        self.window = window
        self._listening = False
        self._last_ok: Optional[float] = None
        self._last_failure: Optional[float] = None

    def mark_listening(self) -> None:
        self._listening = True

    def token_service_ok(self) -> None:
        self._last_ok = self._clock.seconds()

    def token_service_failed(self) -> None:
        self._last_failure = self._clock.seconds()

    def __call__(self) -> tuple[bool, str]:
        if not self._listening:
            return False, "listeners are not up yet"
        if self._last_failure is None:
            return True, "ok"
        now = self._clock.seconds()
        recent_failure = now - self._last_failure < self.window
        recent_ok = (self._last_ok is not None
                     and now - self._last_ok < self.window)
        if recent_failure and not recent_ok:
            return False, ("every token service request in the last %g s "
                           "failed (last failure %.0f s ago)"
                           % (self.window, now - self._last_failure))
        return True, "ok"


class AdminResource(resource.Resource):
    """One leaf resource routing on the exact path; anything else is 404."""

    isLeaf = True

    def __init__(self, metrics: Any, ready: Callable[[], tuple[bool, str]],
                 jwks: Optional[Callable[[], bytes]] = None,
                 jwks_path: str = "/.well-known/jwks.json",
                 registry: Any = None) -> None:
        super().__init__()
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
            return _text(request, 503, "readiness check failed")
        return _text(request, 200 if ready else 503, reason)

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
                    registry: Any = None) -> server.Site:
    """The admin listener's factory.

    ``registry`` (anything with ``collect()``, default ``metrics.registry``)
    is what /metrics renders; in multiprocess mode it is the collector that
    aggregates the workers.  ``jwks`` returns the JSON key set to publish
    at ``jwks_path``; without it that path is 404 like any other.
    """
    root = AdminResource(metrics, ready, jwks=jwks, jwks_path=jwks_path,
                         registry=registry)
    return AdminSite(root, timeout=_IDLE_TIMEOUT, reactor=clock)
