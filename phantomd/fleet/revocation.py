"""Revocation: ``POST /revoke`` drops a token, or every token of a subject,
from this process's cache, from Redis, and (through Redis pub/sub) from every
other process of the fleet.

``Revoker.wrap(introspector)`` sits between the coalescer and the shared
tier, so it sees every answer before the local cache stores it; it keeps the
subject → cache keys index a ``sub=`` revocation needs, and refuses an
answer whose introspection started before its token or its subject was
revoked (it introspects once more instead).  Revocation times only move
forward, so a replayed older message cannot lower one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from phantomd.fleet.sharedcache import subject_of
from phantomd.token.tokens import b64token, token_id, token_key

__all__ = ["Revoker", "RevokeResource"]

log = Logger()

#: Subjects whose revocation time is remembered (to refuse answers
#: introspected before it); past this the oldest are forgotten.
MAX_REVOKED_SUBJECTS = 10000
#: Tokens (cache keys) whose revocation time is remembered, for the same
#: reason; past this the oldest are forgotten.
MAX_REVOKED_TOKENS = 10000
MAX_BODY = 8192


class _Recording:
    def __init__(self, revoker: "Revoker", inner: Any) -> None:
        self._revoker = revoker
        self.inner = inner

    def introspect(self, token: str) -> defer.Deferred:
        return defer.ensureDeferred(self._revoker._introspect(token,
                                                              self.inner))

    @property
    def last_success(self):
        return getattr(self.inner, "last_success", None)


class Revoker:
    """Revocation for one process.

    The index maps cache keys to subject digests and back; it holds at most
    ``max_entries`` keys (the local cache's bound).  At the bound the oldest
    key is dropped from the index *and from the cache*, so no cached answer
    is ever out of a ``sub=`` revocation's reach.  ``shared`` (a
    ``SharedTier`` or None) carries revocations to Redis and the fleet.
    """

    def __init__(self, clock: Any, cache: Any, metrics: Any,
                 max_entries: int, shared: Any = None) -> None:
        self.clock = clock
        self.cache = cache
        self.metrics = metrics
        self.max_entries = max_entries
        self.shared = shared
        #: Without Redis, in the parent of workers: ``peers(event)`` tells
        #: every worker (phantomd.fleet.workerrevoke) and fires True when all
        #: confirmed.  None elsewhere.
        self.peers: Optional[Callable[[dict], defer.Deferred]] = None
        #: ``listener(key, digest)`` for every revocation applied here: a
        #: token's cache key (digest None) or a subject's digest (key
        #: None).  The front closes the WebSocket tunnels they opened.
        self.listeners: list[Callable[[Optional[bytes], Optional[str]],
                                      Any]] = []
        self._subject_of_key: OrderedDict[bytes, str] = OrderedDict()
        self._keys_of_subject: dict[str, set] = {}
        self._revoked: OrderedDict[str, float] = OrderedDict()
        self._revoked_tokens: OrderedDict[bytes, float] = OrderedDict()
        if shared is not None:
            shared.revoked_after = self._revoked.get
            shared.token_revoked_after = self._revoked_tokens.get
            shared.on_event = self._event

    def wrap(self, introspector: Any) -> _Recording:
        return _Recording(self, introspector)

    def digest(self, subject: str) -> str:
        if self.shared is not None:
            return self.shared.keys.subject_digest(subject)
        return hashlib.sha256(subject.encode("utf-8")).hexdigest()

    async def _introspect(self, token: str, inner: Any):
        for attempt in (1, 2):
            start = self.clock.seconds()
            result = await inner.introspect(token)
            key = token_key(token)
            revoked = self._revoked_tokens.get(key)
            if revoked is not None and revoked >= start and attempt == 1:
                continue  # asked before the token was revoked
            sub = subject_of(result)
            if sub is None:
                return result
            digest = self.digest(sub)
            revoked = self._revoked.get(digest)
            if revoked is None or revoked < start or attempt == 2:
                self._index(key, digest)
                return result
        return result  # not reached

    def _index(self, key: bytes, digest: str) -> None:
        old = self._subject_of_key.pop(key, None)
        if old is not None and old != digest:
            self._unindex_key(key, old)
        self._subject_of_key[key] = digest
        self._keys_of_subject.setdefault(digest, set()).add(key)
        while len(self._subject_of_key) > self.max_entries:
            evicted, d = self._subject_of_key.popitem(last=False)
            self._unindex_key(evicted, d)
            self.cache.discard(evicted)

    def _unindex_key(self, key: bytes, digest: str) -> None:
        keys = self._keys_of_subject.get(digest)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_of_subject[digest]

    # -- applying a revocation locally ------------------------------------------

    @staticmethod
    def _remember(times: OrderedDict, name: Any, at: float,
                  bound: int) -> None:
        # The latest revocation wins: a replayed older message (Redis
        # writers can publish what they saw) must not move it back.
        previous = times.pop(name, None)
        times[name] = at if previous is None else max(previous, at)
        while len(times) > bound:
            times.popitem(last=False)

    def drop_key(self, key: bytes, at: Optional[float] = None) -> None:
        self._remember(self._revoked_tokens, key,
                       self.clock.seconds() if at is None else at,
                       MAX_REVOKED_TOKENS)
        self.cache.discard(key)
        digest = self._subject_of_key.pop(key, None)
        if digest is not None:
            self._unindex_key(key, digest)
        self.metrics.revocations["token"].inc()
        self._tell(key, None)

    def drop_subject(self, digest: str, at: float) -> int:
        self._remember(self._revoked, digest, at, MAX_REVOKED_SUBJECTS)
        keys = self._keys_of_subject.pop(digest, set())
        for key in keys:
            self._subject_of_key.pop(key, None)
            self.cache.discard(key)
        self.metrics.revocations["sub"].inc()
        self._tell(None, digest)
        return len(keys)

    def _tell(self, key: Optional[bytes], digest: Optional[str]) -> None:
        for listener in self.listeners:
            try:
                listener(key, digest)
            except Exception:
                # The cache is already clean; a listener's fault must not
                # undo or stop the revocation.
                log.failure("a revocation listener failed")

    def _event(self, event: dict) -> None:
        kind = event.get("t")
        if kind == "token" and isinstance(event.get("k"), str):
            try:
                key = bytes.fromhex(event["k"])
            except ValueError:
                return
            # Another host's clock: what is in flight here when the
            # message arrives started before the revocation too (sub=
            # below likewise).
            at = event.get("at")
            self.drop_key(key, max(float(at), self.clock.seconds())
                          if isinstance(at, (int, float)) else None)
        elif kind == "sub" and isinstance(event.get("s"), str) and \
                isinstance(event.get("at"), (int, float)):
            self.drop_subject(event["s"], max(float(event["at"]),
                                              self.clock.seconds()))

    def missed_events(self) -> None:
        """The pub/sub connection was down: revocations may have been
        missed, so forget every cached answer (they are re-read from Redis
        or introspected again)."""
        self.cache.clear()
        self._subject_of_key.clear()
        self._keys_of_subject.clear()

    # -- the calls from /revoke ---------------------------------------------------

    def revoke_token(self, token: str) -> defer.Deferred:
        """Fires with True when Redis and the fleet were told, False when
        only this process could be (Redis unreachable)."""
        at = self.clock.seconds()
        self.drop_key(token_key(token), at)
        log.info("revoked token {token_id}", token_id=token_id(
            token_key(token)))
        if self.shared is None:
            return self._tell_peers({"t": "token",
                                     "k": token_key(token).hex(), "at": at})
        return self._shared(self.shared.revoke_token(token, at))

    def revoke_subject(self, subject: str) -> defer.Deferred:
        digest = self.digest(subject)
        at = self.clock.seconds()
        n = self.drop_subject(digest, at)
        log.info("revoked subject {subject_id} ({n} cached here)",
                 subject_id=digest[:12], n=n)
        if self.shared is None:
            return self._tell_peers({"t": "sub", "s": digest, "at": at})
        return self._shared(self.shared.revoke_subject(digest, at))

    def _tell_peers(self, event: dict) -> defer.Deferred:
        if self.peers is None:
            return defer.succeed(False)
        return self.peers(event)

    @property
    def fans_out(self) -> bool:
        """Whether other processes must confirm (Redis or workers)."""
        return self.shared is not None or self.peers is not None

    def _shared(self, d: defer.Deferred) -> defer.Deferred:
        def failed(f):
            self.shared._error(f.value)
            log.warn("revocation could not reach Redis ({error}); applied "
                     "to this process only", error=type(f.value).__name__)
            return False
        return d.addCallbacks(lambda _: True, failed)


class RevokeResource(resource.Resource):
    """``POST /revoke`` with ``Authorization: Bearer <token_file content>``
    and a form body ``token=<opaque>`` or ``sub=<subject>``."""

    isLeaf = True

    def __init__(self, revoker: Revoker, bearer: Callable[[], bytes]) -> None:
        super().__init__()
        self._revoker = revoker
        self._bearer = bearer

    def render(self, request: server.Request):
        if request.method != b"POST":
            request.setHeader(b"Allow", b"POST")
            return _json(request, 405, {"error": "method_not_allowed"})
        given = request.getHeader(b"authorization") or b""
        scheme, _, credential = given.partition(b" ")
        if not given or scheme.lower() != b"bearer":
            request.setHeader(b"WWW-Authenticate",
                              b'Bearer realm="phantomd-revocation"')
            return _json(request, 401, {"error": "unauthorized"})
        if not hmac.compare_digest(
                credential.strip(), self._bearer()):
            request.setHeader(
                b"WWW-Authenticate",
                b'Bearer realm="phantomd-revocation", error="invalid_token"')
            return _json(request, 401, {"error": "invalid_token"})
        body = request.content.read(MAX_BODY + 1) if request.content else b""
        if len(body) > MAX_BODY:
            return _json(request, 413, {"error": "invalid_request",
                                        "error_description": "body too large"})
        from urllib.parse import parse_qs
        try:
            form = parse_qs(body.decode("ascii"), strict_parsing=False,
                            max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            form = {}
        tokens, subs = form.get("token", []), form.get("sub", [])
        if len(tokens) + len(subs) != 1 or not (tokens or subs)[0]:
            return _json(request, 400, {
                "error": "invalid_request",
                "error_description": "give exactly one of token= or sub="})
        # RFC 6750's b64token: what the gate accepts, hence all it caches.
        if tokens and not b64token(tokens[0].encode("utf-8")):
            # No bearer token looks like this, so it is not cached: most
            # likely a "+" sent unencoded, which a form reads as a space.
            return _json(request, 400, {
                "error": "invalid_request",
                "error_description": "token= is not a bearer token (send "
                                     "it form-encoded: '+' as %2B)"})
        if tokens:
            d = self._revoker.revoke_token(tokens[0])
            kind = "token"
        else:
            d = self._revoker.revoke_subject(subs[0])
            kind = "sub"

        shared = self._revoker.fans_out
        why = ("revoked in this process only: Redis did not answer"
               if self._revoker.shared is not None else
               "not confirmed by every worker: try again")

        def answered(fleet: bool) -> None:
            if request._disconnected:
                return
            if shared and not fleet:
                # Applied here only: the caller should try again.
                request.setHeader(b"Retry-After", b"1")
                body = _json(request, 503, {
                    "error": "temporarily_unavailable",
                    "error_description": why})
            else:
                body = _json(request, 200, {"revoked": kind})
            request.write(body)
            request.finish()
        def failed(failure) -> None:
            log.failure("revocation failed", failure)
            if request._disconnected or request.finished:
                return
            # Never a caller left hanging: it may not have been applied.
            request.write(_json(request, 500, {
                "error": "server_error",
                "error_description": "the revocation failed; try again"}))
            request.finish()
        d.addCallback(answered).addErrback(failed)
        return server.NOT_DONE_YET


def _json(request: server.Request, status: int, doc: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(doc).encode("ascii")
