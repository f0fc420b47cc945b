"""The start-up probe behind ``/readyz``'s "the token service was reached".

Readiness waits for one answer from the token service that is not a
failure.  With no traffic yet nobody would ask it anything, so at start-up
this probe introspects one random token (``phantomd-readiness-probe.``
followed by 32 random bytes, so the token service's log says what it was)
and expects it to come back inactive.  That proves more than a GET of the
URL would: name resolution, TLS, the client credentials and the answer
format all work, and no real token is needed.  The probe goes to the
introspector directly, not through the gate: it is cached nowhere and
counted in no ``phantomd_introspections_total`` outcome.

* Inactive: the token service is reached; the probe is done.
* Active: a token service that says yes to a random token (a stub, a
  wrong URL) would let anyone in.  Readiness is refused for the life of
  the process and the reason logged as an error.
* A failure (unreachable, 5xx, our credentials refused, timeout): tried
  again after ``backoff`` seconds, doubling up to ``max_backoff``, until it
  works or real traffic reached the token service first.

When the token service's key set is needed (RFC 9701 answers or
``verify_jwt``), ``load_keys()`` is tried the same way.  At most one
introspection and one key fetch are in flight and one retry is pending.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from phantomd.token.outcomes import Active, IntrospectionFailed

log = Logger()

PREFIX = "phantomd-readiness-probe."


def probe_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


class StartupProbe:
    def __init__(self, clock: Any, readiness: Any,
                 introspect: Callable[[str], Deferred],
                 load_keys: Optional[Callable[[], Deferred]] = None,
                 backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        self._clock = clock
        self._readiness = readiness
        self._introspect = introspect
        self._load_keys = load_keys
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._delay = backoff
        self._token = probe_token()
        self._call: Any = None
        self._pending: list[Deferred] = []
        self._running = False

    def start(self) -> None:
        self._running = True
        self._attempt()

    def stop(self) -> None:
        """Cancel the pending retry and whatever is in flight."""
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        pending, self._pending = self._pending, []
        for d in pending:
            d.cancel()

    @property
    def done(self) -> bool:
        return self._readiness.token_service_reached and \
            self._readiness.keys_ready

    def _attempt(self) -> None:
        self._call = None
        if not self._running or self.done:
            self._running = False
            return
        attempts = []
        if not self._readiness.token_service_reached:
            attempts.append(self._introspect(self._token).addCallbacks(
                self._answered, self._failed))
        if self._load_keys is not None and not self._readiness.keys_ready:
            attempts.append(self._load_keys().addCallbacks(
                lambda _: self._readiness.keys_loaded(), self._keys_failed))
        self._pending = attempts
        DeferredList(attempts).addCallback(self._again)

    def _again(self, _: Any) -> None:
        self._pending = []
        if not self._running or self.done:
            self._running = False
            return
        self._call = self._clock.callLater(self._delay, self._attempt)
        self._delay = min(self._max_backoff, self._delay * 2)

    def _answered(self, result: Any) -> None:
        if isinstance(result, Active):
            why = ("the token service says a random token is active: "
                   "it would let anyone in; check [introspection] url")
            log.error("readiness probe: {why}", why=why)
            self._readiness.refuse(why)
            self._running = False
            return
        self._readiness.token_service_ok()

    def _failed(self, failure: Any) -> None:
        if not self._running:
            return None  # cancelled by stop()
        if failure.check(IntrospectionFailed):
            why = "%s: %s" % (failure.value.kind, failure.value.description)
        else:
            why = failure.getErrorMessage() or failure.type.__name__
        self._readiness.token_service_failed(why)
        return None

    def _keys_failed(self, failure: Any) -> None:
        if self._running:
            self._readiness.keys_failed(
                failure.getErrorMessage() or failure.type.__name__)
        return None
