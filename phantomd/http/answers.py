"""The shape of phantomd's answers on the wire: status lines, response heads
and the ``Date`` every answer carries.  Used by the front and by the
forward-auth listener, so both speak alike."""

from __future__ import annotations

from typing import Any, Optional

from phantomd.http.headers import http_date
from phantomd.token.outcomes import Reject

REASONS = {
    200: b"OK", 204: b"No Content", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


def head(status: int, reason: Optional[bytes], headers: list,
         framing: bytes, close: bool, http11: bool) -> list:
    """A response head in pieces: status line, ``headers``, the framing
    line (Content-Length or Transfer-Encoding, or nothing), then Connection
    as the client needs it, and the blank line."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (
        status, reason or REASONS.get(status, b"Unknown"))]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(framing)
    if close:
        parts.append(b"Connection: close\r\n\r\n")
    elif not http11:
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return parts


#: The ``connections_rejected`` reason of a request phantomd refuses, by
#: status.
REJECTED_REASON = {400: "bad_request", 408: "body_timeout",
                   414: "head_too_large", 431: "head_too_large",
                   501: "unsupported", 505: "unsupported"}

#: The answer to a connection accepted beyond ``max_connections``.
AT_CAPACITY = Reject(503, "temporarily_unavailable", "too many connections",
                     retry_after=1, bearer=False)


def own_answer(status: int, headers: list, body: bytes, date: bytes,
               rid: bytes, cors: Optional[list], close: bool, http11: bool,
               head_only: bool) -> bytes:
    """A whole answer phantomd makes itself (never the upstream's):
    ``headers`` (extended in place) with ``Date``, ``X-Request-Id`` and the
    request's CORS headers, the body framed by Content-Length (none on a
    204, none sent for HEAD)."""
    headers.append((b"Date", date))
    headers.append((b"X-Request-Id", rid))
    if cors:
        headers += cors
    parts = head(status, None, headers,
                 b"Content-Length: %d\r\n" % len(body)
                 if status != 204 else b"", close, http11)
    if not head_only:
        parts.append(body)
    return b"".join(parts)


class Dates:
    """The ``Date`` value for now on ``clock``, formatted once a second."""

    __slots__ = ("_clock", "_at", "_value")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._at = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(self._clock.seconds())
        if now != self._at:
            self._at = now
            self._value = http_date(now)
        return self._value
