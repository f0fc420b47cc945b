"""Tests for phantomd.http.tls: loading trust roots and client certificates, and
the TLS policy doing a verified handshake over loopback.

``PKI`` generates a throw-away CA and certificates at run time; no key is
ever committed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, protocol, reactor, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial import unittest

from phantomd.http import tls


class PKI:
    """A CA and the certificates it issues, as PEM files in ``directory``."""

    def __init__(self, directory: str, name: str = "phantomd test CA"):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                           critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        self.ca_file = self._write("ca.pem", self._pem(self.ca_cert))

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    @staticmethod
    def _pem(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def key_pem(key, password: bytes | None = None) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password) if password
            else serialization.NoEncryption())

    def issue(self, name: str, dns=(), ips=(), client=False):
        """Issue a leaf certificate; return (cert_path, key_path, cert)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans = [x509.DNSName(d) for d in dns] + [
            x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([
                ExtendedKeyUsageOID.CLIENT_AUTH if client
                else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path = self._write(name + ".crt", self._pem(cert))
        key_path = self._write(name + ".key", self.key_pem(key))
        return cert_path, key_path, cert

    def server_options(self, cert_path: str, key_path: str,
                       require_client_cert: bool = False):
        """Server-side TLS options; optionally demand a client certificate
        issued by this CA."""
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        kwargs = {}
        if require_client_cert:
            kwargs["trustRoot"] = ssl.trustRootFromCertificates([
                ssl.Certificate.loadPEM(self._pem(self.ca_cert))])
        return ssl.CertificateOptions(privateKey=key, certificate=cert,
                                      **kwargs)


class LoadingTests(unittest.TestCase):
    """Bad files are refused at load time with a message naming them."""

    def setUp(self):
        self.pki = PKI(self.mktemp())
        self.cert, self.key, _ = self.pki.issue("client", client=True)

    def write(self, name, data):
        return self.pki._write(name, data)

    def test_missing_ca_file(self):
        path = os.path.join(self.pki.directory, "nope.pem")
        e = self.assertRaises(ValueError, tls.load_trust_root, path)
        self.assertIn("cannot read CA file", str(e))
        self.assertIn("nope.pem", str(e))

    def test_ca_file_without_certificates(self):
        for data in (b"", b"not a certificate\n", self.pki.key_pem(
                ec.generate_private_key(ec.SECP256R1()))):
            path = self.write("bad-ca.pem", data)
            e = self.assertRaises(ValueError, tls.load_trust_root, path)
            self.assertIn("bad-ca.pem", str(e))
            self.assertIn("PEM certificate", str(e))

    def test_ca_file_with_two_certificates(self):
        other = PKI(self.mktemp(), "other CA")
        with open(self.pki.ca_file, "rb") as a, open(other.ca_file, "rb") as b:
            path = self.write("bundle.pem", a.read() + b.read())
        self.assertIsNotNone(tls.load_trust_root(path))

    def test_client_key_mismatch(self):
        _, other_key, _ = self.pki.issue("other", client=True)
        e = self.assertRaises(ValueError, tls.ClientCertificate,
                              self.cert, other_key)
        self.assertIn("does not belong to the certificate", str(e))

    def test_client_key_encrypted(self):
        path = self.write("enc.key", self.pki.key_pem(
            ec.generate_private_key(ec.SECP256R1()), b"pass"))
        e = self.assertRaises(ValueError, tls.ClientCertificate,
                              self.cert, path)
        self.assertIn("is encrypted", str(e))

    def test_client_key_garbage(self):
        path = self.write("garbage.key", b"-----BEGIN PRIVATE KEY-----\nxx\n")
        e = self.assertRaises(ValueError, tls.ClientCertificate,
                              self.cert, path)
        self.assertIn("not a readable PEM private key", str(e))

    def test_client_cert_is_a_key(self):
        e = self.assertRaises(ValueError, tls.ClientCertificate,
                              self.key, self.key)
        self.assertIn("client certificate", str(e))

    def test_cert_without_key(self):
        e = self.assertRaises(ValueError, tls.client_tls_options,
                              "localhost", None, self.cert, None)
        self.assertIn("go together", str(e))
        self.assertRaises(ValueError, tls.ClientPolicy, None, None, self.key)

    def test_client_tls_options(self):
        creator = tls.client_tls_options("localhost", self.pki.ca_file,
                                         self.cert, self.key)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(creator))

    def test_policy_caches_per_host_within_bound(self):
        policy = tls.ClientPolicy(self.pki.ca_file)
        first = policy.creatorForNetloc(b"localhost", 443)
        self.assertIs(policy.creatorForNetloc(b"localhost", 8443), first)
        for i in range(tls.MAX_CACHED_HOSTS + 5):
            policy.creatorForNetloc(b"h%d.example" % i, 443)
        self.assertLessEqual(len(policy._creators), tls.MAX_CACHED_HOSTS)


class _Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello")


class _Reader(protocol.Protocol):
    def __init__(self):
        self.received = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.received += data
        if self.received == b"hello":
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.received == b"hello":
            self.done.callback(self.received)
        else:
            self.done.errback(reason)


class HandshakeTests(unittest.TestCase):
    """``ClientPolicy`` over a real loopback TLS socket."""

    def setUp(self):
        self.pki = PKI(self.mktemp())
        self.server_cert, self.server_key, _ = self.pki.issue(
            "server", dns=["localhost"], ips=["127.0.0.1"])

    def serve(self, require_client_cert=False, cert=None, key=None):
        options = self.pki.server_options(cert or self.server_cert,
                                          key or self.server_key,
                                          require_client_cert)
        factory = protocol.Factory.forProtocol(_Greeter)
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def connect(self, port, policy, hostname=b"localhost"):
        reader = _Reader()
        endpoint = endpoints.wrapClientTLS(
            policy.creatorForNetloc(hostname, port),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        d = endpoints.connectProtocol(endpoint, reader)
        d.addCallback(lambda _: reader.done)
        return d

    @defer.inlineCallbacks
    def test_verified(self):
        port = self.serve()
        got = yield self.connect(port, tls.ClientPolicy(self.pki.ca_file))
        self.assertEqual(got, b"hello")

    @defer.inlineCallbacks
    def test_verified_ip_address(self):
        port = self.serve()
        got = yield self.connect(port, tls.ClientPolicy(self.pki.ca_file),
                                 b"127.0.0.1")
        self.assertEqual(got, b"hello")

    @defer.inlineCallbacks
    def test_unknown_ca_refused(self):
        port = self.serve()
        other = PKI(self.mktemp(), "another CA")
        with self.assertRaises(SSL.Error):
            yield self.connect(port, tls.ClientPolicy(other.ca_file))

    @defer.inlineCallbacks
    def test_hostname_mismatch_refused(self):
        cert, key, _ = self.pki.issue("wrong", dns=["wrong.example"])
        port = self.serve(cert=cert, key=key)
        with self.assertRaises(VerificationError) as caught:
            yield self.connect(port, tls.ClientPolicy(self.pki.ca_file))
        self.assertIn("localhost", str(caught.exception))

    @defer.inlineCallbacks
    def test_client_certificate_presented(self):
        port = self.serve(require_client_cert=True)
        cert, key, _ = self.pki.issue("gateway_client", client=True)
        got = yield self.connect(
            port, tls.ClientPolicy(self.pki.ca_file, cert, key))
        self.assertEqual(got, b"hello")

    @defer.inlineCallbacks
    def test_client_certificate_required(self):
        port = self.serve(require_client_cert=True)
        with self.assertRaises(Exception):
            yield self.connect(port, tls.ClientPolicy(self.pki.ca_file))
