"""Certificate-bound tokens (RFC 8705; DESIGN section 12) end to end: a
real Gateway with an ``ssl:`` listener asking for client certificates,
certificates made by ``openssl`` in a temp dir, a real TLS client (Python's
ssl module, in a thread), and RFC 9440 ``Client-Cert`` from a trusted
proxy."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import shutil
import ssl
import subprocess

from twisted.internet import threads
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from phantomd import app, config
from phantomd.token.mtls import header_thumbprint, thumbprint
from tests.robustness.fakes import async_test
from tests.test_gateway_e2e import GatewayCase, build


def openssl(*args, cwd):
    subprocess.run(("openssl",) + args, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_pki(d):
    """ca.pem; server.pem/.key (self-signed, localhost); client.pem/.key
    signed by the CA; rogue.pem/.key self-signed.  Returns the DER of
    client.pem and rogue.pem."""
    if shutil.which("openssl") is None:
        raise SkipTest("needs the openssl command (apt-get install openssl)")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    for name in ("ca", "server", "rogue"):
        openssl("req", "-x509", *ec, "-keyout", name + ".key", "-out",
                name + ".pem", "-days", "2", "-subj", "/CN=%s" % name,
                *(("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
                  if name == "server" else ()), cwd=d)
    openssl("req", *ec, "-keyout", "client.key", "-out", "client.csr",
            "-subj", "/CN=client", cwd=d)
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey",
            "ca.key", "-CAcreateserial", "-out", "client.pem", "-days", "2",
            cwd=d)
    ders = []
    for name in ("client", "rogue"):
        with open(os.path.join(d, name + ".pem"), "rb") as f:
            ders.append(ssl.PEM_cert_to_DER_cert(f.read().decode()))
    return ders


def x5t(der):
    return base64.urlsafe_b64encode(
        hashlib.sha256(der).digest()).rstrip(b"=").decode()


def https_get(port, token, cert=None, key=None, ca=None):
    """One GET over real TLS, in a thread: (status, body)."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    conn = http.client.HTTPSConnection("localhost", port, context=ctx,
                                       timeout=5)
    try:
        conn.request("GET", "/resource",
                     headers={"Authorization": "Bearer " + token})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class CertificateBound(GatewayCase):

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.client_der, self.rogue_der = make_pki(self.dir)

    def path(self, name):
        return os.path.join(self.dir, name)

    async def tls_scene(self):
        listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
            self.path("server.key"), self.path("server.pem"))
        return await build(self, phantomd={
            "listen": listen, "tls_client_ca_file": self.path("ca.pem")})

    def get(self, scene, token, who=None):
        kw = {"ca": self.path("server.pem")}
        if who:
            kw.update(cert=self.path(who + ".pem"),
                      key=self.path(who + ".key"))
        return threads.deferToThread(https_get, scene.front, token, **kw)

    @async_test
    async def test_bound_token_passes_only_with_its_certificate(self):
        scene = await self.tls_scene()
        token, _ = scene.good_token(cnf={"x5t#S256": x5t(self.client_der)})
        status, body = await self.get(scene, token, "client")
        self.assertEqual(status, 200, body)
        # Requested, not required: without a certificate the connection
        # works, and the bound token is refused.
        status, body = await self.get(scene, token)
        self.assertEqual(status, 401, body)
        self.assertIn(b"invalid_token", body)
        self.assertEqual(len(scene.api.requests), 1)
        # An unbound token needs no certificate.
        plain, _ = scene.good_token()
        status, body = await self.get(scene, plain)
        self.assertEqual(status, 200, body)

    @async_test
    async def test_certificate_from_another_ca_fails_the_handshake(self):
        scene = await self.tls_scene()
        token, _ = scene.good_token(cnf={"x5t#S256": x5t(self.rogue_der)})
        with self.assertRaises((ssl.SSLError, ConnectionError, OSError)):
            await self.get(scene, token, "rogue")
        self.assertNothingForwarded(scene)

    @async_test
    async def test_client_cert_header_only_from_trusted_proxy(self):
        header = b":" + base64.b64encode(self.client_der) + b":"
        cnf = {"x5t#S256": x5t(self.client_der)}
        scene = await build(self)
        token, _ = scene.good_token(cnf=cnf)
        r = await scene.get(token, headers=[(b"Client-Cert", header)])
        self.assertEqual(r.status, 401, r.body)
        self.assertNothingForwarded(scene)
        # Never forwarded, whoever sent it.
        plain, _ = scene.good_token()
        r = await scene.get(plain, headers=[
            (b"Client-Cert", header), (b"Client-Cert-Chain", header),
            (b"Client_Cert", header), (b"DPoP", b"x.y.z")])
        self.assertEqual(r.status, 200, r.body)
        [api] = scene.api.requests
        for name in (b"client-cert", b"client-cert-chain", b"client_cert",
                     b"dpop"):
            self.assertEqual(api.header(name), [], name)

        trusted = await build(self, phantomd={"trusted_proxies": "127.0.0.1"})
        token, _ = trusted.good_token(cnf=cnf)
        r = await trusted.get(token, headers=[(b"Client-Cert", header)])
        self.assertEqual(r.status, 200, r.body)
        r = await trusted.get(token)
        self.assertEqual(r.status, 401, r.body)


class Helpers(SynchronousTestCase):

    def test_header_thumbprint(self):
        der = b"\x30\x03\x02\x01\x01"
        good = b":" + base64.b64encode(der) + b":"
        self.assertEqual(header_thumbprint([good]), thumbprint(der))
        self.assertEqual(header_thumbprint([b" " + good + b" "]),
                         thumbprint(der))
        for bad in ([], [good, good], [base64.b64encode(der)], [b"::"],
                    [b":not base64!:"], [b":" + b"A" * 20000 + b":"]):
            self.assertIsNone(header_thumbprint(bad), bad)

    def test_client_ca_needs_ssl_listener(self):
        d = self.mktemp()
        os.makedirs(d)
        make_pki(d)
        text = ("[phantomd]\nupstream = http://127.0.0.1:3000\n"
                "tls_client_ca_file = %s\n[introspection]\n"
                "url = https://ts.example/introspect\nclient_id = c\n"
                "client_secret = s\n" % os.path.join(d, "ca.pem"))
        c = config.parse(text, "x.ini")
        with self.assertRaises(config.ConfigError) as cm:
            app.check(c)
        self.assertIn("[phantomd] tls_client_ca_file: needs an ssl:",
                      str(cm.exception))
        with open(os.path.join(d, "bad.pem"), "w") as f:
            f.write("no certificate\n")
        c = config.parse(text.replace("ca.pem", "bad.pem"), "x.ini")
        with self.assertRaises(config.ConfigError) as cm:
            app.check(c)
        self.assertIn("tls_client_ca_file", str(cm.exception))
