"""Whole, bounded answers from whichever HTTP client phantomd was given.

The introspector and the key-set fetcher want an answer whole (``Answer``:
code, decoded headers, body), never more than a bound.  ``fetcher_for``
gives them ``HTTPClient.fetch`` in production; for a client with treq's
interface instead (``treq.testing.StubTreq`` in unit tests) it gives
``_via_treq``, which reads a streamed response into the same ``Answer``
and fails the same ways (``BodyTooLarge``, ``BodyFailed``, or the
client's own failure before the head).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from phantomd.http.client import (Answer, BodyFailed, BodyTooLarge, HTTPClient,
                                  encode_headers)

Fetch = Callable[[str, str, Optional[bytes], Any, int, tuple], Deferred]
"""``fetch(method, url, data, headers, max_body, keep) -> Deferred[Answer]``,
as ``HTTPClient.fetch`` takes them."""


def fetcher_for(http: Any) -> Fetch:
    """``http.fetch`` for a ``HTTPClient``, else the treq way."""
    if isinstance(http, HTTPClient):
        return http.fetch
    return lambda *args: _via_treq(http, *args)


def fixed_headers(http: Any, headers: Any) -> Any:
    """``headers`` as the fetcher for ``http`` takes them fastest when they
    are sent on every request: checked and encoded once for a
    ``HTTPClient``, as they are otherwise."""
    if isinstance(http, HTTPClient):
        return encode_headers(headers)
    return headers


class _TooLarge(Exception):
    """The body passed its bound."""


class _BoundedBody(Protocol):
    """Reads a response body of at most ``limit`` bytes, for ``_via_treq``.

    Past the bound it stops reading and closes the connection (the rest is
    never read) and reports ``_TooLarge``; with ``keep`` false the bytes are
    counted but not kept (bodies of error statuses).  ``done`` is called
    exactly once, with the body bytes or a Failure.  Bodies delimited by the
    connection closing (no Content-Length, not chunked) are complete.
    """

    def __init__(self, limit: int, keep: bool,
                 done: Callable[[Union[bytes, Failure]], None]) -> None:
        self._limit = limit
        self._keep = keep
        self._done: Optional[Callable[[Union[bytes, Failure]], None]] = done
        self._parts: list[bytes] = []
        self._size = 0
        self._finished = False

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._stop()
            self._report(Failure(_TooLarge()))
        elif self._keep:
            self._parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore
        if reason.check(ResponseDone, PotentialDataLoss):
            self._report(b"".join(self._parts))
        else:
            self._report(reason)

    def abort(self) -> None:
        """Stop reading and drop the connection; ``done`` is not called."""
        self._done = None
        self._stop()

    def _stop(self) -> None:
        self._finished = True
        self._parts = []
        if self.transport is not None:
            self.transport.stopProducing()

    def _report(self, result: Union[bytes, Failure]) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(result)


def _via_treq(http: Any, method: str, url: str, data: Optional[bytes],
              headers: Any, max_body: int, keep: tuple) -> Deferred:
    """``HTTPClient.fetch`` for a client with treq's interface (treq
    itself, or ``treq.testing.StubTreq`` in tests): the same ``Answer``
    and the same failures, from a streamed response read by
    ``_BoundedBody``."""
    reader: list[_BoundedBody] = []

    def cancel(_: Deferred) -> None:
        if reader:
            reader[0].abort()
        else:
            request.cancel()

    result: Deferred = Deferred(cancel)

    def got(response: Any) -> None:
        if result.called:  # cancelled meanwhile
            late = _BoundedBody(0, False, lambda _: None)
            response.deliverBody(late)
            late.abort()
            return
        code, kept = response.code, response.code in keep
        fields: dict[str, list[str]] = {}
        for name, values in response.headers.getAllRawHeaders():
            fields.setdefault(name.decode("latin-1").lower(), []).extend(
                v.decode("latin-1") for v in values)

        def done(body: Union[bytes, Failure]) -> None:
            if result.called:
                return
            if not isinstance(body, Failure):
                result.callback(Answer(code, fields, body))
            elif not body.check(_TooLarge):
                result.errback(BodyFailed(code, body))
            elif kept:
                result.errback(BodyTooLarge(code, max_body))
            else:
                result.callback(Answer(code, fields, b""))

        reader.append(_BoundedBody(max_body, kept, done))
        response.deliverBody(reader[0])

    def failed(failure: Failure) -> None:
        if not result.called:
            result.errback(failure)

    request = http.request(method, url, data=data, headers=headers,
                           unbuffered=True, allow_redirects=False)
    request.addCallbacks(got, failed)
    return result
