"""``HTTPClient.fetch`` for unit tests, over treq's ``StubTreq``.

The introspector and ``KeySource`` take any client with
``fetch(method, url, data, headers, max_body, keep) -> Deferred[Answer]``
(``phantomd.http.client.HTTPClient`` in production).  ``TreqFetcher``
gives that interface for a client with treq's (``treq.testing.StubTreq``
around an in-memory twisted.web ``Resource``): a streamed response read
into the same ``Answer``, failing the same ways (``BodyTooLarge``,
``BodyFailed``, or the client's own failure before the head).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from phantomd.direct import then
from phantomd.http.client import (Answer, BodyFailed, BodyTooLarge,
                                  EncodedHeaders)


class TreqFetcher:
    """``fetch`` and ``request`` as ``HTTPClient`` has them, through
    ``http`` (treq's interface: ``StubTreq``, or any object with
    ``request``)."""

    def __init__(self, http: Any) -> None:
        self.http = http

    def fetch(self, method: str, url: str, data: Optional[bytes] = None,
              headers: Any = None, max_body: int = 65536,
              keep: tuple = (200,)) -> Deferred:
        return _via_treq(self.http, method, url, data, _plain(headers),
                         max_body, keep)

    def request(self, method: Any, url: str, data: Optional[bytes],
                headers: Any, max_body: int, keep: tuple,
                done: Callable[[Any], None]) -> Any:
        """``fetch`` with a callable (``phantomd.direct``)."""
        if isinstance(method, bytes):
            method = method.decode("ascii")
        return then(self.fetch(method, url, data, headers, max_body, keep),
                    done)


def _plain(headers: Any) -> Any:
    """``encode_headers``' block back into a dict treq takes."""
    if type(headers) is not EncodedHeaders:
        return headers
    out: dict[bytes, list[bytes]] = {}
    for line in headers.block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            out.setdefault(name, []).append(value.strip())
    return out


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
