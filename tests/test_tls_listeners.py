"""``ssl:`` listeners as a user meets them: real ``curl`` and ``openssl
s_client`` (both offer ALPN) against a real ``twistd phantomd`` with a
certificate made by ``openssl`` in a temporary directory, with one worker,
two, and ``auto``.

Twisted's own TLS clients send no ALPN, which is how a listener that failed
every ALPN handshake with ``internal_error`` went unnoticed.  The token
service and the API are closed ports: phantomd's 401 for a request without a
token is its own answer, proof that HTTP went through the TLS connection.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from phantomd.http import tls
from tests.helpers_twistd import Twistd, write_ini

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
REQUEST = (b"GET /orders HTTP/1.1\r\nHost: localhost\r\n"
           b"Connection: close\r\n\r\n")


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed localhost certificate and its key, by openssl."""
    key = os.path.join(directory, "key.pem")
    cert = os.path.join(directory, "cert.pem")
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out",
         cert, "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    return cert, key


class SelectProtocolTests(SynchronousTestCase):
    """The ALPN choice itself (table: what the client offers → chosen)."""

    def test_table(self):
        none = SSL.NO_OVERLAPPING_PROTOCOLS
        for offered, chosen in [
                ([b"h2", b"http/1.1"], b"http/1.1"),
                ([b"http/1.1", b"h2"], b"http/1.1"),
                ([b"http/1.0"], b"http/1.0"),
                ([b"http/1.0", b"http/1.1"], b"http/1.1"),
                ([b"h2"], none),
                ([b""], none),
                ([b"HTTP/1.1"], none)]:
            self.assertEqual(tls.select_protocol(None, offered), chosen,
                             offered)


class TLSListenerTests(SynchronousTestCase):
    def setUp(self):
        if OPENSSL is None or CURL is None:
            raise self.skipTest("needs openssl and curl (apt-get install "
                                "openssl curl)")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert, self.key = make_certificate(self.dir)

    def start(self, workers: str) -> tuple[Twistd, int]:
        ini = write_ini(
            self.dir, workers=workers,
            listen="ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s"
            % (self.key, self.cert))
        phantomd = Twistd(self, ini, self.dir)
        count = 1 if workers == "1" else 2 if workers == "2" else \
            os.cpu_count() or 1
        return phantomd, phantomd.port(count)

    def curl(self, port: int) -> tuple[str, str]:
        """``curl -v`` over https with certificate checks on; (the status
        and HTTP version it reports, its verbose log)."""
        r = subprocess.run(
            [CURL, "-sS", "-v", "--cacert", self.cert, "--resolve",
             "localhost:%d:127.0.0.1" % port, "-o", os.devnull, "-w",
             "%{http_code} %{http_version}",
             "https://localhost:%d/orders" % port],
            capture_output=True, timeout=60, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout, r.stderr

    def s_client(self, port: int, alpn: str) -> str:
        r = subprocess.run(
            [OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % port,
             "-servername", "localhost", "-CAfile", self.cert,
             "-verify_return_error", "-alpn", alpn, "-ign_eof"],
            input=REQUEST, capture_output=True, timeout=60)
        out = r.stdout.decode("utf-8", "replace")
        self.assertEqual(r.returncode, 0, out + r.stderr.decode(
            "utf-8", "replace"))
        return out

    def assertServes(self, port: int):
        status, log = self.curl(port)
        # curl offered h2 and http/1.1 (its default) and phantomd chose
        # http/1.1; the answer is phantomd's own 401.
        self.assertRegex(log, r"ALPN.*offers.*h2")
        self.assertRegex(log, r"ALPN.*accepted.*http/1\.1")
        self.assertEqual(status, "401 1.1")

        out = self.s_client(port, "h2,http/1.1")
        self.assertIn("ALPN protocol: http/1.1", out)
        self.assertIn("Verify return code: 0 (ok)", out)
        self.assertRegex(out, r"HTTP/1\.1 401 .*\r\n")
        self.assertIn('WWW-Authenticate: Bearer realm="api"', out)

    def test_alpn_clients_with_one_worker(self):
        phantomd, port = self.start("1")
        self.assertServes(port)
        # A client offering only h2 still completes the handshake, without
        # ALPN (no internal_error alert), and gets an HTTP/1.1 answer.
        out = self.s_client(port, "h2")
        self.assertIn("No ALPN negotiated", out)
        self.assertRegex(out, r"HTTP/1\.1 401 ")
        self.assertNotIn("Traceback", phantomd.output)

    def test_two_workers_share_an_ssl_listener(self):
        phantomd, port = self.start("2")
        for _ in range(4):
            self.assertServes(port)
        self.assertNotIn("Traceback", phantomd.output)

    def test_auto_workers_share_an_ssl_listener(self):
        phantomd, port = self.start("auto")
        self.assertServes(port)
        self.assertNotIn("Traceback", phantomd.output)
