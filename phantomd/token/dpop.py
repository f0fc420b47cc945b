"""DPoP proofs (RFC 9449 section 4.3): is this request signed by the key
the access token is bound to?

A DPoP-bound access token (``cnf.jkt`` in its claims) is only half a
credential: every request must also carry a ``DPoP`` header, a JWS the
client signs with its private key over the method, the URL and a hash of
the token.  ``ProofChecker.check`` does every check RFC 9449 section 4.3
lists except the last (the key is the one the token names), which needs the
token's claims: it returns the key's RFC 7638 thumbprint for the gate to
compare with ``cnf.jkt`` once the token is known to be active.  jwcrypto
does the cryptography; this module only decides what to ask it.

Replay: each proof's ``jti`` may be used once within the window in which
its ``iat`` is acceptable.  The gate calls ``ProofChecker.remember`` only
once the token was found active and bound to the proof's key, so clients
without a bound token cannot fill the replay cache.  With ``[shared_cache]``
the fleet's Redis remembers it too (``SharedReplays``), so a proof used on
one process or host is refused on every other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence
from urllib.parse import urlsplit

from jwcrypto import jwk as _jwk
from jwcrypto.common import JWException
from jwcrypto.jws import JWSCore

#: The asymmetric algorithms ``[dpop] algs`` may name (RFC 9449 section 3:
#: no MAC, no ``none``).
ASYMMETRIC_ALGS = frozenset((
    "ES256", "ES384", "ES512", "ES256K", "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512", "EdDSA"))
DEFAULT_ALGS = ("ES256", "RS256", "PS256", "EdDSA")

#: Seconds a client's clock may run ahead of (or its proof arrive later
#: than) ours; added to both ends of the ``iat`` window.
SKEW = 5

#: Longer ``DPoP`` header values are refused unread (an RSA-4096 proof is
#: under 2 KB).
MAX_PROOF_LENGTH = 8192
MAX_JTI_LENGTH = 256
#: Public keys kept parsed (with their thumbprints) between proofs.
MAX_CACHED_KEYS = 1024

#: The ``reason`` label of ``phantomd_dpop_failures_total``: a fixed set.
REASONS = ("missing", "multiple", "malformed", "typ", "alg", "key",
           "signature", "htm", "htu", "iat", "ath", "replay", "binding",
           "full", "unavailable")

_COMPACT = re.compile(rb"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*\Z")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ProofError(Exception):
    """The proof is refused; ``reason`` is one of ``REASONS``, the
    description is safe to show the client."""

    def __init__(self, reason: str, description: str) -> None:
        assert reason in REASONS, reason
        super().__init__(reason, description)
        self.reason = reason
        self.description = description


class ReplayCacheFull(ProofError):
    """The replay cache holds ``max_entries`` unexpired proofs."""

    def __init__(self) -> None:
        super().__init__("full", "too many DPoP proofs in the replay window")


@dataclass(frozen=True)
class Proof:
    """A proof that passed ``check``: the key's thumbprint, and what
    ``remember`` needs to refuse it the next time."""

    jkt: str
    replay_key: bytes


def parse_algs(text: str) -> tuple[str, ...]:
    """``[dpop] algs``: a whitespace-separated list of asymmetric JWS
    algorithms; ValueError naming a refused one (``none``, ``HS256``...)."""
    algs = tuple(text.split())
    if not algs:
        raise ValueError("lists no algorithm")
    for alg in algs:
        if alg not in ASYMMETRIC_ALGS:
            raise ValueError(
                "%r is not an asymmetric JWS algorithm (DPoP proofs are "
                "signed with a private key; one of %s)"
                % (alg, " ".join(sorted(ASYMMETRIC_ALGS))))
    return algs


def _b64decode(segment: bytes) -> bytes:
    """A base64url segment, refused (ValueError) unless canonical: the
    signature must be checked over exactly the bytes that were sent."""
    data = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=") != segment:
        raise ValueError("non-canonical base64url")
    return data


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def access_token_hash(token: str) -> str:
    """``ath``: base64url(SHA-256(the access token's ASCII))."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def _normalize_path(path: str) -> str:
    def fix(m: "re.Match[str]") -> str:
        c = chr(int(m.group(1), 16))
        return c if c in _UNRESERVED else "%" + m.group(1).upper()
    return _PERCENT.sub(fix, path) or "/"


def normalize_uri(uri: str) -> Optional[str]:
    """An http(s) URI as RFC 3986 section 6.2.2/6.2.3 normalises it
    (scheme and host lower-cased, default port dropped, percent-encodings
    upper-cased or decoded when unreserved, empty path ``/``), without
    query and fragment (RFC 9449 section 4.3 step 9); None for anything
    that is not an absolute http(s) URI with a host."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.username \
            or parts.password is not None:
        return None
    if ":" in host:
        host = "[" + host + "]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = "%s:%d" % (host, port)
    return "%s://%s%s" % (scheme, host, _normalize_path(parts.path))


def request_url(scheme: bytes, host: Optional[bytes],
                target: bytes) -> Optional[str]:
    """The URL a client used, from the scheme it reached us with, its
    ``Host`` and the request target (query dropped); None if unusable."""
    if not host:
        return None
    q = target.find(b"?")
    if q >= 0:
        target = target[:q]
    try:
        text = (scheme + b"://" + host + target).decode("ascii")
    except UnicodeDecodeError:
        return None
    return normalize_uri(text)


class ReplayCache:
    """The ``jti``s (per key) seen within the window, bounded.

    Each entry lives until ``clock.seconds() + ttl`` from when it was
    added, ``ttl`` being the same for all, so entries expire in insertion
    order and expired ones are dropped from the front.  At ``max_entries``
    unexpired entries a new one is refused (``ReplayCacheFull``): evicting
    an unexpired entry would let its proof be replayed, so the bound fails
    closed and new proofs are refused until old ones expire.
    """

    def __init__(self, clock: Any, ttl: float, max_entries: int) -> None:
        self.clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: "OrderedDict[bytes, float]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, expires = next(iter(entries.items()))
            if expires > now:
                return
            del entries[key]

    def seen(self, key: bytes) -> bool:
        now = self.clock.seconds()
        self._expire(now)
        return key in self._entries

    def add(self, key: bytes) -> bool:
        """Record ``key``; False if it was already there (a replay).
        Raises ``ReplayCacheFull`` at the bound."""
        now = self.clock.seconds()
        self._expire(now)
        if key in self._entries:
            return False
        if len(self._entries) >= self.max_entries:
            raise ReplayCacheFull()
        self._entries[key] = now + self.ttl
        return True


class SharedReplays:
    """The fleet's replay cache: one ``SET <prefix>d:<key> 1 NX PX <ttl>``
    per accepted proof on the shared tier's Redis connection
    (``redisconn.RedisClient``).  Redis expires the entries, so nothing
    here grows; Redis's own ``maxmemory`` policy is the bound (a
    ``volatile-*`` or ``allkeys-*`` eviction there forgets proofs early,
    so run it with ``noeviction``, which makes SET fail: refused, below).
    ``claim`` fires True for a proof not seen before, False for a replay,
    and fails when Redis does not answer: the gate then refuses the
    request (503) rather than accept a proof another process may have
    seen."""

    def __init__(self, client: Any, prefix: bytes) -> None:
        self.client = client
        self.prefix = prefix + b"d:"

    def claim(self, replay_key: bytes, ttl: float) -> Any:
        d = self.client.call(b"SET", self.prefix + replay_key.hex().encode(),
                             b"1", b"NX", b"PX", max(1, int(ttl * 1000)))
        return d.addCallback(lambda reply: reply is not None)


class ProofChecker:
    """Checks ``DPoP`` proofs on the clock passed in (the gate's)."""

    def __init__(self, clock: Any, algs: Iterable[str] = DEFAULT_ALGS,
                 max_age: float = 60, max_entries: int = 100000) -> None:
        self.clock = clock
        self.replays = ReplayCache(clock, 0, max_entries)
        self._keys: dict = {}
        #: ``SharedReplays`` when ``[shared_cache]`` is on (set by the app).
        self.shared: Optional[SharedReplays] = None
        self.reconfigure(algs=algs, max_age=max_age, max_entries=max_entries)

    def reconfigure(self, algs: Optional[Iterable[str]] = None,
                    max_age: Optional[float] = None,
                    max_entries: Optional[int] = None) -> None:
        """Apply a reload; the jtis already seen stay remembered."""
        if algs is not None:
            algs = tuple(algs)
            for alg in algs:
                if alg not in ASYMMETRIC_ALGS:
                    raise ValueError("%r is not an asymmetric algorithm"
                                     % alg)
            self.algs = algs
            self.algs_text = " ".join(algs)
        if max_age is not None:
            self.max_age = max_age
            # The longest a proof accepted now could still pass the iat
            # check: iat may be up to SKEW ahead, and stays acceptable
            # max_age + SKEW after it.
            self.replays.ttl = max_age + 2 * SKEW
        if max_entries is not None:
            self.replays.max_entries = max_entries

    def check(self, values: Sequence[bytes], method: bytes,
              url: Optional[str], token: str) -> Proof:
        """The proof in ``values`` (every ``DPoP`` header line) for a
        ``method`` request to ``url`` (as ``request_url`` gives it)
        carrying access token ``token``; raises ``ProofError``."""
        if not values:
            raise ProofError("missing", "a DPoP proof is required")
        if len(values) > 1:
            raise ProofError("multiple", "more than one DPoP header")
        raw = values[0].strip(b" \t")
        if len(raw) > MAX_PROOF_LENGTH or not _COMPACT.match(raw):
            raise ProofError("malformed", "the DPoP proof is not a compact "
                                          "JWS")
        h64, p64, s64 = raw.split(b".")
        try:
            protected = _b64decode(h64)
            body = _b64decode(p64)
            signature = _b64decode(s64)
            header = json.loads(protected)
        except ValueError:  # binascii.Error, UnicodeDecodeError, JSON
            raise ProofError("malformed", "the DPoP proof is not a JWS")
        if not isinstance(header, dict):
            raise ProofError("malformed", "the DPoP proof has no header")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "dpop+jwt":
            raise ProofError("typ", 'the DPoP proof\'s typ is not '
                                    '"dpop+jwt"')
        alg = header.get("alg")
        if alg not in self.algs:
            raise ProofError("alg", "the DPoP proof's alg is not one of %s"
                             % self.algs_text)
        if "crit" in header or "b64" in header:
            # RFC 7515 section 4.1.11: an extension we do not know must
            # fail; b64 (RFC 7797) would change what was signed.
            raise ProofError("malformed", "the DPoP proof has critical "
                                          "header parameters")
        key, jkt = self._key(header.get("jwk"))
        try:
            # jwcrypto's JWSCore over exactly the bytes received (the
            # segments were checked to be canonical base64url, which is what
            # JWSCore re-encodes): JWS() would deep-copy its header registry
            # per call, most of a proof's cost, for checks done here.
            JWSCore(alg, key, protected.decode("utf-8"), body,
                    list(self.algs)).verify(signature)
        except (JWException, ValueError, TypeError):
            raise ProofError("signature", "the DPoP proof's signature does "
                                          "not verify with its jwk")
        try:
            payload = json.loads(body)
        except ValueError:
            raise ProofError("malformed", "the DPoP proof's payload is not "
                                          "JSON")
        if not isinstance(payload, dict):
            raise ProofError("malformed", "the DPoP proof's payload is not "
                                          "a JSON object")
        htm = payload.get("htm")
        if not isinstance(htm, str) or \
                htm.encode("ascii", "replace") != method:
            raise ProofError("htm", "the DPoP proof's htm is not the "
                                    "request method")
        htu = payload.get("htu")
        if not isinstance(htu, str) or url is None or \
                normalize_uri(htu) != url:
            raise ProofError("htu", "the DPoP proof's htu is not the "
                                    "request URL")
        iat = payload.get("iat")
        now = self.clock.seconds()
        if isinstance(iat, bool) or not isinstance(iat, (int, float)) \
                or not math.isfinite(iat):
            # (json reads NaN, which no window comparison would refuse)
            raise ProofError("iat", "the DPoP proof has no numeric iat")
        if iat > now + SKEW or iat < now - self.max_age - SKEW:
            raise ProofError("iat", "the DPoP proof's iat is outside the "
                                    "accepted window")
        ath = payload.get("ath")
        if not isinstance(ath, str) or not hmac.compare_digest(
                ath.encode("ascii", "replace"),
                access_token_hash(token).encode("ascii")):
            raise ProofError("ath", "the DPoP proof's ath is not the hash "
                                    "of the access token")
        jti = payload.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise ProofError("malformed", "the DPoP proof has no usable jti")
        replay_key = hashlib.sha256(
            (jkt + "\0" + jti).encode("utf-8", "replace")).digest()[:20]
        if self.replays.seen(replay_key):
            raise ProofError("replay", "the DPoP proof was used before")
        return Proof(jkt=jkt, replay_key=replay_key)

    def _key(self, jwk: Any) -> tuple:
        """``(JWK, RFC 7638 thumbprint)`` of the header's public key, from
        a bounded cache keyed by its canonical JSON (a client signs many
        proofs with one key); at ``MAX_CACHED_KEYS`` it is emptied."""
        try:
            name = json.dumps(jwk, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):
            name = None
        cached = self._keys.get(name) if name is not None else None
        if cached is not None:
            return cached
        key = _public_key(jwk)
        cached = (key, key.thumbprint())
        if name is not None:
            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[name] = cached
        return cached

    def remember(self, proof: Proof) -> None:
        """Record a proof the request is being let through with; raises
        ``ProofError`` if it was recorded meanwhile (two requests racing
        with one proof) or ``ReplayCacheFull``."""
        if not self.replays.add(proof.replay_key):
            raise ProofError("replay", "the DPoP proof was used before")


def _public_key(jwk: Any) -> _jwk.JWK:
    if not isinstance(jwk, dict):
        raise ProofError("key", "the DPoP proof's header has no jwk")
    if jwk.get("kty") not in ("EC", "RSA", "OKP"):
        raise ProofError("key", "the DPoP proof's jwk is not an asymmetric "
                                "public key")
    try:
        key = _jwk.JWK(**jwk)
    except (JWException, ValueError, TypeError):
        raise ProofError("key", "the DPoP proof's jwk is not a valid key")
    if key.has_private or any(k in jwk for k in ("d", "p", "q", "dp", "dq",
                                                   "qi", "oth", "k")):
        raise ProofError("key", "the DPoP proof's jwk has private key "
                                "material")
    return key


def thumbprints_equal(a: Any, b: str) -> bool:
    """``cnf.jkt`` (or ``x5t#S256``) against what was presented."""
    return isinstance(a, str) and hmac.compare_digest(
        a.encode("ascii", "replace"), b.encode("ascii"))
