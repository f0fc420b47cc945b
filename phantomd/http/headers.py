"""Header names the proxy drops or sets itself (RFC 9110 section 7.6.1).

The data path keeps headers as llhttp handed them over (``list[tuple[bytes,
bytes]]``, in order and in their original case) and filters them in one pass
against these sets, by lower-cased name; headers named in ``Connection`` go
too.
"""

from __future__ import annotations

from email.utils import formatdate

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization",
    b"proxy-authenticate",
))

# Headers phantomd sets for the upstream; a client must not be able to spoof them.
SET_BY_PROXY = frozenset((
    b"authorization", b"host", b"content-length", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
    b"x-request-id",
))

# Client-address headers phantomd never forwards, from any peer: it cannot
# extend them with its own hop, nor tell whether a proxy in front set them or
# passed on a client's copy.  The API reads X-Forwarded-For.
NEVER_FORWARDED = frozenset((b"x-real-ip",))

# What a trusted proxy (``[phantomd] trusted_proxies``) may tell phantomd.
FORWARDING = frozenset((
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
))

# Other headers through which a proxy tells an API about the client or the
# URL it asked for (with every ``X-Forwarded-*``: Port, Prefix, Server,
# Scheme, Ssl, Uri...): Spring, Werkzeug's ProxyFix, IIS rewrite and
# Symfony read some of them.  Passed on as sent from a trusted proxy, never
# from anyone else (as Traefik does); phantomd writes none of them itself.
PROXY_REPORTED_NAMES = frozenset((
    b"x-original-url", b"x-original-uri", b"x-rewrite-url",
    b"x-original-host", b"true-client-ip", b"x-client-ip",
    b"x-cluster-client-ip", b"cf-connecting-ip", b"fastly-client-ip",
))


# Sender-constraint evidence (DESIGN section 12): the gate checks it, the API
# never sees it (a Client-Cert from a client is never believed either).
SENDER_PROOF = frozenset((b"dpop", b"client-cert", b"client-cert-chain"))


def _underscore_spellings(names: frozenset) -> frozenset:
    """Every spelling of ``names`` with some ``-`` written ``_``: CGI and
    WSGI servers (gunicorn, uWSGI...) turn ``X_Forwarded_For`` into the same
    ``HTTP_X_FORWARDED_FOR`` as the real header, which nginx guards against
    with ``underscores_in_headers off``."""
    out = set()
    for name in names:
        spellings = [b""]
        for i, part in enumerate(name.split(b"-")):
            spellings = [s + part for s in spellings] if i == 0 else [
                s + sep + part for s in spellings for sep in (b"-", b"_")]
        out.update(spellings)
    return frozenset(out) - names


_GUARDED = HOP_BY_HOP | SET_BY_PROXY | NEVER_FORWARDED | frozenset((
    b"x-request-id",  # the front keeps or replaces the real spelling
)) | SENDER_PROOF

REQUEST_DROP = HOP_BY_HOP | SET_BY_PROXY | NEVER_FORWARDED | SENDER_PROOF | \
    _underscore_spellings(_GUARDED)
PROXY_REPORTED = PROXY_REPORTED_NAMES | _underscore_spellings(
    PROXY_REPORTED_NAMES)

RESPONSE_DROP = HOP_BY_HOP | frozenset((b"content-length",))


def proxy_reported(name: bytes) -> bool:
    """Whether lower-cased ``name`` is a ``PROXY_REPORTED`` header or any
    spelling of an ``X-Forwarded-*`` one phantomd does not set."""
    return name in PROXY_REPORTED or (
        name[:12].replace(b"_", b"-") == b"x-forwarded-"
        and name not in REQUEST_DROP)


# Connection options that name no header: nothing more to drop for them.
PLAIN_CONNECTION_OPTIONS = frozenset((b"keep-alive", b"close", b""))


def drop_connection_options(kept: list, connection: list) -> list:
    """``kept`` without the headers named in ``Connection`` (RFC 9110
    section 7.6.1); ``connection`` holds its comma-separated items."""
    tokens = {t.strip().lower().replace(b"_", b"-")
              for t in connection} - PLAIN_CONNECTION_OPTIONS
    if not tokens:
        return kept
    # X_Foo is dropped with X-Foo: behind a CGI server they are one header.
    return [h for h in kept
            if h[0].lower().replace(b"_", b"-") not in tokens]


def http_date(seconds: float) -> bytes:
    """``seconds`` since the epoch as an RFC 9110 IMF-fixdate
    (``Sun, 06 Nov 1994 08:49:37 GMT``), for the ``Date`` header."""
    return formatdate(int(seconds), usegmt=True).encode("ascii")
