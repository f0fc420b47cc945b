"""CORS for the browser apps that call the APIs behind phantomd (DESIGN
section 9).

Pure functions of the ``[cors]`` settings and a request's headers; the
front asks them.  A preflight carries no token (browsers never send
``Authorization`` on one), so phantomd answers it itself rather than
refusing it with 401; and every answer to an allowed origin -- phantomd's
own 401, 403 and 5xx included -- gets ``Access-Control-Allow-Origin``, or
the app could not even read why it was refused.  The upstream's own
``Access-Control-*`` headers are dropped and replaced: a browser refuses
an answer with two ``Access-Control-Allow-Origin``.

Origins are compared byte for byte with the configured ones (browsers send
the lower-case serialization), so ``https://app.example.com.evil.test``,
``https://APP.example.com`` and ``null`` are not ``https://app.example.com``;
a request with two ``Origin`` headers has none.
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

PREFIX = b"access-control-"


class Policy:
    """The ``[cors]`` settings as header values, built once per config."""

    __slots__ = ("any", "origins", "credentials", "_preflight", "_answer")

    def __init__(self, origins, methods, headers, expose, max_age: int,
                 credentials: bool) -> None:
        self.any = tuple(origins) == ("*",)
        if self.any and credentials:
            raise ValueError("allow_origins = * cannot go with "
                             "allow_credentials = yes (browsers refuse it)")
        self.origins = frozenset(o.encode("ascii") for o in origins)
        self.credentials = credentials
        common = []
        if credentials:
            common.append((b"Access-Control-Allow-Credentials", b"true"))
        pre = list(common)
        if methods:
            pre.append((b"Access-Control-Allow-Methods",
                        ", ".join(methods).encode("ascii")))
        if headers:
            pre.append((b"Access-Control-Allow-Headers",
                        ", ".join(headers).encode("ascii")))
        pre.append((b"Access-Control-Max-Age", b"%d" % max_age))
        self._preflight = pre
        answer = list(common)
        if expose:
            answer.append((b"Access-Control-Expose-Headers",
                           ", ".join(expose).encode("ascii")))
        self._answer = answer

    def allowed(self, origin: Optional[bytes]) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def _allow(self, origin: bytes) -> list:
        return [(b"Access-Control-Allow-Origin",
                 b"*" if self.any else origin), (b"Vary", b"Origin")]

    def preflight_headers(self, origin: Optional[bytes]) -> list:
        """The headers of phantomd's 204 to a preflight; without any CORS
        header when the origin is not allowed (the browser then refuses)."""
        if not self.allowed(origin):
            return [(b"Vary", b"Origin")]
        return self._allow(origin) + self._preflight  # type: ignore[arg-type]

    def answer_headers(self, origin: Optional[bytes]) -> list:
        """The headers to add to any other answer (upstream's or
        phantomd's own); only ``Vary: Origin`` when the origin is not
        allowed or there is none: the answer still depends on it, and a
        cache must not give it to an allowed origin's fetch (Fetch
        section 3.2.5)."""
        if not self.allowed(origin):
            return [(b"Vary", b"Origin")]
        return self._allow(origin) + self._answer  # type: ignore[arg-type]


def from_config(section) -> Optional[Policy]:
    """The policy of ``[cors]``, or None when ``allow_origins`` is empty."""
    if not section.allow_origins:
        return None
    return Policy(section.allow_origins, section.allow_methods,
                  section.allow_headers, section.expose_headers,
                  section.max_age, section.allow_credentials)


def request_origin(headers) -> tuple:
    """``(origin, preflight)`` from a request's headers: ``origin`` is the
    single ``Origin`` value (None if absent or repeated); ``preflight``
    whether ``Access-Control-Request-Method`` is there (with ``OPTIONS``
    and an ``Origin``, that makes a preflight)."""
    origin = None
    origins = 0
    preflight = False
    for name, value in headers:
        n = name.lower()
        if n == b"origin":
            origin = value
            origins += 1
        elif n == b"access-control-request-method":
            preflight = True
    if origins != 1:
        origin = None
    return origin, preflight and origins > 0


def requested_method(headers) -> bytes:
    """The method a preflight asks about (its one
    ``Access-Control-Request-Method``), or ``OPTIONS`` when it names none
    or more than one: the route a preflight takes is the route of the
    request it stands for (Fetch section 4.8)."""
    asked = [v.strip() for n, v in headers
             if n.lower() == b"access-control-request-method"]
    return asked[0] if len(asked) == 1 and asked[0] else b"OPTIONS"


def without_cors(headers: list) -> list:
    """An upstream's response headers minus its ``Access-Control-*``."""
    return [h for h in headers if not h[0].lower().startswith(PREFIX)]


def parse_origins(value: str) -> tuple:
    """``[cors] allow_origins``: ``*`` alone, or exact origins."""
    words = tuple(value.split())
    if "*" in words and len(words) > 1:
        raise ValueError("* stands alone: it already allows every origin")
    for w in words:
        if w == "*":
            continue
        if w == "null":
            raise ValueError("null is the origin of sandboxed and file: "
                             "pages, anyone can send it: not allowed")
        try:
            u = urlsplit(w)
            u.port
        except ValueError:
            u = None
        if u is None or u.scheme not in ("http", "https") or not u.hostname \
                or u.path or u.query or u.fragment or u.username or \
                w != w.lower() or w.endswith("/") or not w.isascii():
            raise ValueError("%r is not an origin (scheme://host[:port], "
                             "lower case, no path or trailing /)" % w)
    return words
