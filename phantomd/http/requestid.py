"""Request ids (``X-Request-Id``): the client's when it is acceptable, else a
new one phantomd makes.  One id per request, in the access log, in error
bodies and on every answer, on the data path and on forward-auth checks."""

from __future__ import annotations

import os
import re
from binascii import b2a_hex

#: A client's X-Request-Id is kept when it is 1-128 visible ASCII characters.
acceptable = re.compile(rb"[!-~]{1,128}\Z").match


class RequestIds:
    """New request ids: 128 bits from the kernel's CSPRNG as 32 hex digits.

    The kernel is asked for 256 ids at a time (8 KiB of hex held, no more):
    one ``os.urandom`` per id costs twice as much (0.5 us).  A forked
    child starts a fresh batch, so no two processes share ids."""

    _BATCH = 16 * 256

    def __init__(self) -> None:
        self._hex = b""
        self._at = 0
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._hex = b""
        self._at = 0

    def __call__(self) -> bytes:
        at = self._at
        if at >= len(self._hex):
            self._hex = b2a_hex(os.urandom(self._BATCH))
            at = 0
        self._at = at + 32
        return self._hex[at:at + 32]


new_request_id = RequestIds()


def chosen(values: list) -> bytes:
    """The id of a request whose ``X-Request-Id`` values are ``values``:
    the client's if it sent exactly one acceptable one, else a new one."""
    if len(values) == 1 and acceptable(values[0]):
        return values[0]
    return new_request_id()


def from_headers(headers: list) -> bytes:
    """``chosen`` for a request's ``(name, value)`` header lines."""
    return chosen([v for n, v in headers if n.lower() == b"x-request-id"])
