"""JOSE for phantomd: reading, minting and verifying JWTs with jwcrypto.

Four jobs, one module, because they share the same parsing and the same
rule about which key may sign with which algorithm:

* ``unverified_claims``: the payload of a JWT the token service handed us
  over an authenticated TLS connection (``response = jwt``), checked for
  shape and expiry only.
* ``Minter``: signs RFC 9068 access tokens from a plain RFC 7662 answer
  (``response = json`` / ``token-introspection+jwt``) and publishes the
  public keys.
* ``IntrospectionResponseVerifier``, ``JWTVerifier``: the signed answers of
  RFC 9701 and the token service's JWTs, checked against the keys of a
  ``phantomd.token.keysource.KeySource`` (which fetches them).
* ``client_assertion``: RFC 7523 ``private_key_jwt`` client authentication.

Every failure is a ``JOSEError`` whose message says what is wrong, never
what the token or key is; callers answer 502 (a broken answer from the token
service) and nothing is cached.
"""

from __future__ import annotations

import binascii
import json
import math
import secrets
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from jwcrypto import jwk as _jwk
from jwcrypto import jws as _jws
from jwcrypto.common import JWException
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger


log = Logger()


class JOSEError(Exception):
    """A JWT, JWS or JWKS that phantomd must not accept; ``str()`` says why."""


# -- algorithms and the key types that go with them ---------------------------

#: alg -> (kty, curve or None).  A key may only verify or sign with an alg of
#: its own family, so an RSA public key can never be used as an HMAC secret
#: (the classic key-confusion attack) and HS*/none are simply absent.
_ALG_FAMILY: dict[str, tuple[str, Optional[frozenset[str]]]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}

DEFAULT_ALGS: tuple[str, ...] = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA")

_DEFAULT_SIGNING_ALG = {("RSA", None): "RS256", ("EC", "P-256"): "ES256",
                        ("EC", "P-384"): "ES384", ("EC", "P-521"): "ES512",
                        ("OKP", "Ed25519"): "EdDSA", ("OKP", "Ed448"): "EdDSA"}


def _check_allowed_algs(allowed_algs: Iterable[str]) -> frozenset[str]:
    algs = frozenset(allowed_algs)
    bad = sorted(a for a in algs if a not in _ALG_FAMILY)
    if bad:
        raise ValueError("unsupported or unsafe JWS algorithm(s) %s; "
                         "choose from %s" % (", ".join(bad),
                                             ", ".join(DEFAULT_ALGS)))
    if not algs:
        raise ValueError("at least one JWS algorithm must be allowed")
    return algs


def _key_fits(key: _jwk.JWK, alg: str) -> Optional[str]:
    """Why ``key`` must not be used with ``alg``, or None if it may."""
    family = _ALG_FAMILY.get(alg)
    if family is None:
        return "algorithm %r is not supported" % alg
    kty, curves = family
    if key.get("kty") != kty:
        return "key type %r cannot be used with %s" % (key.get("kty"), alg)
    if curves is not None and key.get("crv") not in curves:
        return "curve %r cannot be used with %s" % (key.get("crv"), alg)
    if key.get("alg") not in (None, alg):
        return "key is for %r, not %s" % (key.get("alg"), alg)
    if key.get("use") not in (None, "sig"):
        return "key is for use %r, not signing" % key.get("use")
    return None


# -- compact serialization ----------------------------------------------------

#: base64url to base64 for ``binascii``'s strict decoder, and base64's own
#: ``+``, ``/`` and ``=`` (never in base64url: JWS segments are unpadded) to
#: a byte outside both alphabets, so that the decoder refuses them.
_TO_BASE64 = bytes.maketrans(b"-_+/=", b"+/***")
#: The padding a segment of each length modulo 4 needs (1 is never valid).
_PADDING = (b"", None, b"==", b"=")
_B64URL_ALPHABET = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                    b"0123456789-_")


def _b64decode(part: str, what: str) -> bytes:
    """A base64url segment's bytes, checked and decoded in one C pass: on
    a miss this runs on every token, and a regex pass before base64's own
    decoder cost 0.4 us of the 1.5."""
    if not part.isascii():
        raise JOSEError("%s is not base64url" % what)
    raw = part.encode("ascii")
    padding = _PADDING[len(raw) % 4]
    if padding is None:
        raise JOSEError("%s is not base64url" % what)
    try:
        return binascii.a2b_base64(raw.translate(_TO_BASE64) + padding,
                                   strict_mode=True)
    except (binascii.Error, ValueError):
        raise JOSEError("%s is not base64url" % what)


def _is_b64url(part: str) -> bool:
    """``part`` could be a base64url segment (alphabet and length)."""
    return (part.isascii() and len(part) % 4 != 1
            and not part.encode("ascii").translate(None, _B64URL_ALPHABET))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise JOSEError("member %r appears twice" % k)
            seen.add(k)
    return out


def _refuse_constant(name: str) -> Any:
    raise JOSEError("%s is not valid JSON" % name)


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicates,
                                parse_constant=_refuse_constant)
"""Built once: ``json.loads`` with hooks builds a new decoder per call."""


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """Strict JSON: UTF-8, an object, no duplicate members (two parsers
    must never disagree about a claim), no NaN/Infinity."""
    try:
        value = _STRICT_JSON.decode(data.decode("utf-8"))
    except JOSEError as e:
        raise JOSEError("%s: %s" % (what, e))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JOSEError("%s is not JSON" % what)
    if not isinstance(value, dict):
        raise JOSEError("%s is not a JSON object" % what)
    return value


_HEADERS: dict[str, Mapping[str, Any]] = {}
"""Checked JWS headers by their encoded form: a token service signs every
token with the same few, so a miss need not decode them again.  Read-only
views; at ``_MAX_HEADERS`` the map is emptied and refilled."""

_MAX_HEADERS = 64


def _header(part: str) -> Mapping[str, Any]:
    header = _HEADERS.get(part)
    if header is not None:
        return header
    header = _json_object(_b64decode(part, "JWT header"), "JWT header")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise JOSEError("JWT header has no alg")
    if alg.lower() == "none":
        raise JOSEError("JWT is unsigned (alg none)")
    if "crit" in header:
        raise JOSEError("JWT header has critical extensions phantomd does "
                        "not understand")
    if len(_HEADERS) >= _MAX_HEADERS:
        _HEADERS.clear()
    view = _HEADERS[part] = MappingProxyType(header)
    return view


def _split(token: Union[str, bytes]
           ) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """Header and payload of a compact JWS, checked for shape only."""
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise JOSEError("JWT is not ASCII")
    if not isinstance(token, str):
        raise JOSEError("JWT is not a string")
    token = token.strip()
    parts = token.split(".")
    if len(parts) != 3:
        raise JOSEError("JWT does not have three parts (%d found)"
                        % len(parts))
    header = _header(parts[0])
    payload = _json_object(_b64decode(parts[1], "JWT payload"),
                           "JWT payload")
    # The signature is only shape-checked here: decoding it would add
    # nothing, since a base64url string of a valid length always decodes.
    signature = parts[2]
    if not signature:
        raise JOSEError("JWT has an empty signature")
    if not _is_b64url(signature):
        raise JOSEError("JWT signature is not base64url")
    return header, payload


def _numeric(claims: Mapping[str, Any], name: str) -> Optional[float]:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise JOSEError("claim %s is not a number" % name)
    return float(value)


def _check_times(claims: Mapping[str, Any], now: float, leeway: float,
                 require_exp: bool = True) -> None:
    exp = _numeric(claims, "exp")
    if exp is None:
        if require_exp:
            raise JOSEError("JWT has no exp claim")
    elif exp <= now:
        raise JOSEError("expired")
    nbf = _numeric(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise JOSEError("not valid yet (nbf in the future)")
    iat = _numeric(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise JOSEError("issued in the future (iat)")


def unverified_claims(jwt: str, now: float, leeway: float = 30
                      ) -> dict[str, Any]:
    """The payload of ``jwt`` without checking its signature.

    For JWTs the token service handed us itself over TLS: the channel is the
    authentication.  Still refuses anything that is not a signed compact JWS
    with an object payload, an ``exp`` in the future (``JOSEError("expired")``
    otherwise, no leeway: an expired token is never forwarded), and no
    ``nbf``/``iat`` further than ``leeway`` seconds in the future.
    """
    _, payload = _split(jwt)
    _check_times(payload, now, leeway)
    return payload


def payload_of(jwt: str) -> dict[str, Any]:
    """The payload of a JWT phantomd already accepted (a cached one), with
    no check beyond its shape: its times and signature were checked when
    it came."""
    return _split(jwt)[1]


def _sign(key: _jwk.JWK, alg: str, header: Mapping[str, Any],
          claims: Mapping[str, Any]) -> str:
    payload = json.dumps(claims, separators=(",", ":"), sort_keys=True)
    token = _jws.JWS(payload.encode("utf-8"))
    token.add_signature(key, alg=alg, protected=json.dumps(
        dict(header, alg=alg), separators=(",", ":"), sort_keys=True))
    return token.serialize(compact=True)


def _verify_signature(token: str, key: _jwk.JWK, alg: str) -> None:
    why = _key_fits(key, alg)
    if why:
        raise JOSEError("signing key does not fit: %s" % why)
    verifier = _jws.JWS()
    verifier.allowed_algs = [alg]
    try:
        verifier.deserialize(token.strip())
        verifier.verify(key, alg=alg)
    except (JWException, ValueError, TypeError) as e:
        raise JOSEError("bad signature (%s)" % type(e).__name__)


# -- minting ------------------------------------------------------------------

_COPIED_CLAIMS = ("sub", "scope", "client_id", "auth_time", "acr", "amr",
                  "username",
                  # The key or certificate the token is bound to (RFC 9449,
                  # RFC 8705): the gate checks it on every request.
                  "cnf")


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) \
        and math.isfinite(v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: The JSON type each copied claim must have (RFC 7519, 7662, 9068): phantomd
#: signs what it copies, so a claim of another type refuses the answer.
_CLAIM_TYPES = {
    "sub": _is_str, "scope": _is_str, "client_id": _is_str,
    "username": _is_str, "acr": _is_str, "auth_time": _is_number,
    "amr": _is_str_list,
    "cnf": lambda v: isinstance(v, dict),
    "aud": lambda v: _is_str(v) or _is_str_list(v),
}


def _signing_alg(key: _jwk.JWK, where: str) -> str:
    kty = key.get("kty")
    if kty == "oct":
        raise ValueError("%s: symmetric (kty oct) keys cannot be used: the "
                         "key set is published" % where)
    alg = key.get("alg")
    if alg is None:
        alg = _DEFAULT_SIGNING_ALG.get(
            (kty, None if kty == "RSA" else key.get("crv")))
        if alg is None:
            raise ValueError("%s: unsupported key type %r (curve %r); use "
                             "RSA, EC P-256/384/521 or OKP Ed25519/Ed448"
                             % (where, kty, key.get("crv")))
    why = _key_fits(key, alg)
    if why:
        raise ValueError("%s: %s" % (where, why))
    return alg


class Minter:
    """Signs RFC 9068 access tokens (``typ: at+jwt``) for the API.

    ``keys`` is a sequence of ``jwcrypto.jwk.JWK``: the first one signs and
    must hold a private part, all of them are published by ``jwks_json`` so a
    retiring key keeps verifying until its tokens expire (put the new key
    first, keep the old one second).  A ``JWKSet`` is accepted when it holds
    one key: jwcrypto keeps a set's keys unordered, so "the first" would be
    arbitrary; ``from_file`` keeps the file's order.  Keys without a ``kid``
    get their RFC 7638 thumbprint as one.
    """

    def __init__(self, clock: Any,
                 keys: Union[_jwk.JWKSet, Sequence[_jwk.JWK]],
                 issuer: str, audience: Optional[str], lifetime: int,
                 force_audience: bool = False) -> None:
        if isinstance(keys, _jwk.JWKSet):
            keys = list(keys)
            if len(keys) > 1:
                raise ValueError("a JWKSet has no order, so its signing key "
                                 "would be arbitrary; pass a list of keys "
                                 "(or use Minter.from_file)")
        keys = list(keys)
        if not keys:
            raise ValueError("the key set is empty")
        if not issuer:
            raise ValueError("an issuer is required for minted tokens")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) \
                or lifetime <= 0:
            raise ValueError("lifetime must be a positive whole number of "
                             "seconds, not %r" % (lifetime,))
        self._clock = clock
        self.issuer = issuer
        self.audience = audience or None
        if force_audience and self.audience is None:
            raise ValueError("force_audience needs an audience")
        self.force_audience = bool(force_audience)
        self.lifetime = lifetime
        named: list[tuple[_jwk.JWK, str]] = []
        kids: set[str] = set()
        for i, key in enumerate(keys, 1):
            where = "key %d" % i
            if not isinstance(key, _jwk.JWK):
                raise ValueError("%s is not a JWK" % where)
            alg = _signing_alg(key, where)
            if key.get("kid") is None:
                key = _jwk.JWK(**dict(key.export(as_dict=True),
                                      kid=key.thumbprint()))
            if key.get("kid") in kids:
                raise ValueError("%s: kid %r is used twice" % (
                    where, key.get("kid")))
            kids.add(key.get("kid"))
            named.append((key, alg))
        self._key, self.alg = named[0]
        if not self._key.has_private:
            raise ValueError("key 1 (the signing key) has no private part")
        self.kid: str = self._key.get("kid")
        public = []
        for key, alg in named:
            entry = key.export_public(as_dict=True)
            entry.setdefault("alg", alg)
            entry.setdefault("use", "sig")
            public.append(entry)
        self._jwks = json.dumps({"keys": public}, separators=(",", ":"),
                                sort_keys=True).encode("ascii")

    @classmethod
    def from_file(cls, clock: Any, path: str, issuer: str,
                  audience: Optional[str], lifetime: int,
                  force_audience: bool = False) -> "Minter":
        """Read a JWK set JSON file (order kept: the first key signs).

        Reads the file synchronously: meant for startup and reload, where the
        file is small and local.  Raises ``ValueError`` naming the file and
        the key that is wrong.
        """
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
        except OSError as e:
            raise ValueError("%s: cannot read: %s" % (path, e.strerror or e))
        try:
            doc = _json_object(raw, "key file")
        except JOSEError as e:
            raise ValueError("%s: %s" % (path, e))
        entries = doc.get("keys")
        if not isinstance(entries, list) or not entries:
            raise ValueError('%s: not a JWK set (no non-empty "keys" list)'
                             % path)
        keys = []
        for i, entry in enumerate(entries, 1):
            if not isinstance(entry, dict):
                raise ValueError("%s: key %d is not a JSON object" % (path, i))
            try:
                keys.append(_jwk.JWK(**entry))
            except (JWException, ValueError, TypeError) as e:
                raise ValueError("%s: key %d is not a valid JWK (%s)" % (
                    path, i, e.__class__.__name__))
        try:
            return cls(clock, keys, issuer, audience, lifetime,
                       force_audience)
        except ValueError as e:
            raise ValueError("%s: %s" % (path, e))

    def mint(self, introspection_claims: Mapping[str, Any]
             ) -> tuple[str, dict[str, Any]]:
        """A signed ``at+jwt`` for an active token, and its claims.

        ``exp`` is the earliest of the opaque token's own ``exp`` and now +
        ``lifetime``; when the introspection answer carries no ``exp`` only
        the lifetime caps it (the JWT then may outlive a revoked token by at
        most ``lifetime`` seconds, as a cached answer would).  ``aud`` is the
        introspection ``aud`` if present, else the configured audience, else
        absent; with ``force_audience`` it is always the configured audience
        (some token services put the calling client's id in ``aud``).  RFC 9068 requires ``sub``; token services that leave it out
        (Django OAuth Toolkit does) get ``username``, else ``client_id`` (the
        RFC's advice for client-credentials tokens).  An answer whose ``exp``
        has passed raises
        ``JOSEError("expired")``: an active token cannot be expired; one
        whose ``nbf`` is still ahead, or that carries a claim of the wrong
        JSON type (a numeric ``sub``, a list ``scope``...), raises too:
        phantomd would be vouching for it with its own signature.
        """
        now = self._clock.seconds()
        iat = int(now)
        exp = iat + self.lifetime
        token_exp = _numeric(introspection_claims, "exp")
        if token_exp is not None:
            if token_exp <= now:
                raise JOSEError("expired")
            exp = min(exp, int(token_exp))
            if exp <= now:
                raise JOSEError("expired")
        nbf = introspection_claims.get("nbf")
        if nbf is not None and not (_is_number(nbf) and nbf <= now + 30):
            raise JOSEError("the token is not valid yet (nbf)")
        for name, fits in _CLAIM_TYPES.items():
            value = introspection_claims.get(name)
            if value is not None and not fits(value):
                raise JOSEError("claim %r has the wrong type (%s)"
                                % (name, type(value).__name__))
        claims: dict[str, Any] = {
            "iss": self.issuer, "iat": iat, "exp": exp,
            "jti": secrets.token_urlsafe(18)}
        for name in _COPIED_CLAIMS:
            if introspection_claims.get(name) is not None:
                claims[name] = introspection_claims[name]
        if "sub" not in claims:
            subject = claims.get("username") or claims.get("client_id")
            if subject is not None:
                claims["sub"] = subject
        aud = (self.audience if self.force_audience
               else introspection_claims.get("aud") or self.audience)
        if aud:
            claims["aud"] = aud
        header = {"typ": "at+jwt", "kid": self.kid}
        return _sign(self._key, self.alg, header, claims), claims

    def jwks_json(self) -> bytes:
        """The public part of every key, as a JWK set document."""
        return self._jwks


# -- verifying what the token service signed ----------------------------------

class _Verifying:
    def __init__(self, clock: Any, keys: Any,
                 allowed_algs: Iterable[str]) -> None:
        self._clock = clock
        self._keys = keys
        self._algs = _check_allowed_algs(allowed_algs)

    def _verified(self, token: Union[str, bytes], check_header: Any
                  ) -> Deferred:
        """Deferred[(header, payload)] once the signature checks out."""
        try:
            if isinstance(token, bytes):
                token = token.decode("ascii")
            header, payload = _split(token)
            alg = header["alg"]
            if alg not in self._algs:
                raise JOSEError("JWS algorithm %r is not allowed" % alg)
            check_header(header)
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise JOSEError("JWS kid is not a string")
        except UnicodeDecodeError:
            return fail(JOSEError("JWS is not ASCII"))
        except JOSEError:
            return fail()

        def check(key: _jwk.JWK) -> tuple[dict, dict]:
            _verify_signature(token, key, alg)
            return header, payload

        return self._keys.key(kid, alg).addCallback(check)


def _typ_is(header: Mapping[str, Any], expected: str) -> bool:
    typ = header.get("typ")
    if not isinstance(typ, str):
        return False
    typ = typ.lower()
    return typ == expected or typ == "application/" + expected


class IntrospectionResponseVerifier(_Verifying):
    """Checks an RFC 9701 signed introspection answer.

    The answer must be a compact JWS of ``typ: token-introspection+jwt``,
    signed with an allowed asymmetric algorithm by a key of the token
    service (``kid`` looked up in ``keys``), issued by ``issuer`` for
    ``audience`` (our client_id), no older than ``max_age`` seconds and not
    from more than ``leeway`` seconds in the future.
    """

    def __init__(self, clock: Any, keys: Any, issuer: str,
                 audience: str, max_age: float = 60,
                 allowed_algs: Iterable[str] = DEFAULT_ALGS,
                 leeway: float = 5) -> None:
        super().__init__(clock, keys, allowed_algs)
        if not issuer or not audience:
            raise ValueError("issuer and audience are required")
        self.issuer = issuer
        self.audience = audience
        self.max_age = max_age
        self.leeway = leeway

    def verify(self, body: bytes) -> Deferred:
        """Deferred[dict]: the ``token_introspection`` claim."""
        def header_ok(header: Mapping[str, Any]) -> None:
            if not _typ_is(header, "token-introspection+jwt"):
                raise JOSEError("JWS typ is %r, not token-introspection+jwt"
                                % (header.get("typ"),))

        return self._verified(body, header_ok).addCallback(self._claims)

    def _claims(self, verified: tuple[dict, dict]) -> dict[str, Any]:
        _, claims = verified
        now = self._clock.seconds()
        if claims.get("iss") != self.issuer:
            raise JOSEError("iss is %r, not %r" % (claims.get("iss"),
                                                   self.issuer))
        aud = claims.get("aud")
        if not (aud == self.audience or
                (isinstance(aud, list) and self.audience in aud)):
            raise JOSEError("aud %r does not name this client" % (aud,))
        iat = _numeric(claims, "iat")
        if iat is None:
            raise JOSEError("no iat claim")
        if iat > now + self.leeway:
            raise JOSEError("issued in the future (iat)")
        if now - iat > self.max_age:
            raise JOSEError("too old (iat %d s ago, at most %d allowed)"
                            % (now - iat, self.max_age))
        _check_times(claims, now, self.leeway, require_exp=False)
        answer = claims.get("token_introspection")
        if not isinstance(answer, dict):
            raise JOSEError("no token_introspection object")
        if not isinstance(answer.get("active"), bool):
            raise JOSEError("token_introspection has no boolean active")
        return answer


class JWTVerifier(_Verifying):
    """Checks a JWT's signature against the token service's keys, and its
    ``exp`` (required, no leeway) / ``nbf`` / ``iat`` (``leeway`` seconds)."""

    def __init__(self, clock: Any, keys: Any,
                 allowed_algs: Iterable[str] = DEFAULT_ALGS,
                 leeway: float = 30) -> None:
        super().__init__(clock, keys, allowed_algs)
        self.leeway = leeway

    def verify(self, jwt: Union[str, bytes]) -> Deferred:
        """Deferred[dict]: the verified claims."""
        def claims(verified: tuple[dict, dict]) -> dict[str, Any]:
            _check_times(verified[1], self._clock.seconds(), self.leeway)
            return verified[1]

        return self._verified(jwt, lambda header: None).addCallback(claims)


# -- client authentication ----------------------------------------------------

def client_assertion(clock: Any, jwk: _jwk.JWK, client_id: str,
                     audience: str, alg: str) -> str:
    """An RFC 7523 ``private_key_jwt`` client assertion, valid for 60 s.

    ``audience`` is the token service's issuer or endpoint URL, as it asks.
    Raises ``ValueError`` for a key that cannot sign with ``alg``.
    """
    if alg not in _ALG_FAMILY:
        raise ValueError("unsupported algorithm %r for a client assertion"
                         % alg)
    why = _key_fits(jwk, alg)
    if why:
        raise ValueError("client assertion key: %s" % why)
    if not jwk.has_private:
        raise ValueError("client assertion key has no private part")
    iat = int(clock.seconds())
    header: dict[str, Any] = {"typ": "JWT"}
    if jwk.get("kid") is not None:
        header["kid"] = jwk.get("kid")
    claims = {"iss": client_id, "sub": client_id, "aud": audience,
              "jti": secrets.token_urlsafe(18), "iat": iat, "exp": iat + 60}
    return _sign(jwk, alg, header, claims)
