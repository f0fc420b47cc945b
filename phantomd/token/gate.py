"""The gate: opaque token in, ``Forward(jwt)`` or ``Reject`` out.

It knows nothing about sockets.  It reads the cache, and on a miss asks the
coalescer to run (at most) one introspection for the token; the shared
introspection stores its answer in the cache before any waiter sees it.
Scopes are checked on every request, cache hits included, and so are
sender constraints (DESIGN section 12): a ``DPoP`` proof is checked before
the cache is looked at, and the token's ``cnf`` (``jkt``, ``x5t#S256``) is
compared with the proof's key and the client certificate once its claims
are known.  The cache key stays the token.
"""

from __future__ import annotations

from typing import (Any, Callable, Iterable, Mapping, Optional, Sequence,
                    Union)

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from zope.interface import implementer
from twisted.python.failure import Failure

from phantomd.direct import as_deferred, then
from phantomd.http.interfaces import IGate
from phantomd.token.cache import CachedClaims, scope_text
from phantomd.token.dpop import (
    ProofChecker, ProofError, ReplayCacheFull, thumbprints_equal)
from phantomd.token.outcomes import (
    Active, Forward, Inactive, IntrospectionFailed, Reject, Shed)
from phantomd.token.tokens import parse_credentials, token_id, token_key

Decision = Union[Forward, Reject]

_ERRORS = {
    502: ("bad_gateway", "the token service did not give a usable answer"),
    503: ("temporarily_unavailable", "the token service is unavailable"),
    504: ("gateway_timeout", "the token service did not answer in time"),
}

#: Seconds a shed request is told to wait before trying again.
SHED_RETRY_AFTER = 1

#: How a plain bearer request is bound: (scheme, proof, certificate).
_BEARER = ("Bearer", None, None)


def granted_scopes(claims: Mapping[str, Any]) -> frozenset:
    """Scopes from ``scope`` (RFC 9068, space-separated) or ``scp``."""
    return frozenset((scope_text(claims) or "").split())


class _Miss:
    """A miss's handle: the caller's place in the coalescer's flight until
    the answer, then the fleet's replay check (DPoP) if one runs;
    ``cancel()`` leaves whichever it is, and nothing is delivered."""

    __slots__ = ("waiting", "answered")

    def __init__(self) -> None:
        self.waiting: Any = None
        self.answered = False

    def cancel(self) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.cancel()


@implementer(IGate)
class Gate:
    log = Logger()

    def __init__(self, clock, cache, coalescer, introspector, metrics,
                 realm: str, required_scopes: Iterable[str],
                 readiness=None, dpop: "ProofChecker | None" = None) -> None:
        self.clock = clock
        self.dpop = dpop if dpop is not None else ProofChecker(clock)
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
            self.required_scopes = self._scopes = frozenset(required_scopes)
        if introspector is not None:
            self.introspector = introspector

    def authorize(self, authorization: Sequence[bytes],
                  **evidence: Any) -> "Deferred[Decision]":
        """``authorize_to`` with a Deferred: cancelling it detaches the
        caller (it fails with ``CancelledError``)."""
        return as_deferred(lambda done: self.authorize_to(
            done, authorization, **evidence))

    def authorize_to(self, done: Callable[[Any], None],
                     authorization: Sequence[bytes],
                     dpop: Sequence[bytes] = (), method: bytes = b"GET",
                     url: Optional[str] = None,
                     client_cert: Optional[str] = None,
                     required_scopes: Optional[Iterable[str]] = None
                     ) -> Any:
        """The decision for a request's ``Authorization`` values, given to
        ``done`` (``phantomd.direct``): at once for a cache hit or a
        refusal, when the introspection ends for a miss.  Returns None when
        ``done`` has its decision already, else a handle whose ``cancel()``
        detaches the caller (``done`` is then never called).  ``done``
        gets a ``Failure`` only for a bug.

        ``required_scopes``: the scopes this request needs (a route's,
        DESIGN section 8), checked on cache hits too; None: the gate's.

        ``dpop``: its ``DPoP`` header values; ``method`` and ``url`` (as
        ``dpop.request_url`` gives it) what the proof must name;
        ``client_cert``: the SHA-256 thumbprint (base64url) of the client
        certificate the request came with, if any.  A caller that passes
        none of them gets sender-constrained tokens refused."""
        parsed = parse_credentials(authorization)
        if isinstance(parsed, Reject):
            done(parsed)
            return None
        scheme, token = parsed
        scopes = self._scopes if required_scopes is None else (
            frozenset(required_scopes))
        key = token_key(token)
        tid = token_id(key)
        if scheme == "Bearer":
            binding: tuple = _BEARER if client_cert is None else (
                "Bearer", None, client_cert)
        else:
            try:
                proof = self.dpop.check(dpop, method, url, token)
            except ProofError as e:
                done(self._refuse_proof(e, tid))
                return None
            binding = (scheme, proof, client_cert)
        cached = self.cache.get(key)
        if cached is not None:
            if isinstance(cached, Active):
                self.metrics.lookup["hit"].inc()
                # A Deferred for the fleet's replay check (DPoP).
                return then(self._decide(cached, "hit", tid, binding,
                                         scopes), done)
            self.metrics.lookup["negative_hit"].inc()
            done(self._inactive(tid, "negative_hit", binding))
            return None
        self.metrics.lookup["miss"].inc()
        # Flights are per introspector as well as per token: a request
        # arriving after a reload that replaced the token service's client
        # must not join an introspection still running against the old one.
        introspector = self.introspector
        miss = _Miss()

        def answered(result: Any) -> None:
            miss.answered = True
            try:
                if isinstance(result, Failure):
                    decision = self._failed(result, tid)
                else:
                    decision = self._answered(result, tid, binding, scopes)
            except Exception:
                decision = Failure()
            miss.waiting = then(decision, done)

        waiter = self.coalescer.join(
            (introspector, key),
            lambda finish: self._introspect(introspector, token, key, tid,
                                            finish),
            answered)
        if not miss.answered:
            miss.waiting = waiter
        return miss if miss.waiting is not None else None

    # -- the shared introspection (one per token at a time) ----------------

    def _introspect(self, introspector, token: str, key: bytes, tid: str,
                    finish: Callable[[Any], None]) -> None:
        start = self.clock.seconds()

        def ended(result: Any) -> None:
            self.metrics.introspection_duration.observe(
                self.clock.seconds() - start)
            try:
                if isinstance(result, Failure):
                    result = self._not_introspected(result, tid)
                else:
                    result = self._introspected(introspector, key, result)
            except Exception:
                result = self._not_introspected(Failure(), tid)
            finish(result)

        try:
            introspect_to = getattr(introspector, "introspect_to", None)
            if introspect_to is not None:
                introspect_to(token, ended)
            else:  # a fleet tier's wrapper
                introspector.introspect(token).addBoth(ended)
        except Exception:
            ended(Failure())

    def _introspected(self, introspector, key: bytes, result: Any) -> Any:
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

    def _not_introspected(self, f: Failure, tid: str) -> Failure:
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

    # -- per request --------------------------------------------------------

    def _answered(self, result, tid: str, binding: tuple,
                  scopes: Optional[frozenset] = None) -> Decision:
        if isinstance(result, Active):
            return self._decide(result, "miss", tid, binding, scopes)
        return self._inactive(tid, "miss", binding)

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

    def _inactive(self, tid: str, cache: str,
                  binding: tuple = _BEARER) -> Reject:
        if binding[0] == "DPoP":
            return Reject(401, "invalid_token",
                          "the access token is not active", token_id=tid,
                          cache=cache, scheme="DPoP",
                          dpop_algs=self.dpop.algs_text)
        return Reject(401, "invalid_token",
                      "the access token is not active", token_id=tid,
                      cache=cache)

    def _decide(self, result: Active, cache: str, tid: str,
                binding: tuple = _BEARER, scopes: Optional[frozenset] = None
                ) -> Decision:
        if scopes is None:
            scopes = self._scopes
        claims = result.claims
        if type(claims) is CachedClaims:
            # A cache entry never outlives the token's exp.
            cnf = claims.cnf
        else:
            exp = claims.get("exp")
            if isinstance(exp, (int, float)) and exp <= self.clock.seconds():
                return self._inactive(tid, cache, binding)
            cnf = claims.get("cnf")
        if cnf is not None or binding[1] is not None:
            refused = self._bound(cnf, binding, tid, cache)
            if refused is not None:
                if isinstance(refused, Deferred):
                    return refused.addCallback(
                        lambda r: r if r is not None else
                        self._scoped(result, cache, tid, binding, scopes))
                return refused
        return self._scoped(result, cache, tid, binding, scopes)

    def _scoped(self, result: Active, cache: str, tid: str,
                binding: tuple, scopes: frozenset) -> Decision:
        claims = result.claims
        if scopes and not scopes.issubset(granted_scopes(claims)):
            dpop = binding[0] == "DPoP"
            return Reject(403, "insufficient_scope",
                          "the access token lacks a required scope",
                          scope=" ".join(sorted(scopes)), token_id=tid,
                          cache=cache,
                          scheme=binding[0],
                          dpop_algs=self.dpop.algs_text if dpop else None)
        return Forward(result.jwt, claims, cache, tid)

    # -- sender constraints (DESIGN section 12) -----------------------------

    def _refuse_proof(self, e: ProofError, tid: str,
                      cache: str = "") -> Reject:
        self.metrics.dpop_failures[e.reason].inc()
        self.log.debug("DPoP proof refused for {token_id}: {reason}",
                       token_id=tid, reason=e.reason)
        if isinstance(e, ReplayCacheFull):
            return Reject(503, "temporarily_unavailable", e.description,
                          retry_after=SHED_RETRY_AFTER, token_id=tid,
                          cache=cache)
        return Reject(401, "invalid_dpop_proof", e.description,
                      token_id=tid, cache=cache, scheme="DPoP",
                      dpop_algs=self.dpop.algs_text)

    def _bound(self, cnf: Any, binding: tuple, tid: str,
               cache: str) -> "Reject | Deferred | None":
        """None if the request satisfies the token's ``cnf``, else the
        refusal.  A DPoP proof is remembered (its jti used up) only here,
        once everything else about it passed; with the fleet's Redis the
        answer is a Deferred of the same."""
        scheme, proof, cert = binding
        if cnf is None:
            cnf = {}
        elif not isinstance(cnf, Mapping):
            return self._unbound(scheme, "the access token's cnf claim is "
                                         "unreadable", tid, cache)
        jkt = cnf.get("jkt")
        x5t = cnf.get("x5t#S256")
        if x5t is not None and (cert is None or
                                not thumbprints_equal(x5t, cert)):
            self.metrics.cert_binding_failures.inc()
            return self._unbound(scheme, "the access token is bound to a "
                                         "client certificate this request "
                                         "did not present", tid, cache)
        if proof is None:
            if jkt is not None:
                self.metrics.dpop_failures["binding"].inc()
                return Reject(401, "invalid_token",
                              "the access token is DPoP-bound: send it "
                              "with the DPoP scheme and a proof",
                              token_id=tid, cache=cache,
                              dpop_algs=self.dpop.algs_text)
            return None
        if jkt is None:
            self.metrics.dpop_failures["binding"].inc()
            return self._unbound(scheme, "the access token is not "
                                         "DPoP-bound (no cnf.jkt)",
                                 tid, cache)
        if not thumbprints_equal(jkt, proof.jkt):
            return self._refuse_proof(ProofError(
                "binding", "the DPoP proof's key is not the one the "
                           "access token is bound to"), tid, cache)
        try:
            self.dpop.remember(proof)
        except ProofError as e:
            return self._refuse_proof(e, tid, cache)
        shared = self.dpop.shared
        if shared is None:
            return None
        d = shared.claim(proof.replay_key, self.dpop.replays.ttl)

        def claimed(new: bool):
            if new:
                return None
            return self._refuse_proof(ProofError(
                "replay", "the DPoP proof was used before"), tid, cache)

        def failed(f: Failure):
            if f.check(CancelledError):
                return f
            # Counted, not logged per request: the Redis client already
            # logs its outages, throttled.
            self.log.debug("DPoP replay check in Redis failed for "
                           "{token_id}: {error}", token_id=tid,
                           error=f.getErrorMessage())
            self.metrics.dpop_failures["unavailable"].inc()
            return Reject(503, "temporarily_unavailable",
                          "the DPoP replay check is unavailable",
                          retry_after=SHED_RETRY_AFTER, token_id=tid,
                          cache=cache)

        return d.addCallbacks(claimed, failed)

    def _unbound(self, scheme: str, why: str, tid: str,
                 cache: str) -> Reject:
        dpop = scheme == "DPoP"
        return Reject(401, "invalid_token", why, token_id=tid, cache=cache,
                      scheme=scheme,
                      dpop_algs=self.dpop.algs_text if dpop else None)
