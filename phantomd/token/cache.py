"""The token cache: introspection answers kept by token digest, with TTLs.

Entries expire by the injected clock and are evicted least recently used at
``max_entries``, so a flood of random tokens cannot grow memory past the
bound.  Failures are never given to the cache (the gate only stores
``Active`` and ``Inactive`` answers).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

from phantomd.token import jose
from phantomd.token.outcomes import Active, Inactive

__all__ = ["TokenCache"]

Result = Union[Active, Inactive]

#: Distinct scope strings shared between entries (tokens mostly carry a
#: handful of scope sets); beyond this many, entries keep their own copy.
MAX_SHARED_SCOPES = 4096


class TokenCache:
    """Introspection results by key (a SHA-256 digest of the token).

    At ``max_entries`` a ``put`` evicts the least recently used entry (a
    ``get`` hit counts as use).  An entry is gone from the instant
    put-time + TTL: a ``get`` at exactly that clock value misses.

    Each entry is one tuple in an ``OrderedDict``: ``(expiry,)`` for an
    inactive token, ``(expiry, jwt, scope)`` for an active one
    (plus its ``cnf`` for a sender-constrained one).  Only what
    the gate decides on is kept beside the JWT: its scopes, as one
    space-separated string shared between entries through a bounded table
    of distinct scope strings.  Its ``exp`` need not be kept, since an entry
    never outlives it.  So an entry costs its JWT plus a small tuple, and a
    hit decodes nothing it does not need: a hit's ``claims`` are a
    ``CachedClaims``, which answers the gate (scopes, ``cnf``) from the
    entry and decodes the JWT's payload only when something else is asked
    for (a route's ``claim_headers``, a tunnel's ``exp`` and ``sub``).

    A value returned by ``get`` carries as ``lifetime`` the seconds it has
    left in the cache, not the lifetime it was stored with.
    """

    def __init__(self, clock: Any, metrics: Any, max_entries: int,
                 max_ttl: float, default_ttl: float, negative_ttl: float,
                 min_ttl: float = 0) -> None:
        self._clock = clock
        self._metrics = metrics
        self._entries: OrderedDict[bytes, tuple] = OrderedDict()
        self._scopes: dict[str, str] = {}
        self._set_limits(max_entries, max_ttl, default_ttl, negative_ttl,
                         min_ttl)
        self._update_gauge()

    def _set_limits(self, max_entries: int, max_ttl: float,
                    default_ttl: float, negative_ttl: float,
                    min_ttl: float) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError("max_entries must be a whole number >= 1, not %r"
                             % (max_entries,))
        for name, value in (("max_ttl", max_ttl), ("default_ttl", default_ttl),
                            ("negative_ttl", negative_ttl),
                            ("min_ttl", min_ttl)):
            if not (isinstance(value, (int, float)) and value >= 0
                    and math.isfinite(value)):
                raise ValueError("%s must be a finite number >= 0, not %r"
                                 % (name, value))
        self.max_entries = max_entries
        self.max_ttl = float(max_ttl)
        self.default_ttl = float(default_ttl)
        self.negative_ttl = float(negative_ttl)
        self.min_ttl = float(min_ttl)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Optional[Result]:
        """The stored answer, or None when absent or expired (an expired
        entry is removed)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expiry = entry[0]
        now = self._clock.seconds()
        if now >= expiry:
            del self._entries[key]
            self._update_gauge()
            return None
        self._entries.move_to_end(key)
        if len(entry) == 1:
            return Inactive(lifetime=expiry - now)
        jwt = entry[1]
        claims = CachedClaims(jwt, entry[2],
                              entry[3] if len(entry) == 4 else None)
        return Active(jwt, claims, expiry - now)

    def put(self, key: bytes, result: Result) -> None:
        """Store ``result`` for as long as DESIGN section 4 allows.

        Active: its lifetime (None: ``default_ttl``), raised to ``min_ttl``
        when the answer is ``floorable`` (marked no-store/no-cache or
        silent), then capped by the token's ``exp`` claim and by
        ``max_ttl``; an ``exp`` that is present but not a number means "do
        not store", since we cannot tell when it ends.
        Inactive: its lifetime (None: ``default_ttl``) capped by
        ``negative_ttl``.  A TTL <= 0 stores nothing and drops any older
        entry for the key, which the new answer supersedes.
        """
        now = self._clock.seconds()
        ttl = self._ttl(result, now)
        if not ttl > 0:
            if self._entries.pop(key, None) is not None:
                self._update_gauge()
            return
        entry: tuple
        if isinstance(result, Inactive):
            entry = (now + ttl,)
        else:
            entry = (now + ttl, result.jwt,
                     self._shared(scope_text(result.claims)))
            cnf = result.claims.get("cnf")
            if cnf is not None:
                # The key or certificate the token is bound to: checked on
                # every hit (DESIGN section 12), so kept with the JWT.
                entry += (cnf,)
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        self._update_gauge()

    def discard(self, key: bytes) -> bool:
        """Forget one answer (a revocation); True if there was one."""
        if self._entries.pop(key, None) is None:
            return False
        self._update_gauge()
        return True

    def ttl(self, result: Result) -> float:
        """Seconds ``put`` would keep ``result`` now (<= 0: not at all);
        the shared tier gives Redis entries the same lifetime."""
        return self._ttl(result, self._clock.seconds())

    def clear(self) -> None:
        """Forget every answer (a reload changed what they mean)."""
        self._entries.clear()
        self._update_gauge()

    def reconfigure(self, max_entries: int, max_ttl: float,
                    default_ttl: float, negative_ttl: float,
                    min_ttl: float = 0) -> None:
        """Apply new limits on reload, keeping what is still valid.

        No entry outlives the reload by more than the new cap for its kind
        (the put time is not stored, so the cap counts from now); entries
        the new caps leave no time are dropped, then the least recently used
        are evicted down to the new ``max_entries``.  ``default_ttl`` only
        affects later puts.  Lowering ``min_ttl`` drops every active entry:
        an operator lowers it to see revocations sooner, and the cache does
        not record which entries only the old floor kept.
        """
        old_max_ttl, old_negative_ttl = self.max_ttl, self.negative_ttl
        old_min_ttl = self.min_ttl
        self._set_limits(max_entries, max_ttl, default_ttl, negative_ttl,
                         min_ttl)
        if self.min_ttl < old_min_ttl:
            for k in [k for k, e in self._entries.items() if len(e) > 1]:
                del self._entries[k]
        shrinking = (self.max_ttl < old_max_ttl
                     or self.negative_ttl < old_negative_ttl)
        entries = self._entries
        if shrinking:
            now = self._clock.seconds()
            active_until = now + self.max_ttl
            inactive_until = now + self.negative_ttl
            changed = []
            for key, entry in entries.items():
                until = inactive_until if len(entry) == 1 else active_until
                if entry[0] > until:
                    changed.append((key, (until,) + entry[1:]))
            for key, entry in changed:
                if entry[0] > now:
                    entries[key] = entry
                else:
                    del entries[key]
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        self._update_gauge()

    def _ttl(self, result: Result, now: float) -> float:
        lifetime = result.lifetime
        if lifetime is None:
            lifetime = self.default_ttl
        if isinstance(result, Inactive):
            return min(lifetime, self.negative_ttl)
        if result.floorable:
            lifetime = max(lifetime, self.min_ttl)
        ttl = min(lifetime, self.max_ttl)
        if "exp" in result.claims:
            exp = result.claims["exp"]
            if isinstance(exp, bool) or not isinstance(exp, (int, float)) \
                    or not math.isfinite(exp):
                return 0.0
            ttl = min(ttl, exp - now)
        return ttl

    def _shared(self, scope: Optional[str]) -> Optional[str]:
        """One string object per distinct scope set.  The table holds at
        most ``MAX_SHARED_SCOPES`` strings; past that, new ones are simply
        not shared."""
        if scope is None:
            return None
        shared = self._scopes.get(scope)
        if shared is not None:
            return shared
        if len(self._scopes) < MAX_SHARED_SCOPES:
            self._scopes[scope] = scope
        return scope

    def _update_gauge(self) -> None:
        self._metrics.cache_entries.set(len(self._entries))


class CachedClaims(Mapping):
    """A cache hit's claims: what the JWT it forwards says, as on the miss
    that stored it (every ``Active``'s claims are its JWT's payload).

    ``scope`` (``scope_text`` of the claims) and ``cnf`` are the entry's
    own, for the gate's checks on every hit; looking up any claim decodes
    the JWT's payload, once per hit that needs it: a route's
    ``claim_headers``, a WebSocket tunnel's ``exp`` and ``sub``."""

    __slots__ = ("jwt", "scope", "cnf", "_payload")

    def __init__(self, jwt: str, scope: Optional[str], cnf: Any) -> None:
        self.jwt = jwt
        self.scope = scope
        self.cnf = cnf
        self._payload: Optional[dict] = None

    def _all(self) -> dict:
        payload = self._payload
        if payload is None:
            payload = self._payload = jose.payload_of(self.jwt)
        return payload

    def __getitem__(self, name: str) -> Any:
        return self._all()[name]

    def __iter__(self) -> Any:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def scope_text(claims: Mapping[str, Any]) -> Optional[str]:
    """The granted scopes as one space-separated string, from ``scope``
    (RFC 9068: a string; some servers send a list) or ``scp``."""
    if type(claims) is CachedClaims:
        return claims.scope
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return " ".join(v for v in value if isinstance(v, str))
    return None
