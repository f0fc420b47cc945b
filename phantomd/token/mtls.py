"""Certificate-bound access tokens (RFC 8705 section 3): which client
certificate did this request come with?

A token whose claims carry ``cnf["x5t#S256"]`` passes only with the client
certificate of that SHA-256 thumbprint.  The certificate is the one the
client presented on an ``ssl:`` listener, which asks for (but does not
require) one signed by ``[phantomd] tls_client_ca_file`` when that is set;
or, from a ``trusted_proxies`` peer that terminated TLS itself, the one in
its RFC 9440 ``Client-Cert`` header.  From any other peer that header is
the client's own word and is ignored (the front never forwards it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, Optional, Sequence

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from phantomd.token.dpop import b64url
from phantomd.http.tls import _pem_certificates

#: Larger ``Client-Cert`` values are ignored (a certificate is a few KB).
MAX_CERTIFICATE_HEADER = 16384


def thumbprint(der: bytes) -> str:
    """``x5t#S256``: base64url(SHA-256(the certificate's DER))."""
    return b64url(hashlib.sha256(der).digest())


def peer_thumbprint(transport: Any) -> Optional[str]:
    """The thumbprint of the client certificate on a TLS transport, or
    None (no certificate, or not TLS)."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return None
    return thumbprint(cert.to_cryptography().public_bytes(Encoding.DER))


def header_thumbprint(values: Sequence[bytes]) -> Optional[str]:
    """The thumbprint of the certificate in one RFC 9440 ``Client-Cert``
    header (an RFC 8941 byte sequence, ``:base64 DER:``); None for no
    header, several, or one that is not a byte sequence."""
    if len(values) != 1:
        return None
    v = values[0].strip(b" \t")
    if len(v) < 3 or len(v) > MAX_CERTIFICATE_HEADER or v[:1] != b":" \
            or v[-1:] != b":":
        return None
    try:
        der = base64.b64decode(v[1:-1], validate=True)
    except (binascii.Error, ValueError):
        return None
    return thumbprint(der) if der else None


def request_client_certificates(endpoint: Any, ca_file: str) -> None:
    """Make an ``ssl:`` server endpoint (as ``serverFromString`` built it)
    ask every client for a certificate signed by a CA of ``ca_file``: a
    client that sends none still connects (its certificate-bound tokens
    are refused later); one that sends another fails the handshake.
    Raises ValueError naming the file if it holds no PEM certificate."""
    certs = _pem_certificates(ca_file, "client CA file")
    ctx = endpoint._sslContextFactory.getContext()
    store = ctx.get_cert_store()
    names = []
    for c in certs:
        x509 = crypto.X509.from_cryptography(c)
        store.add_cert(x509)
        names.append(x509.get_subject())
    ctx.set_client_ca_list(names)
    # Resumed sessions need an id context once peers are verified.
    ctx.set_session_id(b"phantomd-mtls")
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok:
                   bool(ok))


def is_ssl_endpoint(description: str) -> bool:
    return description.split(":", 1)[0].lower() == "ssl"
