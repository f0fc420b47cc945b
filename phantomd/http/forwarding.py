"""What goes upstream for a client's request: which of its header lines
phantomd keeps, uses or drops, its target as the route sees it, and the
request head the upstream gets.

Pure functions of bytes, no connection, no I/O: the front calls them once
per request (``sort_headers`` and ``target_of`` when the head has arrived,
``upstream_head`` when the gate allowed it).

``Upgrade`` is dropped with the hop-by-hop headers in ``sort_headers``; a
WebSocket upgrade (DESIGN section 13) gets exactly ``WEBSOCKET_LINES`` from
``upstream_head`` instead, whatever the client wrote.  The CORS headers an
answer gets are decided by the front per request (``cors.py``).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from phantomd.http.headers import (
    FORWARDING, REQUEST_DROP, SENDER_PROOF, drop_connection_options,
    proxy_reported)
from phantomd.http.proxies import forwarded_by_proxy
from phantomd.http.requestid import (
    acceptable as _acceptable_id, new_request_id)
from phantomd.http.routes import drop_name

# Methods the upstream pool may send a second time when a reused connection
# closes before answering (RFC 9110 section 9.2.2 forbids resending the
# others).  Only the safe ones: PUT and DELETE are idempotent on paper, but
# whether an API's DELETE really is, phantomd cannot know; the client can.
RETRYABLE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
#: The hop-by-hop lines of a WebSocket upgrade (DESIGN section 13), in the
#: request sent upstream and in the 101 sent back.
WEBSOCKET_LINES = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
#: First letters of the ``headers.proxy_reported`` names: any other
#: header is kept without asking.
_REPORTED_FIRST = frozenset((b"x", b"t", b"c", b"f"))
#: A Host value phantomd accepts and vouches for in X-Forwarded-Host: a
#: name or IPv4 address, or a bracketed IPv6 one, and an optional port.
#: Stricter than RFC 3986's reg-name (no sub-delims, no escapes): a comma
#: makes a list of hosts of it, ``@`` or ``/`` another URL, for whatever
#: builds URLs from it upstream.
_VALID_HOST = re.compile(
    rb"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?\Z").match


class SortedHeaders:
    """A request's header lines, sorted by what phantomd does with them.

    ``kept``: forwarded as they are (hop-by-hop, spoofable and
    Connection-named lines gone); ``auth``: the Authorization values, for
    the gate; ``host`` and ``hosts`` (how many Host lines); ``length``: the
    Content-Length value; ``te``: every Transfer-Encoding line joined;
    ``fwd``: the client's X-Forwarded-* and other ``proxy_reported`` lines
    (believed, and forwarded, only from a trusted proxy); ``proofs``:
    DPoP/Client-Cert lines, for the gate only; ``rid``: the request id
    (the client's single acceptable one, else a new one)."""

    __slots__ = ("kept", "auth", "host", "hosts", "length", "te", "fwd",
                 "proofs", "rid")

    def __init__(self, kept: list, auth: list, host: Optional[bytes],
                 hosts: int, length: Optional[bytes], te: Optional[bytes],
                 fwd: Optional[list], proofs: Optional[list],
                 rid: bytes) -> None:
        self.kept = kept
        self.auth = auth
        self.host = host
        self.hosts = hosts
        self.length = length
        self.te = te
        self.fwd = fwd
        self.proofs = proofs
        self.rid = rid


def sort_headers(headers: list) -> SortedHeaders:
    """Sort ``headers`` (``(name, value)`` lines as parsed) in one pass."""
    auth = []
    host = None
    hosts = 0
    kept = []
    length = None
    te = None
    connection = None
    fwd = None
    rid = None
    rids = 0
    proofs = None
    for item in headers:
        name = item[0].lower()
        if name in REQUEST_DROP:
            if name == b"authorization":
                auth.append(item[1])
            elif name == b"host":
                host = item[1].rstrip(b" \t")  # llhttp keeps trailing OWS
                hosts += 1
            elif name == b"content-length":
                length = item[1]
            elif name == b"transfer-encoding":
                # Every line counts: "gzip" then "chunked" is not chunked.
                te = item[1] if te is None else te + b"," + item[1]
            elif name == b"connection":
                connection = (connection or []) + item[1].split(b",")
            elif name in FORWARDING:
                fwd = [item] if fwd is None else fwd + [item]
            elif name == b"x-request-id":
                rid = item[1]
                rids += 1
            elif name in SENDER_PROOF:
                proofs = [item] if proofs is None else proofs + [item]
            continue
        if name[:1] in _REPORTED_FIRST and proxy_reported(name):
            # Forwarded only for a trusted proxy (forwarded_lines).
            fwd = [item] if fwd is None else fwd + [item]
            continue
        kept.append(item)
    if connection:
        kept = drop_connection_options(kept, connection)
    if rids != 1 or not _acceptable_id(rid):
        rid = new_request_id()
    return SortedHeaders(kept, auth, host, hosts, length, te, fwd, proofs,
                         rid)


def head_problem(method: bytes, version: str,
                 sorted_: SortedHeaders) -> Optional[tuple]:
    """``(status, error, description)`` for a request head phantomd will
    not forward (its version, Host lines, transfer coding or method), or
    None."""
    if version != "1.1" and version != "1.0":
        return ((400, "invalid_request", "malformed request line")
                if version[0] == "0" else
                (505, "invalid_request", "only HTTP/1.x is supported"))
    hosts = sorted_.hosts
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        return (400, "invalid_request", "exactly one Host header is required")
    if hosts and _VALID_HOST(sorted_.host) is None:
        # RFC 9112 section 3.2: a Host that is no host (and port) is a 400.
        return (400, "invalid_request", "the Host header is not a host name")
    te = sorted_.te
    if te is not None:
        if version == "1.0":
            # RFC 9112 section 6.1: an HTTP/1.0 hop in front may have
            # framed this body by Content-Length or by the close instead.
            return (400, "invalid_request",
                    "Transfer-Encoding in an HTTP/1.0 request")
        if te.strip().lower() != b"chunked":
            return (501, "not_implemented",
                    "only the chunked transfer coding is supported")
    if method == b"CONNECT":
        return (501, "not_implemented", "CONNECT is not supported")
    return None


def target_of(method: bytes, url: bytes) -> Optional[bytes]:
    """The origin-form target of a request line's ``url``: itself when it
    starts with ``/``, ``*`` for ``OPTIONS *``, the path (and query) of an
    absolute ``http(s)://`` URL (``*`` for an ``OPTIONS`` of none, RFC 9112
    section 3.2.4); None for anything else."""
    if url[:1] == b"/":
        return url
    if url == b"*" and method == b"OPTIONS":
        return b"*"
    lowered = url[:8].lower()
    if (lowered.startswith(b"http://") or lowered.startswith(b"https://")) \
            and b"#" not in url:  # a fragment could end the authority
        rest = url[url.index(b"//") + 2:]
        cut = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < cut:
                cut = i
        path = rest[cut:]
        if path[:1] != b"/":
            if not path and method == b"OPTIONS":
                return b"*"
            path = b"/" + path
        return path
    return None


def canonical_length(length: bytes) -> bytes:
    """A Content-Length as a number, never as written: "0005" or "5 " might
    be read otherwise by the API (llhttp has checked the digits)."""
    return b"%d" % int(length)


def own_forwarded(peer: Optional[str], tls: bool) -> bytes:
    """The X-Forwarded-For/-Proto lines phantomd sends for a peer whose
    X-Forwarded-* it does not believe."""
    fwd = b""
    if peer:
        fwd = b"X-Forwarded-For: " + peer.encode("ascii") + b"\r\n"
    if tls:
        return fwd + b"X-Forwarded-Proto: https\r\n"
    return fwd + b"X-Forwarded-Proto: http\r\n"


def forwarded_lines(fwd: Optional[list], trusted: bool, peer: str,
                    tls: bool, host: Optional[bytes], own: bytes,
                    drop: Any = None) -> bytes:
    """The X-Forwarded-* lines of a request: a trusted proxy's extended
    with this hop (and its other ``proxy_reported`` lines, less the
    route's ``drop`` names), else ``own`` (``own_forwarded``) and the
    Host."""
    if fwd is not None and trusted:
        return forwarded_by_proxy(fwd, peer.encode("ascii"),
                                  b"https" if tls else b"http", host, drop)
    if host is not None:
        return own + b"X-Forwarded-Host: " + host + b"\r\n"
    return own


def upstream_target(base_path: bytes, sent: bytes) -> bytes:
    """The target on the upstream: the route's (``strip_prefix`` applied)
    under the pool's ``base_path``."""
    if base_path:
        return base_path + (sent if sent != b"*" else b"")
    return sent


def upstream_head(method: bytes, target: bytes, authority: bytes,
                  jwt: Optional[bytes], rid: bytes, kept: list, drop: Any,
                  claimed: Any, forwarded: bytes, chunked: bool,
                  length: Optional[bytes], websocket: bool = False) -> bytes:
    """The request head for the upstream: Host is the pool's
    ``authority``; ``jwt`` (None: no Authorization at all); the request id;
    the ``kept`` lines minus the route's ``drop`` names; the ``claimed``
    claim lines; the ``forwarded`` lines; with ``websocket``, the upgrade's
    ``WEBSOCKET_LINES``; the body's framing."""
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", authority,
             b"\r\n"]
    if jwt is not None:
        parts += (b"Authorization: Bearer ", jwt, b"\r\n")
    parts += (b"X-Request-Id: ", rid, b"\r\n")
    for name, value in kept:
        if drop and drop_name(name) in drop:
            continue
        parts += (name, b": ", value, b"\r\n")
    for name, value in claimed:
        parts += (name, b": ", value, b"\r\n")
    parts.append(forwarded)
    if websocket:
        parts.append(WEBSOCKET_LINES)
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif length is not None:
        parts += (b"Content-Length: ", length, b"\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


def retryable(method: bytes, chunked: bool, length: Optional[bytes]) -> bool:
    """Whether the pool may send the request again on a fresh connection:
    a safe method and no body."""
    return method in RETRYABLE_METHODS and not chunked and (
        length is None or length == b"0")
