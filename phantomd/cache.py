"""The token cache: introspection answers kept by token digest, with TTLs.

Entries expire by the injected clock and are evicted least recently used at
``max_entries``, so a flood of random tokens cannot grow memory past the
bound.  Failures are never given to the cache (the gate only stores
``Active`` and ``Inactive`` answers).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

from phantomd.outcomes import Active, Inactive

__all__ = ["TokenCache"]

Result = Union[Active, Inactive]


class TokenCache:
    """Introspection results by key (a SHA-256 digest of the token).

    At ``max_entries`` a ``put`` evicts the least recently used entry (a
    ``get`` hit counts as use).  An entry is gone from the instant
    put-time + TTL: a ``get`` at exactly that clock value misses.

    Each entry is one tuple in an ``OrderedDict``: ``(expiry,)`` for an
    inactive token, ``(expiry, jwt)`` when the claims are exactly the JWT's
    own payload, else ``(expiry, jwt, claims)``.  That keeps an entry to
    about 250-300 bytes beyond its JWT instead of twice the JWT's size; the
    price is decoding the payload again on a hit (~15 us for a 1 KB JWT),
    so the decoded claims of the ``claims_memo`` most recently hit JWTs are
    kept (least recently used dropped beyond that) and hot tokens are not
    decoded on every request.

    A value returned by ``get`` carries as ``lifetime`` the seconds it has
    left in the cache, not the lifetime it was stored with.
    """

    def __init__(self, clock: Any, metrics: Any, max_entries: int,
                 max_ttl: float, default_ttl: float, negative_ttl: float,
                 *, claims_memo: int = 4096) -> None:
        self._clock = clock
        self._metrics = metrics
        self._entries: OrderedDict[bytes, tuple] = OrderedDict()
        self._memo: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        if claims_memo < 0:
            raise ValueError("claims_memo must be >= 0, not %r" % claims_memo)
        self._memo_size = claims_memo
        self._set_limits(max_entries, max_ttl, default_ttl, negative_ttl)
        self._update_gauge()

    def _set_limits(self, max_entries: int, max_ttl: float,
                    default_ttl: float, negative_ttl: float) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError("max_entries must be a whole number >= 1, not %r"
                             % (max_entries,))
        for name, value in (("max_ttl", max_ttl), ("default_ttl", default_ttl),
                            ("negative_ttl", negative_ttl)):
            if not (isinstance(value, (int, float)) and value >= 0
                    and math.isfinite(value)):
                raise ValueError("%s must be a finite number >= 0, not %r"
                                 % (name, value))
        self.max_entries = max_entries
        self.max_ttl = float(max_ttl)
        self.default_ttl = float(default_ttl)
        self.negative_ttl = float(negative_ttl)

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
        claims = entry[2] if len(entry) == 3 else self._decoded(jwt)
        return Active(jwt=jwt, claims=claims, lifetime=expiry - now)

    def put(self, key: bytes, result: Result) -> None:
        """Store ``result`` for as long as DESIGN section 4 allows.

        Active: its lifetime (None: ``default_ttl``), capped by the token's
        ``exp`` claim and by ``max_ttl``; an ``exp`` that is present but not
        a number means "do not store", since we cannot tell when it ends.
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
        elif _payload(result.jwt) == result.claims:
            entry = (now + ttl, result.jwt)
        else:
            entry = (now + ttl, result.jwt, result.claims)
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        self._update_gauge()

    def reconfigure(self, max_entries: int, max_ttl: float,
                    default_ttl: float, negative_ttl: float) -> None:
        """Apply new limits on reload, keeping what is still valid.

        No entry outlives the reload by more than the new cap for its kind
        (the put time is not stored, so the cap counts from now); entries
        the new caps leave no time are dropped, then the least recently used
        are evicted down to the new ``max_entries``.  ``default_ttl`` only
        affects later puts.
        """
        old_max_ttl, old_negative_ttl = self.max_ttl, self.negative_ttl
        self._set_limits(max_entries, max_ttl, default_ttl, negative_ttl)
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
        ttl = min(lifetime, self.max_ttl)
        if "exp" in result.claims:
            exp = result.claims["exp"]
            if isinstance(exp, bool) or not isinstance(exp, (int, float)) \
                    or not math.isfinite(exp):
                return 0.0
            ttl = min(ttl, exp - now)
        return ttl

    def _decoded(self, jwt: str) -> Mapping[str, Any]:
        memo = self._memo
        claims = memo.get(jwt)
        if claims is not None:
            memo.move_to_end(jwt)
            return claims
        claims = _payload(jwt)
        if claims is None:  # cannot happen: put checked it decodes
            claims = {}
        if self._memo_size:
            memo[jwt] = claims
            if len(memo) > self._memo_size:
                memo.popitem(last=False)
        return claims

    def _update_gauge(self) -> None:
        self._metrics.cache_entries.set(len(self._entries))


def _payload(jwt: str) -> Optional[dict]:
    """The JSON payload of a compact JWS, or None if it is not one."""
    parts = jwt.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        claims = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None
