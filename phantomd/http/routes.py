"""Which route a request takes (DESIGN section 8), and whether its path is safe.

Pure: the config's ``[route NAME]`` sections become a ``RouteTable``;
``table.match(method, target)`` is asked once per request by the front.
A path is matched on its segments with percent-encoded unreserved
characters decoded, empty segments dropped and ``;params`` cut off, so
that every spelling an upstream might read as the same path (``//admin``,
``/%61dmin``, ``/admin;x``) takes the same route.  Spellings an upstream
might read as *another* path (dot segments, also ``%2e`` and ``..;``, a
backslash, NUL, ``..`` hidden between ``%2F``, invalid or overlong UTF-8)
are refused with 400 before any route is chosen.  ``%2F`` stays data: it
never separates segments.  Matching is case-sensitive, as paths are
(RFC 3986 section 6.2.2.1).  The target itself is never rewritten, except
that ``strip_prefix`` cuts the matched prefix off.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
# Separators some upstream may decode and act on: '/', '\', NUL.
_HIDDEN_SEPARATOR = re.compile(rb"%2[fF]|%5[cC]|\\")
# A path that is not its own matched form: something to decode or cut
# (``%``, ``;``), to refuse (a backslash, a dot segment) or to drop (``//``).
_NOT_PLAIN = re.compile(rb"[%;\\]|/[./]").search


class UnsafePath(ValueError):
    """The path could name another resource upstream than the one matched;
    the message says why (it goes to the client with a 400)."""


class Route:
    """One ``[route NAME]`` (or the default: ``[phantomd]``'s upstream and
    scopes, named ``default``).  ``upstream`` None: ``[phantomd]``'s;
    ``required_scopes`` None: the gate's."""

    __slots__ = ("name", "prefixes", "methods", "upstream", "auth",
                 "required_scopes", "claim_headers", "strip_prefix", "drop",
                 "cors")

    def __init__(self, name: str, prefixes: tuple = ((),),
                 methods: Optional[frozenset] = None,
                 upstream: Optional[str] = None, auth: str = "required",
                 required_scopes: Optional[tuple] = None,
                 claim_headers: tuple = (), strip_prefix: bool = False,
                 cors: bool = True) -> None:
        self.name = name
        self.prefixes = prefixes
        self.methods = methods
        self.upstream = upstream
        self.auth = auth
        self.required_scopes = (None if required_scopes is None
                                else frozenset(required_scopes))
        self.claim_headers = claim_headers
        self.strip_prefix = strip_prefix
        #: False (``cors = no``): the front treats this route's requests as
        #: without ``[cors]`` (DESIGN section 9's route override).
        self.cors = cors
        #: ``claim_headers`` names as ``drop_name`` spells them: a client's
        #: copy goes, whatever its case and ``_`` for ``-`` (CGI/WSGI
        #: servers read ``X_User_Id`` as ``X-User-Id``).
        self.drop = frozenset(drop_name(n) for n, _ in claim_headers)

    def __repr__(self) -> str:
        return "Route(%r)" % self.name


def drop_name(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")


class Match:
    """What ``RouteTable.match`` found: the route and the target to send
    upstream (the request's, minus ``strip_prefix``)."""

    __slots__ = ("route", "target")

    def __init__(self, route: Route, target: bytes) -> None:
        self.route = route
        self.target = target


def _segment(raw: bytes) -> bytes:
    """A segment as matched: unreserved escapes decoded, other escapes in
    upper case, ``;params`` cut off."""
    def decode(m: "re.Match[bytes]") -> bytes:
        c = int(m.group(1), 16)
        return bytes((c,)) if c in _UNRESERVED else b"%" + m.group(1).upper()
    return _ESCAPE.sub(decode, raw).split(b";", 1)[0]


def _fully_decoded(raw: bytes) -> bytes:
    return _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), raw)


def segments(path: bytes) -> tuple[list, list]:
    """``(matched, ends)``: the path's non-empty segments as matched, and
    for each the offset in ``path`` just past it.  Raises ``UnsafePath``."""
    if b"%" not in path and b";" not in path and b"\\" not in path and \
            b"/." not in path:
        # The common case: nothing to decode, no dot segment possible.
        matched = []
        ends = []
        offset = 0
        for raw in path.split(b"/"):
            offset += len(raw) + 1
            if raw:
                matched.append(raw)
                ends.append(offset - 1)
        return matched, ends
    if b"\\" in path:
        raise UnsafePath("the path contains a backslash")
    decoded = _fully_decoded(path)
    if b"\\" in decoded:
        raise UnsafePath("the path contains an encoded backslash")
    if b"\x00" in decoded:
        raise UnsafePath("the path contains NUL")
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        # %c0%ae is an overlong '.': some decoders still accept it.
        raise UnsafePath("the path is not valid UTF-8 once decoded")
    matched: list = []
    ends: list = []
    offset = 0
    for raw in path.split(b"/"):
        offset += len(raw) + 1
        if not raw:
            continue
        seg = _segment(raw)
        for piece in _HIDDEN_SEPARATOR.split(seg):
            if piece.split(b";", 1)[0] in (b".", b".."):
                raise UnsafePath("the path contains a dot segment")
        if seg in (b".", b".."):
            raise UnsafePath("the path contains a dot segment")
        if seg:
            matched.append(seg)
            ends.append(offset - 1)
    return matched, ends


def parse_prefix(value: str) -> tuple:
    """A configured prefix as the tuple of segments it matches."""
    if not value.startswith("/"):
        raise ValueError("%r does not start with /" % value)
    if "?" in value or "#" in value:
        raise ValueError("%r is a path prefix: no ? or #" % value)
    try:
        matched, _ = segments(value.encode("utf-8"))
    except UnsafePath as e:
        raise ValueError("%r: %s" % (value, e))
    return tuple(matched)


class RouteTable:
    """The routes, indexed by their prefixes' first segment.

    ``match`` looks up the path's first segment once and tries only the
    prefixes that start with it (longest first, ties in config order),
    then the root ``/`` prefixes: its cost does not grow with the number
    of routes, only with how many prefixes share a first segment.  A
    path with nothing to decode or drop (no ``%``, ``;``, ``\\``, ``/.``,
    ``//``) is its own matched form, so it is compared to the prefixes as
    bytes without being split.  A table is immutable; a reload builds a
    new one."""

    def __init__(self, routes: "list[Route]", default: Optional[Route]
                 ) -> None:
        self.routes = tuple(routes)
        self.default = default
        entries = []
        for order, route in enumerate(routes):
            for prefix in route.prefixes:
                entries.append((-len(prefix), order, prefix, route))
        entries.sort(key=lambda e: e[:2])
        #: first segment -> ((prefix, b"/a/b", route), ...) longest first
        index: dict = {}
        root = []
        for _, _, prefix, route in entries:
            if prefix:
                index.setdefault(prefix[0], []).append(
                    (prefix, b"/" + b"/".join(prefix), route))
            else:
                root.append(route)
        self._index = {k: tuple(v) for k, v in index.items()}
        self._root = tuple(root)
        self._empty = not entries

    def match(self, method: bytes, target: bytes) -> Optional[Match]:
        """The route for a request, or None (404: no route and no
        ``[phantomd]`` upstream).  Raises ``UnsafePath`` (400)."""
        if target == b"*":
            return (Match(self.default, target)
                    if self.default is not None else None)
        if b"#" in target:
            # No target has a fragment (RFC 9112 section 3.2), and an API
            # that cuts one off would see /admin in /admin#x, which would
            # match no route here.
            raise UnsafePath("the request target contains a fragment (#)")
        q = target.find(b"?")
        path = target if q < 0 else target[:q]
        if self._empty:
            if b"%" in path or b"\\" in path or b"/." in path:
                segments(path)  # only its checks
            return (Match(self.default, target)
                    if self.default is not None else None)
        if path[:1] == b"/" and _NOT_PLAIN(path) is None:
            # The common case: the path is its matched form.
            cut = path.find(b"/", 1)
            first = path[1:] if cut < 0 else path[1:cut]
            for prefix, joined, route in self._index.get(first, ()):
                end = len(joined)
                if path.startswith(joined) and (
                        len(path) == end or path[end] == 0x2F) and (
                        route.methods is None or method in route.methods):
                    if route.strip_prefix:
                        return self._found(route, target, end)
                    return Match(route, target)
        else:
            matched, ends = segments(path)
            if matched:
                n = len(matched)
                for prefix, _, route in self._index.get(matched[0], ()):
                    length = len(prefix)
                    if length <= n and tuple(matched[:length]) == prefix \
                            and (route.methods is None
                                 or method in route.methods):
                        return self._found(route, target, ends[length - 1])
        for route in self._root:
            if route.methods is None or method in route.methods:
                return Match(route, target)
        if self.default is None:
            return None
        return Match(self.default, target)

    @staticmethod
    def _found(route: Route, target: bytes, end: int) -> Match:
        """``route`` matched a prefix ending at ``end`` in ``target``."""
        if route.strip_prefix:
            rest = target[end:]
            if rest[:1] != b"/":
                rest = b"/" + rest
            return Match(route, rest)
        return Match(route, target)


def from_config(config: Any, default: bool = False) -> RouteTable:
    """The table for a loaded ``Config``; ``default``: unmatched requests
    take the default route even without ``[phantomd] upstream`` (the
    forward-auth checks, which have no upstream to miss)."""
    routes = [
        Route(name, prefixes=s.match, methods=s.methods, upstream=s.upstream,
              auth=s.auth, required_scopes=s.required_scopes,
              claim_headers=s.claim_headers, strip_prefix=s.strip_prefix,
              cors=s.cors)
        for name, s in config.routes.items()]
    return RouteTable(routes, Route("default") if (
        default or config.phantomd.upstream) else None)


def claim_value(value: Any) -> Optional[bytes]:
    """A claim as a header value: strings and numbers as written, arrays
    space-joined; None when it cannot be sent (an object, a control
    character, a non-ASCII character: the caller refuses the request)."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = repr(value) if isinstance(value, float) else str(value)
    elif isinstance(value, list):
        parts = [claim_value(v) for v in value]
        if any(p is None for p in parts):
            return None
        return b" ".join(parts)  # type: ignore[arg-type]
    if not isinstance(value, str):
        return None
    if any(not (0x20 <= ord(c) <= 0x7E) for c in value):
        return None
    return value.encode("ascii")


def claim_lines(route: Route, claims: Mapping[str, Any]
                ) -> Optional[list]:
    """The ``(name, value)`` headers of ``route``'s ``claim_headers`` for a
    JWT's claims (absent claims give no header), or None when a claim
    cannot be sent as a header."""
    out = []
    for name, claim in route.claim_headers:
        if claim not in claims:
            continue
        value = claim_value(claims[claim])
        if value is None:
            return None
        out.append((name, value))
    return out
