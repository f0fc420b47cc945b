"""``[forward_auth]``: phantomd as the token check of a proxy already in front.

nginx ``auth_request``, Caddy ``forward_auth``, Traefik ``ForwardAuth`` and
Envoy ``ext_authz`` (HTTP service) each send a check request per client
request and let it pass when the answer is 2xx, copying headers from it.
Every request on this listener is such a check: phantomd reads the
original request's ``Authorization``, asks the same ``Gate`` as the front
(cache, coalescer, scopes), and answers ``200`` with an empty body and
``Authorization: Bearer <jwt>`` for the proxy to put on the request it
forwards, or the usual 4xx/5xx with ``WWW-Authenticate`` and a JSON body
for it to relay.

This listener hands JWTs to whoever asks, so only ``allow_from`` peers
(and, with ``secret_file``, only those sending the secret in
``X-Phantomd-Secret``) have their checks looked at; anyone else gets 403
without the gate being asked.

The listener is a small HTTP/1.1 protocol on httptools (llhttp), as the
front is: a check has no body to stream and its answer is a few header
lines, so a cache hit is parse, lookup, one write.  (twisted.web's channel
did the same job at about twice phantomd's CPU per check.)  A check's
own body is parsed and discarded, never stored.

Sender-constrained tokens (DESIGN section 12) pass here as on the front:
a DPoP proof in the check's ``DPoP`` header must name the original
request, ``htm`` its method and ``htu`` the URL made of the proxy's
``X-Forwarded-Proto``, ``X-Forwarded-Host`` and the original URI
(without ``X-Forwarded-Host``, the check's own ``Host``: Envoy's
``ext_authz`` sends the client's there, nginx and Caddy their upstream's,
which no proof names, so a missing header fails closed); a
certificate-bound token needs the client certificate in an RFC 9440
``Client-Cert`` header.  Those headers are believed because only
``allow_from`` peers (the proxy) are answered at all: the proxy must set
them itself, overwriting any copy its client sent (the README snippets
do).  Without them such a token is refused, 401 with the DPoP or
certificate error.

A 200 carries every claim header of the original URI's route (DESIGN
section 8), empty for a claim the token lacks, and an ``auth = none`` (or
``optional`` without a token) 200 carries an empty ``Authorization``: a
proxy copying a header from the answer then never keeps or invents one
(Caddy 2.6-2.9 sends a literal placeholder for a header the answer lacks,
2.10 keeps the client's).
"""

from __future__ import annotations

import hmac
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from phantomd.http import requestid
from phantomd.http.admission import bound
from phantomd.http.answers import Dates, head
from phantomd.http.cors import requested_method
from phantomd.http.deadline import Deadline
from phantomd.http.fastio import writer_for
from phantomd.http.routes import UnsafePath, claim_lines
from phantomd.token.mtls import header_thumbprint
from phantomd.token.outcomes import Forward, Reject, error_response
from phantomd.token.tokens import jwt_shaped

log = Logger()

#: The header a proxy sends the ``secret_file`` contents in.
SECRET_HEADER = b"x-phantomd-secret"

#: Longest original URI accepted (nginx's default large_client_header_buffers
#: is 8 KiB, so a longer one cannot have come through it either).
MAX_ORIGINAL_URI = 8192

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}\Z").match
# Visible ASCII only: no CR, LF, NUL, space or other controls.
_URI = re.compile(rb"[\x21-\x7e]+\Z").match

_FORWARDED = (b"x-forwarded-method", b"x-original-method")
_FORWARDED_URI = (b"x-forwarded-uri", b"x-original-uri")

#: A check of a route that needs no token: 200 without Authorization.
PUBLIC = Forward(jwt="")

REFUSED_PEER = error_response(
    403, "access_denied", "this peer may not use the forward-auth listener")
REFUSED_SECRET = error_response(
    403, "access_denied", "missing or wrong forward-auth secret")


@dataclass(frozen=True)
class OriginalRequest:
    """What the proxy says its client asked for: the input of a route
    lookup (``method`` upper-case as sent, ``uri`` origin-form)."""

    method: bytes
    uri: bytes

    @property
    def path(self) -> bytes:
        return self.uri.split(b"?", 1)[0]


def _bad(description: str) -> Reject:
    return Reject(400, "invalid_request", description)


def _one(headers, names: Sequence[bytes], what: str
         ) -> Union[None, bytes, Reject]:
    """The single value all of ``names`` agree on, None when none is sent.

    Proxies set one of the two families and pass the client's headers
    through, so a client can add the other family (or a second line):
    values that disagree are refused rather than one believed."""
    get = headers.getRawHeaders
    first, second = get(names[0]), get(names[1])
    if second is None:
        if first is None:
            return None
        if len(first) == 1:  # the usual case: one line from the proxy
            return first[0].strip(b" \t")
        values = list(first)
    else:
        values = (first or []) + second
    first = values[0].strip(b" \t")
    if any(v.strip(b" \t") != first for v in values[1:]):
        return _bad("conflicting %s headers" % what)
    return first


def original_request(headers, own_method: bytes, own_uri: bytes
                     ) -> Union[OriginalRequest, Reject]:
    """The original method and URI: ``X-Forwarded-Method``/``-Uri`` or
    ``X-Original-Method``/``-URI``, else the check's own (Envoy sends the
    client's method and path as the check's).  The one place they are
    worked out; anything unreadable is a 400."""
    method = _one(headers, _FORWARDED, "X-Forwarded-Method/X-Original-Method")
    if isinstance(method, Reject):
        return method
    uri = _one(headers, _FORWARDED_URI, "X-Forwarded-Uri/X-Original-URI")
    if isinstance(uri, Reject):
        return uri
    method = own_method if method is None else method
    uri = own_uri if uri is None else uri
    if _METHOD(method) is None:
        return _bad("the original method is not an HTTP method token")
    if len(uri) > MAX_ORIGINAL_URI:
        return _bad("the original URI is longer than %d bytes"
                    % MAX_ORIGINAL_URI)
    if _URI(uri) is None:
        return _bad("the original URI has characters a URI cannot have")
    if b"#" in uri:
        # No request target has a fragment (RFC 9112 section 3.2); cut at
        # the wrong place it would name another path than the proxy's.
        return _bad("the original URI contains a fragment (#)")
    lowered = uri[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        rest = uri[uri.index(b"//") + 2:]
        cut = min([i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0],
                  default=len(rest))
        uri = rest[cut:]
        if uri[:1] != b"/":
            uri = b"/" + uri
    elif uri[:1] != b"/" and uri != b"*":
        return _bad("the original URI is not a path")
    method = method.upper()
    if uri == b"*" and method != b"OPTIONS":
        # RFC 9112 section 3.2.4; the front refuses it the same way.
        return _bad("only OPTIONS may have the target *")
    return OriginalRequest(method, uri)


def preflight_method(original: OriginalRequest, headers: Any
                     ) -> Optional[bytes]:
    """For a check of a CORS preflight (an ``OPTIONS`` with ``Origin`` and
    ``Access-Control-Request-Method``, as the front tells one), the method
    it asks about, which chooses its route; else None."""
    if original.method != b"OPTIONS":
        return None
    asked = headers.getRawHeaders(b"access-control-request-method", ())
    if not asked or not headers.getRawHeaders(b"origin", ()):
        return None
    return requested_method([(b"access-control-request-method", v)
                             for v in asked])


def read_secret(path: Optional[str]) -> Optional[bytes]:
    """``secret_file``'s contents (surrounding whitespace removed); None
    without one.  ValueError for an empty or unreadable file."""
    from phantomd.config import read_secret_file
    secret = read_secret_file(path)
    if secret is None:
        return None
    if _URI(secret) is None:
        raise ValueError("%r must hold visible ASCII only (it is sent as "
                         "a header value)" % path)
    return secret


class Checker:
    """The policy behind the listener: peer, secret, original request,
    gate.  HTTP-free, so the data path may be rewritten without it.

    ``settings`` is the ``[forward_auth]`` section; ``secret`` the
    ``secret_file`` contents (``read_secret``).
    """

    def __init__(self, gate, metrics, settings, secret: Optional[bytes],
                 routes=None) -> None:
        self.gate = gate
        self.metrics = metrics
        self.routes = None
        self.reconfigure(settings, secret, routes=routes)

    def reconfigure(self, settings, secret: Optional[bytes],
                    gate=None, routes=None) -> None:
        """``routes``: a ``routes.RouteTable`` whose default route always
        exists (a check has no upstream to miss); None keeps the one in
        force, or none at all (the gate's scopes for every check)."""
        self.allow_from = settings.allow_from
        self.secret = secret
        if gate is not None:
            self.gate = gate
        if routes is not None:
            self.routes = routes

    def refusal(self, peer_allowed: bool,
                sent_secret: Optional[Sequence[bytes]]) -> Optional[Reject]:
        """403 for a peer that may not ask (``allowed(host)`` said no), or
        that did not send the secret, before anything else is read."""
        if not peer_allowed:
            self.metrics.forward_auth_refused["peer"].inc()
            return REFUSED_PEER
        if self.secret is not None:
            if not sent_secret or len(sent_secret) != 1 or \
                    not hmac.compare_digest(sent_secret[0], self.secret):
                self.metrics.forward_auth_refused["secret"].inc()
                return REFUSED_SECRET
        return None

    def allowed(self, host: Optional[str]) -> bool:
        return self.allow_from.trusts(host)

    def route(self, original: OriginalRequest) -> Any:
        """The route ``original`` takes (None without a route table), or
        a 400 ``Reject`` for a path the front would refuse."""
        table = self.routes
        if table is None:
            return None
        try:
            return table.match(original.method, original.uri).route
        except UnsafePath as e:
            return error_response(400, "invalid_request", str(e))

    def authorize(self, original: OriginalRequest, route: Any,
                  authorization: Sequence[bytes], headers: Any = None
                  ) -> defer.Deferred:
        """The gate's decision for ``original`` taking ``route`` (DESIGN
        section 8): the route's scopes, and for ``auth = none`` (or
        ``optional`` without a token) ``PUBLIC``.  ``headers``: the
        check's lines, for the sender-constraint evidence (``DPoP``,
        ``Client-Cert``, ``X-Forwarded-Proto``/``-Host``: the proxy's,
        see the module docstring)."""
        more: dict = {}
        if route is not None:
            if route.auth == "none" or (route.auth == "optional"
                                        and not authorization):
                return defer.succeed(PUBLIC)
            if route.required_scopes is not None:
                more["required_scopes"] = route.required_scopes
        get = headers.getRawHeaders if headers is not None else None
        dpop = get(b"dpop", ()) if get else ()
        certs = get(b"client-cert", ()) if get else ()
        cert = header_thumbprint(certs) if certs else None
        if dpop or cert is not None:
            fwd: list = []
            own: Any = ()
            if dpop:  # only a proof names a URL
                fwd = [(n, v) for n in (b"x-forwarded-proto",
                                        b"x-forwarded-host")
                       for v in get(n, ())]
                own = get(b"host", ())
            more.update(bound(dpop, cert, original.method, original.uri,
                              b"http", own[0] if len(own) == 1 else None,
                              fwd))
        return self.gate.authorize(authorization, **more)


class _Headers(dict):
    """The check's header lines, by lower-case name (``getRawHeaders`` as
    twisted.web's ``Headers`` has it, for ``original_request``; a dict's
    own ``get``, so a look-up costs no Python call)."""

    __slots__ = ()

    getRawHeaders = dict.get


#: The only header lines a check reads.
_READ = frozenset(_FORWARDED + _FORWARDED_URI + (
    b"authorization", b"x-request-id", SECRET_HEADER, b"dpop",
    b"client-cert", b"x-forwarded-proto", b"x-forwarded-host", b"host",
    b"origin", b"access-control-request-method"))


#: Pipelined checks waiting for an answer on one connection; beyond it the
#: connection stops reading until answers have gone out.
MAX_PIPELINE = 16

_IDLE, _HEAD = 1, 2


class _TooLarge(Exception):
    pass


class CheckProtocol(Protocol):
    """One connection from a proxy: HTTP/1.1 checks (keep-alive,
    pipelining) parsed by httptools, answered in order.

    Bounds: a request head of ``MAX_HEAD`` bytes and ``MAX_HEADERS`` lines
    (beyond: 431 and close), ``header_timeout`` to send a head once begun
    (408 and close), ``idle_timeout`` between checks (close), at most
    ``MAX_PIPELINE`` checks in progress (reading pauses).  A check's body
    is parsed and discarded."""

    MAX_HEAD = 16384
    MAX_HEADERS = 100

    def __init__(self, factory: "ForwardAuthFactory") -> None:
        self.factory = factory
        self.reactor = factory.reactor
        self._parser = HttpRequestParser(self)
        self._slots: deque = deque()   # [answer bytes or None, deferred]
        self._deadline = Deadline(factory.reactor, self._timed_out)
        self._paused = False
        self._closing = False
        self._url = b""
        self._headers = _Headers()
        self._size = 0
        self._count = 0

    def connectionMade(self) -> None:
        self._write = writer_for(self.transport)
        self._peer = getattr(self.transport.getPeer(), "host", None)
        self._allow_from = self._allowed = None
        self._deadline.arm(self.factory.idle_timeout, _IDLE)

    def connectionLost(self, reason=None) -> None:
        self._closing = True
        self._deadline.cancel()
        slots, self._slots = self._slots, deque()
        for slot in slots:
            if slot[1] is not None and not slot[1].called:
                slot[1].cancel()

    # -- parsing --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            # The head is complete (an Upgrade or CONNECT): answer it, then
            # close, as nothing after it is HTTP.
            self._closing = True
            if not self._slots:
                self.transport.loseConnection()
        except HttpParserError as e:
            if self._closing:
                # After a check that asked to close (llhttp refuses what
                # follows it): nothing more is read or answered (RFC 9112
                # section 9.6).
                return
            too_large = isinstance(e.__context__, _TooLarge)
            self._fail(431 if too_large else 400)

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = _Headers()
        self._size = self._count = 0
        self._deadline.arm(self.factory.header_timeout, _HEAD)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._size += len(url)
        if self._size > self.MAX_HEAD:
            raise _TooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4
        self._count += 1
        if self._size > self.MAX_HEAD or self._count > self.MAX_HEADERS:
            raise _TooLarge()
        name = name.lower()
        if name in _READ:  # the rest is never looked at
            lines = self._headers
            got = lines.get(name)
            if got is None:
                lines[name] = [value]
            else:
                got.append(value)

    def on_headers_complete(self) -> None:
        self._deadline.disarm()
        p = self._parser
        slot = [None, None]
        self._slots.append(slot)
        if len(self._slots) >= MAX_PIPELINE and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        keep_alive = p.should_keep_alive()
        if not keep_alive:
            self._closing = True  # its answer is the connection's last
        self._check(slot, p.get_method(), self._url, self._headers,
                    keep_alive)

    # -- checking -------------------------------------------------------------

    def _check(self, slot, method: bytes, uri: bytes, headers: _Headers,
               keep_alive: bool) -> None:
        factory = self.factory
        # ctx: request id, HEAD, keep-alive, start, method, URI, route.
        ctx = [requestid.chosen(headers.getRawHeaders(b"x-request-id", ())),
               method == b"HEAD", keep_alive, self.reactor.seconds(),
               method, uri, None]
        checker = factory.checker
        if checker.allow_from is not self._allow_from:
            # Worked out once per connection, again after a reload.
            self._allow_from = checker.allow_from
            self._allowed = checker.allowed(self._peer)
        refused = checker.refusal(self._allowed,
                                  headers.getRawHeaders(SECRET_HEADER))
        if refused is not None:
            return self._answer(slot, ctx, refused)
        original = original_request(headers, method, uri)
        if type(original) is Reject:
            return self._answer(slot, ctx, original)
        ctx[4] = original.method
        ctx[5] = original.uri
        asked = preflight_method(original, headers)
        route = checker.route(original if asked is None
                              else OriginalRequest(asked, original.uri))
        if type(route) is Reject:
            return self._answer(slot, ctx, route)
        ctx[6] = route
        if asked is not None:
            # A browser sends no token on a preflight (DESIGN section 9):
            # through, without one, as the front forwards it without [cors].
            d = defer.succeed(PUBLIC)
        else:
            d = checker.authorize(original, route,
                                  headers.getRawHeaders(b"authorization", []),
                                  headers)
        result = getattr(d, "result", None)
        if d.called and type(result) in (Forward, Reject):
            # Decided already (a cache hit): no callback machinery.
            return self._answer(slot, ctx, result)
        slot[1] = d
        d.addCallbacks(self._decided, self._failed,
                       callbackArgs=(slot, ctx), errbackArgs=(slot, ctx))

    def _failed(self, f, slot, ctx) -> None:
        if f.check(defer.CancelledError) or self._closing and \
                slot not in self._slots:
            if slot[0] is None:
                self._logged(ctx, None, None, 0, "client_closed")
            return
        log.failure("forward-auth check failed", f)
        self._answer(slot, ctx, error_response(500, "server_error",
                                               "internal error"))

    def _decided(self, outcome, slot, ctx) -> None:
        if slot not in self._slots:
            # The connection went away.
            self._logged(ctx, None, outcome, 0, "client_closed")
            return
        self._answer(slot, ctx, outcome)

    def _granted(self, outcome, route) -> Union[list, Reject]:
        """The header lines of a 200: ``Authorization`` (empty for
        ``PUBLIC``) and every claim header of ``route``, empty for an
        absent claim; a 502 for a claim that cannot be a header."""
        if outcome is PUBLIC:
            lines = [(b"Authorization", b"")]
            claims: Any = None
        else:
            jwt = outcome.jwt.encode("ascii", "replace")
            if not jwt_shaped(jwt):
                log.error("the gate produced a malformed JWT for "
                          "{token_id}", token_id=outcome.token_id)
                return error_response(
                    502, "bad_gateway",
                    "the token service returned an unusable token")
            lines = [(b"Authorization", b"Bearer " + jwt)]
            claims = outcome.claims
        if route is not None and route.claim_headers:
            claimed = claim_lines(route, claims) if claims else []
            if claimed is None:
                # As the front: CR, LF, a control or non-ASCII character
                # (or an object) cannot become a header.
                log.error("a claim of {token_id} cannot be sent as a "
                          "header of route {route}",
                          token_id=outcome.token_id, route=route.name)
                return error_response(
                    502, "bad_gateway",
                    "the token's claims cannot be forwarded")
            present = dict(claimed)
            lines += [(name, present.get(name, b""))
                      for name, _ in route.claim_headers]
        lines.append((b"Cache-Control", b"no-store"))
        return lines

    def _answer(self, slot, ctx, outcome) -> None:
        rid, head_only, keep_alive = ctx[0], ctx[1], ctx[2]
        factory = self.factory
        if outcome is PUBLIC or type(outcome) is Forward:
            lines = self._granted(outcome, ctx[6])
            if type(lines) is Reject:
                outcome = lines
        if outcome is PUBLIC or type(outcome) is Forward:
            status, body = 200, b""
        else:
            status = outcome.status
            body = outcome.body(rid.decode("ascii"))
            lines = outcome.headers(factory.checker.gate.realm)
        factory.metrics.forward_auth_answered(status)
        close = not keep_alive or self._closing
        parts = head(status, None, [(b"Date", factory.date()),
                                    (b"X-Request-Id", rid)] + lines,
                     b"Content-Length: %d\r\n" % len(body), close, True)
        if not head_only:
            parts.append(body)
        slot[0] = b"".join(parts)
        if close:
            slot.append(True)
        self._logged(ctx, status, outcome, len(slot[0]), "ok")
        self._flush()

    def _logged(self, ctx, status, outcome, sent: int, end: str) -> None:
        """One access-log line per check, with the front's fields
        (``logs.ACCESS_FIELDS``): the original method and path."""
        access_log = self.factory.access_log
        if access_log is None:
            return
        uri = ctx[5]
        q = uri.find(b"?")
        access_log({
            "client": self._peer,
            "method": ctx[4].decode("ascii", "replace"),
            "path": (uri if q < 0 else uri[:q]).decode("latin-1") or "-",
            "status": status,
            "duration": self.reactor.seconds() - ctx[3],
            "upstream_duration": None,
            "cache": getattr(outcome, "cache", None) or None,
            "token_id": getattr(outcome, "token_id", None) or None,
            "bytes_sent": sent,
            "request_id": ctx[0].decode("ascii"),
            "end": end,
        })

    def _flush(self) -> None:
        slots = self._slots
        while slots and slots[0][0] is not None:
            slot = slots.popleft()
            self._write(slot[0])
            if len(slot) > 2:  # Connection: close
                self._closing = True
                self.transport.loseConnection()
                return
        if self._paused and len(slots) < MAX_PIPELINE:
            self._paused = False
            self.transport.resumeProducing()
        if not slots and not self._deadline.armed:
            self._deadline.arm(self.factory.idle_timeout, _IDLE)

    def _fail(self, status: int, description: str = "") -> None:
        """Answer what cannot be parsed or came too late (after the
        answers owed), close."""
        self._closing = True
        slot = [None, None]
        self._slots.append(slot)
        error = {400: "invalid_request", 408: "request_timeout",
                 431: "request_header_fields_too_large"}[status]
        self._answer(slot, [requestid.new_request_id(), False, False,
                            self.reactor.seconds(), b"-", self._url, None],
                     error_response(status, error, description or (
                         "malformed request" if status == 400 else
                         "request head too large")))

    def _timed_out(self, kind: int) -> None:
        if self._closing:
            return
        if kind == _IDLE:
            self._closing = True
            self.transport.loseConnection()
            return
        self._fail(408, "request head not received in time")


class ForwardAuthFactory(Factory):
    """The ``[forward_auth] listen`` factory.  ``idle_timeout`` and
    ``header_timeout`` are ``[phantomd]``'s; ``reconfigure`` applies a
    reload to new checks."""

    noisy = False

    def __init__(self, reactor, checker: Checker, metrics,
                 idle_timeout: float = 60, header_timeout: float = 10,
                 access_log: Optional[Any] = None) -> None:
        self.reactor = reactor
        #: Called with one dict per check (``logs.AccessLog``), or None.
        self.access_log = access_log
        self.checker = checker
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.date = Dates(reactor)

    def reconfigure(self, idle_timeout: float, header_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: Any) -> CheckProtocol:
        p = CheckProtocol(self)
        return p
