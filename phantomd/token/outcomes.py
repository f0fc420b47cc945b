"""What the gate decides for one request: forward it with a JWT, or answer it.

These values are the only thing the data path (front + forwarder) learns from
the gate; keeping them plain data lets the data path be rewritten freely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


@dataclass(slots=True)
class Forward:
    """Forward the request upstream with ``Authorization: Bearer <jwt>``.

    ``cache`` says how the answer was found (``hit``, ``miss``, ``coalesced``)
    and ``token_id`` is a short digest of the opaque token, for logs.

    Read-only by convention, not frozen: one is made for every request
    that goes upstream, and a frozen dataclass's ``__init__`` costs four
    times as much (an ``object.__setattr__`` per field).  Not a tuple
    either: ``logs`` writes a tuple's items, and this one holds the JWT.
    """

    jwt: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    cache: str = "miss"
    token_id: str = ""


@dataclass(frozen=True)
class Reject:
    """Answer the client directly; nothing goes upstream.

    ``error`` is the RFC 6750 error code, or None for a request that carried
    no bearer credentials at all (RFC 6750 section 3.1: no error code then).
    """

    status: int
    error: Optional[str]
    description: str
    scope: Optional[str] = None
    retry_after: Optional[int] = None
    token_id: str = ""
    cache: str = ""
    #: False for data-path errors (framing, limits): the request's bearer
    #: credentials were never looked at, so no challenge is owed.
    bearer: bool = True
    #: ``DPoP``: the error is about DPoP credentials and goes in a DPoP
    #: challenge (RFC 9449 section 7.1) instead of the Bearer one.
    scheme: str = "Bearer"
    #: Set for refusals about sender-constrained tokens: the DPoP
    #: challenge's ``algs`` (a Bearer refusal then gets one too, telling
    #: the client which scheme its token needs).
    dpop_algs: Optional[str] = None

    def challenge(self, realm: str) -> bytes:
        """The ``WWW-Authenticate`` value, or ``b""`` where none applies."""
        if not self.bearer or self.status not in (400, 401, 403):
            return b""
        params = [("realm", realm)]
        if self.error is not None:
            params.append(("error", self.error))
            params.append(("error_description", self.description))
        if self.scope is not None:
            params.append(("scope", self.scope))
        if self.scheme == "DPoP" and self.dpop_algs is not None:
            params.append(("algs", self.dpop_algs))
        return (self.scheme + " " + ", ".join(
            '%s="%s"' % (k, _quote(v)) for k, v in params)).encode("ascii")

    def body(self, request_id: Optional[str] = None) -> bytes:
        """The JSON error document; ``request_id`` (the request's
        ``X-Request-Id``) lets a client quote the request to an operator."""
        doc = {
            "error": self.error or _DEFAULT_ERRORS.get(self.status, "error"),
            "error_description": self.description,
        }
        if request_id is not None:
            doc["request_id"] = request_id
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    def headers(self, realm: str) -> list[tuple[bytes, bytes]]:
        """Every header of the error response except framing ones."""
        out = [
            (b"Content-Type", b"application/json"),
            (b"Cache-Control", b"no-store"),
        ]
        challenge = self.challenge(realm)
        if challenge:
            out.append((b"WWW-Authenticate", challenge))
            if self.scheme != "DPoP" and self.dpop_algs is not None:
                out.append((b"WWW-Authenticate", (
                    'DPoP realm="%s", algs="%s"' % (
                        _quote(realm), _quote(self.dpop_algs))
                ).encode("ascii")))
        if self.retry_after is not None:
            out.append((b"Retry-After", str(int(self.retry_after)).encode()))
        return out


_DEFAULT_ERRORS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "insufficient_scope",
    404: "not_found",
    408: "request_timeout",
    414: "uri_too_long",
    431: "request_header_fields_too_large",
    502: "bad_gateway",
    503: "temporarily_unavailable",
    504: "gateway_timeout",
}


def _quote(value: str) -> str:
    """Quote for an auth-param: printable ASCII only, no quote or backslash."""
    return "".join(
        c for c in value if 0x20 <= ord(c) < 0x7F and c not in '"\\')


def error_response(status: int, error: str, description: str) -> Reject:
    """A data-path error (framing, timeouts, upstream faults): no challenge."""
    return Reject(status=status, error=error, description=description,
                  bearer=False)


# -- what the introspector answers (before the gate decides) -----------------

@dataclass(frozen=True, init=False)
class Active:
    """The token is active; ``jwt`` goes upstream, ``claims`` are its
    payload (for scopes and ``exp``), ``lifetime`` the token service's
    freshness lifetime in seconds (None: it said nothing; 0: do not store).
    ``floorable``: the answer was marked ``no-store``/``no-cache`` or said
    nothing, so ``[cache] min_ttl`` may raise its lifetime (not compared:
    it says how the lifetime was found, not what the answer is)."""

    jwt: str
    claims: Mapping[str, Any]
    lifetime: Optional[float]
    floorable: bool = field(default=False, compare=False)

    def __init__(self, jwt: str, claims: Mapping[str, Any],
                 lifetime: Optional[float], floorable: bool = False) -> None:
        # What the generated one does, minus an object.__setattr__ call per
        # field: one of these is made on every cache hit and every miss.
        fields = self.__dict__
        fields["jwt"] = jwt
        fields["claims"] = claims
        fields["lifetime"] = lifetime
        fields["floorable"] = floorable


@dataclass(frozen=True)
class Inactive:
    """The token is inactive, unknown or expired."""

    lifetime: Optional[float]


class IntrospectionFailed(Exception):
    """The token service gave no usable answer; nothing may be cached.

    ``kind``: ``error`` (502), ``timeout`` (504), ``unavailable`` (503).
    """

    STATUS = {"error": 502, "timeout": 504, "unavailable": 503}

    def __init__(self, kind: str, description: str,
                 retry_after: Optional[int] = None) -> None:
        if kind not in self.STATUS:
            raise ValueError(kind)
        super().__init__(kind, description)
        self.kind = kind
        self.description = description
        self.retry_after = retry_after


class Shed(Exception):
    """Too many introspections in flight; the request is refused (503)."""
