"""The gate: opaque token in, ``Forward(jwt)`` or ``Reject`` out.

It knows nothing about sockets.  It reads the cache, and on a miss asks the
coalescer to run (at most) one introspection for the token; the shared
introspection stores its answer in the cache before any waiter sees it.
Scopes are checked on every request, cache hits included.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, Union

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from phantomd.cache import scope_text
from phantomd.outcomes import (
    Active, Forward, Inactive, IntrospectionFailed, Reject, Shed)
from phantomd.tokens import parse_authorization, token_id, token_key

Decision = Union[Forward, Reject]

_ERRORS = {
    502: ("bad_gateway", "the token service did not give a usable answer"),
    503: ("temporarily_unavailable", "the token service is unavailable"),
    504: ("gateway_timeout", "the token service did not answer in time"),
}

#: Seconds a shed request is told to wait before trying again.
SHED_RETRY_AFTER = 1


def granted_scopes(claims: Mapping[str, Any]) -> frozenset:
    """Scopes from ``scope`` (RFC 9068, space-separated) or ``scp``."""
    return frozenset((scope_text(claims) or "").split())


class Gate:
    log = Logger()

    def __init__(self, clock, cache, coalescer, introspector, metrics,
                 realm: str, required_scopes: Iterable[str],
                 readiness=None) -> None:
        self.clock = clock
        self.cache = cache
        self.coalescer = coalescer
        self.introspector = introspector
        self.metrics = metrics
        self.readiness = readiness
        self.reconfigure(realm=realm, required_scopes=required_scopes)

    def reconfigure(self, realm=None, required_scopes=None,
                    introspector=None) -> None:
        """Apply a reload; requests already waiting finish on the old
        introspector, new ones use the new one."""
        if realm is not None:
            self.realm = realm
        if required_scopes is not None:
            self.required_scopes = frozenset(required_scopes)
            self._scope_text = " ".join(sorted(self.required_scopes))
        if introspector is not None:
            self.introspector = introspector

    def authorize(self, authorization: Sequence[bytes]) -> "Deferred[Decision]":
        parsed = parse_authorization(authorization)
        if isinstance(parsed, Reject):
            return succeed(parsed)
        key = token_key(parsed)
        tid = token_id(key)
        cached = self.cache.get(key)
        if cached is not None:
            if isinstance(cached, Active):
                self.metrics.lookup["hit"].inc()
                return succeed(self._decide(cached, "hit", tid))
            self.metrics.lookup["negative_hit"].inc()
            return succeed(self._inactive(tid, "negative_hit"))
        self.metrics.lookup["miss"].inc()
        # Flights are per introspector as well as per token: a request
        # arriving after a reload that replaced the token service's client
        # must not join an introspection still running against the old one.
        introspector = self.introspector
        d = self.coalescer.run(
            (introspector, key),
            lambda: self._introspect(introspector, parsed, key, tid))
        d.addCallbacks(self._answered, self._failed,
                       callbackArgs=(tid,), errbackArgs=(tid,))
        return d

    # -- the shared introspection (one per token at a time) ----------------

    def _introspect(self, introspector, token: str, key: bytes,
                    tid: str) -> Deferred:
        start = self.clock.seconds()
        d = introspector.introspect(token)

        def answered(result):
            self.metrics.introspection_duration.observe(
                self.clock.seconds() - start)
            if isinstance(result, Active):
                self.metrics.outcome["active"].inc()
            elif isinstance(result, Inactive):
                self.metrics.outcome["inactive"].inc()
            else:
                raise IntrospectionFailed(
                    "error", "introspector gave %r" % type(result).__name__)
            if self.readiness is not None:
                self.readiness.token_service_ok()
            if introspector is self.introspector:
                # Not replaced by a reload meanwhile: a reload that changed
                # the token service emptied the cache, and an answer from
                # the old one must not slip back in.
                self.cache.put(key, result)
            return result

        def failed(f: Failure):
            self.metrics.introspection_duration.observe(
                self.clock.seconds() - start)
            if f.check(IntrospectionFailed):
                # The introspector logs failures, throttled: an outage
                # under load must not become one warning per request.
                kind = f.value.kind
                self.log.debug(
                    "introspection failed for {token_id}: {kind}: "
                    "{description}", token_id=tid, kind=kind,
                    description=f.value.description)
            else:
                kind = "error"
                self.log.failure("introspection crashed for {token_id}", f,
                                 token_id=tid)
                f = Failure(IntrospectionFailed(
                    "error", "internal error during introspection"))
            self.metrics.outcome[
                "timeout" if kind == "timeout" else "error"].inc()
            if self.readiness is not None:
                self.readiness.token_service_failed()
            return f

        d.addCallbacks(answered, failed)
        return d

    # -- per request --------------------------------------------------------

    def _answered(self, result, tid: str) -> Decision:
        if isinstance(result, Active):
            return self._decide(result, "miss", tid)
        return self._inactive(tid, "miss")

    def _failed(self, f: Failure, tid: str) -> Decision:
        if f.check(CancelledError):
            return f  # the caller went away; nothing to answer
        if f.check(Shed):
            self.metrics.outcome["shed"].inc()
            return Reject(503, "temporarily_unavailable",
                          "too many token checks in progress",
                          retry_after=SHED_RETRY_AFTER, token_id=tid)
        if f.check(IntrospectionFailed):
            status = IntrospectionFailed.STATUS[f.value.kind]
            retry_after = f.value.retry_after
        else:
            self.log.failure("gate crashed for {token_id}", f, token_id=tid)
            status, retry_after = 502, None
        if status == 503 and retry_after is None:
            retry_after = SHED_RETRY_AFTER
        error, description = _ERRORS[status]
        return Reject(status, error, description, retry_after=retry_after,
                      token_id=tid)

    def _inactive(self, tid: str, cache: str) -> Reject:
        return Reject(401, "invalid_token",
                      "the access token is not active", token_id=tid,
                      cache=cache)

    def _decide(self, result: Active, cache: str, tid: str) -> Decision:
        exp = result.claims.get("exp")
        if isinstance(exp, (int, float)) and exp <= self.clock.seconds():
            return self._inactive(tid, cache)
        if self.required_scopes and not self.required_scopes.issubset(
                granted_scopes(result.claims)):
            return Reject(403, "insufficient_scope",
                          "the access token lacks a required scope",
                          scope=self._scope_text, token_id=tid, cache=cache)
        return Forward(jwt=result.jwt, claims=result.claims, cache=cache,
                       token_id=tid)
