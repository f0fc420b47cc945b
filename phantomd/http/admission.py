"""A request's way in: from its parsed head to what the front does with it.

``admit`` sorts the head's lines (``forwarding.sort_headers``), checks what
HTTP/1.1 requires of it, picks its route (DESIGN section 8) and the CORS
headers its answers get (section 9), and says which of five things
happens: it is refused (and the connection closed), answered 404 (no
route), answered as a CORS preflight, forwarded with no token
(``auth = none``/``optional``), or the gate is asked.  ``evidence`` is what
the gate is given beside the token for a sender-constrained one (section
12).  Both are pure: no I/O, nothing kept but the request's own fields,
which ``admit`` fills in for the rest of the exchange.
"""

from __future__ import annotations

from typing import Any, Callable

from phantomd.http.cors import request_origin, requested_method
from phantomd.http.forwarding import (
    canonical_length, head_problem, sort_headers, target_of)
from phantomd.http.proxies import forwarded_origin
from phantomd.http.routes import UnsafePath
from phantomd.http.wire import ParsedRequest
from phantomd.token.dpop import request_url
from phantomd.token.mtls import header_thumbprint

#: What ``admit`` decides (the first item of its answer).
GATE, OPEN, REFUSE, NOT_FOUND, PREFLIGHT = range(5)


def admit(r: ParsedRequest, routes: Any, cors: Any) -> tuple:
    """What to do with ``r`` by the ``routes`` (a ``RouteTable``) and
    ``cors`` (a ``cors.Policy``, or None) in force:

    - ``(GATE, (authorization values, proof lines or None))``;
    - ``(OPEN, None)``: forward it without any token;
    - ``(REFUSE, (status, error, description))``: refuse it and close;
    - ``(NOT_FOUND, None)``: no route (and no default upstream);
    - ``(PREFLIGHT, headers)``: answer it 204 with these headers.
    """
    if r.error is not None:
        return REFUSE, r.error
    h = sort_headers(r.headers)
    r.headers = []
    r.rid = h.rid
    kept = h.kept
    preflight = False
    origin = None
    if cors is not None or r.method == b"OPTIONS":
        origin, preflight = request_origin(kept)
        preflight = preflight and r.method == b"OPTIONS"
        if cors is not None:
            r.cors = cors.answer_headers(origin)
    problem = head_problem(r.method, r.version, h)
    target = target_of(r.method, r.url)
    if target is not None:
        r.target = target
    elif problem is None:
        problem = (400, "invalid_request", "malformed request target")
    if problem is not None:
        return REFUSE, problem
    try:
        # A preflight takes the route of the request it asks about: a
        # route that lists methods (and cors = no, say) must not see its
        # preflights answered by another.
        match = routes.match(requested_method(kept) if preflight
                             else r.method, r.target)
    except UnsafePath as e:
        return REFUSE, (400, "invalid_request", str(e))
    r.chunked = h.te is not None
    if h.length is not None:
        r.length = canonical_length(h.length)
    r.host = h.host
    r.kept = kept
    r.fwd = h.fwd
    auth = h.auth
    if match is None:
        return NOT_FOUND, None
    route = r.route = match.route
    r.sent = match.target
    if not route.cors:  # [route] cors = no: as without [cors]
        cors = r.cors = None
    if preflight and cors is not None:
        # Browsers send no token on a preflight: phantomd answers it.
        r.cors = None
        return PREFLIGHT, cors.preflight_headers(origin)
    if preflight or route.auth == "none" or (
            route.auth == "optional" and not auth):
        # No token goes upstream: the Authorization lines were never kept,
        # and a client's copies of claim headers are dropped.  Without
        # [cors] a preflight goes to the API this way.
        return OPEN, None
    if r.upgrade:
        r.auth = auth  # which tunnel a revocation must close
    return GATE, (auth, h.proofs)


def evidence(proofs: Any, r: ParsedRequest, tls: bool, trusted: bool,
             peer_cert: Callable[[], Any]) -> dict:
    """The gate's keyword arguments for a request's sender-constraint
    evidence (DESIGN section 12), empty when it has none: its DPoP proofs
    and the URL they must name (the client's scheme and host as a trusted
    proxy reports them), and the client certificate's thumbprint (a
    trusted proxy's ``Client-Cert`` header, else ``peer_cert()``: the one
    presented on this TLS connection)."""
    dpop = []
    certs = []
    for n, v in proofs:
        n = n.lower()
        if n == b"dpop":
            dpop.append(v)
        elif n == b"client-cert":
            certs.append(v)
    cert = header_thumbprint(certs) if trusted else peer_cert()
    return bound(dpop, cert, r.method, r.target,
                 b"https" if tls else b"http", r.host,
                 r.fwd if trusted else None)


def bound(dpop: list, cert: Any, method: bytes, target: bytes,
          scheme: bytes, host: Any, forwarded: Any) -> dict:
    """The gate's keyword arguments for ``dpop`` proofs and a client
    certificate thumbprint ``cert`` (empty without either): the proofs must
    name ``method`` and the URL of ``target`` on ``scheme`` and ``host``,
    or on what ``forwarded`` (a trusted proxy's ``X-Forwarded-*`` lines;
    None for any other peer) says the client used.  The front and
    forward-auth both ask this way."""
    if not dpop and cert is None:
        return {}
    url = None
    if dpop:
        scheme, host = forwarded_origin(forwarded, scheme, host)
        url = request_url(scheme, host, target)
    return {"dpop": dpop, "method": method, "url": url, "client_cert": cert}
