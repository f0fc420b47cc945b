"""RFC 7662 token introspection: one opaque token in, one JWT (or "inactive")
out.

``Introspector.introspect(token)`` POSTs ``token=<raw>`` to the token
service with phantomd's client credentials (phantomd.token.clientauth) and reads
the answer in the configured ``response`` form:

* ``jwt`` (Curity): ``Accept: application/jwt``; a 200 body is the JWT,
  204 or 200 ``{"active": false}`` means inactive;
* ``phantom_token``: JSON; the JWT is its ``phantom_token`` member (the
  member is ``phantom_token_field``: Keycloak >= 25 calls it ``jwt``, and
  sends it only for ``accept = application/jwt``);
* ``json`` (plain RFC 7662): phantomd mints the JWT (jose.Minter);
* ``token-introspection+jwt`` (RFC 9701): the signed answer is verified,
  then phantomd mints the JWT.

Whatever the form, the JWT that goes upstream must be well formed and
unexpired, and with ``verify_jwt`` its signature must check out against the
token service's keys.  A status in ``inactive_statuses`` (default 204)
with an empty body means inactive, in every form; 401, 403 and 5xx never
can (config refuses them).  A 503 is ``unavailable`` (with ``Retry-After``), a
timeout is ``timeout``, everything else that is not a clear answer is
``error``.  Nothing is retried or cached here: the cache and coalescer
above decide that.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional
from urllib.parse import quote_plus, urlencode

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from phantomd.token import cachecontrol, readers, tokens
from phantomd.token.readers import ACCEPT

from phantomd import config
from phantomd.direct import as_deferred

from phantomd.ops import logs
from phantomd.token.clientauth import ClientAuth
from phantomd.http.client import (AnswerTooLarge, Answer, BodyFailed,
                                  BodyTooLarge, HTTPClient, encode_headers)
from phantomd.token.outcomes import Inactive, IntrospectionFailed

log = Logger()

_FORM_SAFE = re.compile(r"[A-Za-z0-9._~-]*\Z").match
"""Characters a form value keeps as they are (most tokens have no others)."""

RETRY_AFTER_DEFAULT = 5
RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 60

IDLE_CONNECTION_SECONDS = 4
"""Idle pooled connections to the token service are closed after this.

Short on purpose: introspection is a POST, which is never retried, so a
connection the token service has already closed on its side (many servers
drop idle keep-alive connections after 5 s) would cost a client a 502."""

MAX_HEAD_BYTES = 65536
"""Allowance for an answer's status line and headers on the wire."""

LOG_INTERVAL = 10.0
"""Repeats of the same failure (kind, status) are logged at most this often."""

_MAX_LOG_KEYS = 64


_failed = readers.failed


def _describe(failure: Failure) -> str:
    """A one-line reason for a connection-level failure, for logs and the
    502 description (Twisted wraps the real cause in lists of Failures)."""
    e = failure.value
    while isinstance(getattr(e, "reasons", None), list) and e.reasons:
        inner = e.reasons[0]
        e = inner.value if isinstance(inner, Failure) else inner
    if isinstance(e, VerificationError):
        names = []
        for mismatch in e.errors:
            ident = getattr(mismatch, "mismatched_id", None)
            name = getattr(ident, "hostname", None) or getattr(ident, "ip", "")
            names.append(name.decode("ascii", "replace")
                         if isinstance(name, bytes) else str(name))
        return "its TLS certificate is not valid for %s" % (
            ", ".join(names) or "this host")
    if isinstance(e, AnswerTooLarge):
        return "its %s" % e
    if isinstance(e, SSL.Error):
        details = [part[-1] for part in e.args[0]
                   if isinstance(part, tuple) and part] \
            if e.args and isinstance(e.args[0], list) else []
        return "TLS handshake failed (%s)" % (
            ", ".join(details) or "no details")
    return (str(e) or type(e).__name__)[:200]


def _media_type(headers: dict[str, list[str]]) -> Optional[str]:
    values = headers.get("content-type", [])
    if len(values) != 1:
        return None
    return values[0].split(";", 1)[0].strip().lower()


class Introspector:
    """Asks the token service about one token at a time (many concurrently).

    ``settings`` is ``config.introspection``; ``minter`` is needed for
    ``response = json`` and ``token-introspection+jwt``,
    ``response_verifier`` for the latter, ``jwt_verifier`` for
    ``verify_jwt = yes`` (which applies to the JWTs the token service hands
    over: ``jwt`` and ``phantom_token``; minted JWTs are phantomd's own).
    Missing ones raise ValueError here, not on the first request.

    Failures are logged (with ``token_id``, never the token) at most once
    per ``LOG_INTERVAL`` per (kind, status), with a count of the repeats
    suppressed; that map holds at most 64 keys and is emptied when full.
    """

    def __init__(self, clock: Any, http_client: Any, settings: Any,
                 client_secret: Optional[str], minter: Any = None,
                 response_verifier: Any = None,
                 jwt_verifier: Any = None) -> None:
        self._clock = clock
        self._settings = settings
        self._mode = settings.response
        self._verify_jwt = bool(settings.verify_jwt) and self._mode in (
            "jwt", "phantom_token")
        if self._verify_jwt and jwt_verifier is None:
            raise ValueError("verify_jwt needs a JWT verifier")
        self._reader = readers.for_mode(
            self._mode, clock, settings.phantom_token_field, minter,
            response_verifier, jwt_verifier if self._verify_jwt else None)
        self._auth = ClientAuth.from_settings(clock, settings, client_secret)
        self._accept = (settings.accept.encode("ascii") if settings.accept
                        else ACCEPT[self._mode])
        self._inactive_statuses = frozenset(settings.inactive_statuses)
        # Config refuses these already; a caller building settings by hand
        # must not be able to turn "our credentials were refused" or a
        # server fault into "inactive token" either.
        config.inactive_statuses(" ".join(
            str(status) for status in self._inactive_statuses))
        # Bodies kept: an answer's, and those of the inactive statuses,
        # which count only when empty (so they must be seen, bounded).
        self._keep = (200,) + tuple(sorted(self._inactive_statuses))
        self._url = settings.url
        self._send = http_client.request
        self._static_form: Optional[tuple[bytes, Any]] = None
        if self._auth.static:
            tail, headers = self._form()
            self._static_form = (tail, encode_headers(headers))
        self._throttle = logs.Throttle(clock, LOG_INTERVAL, _MAX_LOG_KEYS)
        self.last_success: Optional[float] = None

    def introspect(self, token: str) -> Deferred:
        """Deferred firing ``Active`` or ``Inactive``, or failing with
        ``IntrospectionFailed``; cancelling it aborts the exchange."""
        return as_deferred(lambda done: self.introspect_to(token, done))

    def introspect_to(self, token: str, done: Callable[[Any], None]) -> Any:
        """``introspect`` without a Deferred (``phantomd.direct``): ``done``
        gets the ``Active``, ``Inactive`` or ``Failure``; returns the
        exchange, whose ``cancel()`` aborts it."""
        return _Exchange(self, token, done).start()

    # -- used by _Exchange ---------------------------------------------------

    def _form(self) -> tuple[bytes, dict[bytes, list[bytes]]]:
        """Everything of a request but the token: the rest of the form
        (``&``-prefixed) and the headers."""
        form, headers = self._auth.credentials()
        fields = []
        if self._settings.token_type_hint:
            fields.append(("token_type_hint", self._settings.token_type_hint))
        tail = urlencode(fields + form).encode("ascii")
        headers[b"Accept"] = [self._accept]
        headers[b"Content-Type"] = [b"application/x-www-form-urlencoded"]
        return (b"&" + tail if tail else b""), headers

    def _request(self, token: str, done: Callable[[Any], None]) -> Any:
        """Send the request; ``done`` gets the ``Answer`` or a Failure.
        Returns what cancels it (or None)."""
        tail, headers = self._static_form or self._form()
        if _FORM_SAFE(token) is None:
            token = quote_plus(token, safe="")
        body = b"token=%s%s" % (token.encode("ascii"), tail)
        return self._send(b"POST", self._url, body, headers,
                          self._settings.max_response_bytes, self._keep, done)

    def _answer(self, status: int, headers: dict[str, list[str]],
                body: bytes) -> Any:
        """``Active`` or ``Inactive`` for a complete answer, or a Deferred
        of one when a signature must be checked first; raises (or fails
        with) IntrospectionFailed."""
        now = self._clock.seconds()
        if status in (401, 403):
            raise _failed("error", "token service refused phantomd's client "
                          "credentials (HTTP %d)" % status)
        if status == 503:
            raise _failed("unavailable", "token service unavailable (HTTP "
                          "503)", self._retry_after(headers, now))
        if status in self._inactive_statuses:
            if body.strip():
                raise _failed("error", "token service answered HTTP %d "
                              "with a body (inactive_statuses counts only "
                              "empty answers as inactive)" % status)
            return Inactive(cachecontrol.freshness_lifetime(headers, now))
        if status != 200:
            raise _failed("error", "token service answered HTTP %d" % status)
        return self._reader.read(_media_type(headers), body,
                                 cachecontrol.freshness(headers, now))

    @staticmethod
    def _retry_after(headers: dict[str, list[str]], now: float) -> int:
        values = headers.get("retry-after", [])
        seconds: Optional[float] = None
        if len(values) == 1:
            value = values[0].strip()
            if value.isdigit() and value.isascii():
                seconds = int(value[:6])
            else:
                when = cachecontrol.parse_http_date(value, now)
                if when is not None:
                    seconds = when - now
        if seconds is None:
            return RETRY_AFTER_DEFAULT
        return int(min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX))

    def _log_failure(self, token: str, failure: Failure,
                     status: Optional[int]) -> None:
        e = failure.value
        suppressed = self._throttle.admit(
            (getattr(e, "kind", "error"), status or 0))
        if suppressed is None:
            return
        token_id = tokens.token_id(tokens.token_key(token))
        if not isinstance(e, IntrospectionFailed):
            log.failure("introspection of {token_id} failed unexpectedly",
                        failure, token_id=token_id)
        elif status in (401, 403):
            hint = self._auth.encoding_hint()
            log.error(
                "token service at {url} refused phantomd's client "
                "credentials (HTTP {status}, client_id={client_id}, "
                "auth_method={auth_method}): check them; every "
                "introspection fails until they are fixed{hint}",
                url=self._settings.url, status=status,
                client_id=self._settings.client_id,
                auth_method=self._settings.auth_method,
                hint="; " + hint if hint else "",
                token_id=token_id, suppressed=suppressed)
        else:
            log.warn("introspection of {token_id} failed ({kind}): "
                     "{description}", token_id=token_id, kind=e.kind,
                     description=e.description, status=status,
                     suppressed=suppressed)


class _Exchange:
    """One introspection: request, bounded answer, verdict, under one timer.

    The timer covers everything (connect, request, answer head and body,
    signature checks); when it fires the request is cancelled (which drops
    its connection) and the result fails with ``timeout``.
    """

    def __init__(self, introspector: Introspector, token: str,
                 done: Callable[[Any], None]) -> None:
        self._intro = introspector
        self._token = token
        self._done = done
        self._status: Optional[int] = None
        self._request: Any = None
        self._finished = False
        self._timer = introspector._clock.callLater(
            introspector._settings.timeout, self._timed_out)

    def start(self) -> "_Exchange":
        try:
            self._request = self._intro._request(self._token, self._ended)
        except Exception:
            self._finish(Failure())
        return self

    def _ended(self, result: Any) -> None:
        """The request's outcome (one callback, not three: this is on the
        miss path of every new token)."""
        try:
            if isinstance(result, Failure):
                self._request_failed(result)
            else:
                self._got_answer(result)
        except Exception:
            self._unexpected(Failure())

    def _got_answer(self, answer: Answer) -> None:
        if self._finished:
            return
        self._status = answer.code
        try:
            result = self._intro._answer(answer.code, answer.headers,
                                         answer.body)
        except Exception:
            self._finish(Failure())
            return
        if isinstance(result, Deferred):
            result.addBoth(self._answered)
        else:
            self._finish(result)

    def _unexpected(self, failure: Failure) -> None:
        if not self._finished:
            self._finish(failure)

    def _request_failed(self, failure: Failure) -> None:
        if self._finished:
            return
        e = failure.value
        if isinstance(e, BodyTooLarge):
            self._status = e.code
            failure = Failure(_failed(
                "error", "token service answer larger than "
                "max_response_bytes (%d)" % e.max_body))
        elif isinstance(e, BodyFailed):
            self._status = e.code
            failure = Failure(_failed(
                "error", "token service answer cut short: the connection "
                "ended before the body was complete"))
        else:
            failure = Failure(_failed(
                "error", "cannot reach the token service: %s"
                % _describe(failure)))
        self._finish(failure)

    def _answered(self, result: Any) -> None:
        if not self._finished:
            self._finish(result)

    def _timed_out(self) -> None:
        self._timer = None
        if self._finished:
            return
        self._finish(Failure(_failed(
            "timeout", "token service did not answer within %g s"
            % self._intro._settings.timeout)))
        self._abort()

    def _abort(self) -> None:
        if self._request is not None:
            self._request.cancel()

    def cancel(self) -> None:
        """The caller gave up: abort, and deliver nothing."""
        if self._finished:
            return
        self._finished = True
        self._stop_timer()
        self._abort()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(self, result: Any) -> None:
        self._finished = True
        self._stop_timer()
        intro = self._intro
        if isinstance(result, Failure):
            if not result.check(IntrospectionFailed, CancelledError):
                intro._log_failure(self._token, result, self._status)
                result = Failure(_failed("error", "internal error while "
                                         "introspecting"))
            elif result.check(IntrospectionFailed):
                intro._log_failure(self._token, result, self._status)
        else:
            intro.last_success = intro._clock.seconds()
        self._done(result)


def make_http_client(reactor: Any, settings: Any) -> HTTPClient:
    """The HTTP client the introspector (and the token service's key set)
    uses in production: phantomd.http.client, lean and pooled.

    Up to ``max_in_flight`` idle connections to the token service are kept
    (the coalescer never runs more at once) and closed after
    ``IDLE_CONNECTION_SECONDS``; an answer (head and body, with chunk
    framing) longer than twice ``max_response_bytes`` plus
    ``MAX_HEAD_BYTES`` on the wire aborts its connection; connecting takes
    at most ``timeout``; TLS is verified per phantomd.http.tls, presenting
    ``client_cert`` when configured.  Redirects are never followed, cookies
    never kept.  Raises ValueError for unusable CA/certificate/key files.
    ``close()`` closes the idle connections, and those in flight when their
    exchange ends.
    """
    from phantomd.http import tls
    policy = tls.ClientPolicy(settings.ca_file, settings.client_cert,
                              settings.client_key)
    return HTTPClient(
        reactor, policy, connect_timeout=settings.timeout,
        max_idle=settings.max_in_flight,
        idle_timeout=IDLE_CONNECTION_SECONDS,
        max_answer_bytes=2 * settings.max_response_bytes + MAX_HEAD_BYTES)
