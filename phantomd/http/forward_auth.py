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
"""

from __future__ import annotations

import hmac
import os
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from phantomd.http.answers import REASONS, Dates
from phantomd.http.fastio import writer_for
from phantomd.token.outcomes import Forward, Reject, error_response

log = Logger()

#: The header a proxy sends the ``secret_file`` contents in.
SECRET_HEADER = b"x-phantomd-secret"

#: Longest original URI accepted (nginx's default large_client_header_buffers
#: is 8 KiB, so a longer one cannot have come through it either).
MAX_ORIGINAL_URI = 8192

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}\Z").match
# Visible ASCII only: no CR, LF, NUL, space or other controls.
_URI = re.compile(rb"[\x21-\x7e]+\Z").match
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}\Z").match
_JWT = re.compile(rb"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]*)*\Z").match

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
    values: list = []
    for name in names:
        values += headers.getRawHeaders(name, [])
    if not values:
        return None
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
    return OriginalRequest(method.upper(), uri)


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

    def authorize(self, original: OriginalRequest,
                  authorization: Sequence[bytes]) -> defer.Deferred:
        """The gate's decision for ``original``, by its route (DESIGN
        section 8): its path checked as the front checks it (400), the
        route's scopes, and for ``auth = none`` (or ``optional`` without a
        token) a 200 carrying no Authorization at all.  Claim headers are
        not answered here (the proxy would have to copy them)."""
        table = self.routes
        if table is None:
            return self.gate.authorize(authorization)
        from phantomd.http.routes import UnsafePath
        try:
            match = table.match(original.method, original.uri)
        except UnsafePath as e:
            return defer.succeed(error_response(400, "invalid_request",
                                                str(e)))
        route = match.route
        if route.auth == "none" or (route.auth == "optional"
                                    and not authorization):
            return defer.succeed(PUBLIC)
        if route.required_scopes is None:
            return self.gate.authorize(authorization)
        return self.gate.authorize(authorization,
                                   required_scopes=route.required_scopes)


class _Headers:
    """The check's header lines, by lower-case name (``getRawHeaders`` as
    twisted.web's ``Headers`` has it, for ``original_request``)."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: dict = {}

    def getRawHeaders(self, name: bytes, default=None):
        return self.lines.get(name, default)


#: The only header lines a check reads.
_READ = frozenset(_FORWARDED + _FORWARDED_URI + (
    b"authorization", b"x-request-id", SECRET_HEADER))


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
        self._timer = None
        self._kind = None
        self._deadline = 0.0
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
        self._arm(self.factory.idle_timeout, _IDLE)

    def connectionLost(self, reason=None) -> None:
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
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
            too_large = isinstance(e.__context__, _TooLarge)
            self._fail(431 if too_large else 400)

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = _Headers()
        self._size = self._count = 0
        self._arm(self.factory.header_timeout, _HEAD)

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
            lines = self._headers.lines
            got = lines.get(name)
            if got is None:
                lines[name] = [value]
            else:
                got.append(value)

    def on_headers_complete(self) -> None:
        self._disarm()
        p = self._parser
        slot = [None, None]
        self._slots.append(slot)
        if len(self._slots) >= MAX_PIPELINE and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        self._check(slot, p.get_method(), self._url, self._headers,
                    p.should_keep_alive())

    # -- checking -------------------------------------------------------------

    def _check(self, slot, method: bytes, uri: bytes, headers: _Headers,
               keep_alive: bool) -> None:
        factory = self.factory
        rid = headers.getRawHeaders(b"x-request-id")
        rid = (rid[0] if rid and len(rid) == 1 and _REQUEST_ID(rid[0])
               else factory.request_id())
        ctx = (rid, method == b"HEAD", keep_alive)
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
        d = checker.authorize(original,
                              headers.getRawHeaders(b"authorization", []))
        result = getattr(d, "result", None)
        if d.called and type(result) in (Forward, Reject):
            d.addErrback(lambda f: None)
            return self._answer(slot, ctx, result)
        slot[1] = d
        d.addCallbacks(self._decided, self._failed,
                       callbackArgs=(slot, ctx), errbackArgs=(slot, ctx))

    def _failed(self, f, slot, ctx) -> None:
        if f.check(defer.CancelledError) or self._closing and \
                slot not in self._slots:
            return
        log.failure("forward-auth check failed", f)
        self._answer(slot, ctx, error_response(500, "server_error",
                                               "internal error"))

    def _decided(self, outcome, slot, ctx) -> None:
        if slot not in self._slots:
            return  # the connection went away
        self._answer(slot, ctx, outcome)

    def _answer(self, slot, ctx, outcome) -> None:
        rid, head_only, keep_alive = ctx
        factory = self.factory
        if outcome is PUBLIC:
            status, body = 200, b""
            lines = [b"Cache-Control: no-store\r\n"]
        elif type(outcome) is Forward:
            jwt = outcome.jwt.encode("ascii", "replace")
            if not _JWT(jwt):
                log.error("the gate produced a malformed JWT for "
                          "{token_id}", token_id=outcome.token_id)
                outcome = error_response(
                    502, "bad_gateway",
                    "the token service returned an unusable token")
        if outcome is PUBLIC:
            pass
        elif type(outcome) is Forward:
            status, body = 200, b""
            lines = [b"Authorization: Bearer ", jwt,
                     b"\r\nCache-Control: no-store\r\n"]
        else:
            status, body = outcome.status, outcome.body()
            lines = []
            for name, value in outcome.headers(factory.checker.gate.realm):
                lines += (name, b": ", value, b"\r\n")
        factory.metrics.forward_auth_answered(status)
        close = not keep_alive or self._closing
        slot[0] = b"".join([
            b"HTTP/1.1 %d %s\r\nDate: " % (status,
                                           REASONS.get(status, b"")),
            factory.date(), b"\r\nX-Request-Id: ", rid, b"\r\n"] + lines + [
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            b"" if head_only else body])
        if close:
            slot.append(True)
        self._flush()

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
        if not slots and self._kind is None:
            self._arm(self.factory.idle_timeout, _IDLE)

    def _fail(self, status: int) -> None:
        """Answer what cannot be parsed (after the answers owed), close."""
        self._closing = True
        slot = [None, None]
        self._slots.append(slot)
        self._answer(slot, (self.factory.request_id(), False, False),
                     error_response(status, "invalid_request" if status ==
                                    400 else "request_header_fields_too_large",
                                    "malformed request" if status == 400 else
                                    "request head too large"))

    # -- timers ---------------------------------------------------------------

    # One DelayedCall at most, moved lazily: arming sets a deadline, and
    # the call, when it fires early, re-schedules itself for the rest.
    # (Scheduling and cancelling a call per check costs more than the
    # check's parsing.)  It is never more than header_timeout ahead, so a
    # head's deadline, the shorter one, is never missed.

    def _arm(self, seconds: float, kind: int) -> None:
        self._kind = kind
        self._deadline = self.reactor.seconds() + seconds
        if self._timer is None:
            self._timer = self.reactor.callLater(
                min(seconds, self.factory.header_timeout), self._timed_out)

    def _disarm(self) -> None:
        self._kind = None

    def _timed_out(self) -> None:
        self._timer = None
        kind = self._kind
        if kind is None or self._closing:
            return
        left = self._deadline - self.reactor.seconds()
        if left > 0:
            self._timer = self.reactor.callLater(
                min(left, self.factory.header_timeout), self._timed_out)
            return
        self._kind = None
        self._closing = True
        if kind == _IDLE:
            self.transport.loseConnection()
            return
        slot = [None, None]
        self._slots.append(slot)
        self._answer(slot, (self.factory.request_id(), False, False),
                     error_response(408, "request_timeout",
                                    "request head not received in time"))


class ForwardAuthFactory(Factory):
    """The ``[forward_auth] listen`` factory.  ``idle_timeout`` and
    ``header_timeout`` are ``[phantomd]``'s; ``reconfigure`` applies a
    reload to new checks."""

    noisy = False

    def __init__(self, reactor, checker: Checker, metrics,
                 idle_timeout: float = 60, header_timeout: float = 10
                 ) -> None:
        self.reactor = reactor
        self.checker = checker
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.date = Dates(reactor)
        self._id_prefix = os.urandom(6).hex().encode("ascii")
        self._ids = 0

    def reconfigure(self, idle_timeout: float, header_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout

    def request_id(self) -> bytes:
        """A new id: this process's random prefix and a counter (unique
        without a system call per check)."""
        self._ids += 1
        return b"%s-%x" % (self._id_prefix, self._ids)

    def buildProtocol(self, addr: Any) -> CheckProtocol:
        p = CheckProtocol(self)
        return p
