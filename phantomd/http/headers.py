"""Header rules shared by both directions of the proxy (RFC 9110 section 7.6.1).

Plain functions over ``list[tuple[bytes, bytes]]``: the data path keeps the
headers as llhttp handed them over, in order and in their original case.
"""

from __future__ import annotations

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization",
    b"proxy-authenticate",
))

# Headers phantomd sets for the upstream; a client must not be able to spoof them.
SET_BY_PROXY = frozenset((
    b"authorization", b"host", b"content-length", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
))

REQUEST_DROP = HOP_BY_HOP | SET_BY_PROXY
RESPONSE_DROP = HOP_BY_HOP | frozenset((b"content-length",))


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset:
    """Lower-cased header names listed in every ``Connection`` header."""
    names = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    names.add(token)
    return frozenset(names)


def has_connection_header(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, _ in headers:
        if len(name) == 10 and name.lower() == b"connection":
            return True
    return False
