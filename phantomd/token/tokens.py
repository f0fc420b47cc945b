"""Bearer token extraction (RFC 6750 section 2.1) and token digests.

``parse_authorization`` turns every ``Authorization`` header value the client
sent into the opaque token or the ``Reject`` the client must get.  The scheme
name is case-insensitive; the token must match the b64token grammar, so a
header phantomd cannot read unambiguously never reaches the token service.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence, Union

from phantomd.token.outcomes import Reject

_ALNUM = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
          b"0123456789")
# b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN_CHARS = _ALNUM + b"-._~+/"
# A compact JWS/JWE: base64url segments joined by dots.
_JWT_CHARS = _ALNUM + b"_-."


def b64token(value: bytes) -> bool:
    """Whether ``value`` is an RFC 6750 b64token.  ``bytes.translate``
    deleting the allowed bytes is a C loop: a regex over the same grammar
    cost more than the rest of parsing the header."""
    body = value.rstrip(b"=")
    return bool(body) and not body.translate(None, _B64TOKEN_CHARS)


def jwt_shaped(value: bytes) -> bool:
    """Whether ``value`` can be sent as a JWT: base64url segments joined by
    dots (the first one not empty), nothing else.  Checked on every request
    that forwards one, hence ``translate`` rather than a regex (2.2 us for
    a 700-byte JWT)."""
    return bool(value) and value[0] != 0x2E and not value.translate(
        None, _JWT_CHARS)


_SCHEME = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+)(?:[ ]+(.*))?\Z", re.S)

#: Longer tokens are refused (400) before anything is sent to the token
#: service; real opaque tokens are tens of bytes, JWT-sized ones ~1-2 KB.
MAX_TOKEN_LENGTH = 4096

NO_CREDENTIALS = Reject(401, None, "Bearer token required")


def _malformed(why: str) -> Reject:
    return Reject(400, "invalid_request", why)


def parse_authorization(values: Sequence[bytes]) -> Union[str, Reject]:
    """The opaque token from the ``Authorization`` header values, or a Reject.

    No header, or only other schemes: 401 without an error code (RFC 6750
    section 3.1).  Several credentials, an empty or malformed bearer token:
    400 ``invalid_request``.
    """
    parsed = parse_credentials(values)
    if isinstance(parsed, Reject):
        return parsed
    if parsed[0] != "Bearer":
        return NO_CREDENTIALS
    return parsed[1]


def parse_credentials(values: Sequence[bytes]
                      ) -> Union[tuple[str, str], Reject]:
    """``("Bearer" or "DPoP", token)`` from the ``Authorization`` header
    values (RFC 9449 section 7.1: the DPoP scheme carries the token with
    the same syntax), or the Reject ``parse_authorization`` describes."""
    if not values:
        return NO_CREDENTIALS
    if len(values) > 1:
        return _malformed("more than one Authorization header")
    value = values[0].strip(b" \t")
    if value[:7] == b"Bearer ":
        # What nearly every client sends, read as _SCHEME would read it.
        name, credentials = "Bearer", value[7:].lstrip(b" ")
    else:
        m = _SCHEME.match(value)
        if m is None:
            if value[:6].lower() == b"bearer" or value[:4].lower() == b"dpop":
                return _malformed("unreadable bearer credentials")
            return NO_CREDENTIALS
        scheme, credentials = m.group(1).lower(), m.group(2)
        if scheme == b"bearer":
            name = "Bearer"
        elif scheme == b"dpop":
            name = "DPoP"
        else:
            return NO_CREDENTIALS
    if not credentials:
        return _malformed("empty bearer token")
    if len(credentials) > MAX_TOKEN_LENGTH:
        return _malformed("bearer token longer than %d bytes"
                          % MAX_TOKEN_LENGTH)
    if not b64token(credentials):
        if b"," in credentials or b" " in credentials:
            return _malformed("more than one credential in Authorization")
        return _malformed("bearer token has characters RFC 6750 forbids")
    return name, credentials.decode("ascii")


def token_key(token: str) -> bytes:
    """The cache key: a SHA-256 digest, so the token itself is never kept."""
    return hashlib.sha256(token.encode("ascii")).digest()


def token_id(key: bytes) -> str:
    """A short, non-reversible name for a token, safe to log."""
    return key.hex()[:12]
