"""One reader per ``[introspection] response`` form: a 200 answer's
Content-Type and body in, ``Active`` / ``Inactive`` (or a Deferred of one)
out.

The introspector picks one reader at construction (``for_mode``) and hands
it every 200 answer, with the media type it carried and the answer's
freshness (``cachecontrol.freshness``: lifetime and whether
``[cache] min_ttl`` may raise it).  Statuses (inactive, 503, refused
credentials...) are the introspector's business, the same for every form.

* ``JWTReader`` (``jwt``): the body is the JWT; ``application/json``
  ``{"active": false}`` is inactive;
* ``FieldReader`` (``phantom_token``): JSON whose ``field`` member is the
  JWT;
* ``MintingReader`` (``json``): a plain RFC 7662 answer, phantomd mints;
* ``SignedReader`` (``token-introspection+jwt``, RFC 9701): the signed
  answer is verified, then phantomd mints.

A JWT the token service hands over must be a well-formed compact JWS with
an ``exp`` in the future; with a ``jwt_verifier`` its signature must check
out too.  Everything else raises (or fails with) ``IntrospectionFailed``
of kind ``error``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.python.failure import Failure

from phantomd.token import jose
from phantomd.token.outcomes import Active, Inactive, IntrospectionFailed

Fresh = tuple  # (lifetime: Optional[float], floorable: bool)

ACCEPT = {
    "jwt": b"application/jwt",
    "phantom_token": b"application/json",
    "json": b"application/json",
    "token-introspection+jwt": b"application/token-introspection+jwt",
}
"""The default ``Accept`` of each response form, and the Content-Type its
answers must have (``[introspection] accept`` changes only the former)."""


def failed(kind: str, description: str,
           retry_after: Optional[int] = None) -> IntrospectionFailed:
    return IntrospectionFailed(kind, description, retry_after)


def json_object(body: bytes) -> dict:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise failed("error", "token service answered malformed JSON")
    if not isinstance(doc, dict):
        raise failed("error", "token service answered JSON that is not an "
                     "object")
    return doc


def active(doc: dict) -> bool:
    value = doc.get("active")
    if not isinstance(value, bool):
        raise failed("error", "token service answer has %s" % (
            "no \"active\" member" if "active" not in doc
            else "a non-boolean \"active\" member"))
    return value


def _expect(media_type: Optional[str], expected: str) -> None:
    if media_type != expected:
        raise failed("error", "token service answered Content-Type %s, "
                     "expected %s" % (
                         "(none or several)" if media_type is None
                         else media_type[:64], expected))


def _jose_failed(failure: Failure, what: str) -> Failure:
    if failure.check(jose.JOSEError):
        raise failed("error", "the token service's %s did not verify: %s"
                     % (what, failure.value))
    return failure


class _HandedOver:
    """The JWT the token service hands over (``jwt``, ``phantom_token``):
    shape and times checked, its signature too with a ``jwt_verifier``."""

    def __init__(self, clock: Any, jwt_verifier: Any = None) -> None:
        self._clock = clock
        self._verifier = jwt_verifier

    def check(self, jwt: str, fresh: Fresh) -> Any:
        if jwt.strip() != jwt:
            # Checked here, not only by the front: an Active with a JWT the
            # front refuses to forward would be cached and fail every
            # request until it expired.  (unverified_claims strips, then
            # holds each part to the base64url alphabet.)
            raise failed("error", "token service answered an unusable JWT: "
                         "not a compact JWS")
        try:
            claims = jose.unverified_claims(jwt, self._clock.seconds())
        except jose.JOSEError as e:
            raise failed("error", "token service answered an unusable JWT: "
                         "%s" % e)
        lifetime, floorable = fresh
        if self._verifier is None:
            return Active(jwt, claims, lifetime, floorable)
        d = self._verifier.verify(jwt)
        d.addErrback(_jose_failed, "JWT")
        d.addCallback(lambda verified: Active(jwt, verified, lifetime,
                                              floorable))
        return d


class JWTReader(_HandedOver):
    """``response = jwt``: the body is the JWT (``application/jwt``); an
    ``application/json`` answer may only say inactive."""

    media_type = "application/jwt"

    def read(self, media_type: Optional[str], body: bytes,
             fresh: Fresh) -> Any:
        if media_type == "application/json":
            if active(json_object(body)):
                raise failed("error", "token service answered active JSON "
                             "to a request for application/jwt")
            return Inactive(fresh[0])
        _expect(media_type, self.media_type)
        try:
            jwt = body.decode("ascii").strip()
        except UnicodeDecodeError:
            raise failed("error", "token service answered a JWT that is "
                         "not ASCII")
        return self.check(jwt, fresh)


class FieldReader(_HandedOver):
    """``response = phantom_token``: JSON; the JWT is its ``field``
    member when ``active`` is true."""

    media_type = "application/json"

    def __init__(self, clock: Any, field: str,
                 jwt_verifier: Any = None) -> None:
        super().__init__(clock, jwt_verifier)
        self._field = field

    def read(self, media_type: Optional[str], body: bytes,
             fresh: Fresh) -> Any:
        _expect(media_type, self.media_type)
        doc = json_object(body)
        if not active(doc):
            return Inactive(fresh[0])
        jwt = doc.get(self._field)
        if not isinstance(jwt, str) or not jwt:
            raise failed("error", "token service answered active without "
                         "a %s member%s" % (
                             self._field[:64], "" if self._field in doc
                             else " (phantom_token_field)"))
        return self.check(jwt, fresh)


class MintingReader:
    """``response = json``: a plain RFC 7662 answer; phantomd mints the
    JWT for an active token (``minter``: ``jose.Minter``)."""

    media_type = "application/json"

    def __init__(self, minter: Any) -> None:
        self._minter = minter

    def read(self, media_type: Optional[str], body: bytes,
             fresh: Fresh) -> Any:
        _expect(media_type, self.media_type)
        return self.from_claims(json_object(body), fresh)

    def from_claims(self, doc: dict, fresh: Fresh) -> Any:
        if not active(doc):
            return Inactive(fresh[0])
        try:
            jwt, claims = self._minter.mint(doc)
        except jose.JOSEError as e:
            raise failed("error", "cannot mint a JWT from the token "
                         "service's answer: %s" % e)
        return Active(jwt, claims, fresh[0], fresh[1])


class SignedReader(MintingReader):
    """``response = token-introspection+jwt`` (RFC 9701): the signed
    answer is checked by ``verifier``
    (``jose.IntrospectionResponseVerifier``), then minted from."""

    media_type = "application/token-introspection+jwt"

    def __init__(self, minter: Any, verifier: Any) -> None:
        super().__init__(minter)
        self._verifier = verifier

    def read(self, media_type: Optional[str], body: bytes,
             fresh: Fresh) -> Any:
        _expect(media_type, self.media_type)
        d = self._verifier.verify(body)
        d.addErrback(_jose_failed, "signed introspection answer")
        d.addCallback(self.from_claims, fresh)
        return d


def for_mode(mode: str, clock: Any, field: str, minter: Any = None,
             response_verifier: Any = None, jwt_verifier: Any = None) -> Any:
    """The reader for ``response = mode``; ValueError when ``mode`` is
    unknown or a part it needs is missing (``jwt_verifier`` is only used,
    and then required by the caller, for ``jwt`` and ``phantom_token``)."""
    if mode == "jwt":
        return JWTReader(clock, jwt_verifier)
    if mode == "phantom_token":
        return FieldReader(clock, field, jwt_verifier)
    if mode not in ACCEPT:
        raise ValueError("unknown response form %r" % mode)
    if minter is None:
        raise ValueError("response = %s needs a minter" % mode)
    if mode == "json":
        return MintingReader(minter)
    if response_verifier is None:
        raise ValueError("response = token-introspection+jwt needs a "
                         "response verifier")
    return SignedReader(minter, response_verifier)
