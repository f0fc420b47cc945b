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
``X-Phantomd-Secret``) get past the first line of ``render``; anyone else
gets 403 without the gate being asked.

The listener is twisted.web's HTTP/1.1 channel with a request class of our
own: a check has no body to stream and its answer is a few header lines, so
the channel's keep-alive, pipelining and header limits (16 KiB head, 500
lines) are what is needed, and the request skips resource traversal.  A
check's own body is read and discarded, never stored.
"""

from __future__ import annotations

import hmac
import io
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http

from phantomd.outcomes import Forward, Reject, error_response

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
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ValueError("cannot read %r: %s" % (path, e.strerror or e))
    if not secret:
        raise ValueError("%r is empty" % path)
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

    def __init__(self, gate, metrics, settings, secret: Optional[bytes]
                 ) -> None:
        self.gate = gate
        self.metrics = metrics
        self.reconfigure(settings, secret)

    def reconfigure(self, settings, secret: Optional[bytes],
                    gate=None) -> None:
        self.allow_from = settings.allow_from
        self.secret = secret
        if gate is not None:
            self.gate = gate

    def refusal(self, peer_host: Optional[str],
                sent_secret: Optional[Sequence[bytes]]) -> Optional[Reject]:
        """403 for a peer that may not ask, before anything else is read."""
        if not self.allow_from.trusts(peer_host):
            self.metrics.forward_auth_refused["peer"].inc()
            return REFUSED_PEER
        if self.secret is not None:
            if not sent_secret or len(sent_secret) != 1 or \
                    not hmac.compare_digest(sent_secret[0], self.secret):
                self.metrics.forward_auth_refused["secret"].inc()
                return REFUSED_SECRET
        return None

    def authorize(self, original: OriginalRequest,
                  authorization: Sequence[bytes]) -> defer.Deferred:
        """The gate's decision for ``original``.  Routes (``[route]``)
        will choose the scopes and claim headers from ``original`` here;
        until then ``[phantomd] required_scopes`` apply to every check."""
        return self.gate.authorize(authorization)


class CheckRequest(http.Request):
    """One check: answered from ``process`` without resource traversal."""

    def gotLength(self, length) -> None:
        self.content = io.BytesIO()  # stays empty

    def handleContentChunk(self, data: bytes) -> None:
        pass  # a check's body is never needed, so never stored

    def process(self) -> None:
        factory = self.channel.site
        self._date = http.datetimeToString(factory.reactor.seconds())
        rid = self.requestHeaders.getRawHeaders(b"x-request-id")
        self._rid = (rid[0] if rid and len(rid) == 1 and _REQUEST_ID(rid[0])
                     else os.urandom(8).hex().encode("ascii"))
        checker = factory.checker
        peer = self.getClientAddress()
        refused = checker.refusal(getattr(peer, "host", None),
                                  self.requestHeaders.getRawHeaders(
                                      SECRET_HEADER))
        if refused is not None:
            self._reject(refused)
            return
        original = original_request(self.requestHeaders, self.method,
                                    self.uri)
        if type(original) is Reject:
            self._reject(original)
            return
        d = checker.authorize(
            original, self.requestHeaders.getRawHeaders(b"authorization", []))
        result = getattr(d, "result", None)
        if d.called and type(result) in (Forward, Reject):
            d.addErrback(lambda f: None)  # consumed here: a cache hit
            self._decided(result)
            return
        self.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallbacks(self._decided, self._failed)

    def _failed(self, f) -> None:
        if f.check(defer.CancelledError) or self.finished or \
                self._disconnected:
            return
        log.failure("forward-auth check failed", f)
        self._reject(error_response(500, "server_error", "internal error"))

    def _decided(self, outcome) -> None:
        if self.finished or self._disconnected:
            return
        if type(outcome) is not Forward:
            self._reject(outcome)
            return
        jwt = outcome.jwt.encode("ascii", "replace")
        if not _JWT(jwt):
            log.error("the gate produced a malformed JWT for {token_id}",
                      token_id=outcome.token_id)
            self._reject(error_response(
                502, "bad_gateway",
                "the token service returned an unusable token"))
            return
        self._send(200, [(b"Authorization", b"Bearer " + jwt),
                         (b"Cache-Control", b"no-store")], b"")

    def _reject(self, reject: Reject) -> None:
        realm = self.channel.site.checker.gate.realm
        self._send(reject.status, reject.headers(realm), reject.body())

    def _send(self, status: int, headers: list, body: bytes) -> None:
        self.setResponseCode(status)
        h = self.responseHeaders
        h.setRawHeaders(b"Date", [self._date])
        h.setRawHeaders(b"X-Request-Id", [self._rid])
        for name, value in headers:
            h.addRawHeader(name, value)
        h.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        self.channel.site.metrics.forward_auth_answered(status)
        if body:
            self.write(body)
        self.finish()


_MALFORMED = error_response(400, "invalid_request", "malformed request")


class CheckChannel(http.HTTPChannel):
    """twisted.web's HTTP/1.1 channel (no HTTP/2: proxies speak 1.1 to
    auth services), answering what it cannot parse -- an over-long line,
    a head past 16 KiB, garbage -- with phantomd's JSON 400 and a close
    instead of a bare status line or a silent drop."""

    requestFactory = CheckRequest

    def lineLengthExceeded(self, line: bytes) -> None:
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self.transport is None or self.transport.disconnecting:
            return
        site = self.site
        site.metrics.forward_auth_answered(400)
        body = _MALFORMED.body()
        head = [b"HTTP/1.1 400 Bad Request",
                b"Date: " + http.datetimeToString(site.reactor.seconds()),
                b"Connection: close",
                b"Content-Length: %d" % len(body)]
        realm = site.checker.gate.realm
        head += [name + b": " + value
                 for name, value in _MALFORMED.headers(realm)]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.loseConnection()


class ForwardAuthFactory(http.HTTPFactory):
    """The ``[forward_auth] listen`` factory; ``timeout`` closes idle
    keep-alive connections (``[phantomd] idle_timeout``).  twisted.web's
    own access log is off (it would log every check)."""

    noisy = False
    protocol = CheckChannel

    def __init__(self, reactor, checker: Checker, metrics,
                 timeout: float = 60) -> None:
        super().__init__(timeout=timeout, reactor=reactor)
        self.checker = checker
        self.metrics = metrics

    def buildProtocol(self, addr: Any):
        p = super().buildProtocol(addr)
        p.site = self
        return p

    def startFactory(self) -> None:
        pass  # no access log file, no once-a-second log timestamp timer

    def stopFactory(self) -> None:
        pass

    def log(self, request) -> None:
        pass
