"""The token service's signing keys (its JWKS), fetched and cached.

``KeySource`` is what ``jose.JWTVerifier`` and
``jose.IntrospectionResponseVerifier`` ask for a key: it fetches the key set
through the HTTP client it is given (anything with
``fetch(method, url, data, headers, max_body, keep) -> Deferred[Answer]``,
as ``phantomd.http.client.HTTPClient``), so ``jose`` itself never talks
HTTP.
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from jwcrypto import jwk as _jwk
from jwcrypto.common import JWException
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from phantomd.http.client import Answer, BodyFailed, BodyTooLarge
from phantomd.token.jose import JOSEError, _json_object, _key_fits

log = Logger()


class _NotThere(JOSEError):
    """A metadata URL answered with a status other than 200."""


class KeySource:
    """The token service's JWKS, fetched and cached.

    From ``jwks_url``, else discovered: ``jwks_uri`` from
    ``{issuer}/.well-known/openid-configuration``, then RFC 8414's
    ``/.well-known/oauth-authorization-server``; an ``https`` issuer's
    ``jwks_uri`` must be ``https`` too.  An unknown ``kid`` causes
    one refetch, at most one per ``min_refresh_interval`` seconds (a burst
    of unknown kids shares one fetch; a flood of forged kids cannot turn into
    a flood of fetches).  At most ``max_keys`` keys are kept: a larger set is
    truncated (logged).  Bodies beyond ``max_bytes`` are refused, and so are
    redirects (the key set decides what phantomd trusts; it comes from the
    configured or discovered URL, nowhere else).  A fetch
    failure is a ``JOSEError``: the caller answers 502, never lets the
    request pass.
    """

    def __init__(self, clock: Any, http_client: Any,
                 jwks_url: Optional[str] = None,
                 issuer: Optional[str] = None,
                 min_refresh_interval: float = 30, max_keys: int = 100,
                 max_bytes: int = 256 * 1024, timeout: float = 10) -> None:
        if not jwks_url and not issuer:
            raise ValueError("a jwks_url or an issuer (for discovery) is "
                             "required")
        self._clock = clock
        self._get = http_client.fetch
        self._jwks_url = jwks_url or None
        self._issuer = issuer or None
        self._discovered: Optional[str] = None
        self._min_refresh = min_refresh_interval
        self._max_keys = max_keys
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._keys: Optional[dict[Optional[str], _jwk.JWK]] = None
        self._last_attempt: Optional[float] = None
        self._last_error: Optional[str] = None
        self._fetching: Optional[Deferred] = None
        self._waiters: list[Deferred] = []

    def key(self, kid: Optional[str], alg: str) -> Deferred:
        """``Deferred[JWK]`` for ``kid`` usable with ``alg``, or JOSEError.

        A JWS without ``kid`` is accepted only while exactly one key of the
        set fits ``alg`` (a single-key token service); otherwise it is an
        unknown key.
        """
        if self._keys is not None and self._find(kid, alg) is not None:
            return self._pick(kid, alg)
        if self._fetching is None and self._last_attempt is not None and \
                self._clock.seconds() - self._last_attempt < self._min_refresh:
            if self._keys is None:
                return fail(JOSEError("token service keys unavailable (%s)"
                                      % self._last_error))
            return fail(JOSEError("unknown key id %r (key set refreshed "
                                  "recently)" % (kid,)))
        return self._refresh().addCallback(lambda _: self._pick(kid, alg))

    def load(self) -> Deferred:
        """Fetch the key set now unless it is loaded (the readiness probe,
        phantomd.ops.probe); fails with JOSEError like ``key``."""
        if self._keys is not None:
            return succeed(None)
        return self._refresh()

    def _find(self, kid: Optional[str], alg: str) -> Optional[_jwk.JWK]:
        keys = self._keys or {}
        if kid is None and None not in keys:
            fitting = [k for k in keys.values() if _key_fits(k, alg) is None]
            return fitting[0] if len(fitting) == 1 else None
        return keys.get(kid)

    def _pick(self, kid: Optional[str], alg: str) -> Deferred:
        key = self._find(kid, alg)
        if key is None:
            return fail(JOSEError("unknown key id %r" % (kid,)))
        why = _key_fits(key, alg)
        if why:
            return fail(JOSEError("key %r does not fit: %s" % (kid, why)))
        return succeed(key)

    def _refresh(self) -> Deferred:
        """One fetch shared by every caller; each caller gets its own
        Deferred, so cancelling one caller does not cancel the fetch."""
        mine: Deferred = Deferred(lambda d: self._waiters.remove(d)
                                  if d in self._waiters else None)
        self._waiters.append(mine)
        if self._fetching is None:
            self._last_attempt = self._clock.seconds()
            self._fetching = self._fetch()
            self._fetching.addTimeout(self._timeout, self._clock)
            self._fetching.addBoth(self._fetched)
        return mine

    def _fetched(self, result: Any) -> None:
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            if result.check(JOSEError):
                why = str(result.value)
            else:
                why = "%s: %s" % (result.type.__name__, result.getErrorMessage()
                                  or "no detail")
            self._last_error = why
            self._discovered = None
            log.warn("token service JWKS fetch failed: {why}", why=why)
            for d in waiters:
                d.errback(JOSEError("token service keys unavailable (%s)"
                                    % why))
            return
        self._keys = result
        self._last_error = None
        log.info("token service JWKS loaded: {count} key(s)",
                 count=len(result))
        for d in waiters:
            d.callback(None)

    def _fetch(self) -> Deferred:
        if self._jwks_url:
            d = succeed(self._jwks_url)
        elif self._discovered:
            d = succeed(self._discovered)
        else:
            d = self._discover()
        d.addCallback(self._get_json, "JWKS")
        d.addCallback(self._parse_jwks)
        return d

    def _discover(self) -> Deferred:
        issuer = self._issuer or ""
        urls = [issuer.rstrip("/") + "/.well-known/openid-configuration"]
        parts = urlsplit(issuer)
        urls.append(urlunsplit((
            parts.scheme, parts.netloc,
            "/.well-known/oauth-authorization-server"
            + parts.path.rstrip("/"), "", "")))

        def attempt(remaining: list[str]) -> Deferred:
            url = remaining[0]
            d = self._get_json(url, "discovery document")
            d.addCallback(self._jwks_uri_from, url)
            if len(remaining) > 1:
                d.addErrback(next_one, remaining[1:])
            return d

        def next_one(failure: Failure, remaining: list[str]) -> Deferred:
            failure.trap(_NotThere)
            return attempt(remaining)

        return attempt(urls)

    def _jwks_uri_from(self, doc: dict[str, Any], url: str) -> str:
        if doc.get("issuer") != self._issuer:
            raise JOSEError("discovery document %s names issuer %r, not %r"
                            % (url, doc.get("issuer"), self._issuer))
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or urlsplit(uri).scheme not in (
                "http", "https"):
            raise JOSEError("discovery document %s has no usable jwks_uri"
                            % url)
        if urlsplit(url).scheme == "https" and \
                urlsplit(uri).scheme != "https":
            # Keys fetched in clear would let anyone on the path have
            # forged JWTs verified: the issuer's TLS must cover them too.
            raise JOSEError("discovery document %s names jwks_uri %s, not "
                            "https like its issuer: refused" % (url, uri))
        self._discovered = uri
        return uri

    def _get_json(self, url: str, what: str) -> Deferred:
        def got(answer: Answer) -> dict[str, Any]:
            if answer.code != 200:
                raise _NotThere("%s %s answered HTTP %d" % (
                    what, url, answer.code))
            return _json_object(answer.body, "%s %s" % (what, url))

        def failed(failure: Failure) -> Failure:
            if failure.check(BodyTooLarge):
                raise JOSEError("%s %s is larger than %d bytes" % (
                    what, url, self._max_bytes))
            if failure.check(BodyFailed):
                raise JOSEError("%s %s was cut short" % (what, url))
            return failure

        d = self._get("GET", url, None, {b"Accept": [b"application/json"]},
                      self._max_bytes, (200,))
        return d.addCallbacks(got, failed)

    def _parse_jwks(self, doc: dict[str, Any]) -> dict[Optional[str], _jwk.JWK]:
        entries = doc.get("keys")
        if not isinstance(entries, list):
            raise JOSEError('JWKS has no "keys" list')
        keys: dict[Optional[str], _jwk.JWK] = {}
        skipped = 0
        for entry in entries:
            if len(keys) >= self._max_keys:
                log.warn("token service JWKS has more than {max} keys; "
                         "the rest are ignored", max=self._max_keys)
                break
            if not isinstance(entry, dict) or entry.get("kty") == "oct" \
                    or entry.get("use") not in (None, "sig"):
                skipped += 1
                continue
            try:
                key = _jwk.JWK(**entry)
            except (JWException, ValueError, TypeError):
                skipped += 1
                continue
            if key.has_private:
                key = _jwk.JWK(**key.export_public(as_dict=True))
            kid = key.get("kid")
            if kid in keys:
                skipped += 1
                continue
            keys[kid] = key
        if skipped:
            log.info("token service JWKS: {skipped} key(s) ignored (not "
                     "usable for signatures)", skipped=skipped)
        if not keys:
            raise JOSEError("JWKS holds no usable signing key")
        return keys
