"""TLS for phantomd: its ``ssl:`` listeners and its outgoing connections.

Listeners (``server_endpoint``): Twisted's ``ssl:`` endpoint installs an ALPN
callback that answers a client offering protocols it was not told about with
an empty selection, which OpenSSL turns into an ``internal_error`` alert; so
curl, browsers and ``openssl s_client -alpn`` could not connect at all.
phantomd's listeners select ``http/1.1`` (or ``http/1.0``) when offered and
otherwise complete the handshake without ALPN (RFC 7301 lets the client
decide then), never with an alert.

Outgoing TLS is verified by default: against the system's CAs, or against
``ca_file`` alone when one is configured, always with host name checking
(service-identity).  A client certificate can be presented for mutual TLS
(RFC 8705 ``tls_client_auth``).  Files are read once, when the policy is
built, so a bad file stops startup (``ValueError`` with a message naming the
file) instead of failing the first request, and no file is read on the
reactor thread while serving.
"""

from __future__ import annotations

from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.exceptions import UnsupportedAlgorithm
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

MAX_CACHED_HOSTS = 64
"""Connection creators kept per host name by ``ClientPolicy``."""


SERVED_PROTOCOLS = (b"http/1.1", b"http/1.0")
"""What phantomd's listeners speak, in order of preference, for ALPN."""


def select_protocol(connection: SSL.Connection, offered: list[bytes]):
    """ALPN: the first of ``SERVED_PROTOCOLS`` the client offers, else no
    selection at all (the handshake goes on without ALPN)."""
    for name in SERVED_PROTOCOLS:
        if name in offered:
            return name
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS side of one ``ssl:`` listener: Twisted's ``CertificateOptions``
    (certificate, key, ciphers, as the endpoint string says) with
    ``select_protocol`` as the ALPN callback of its one context."""

    def __init__(self, options) -> None:
        self.options = options
        self._context = options.getContext()
        self._context.set_alpn_select_callback(select_protocol)

    def getContext(self) -> SSL.Context:
        """The one context every connection is made from (client
        certificate settings go here: ``mtls.request_client_certificates``)."""
        return self._context

    def serverConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def server_endpoint(reactor, description: str):
    """``serverFromString``, with an ``ssl:`` endpoint's TLS settings made
    a ``ServerTLS``."""
    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, SSL4ServerEndpoint):
        endpoint._sslContextFactory = ServerTLS(endpoint._sslContextFactory)
    return endpoint


def endpoint_tls(endpoint) -> Optional[ServerTLS]:
    """The ``ServerTLS`` of an endpoint from ``server_endpoint``; None for
    one without TLS."""
    if isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint._sslContextFactory
    return None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError("cannot read %s %r: %s" % (what, path,
                                                    e.strerror or e))


def _pem_certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError("%s %r holds no readable PEM certificate (%s)"
                         % (what, path, e))
    if not certs:
        raise ValueError("%s %r holds no PEM certificate" % (what, path))
    return certs


def _twisted_certificate(cert: x509.Certificate) -> ssl.Certificate:
    return ssl.Certificate.loadPEM(
        cert.public_bytes(serialization.Encoding.PEM))


def load_trust_root(ca_file: Optional[str] = None):
    """The CAs to verify servers against: ``ca_file`` only, or the system's.

    Raises ValueError when ``ca_file`` cannot be read or holds no PEM
    certificate.
    """
    if not ca_file:
        return ssl.platformTrust()
    certs = _pem_certificates(ca_file, "CA file")
    return ssl.trustRootFromCertificates(
        [_twisted_certificate(c) for c in certs])


class ClientCertificate:
    """A client certificate (with any intermediates) and its private key.

    ``client_cert`` is a PEM file whose first certificate is the client's and
    whose later ones, if any, are sent as its chain; ``client_key`` is an
    unencrypted PEM private key that must match the first certificate.
    """

    def __init__(self, client_cert: str, client_key: str) -> None:
        certs = _pem_certificates(client_cert, "client certificate")
        key_data = _read(client_key, "client key")
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except TypeError:
            raise ValueError("client key %r is encrypted; phantomd needs an "
                             "unencrypted PEM key" % client_key)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ValueError("client key %r is not a readable PEM private "
                             "key (%s)" % (client_key, e))
        self.certificate = certs[0]
        self.private_key = key
        self.chain = certs[1:]
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        try:
            context.use_certificate(self.certificate)
            context.use_privatekey(self.private_key)
            context.check_privatekey()
        except SSL.Error:
            raise ValueError("client key %r does not belong to the "
                             "certificate in %r" % (client_key, client_cert))

    def options(self) -> dict:
        """Keyword arguments for ``CertificateOptions``."""
        return {"privateKey": self.private_key,
                "certificate": self.certificate,
                "extraCertChain": self.chain}


def connection_creator(hostname: str, trust_root,
             client: Optional[ClientCertificate]
             ) -> IOpenSSLClientConnectionCreator:
    extra = client.options() if client is not None else {}
    return ssl.optionsForClientTLS(hostname, trustRoot=trust_root,
                                   extraCertificateOptions=extra)


def client_tls_options(hostname: str, ca_file: Optional[str] = None,
                       client_cert: Optional[str] = None,
                       client_key: Optional[str] = None
                       ) -> IOpenSSLClientConnectionCreator:
    """A verifying TLS connection creator for ``hostname``.

    Raises ValueError with a clear message for unreadable or mismatched
    files; ``client_cert`` and ``client_key`` go together.
    """
    if bool(client_cert) != bool(client_key):
        raise ValueError("client_cert and client_key go together")
    client = ClientCertificate(client_cert, client_key) if client_cert \
        else None
    return connection_creator(hostname, load_trust_root(ca_file), client)


@implementer(IPolicyForHTTPS)
class ClientPolicy:
    """The ``IPolicyForHTTPS`` an ``Agent`` uses: ``client_tls_options`` for
    every host it connects to, with the files loaded once, up front.

    Creators are cached per host name; at ``MAX_CACHED_HOSTS`` the cache is
    emptied and refilled (phantomd talks to a handful of hosts).
    """

    def __init__(self, ca_file: Optional[str] = None,
                 client_cert: Optional[str] = None,
                 client_key: Optional[str] = None) -> None:
        if bool(client_cert) != bool(client_key):
            raise ValueError("client_cert and client_key go together")
        self._trust_root = load_trust_root(ca_file)
        self._client = (ClientCertificate(client_cert, client_key)
                        if client_cert else None)
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int
                         ) -> IOpenSSLClientConnectionCreator:
        name = hostname.decode("ascii")
        creator = self._creators.get(name)
        if creator is None:
            if len(self._creators) >= MAX_CACHED_HOSTS:
                self._creators.clear()
            creator = self._creators[name] = connection_creator(
                name, self._trust_root, self._client)
        return creator
