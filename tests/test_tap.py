"""The twistd plugin's options: a file phantomd cannot use stops startup
with one line naming file, section and key, before anything binds."""

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from phantomd import tap

BASE = """\
[phantomd]
upstream = {upstream}
{phantomd}
[introspection]
url = {url}
client_id = gw
client_secret = s3cret
{introspection}
[metrics]
listen =
{extra}
"""


class OptionsTests(SynchronousTestCase):
    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def ini(self, upstream="http://127.0.0.1:3000",
            url="http://127.0.0.1:1/introspect", phantomd="",
            introspection="", extra=""):
        return self.write(BASE.format(upstream=upstream, url=url,
                                      phantomd=phantomd,
                                      introspection=introspection,
                                      extra=extra))

    def refused(self, path):
        """Not a UsageError: twistd would print its usage text first."""
        options = tap.Options()
        with self.assertRaises(tap.StartupError) as cm:
            options.parseOptions(["--config", path])
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("phantomd: " + path + ": "),
                        message)
        return message

    def test_good_file_is_parsed(self):
        options = tap.Options()
        options.parseOptions(["--config", self.ini()])
        self.assertEqual(options["parsed"].introspection.client_id, "gw")

    def test_config_or_demo_required(self):
        self.assertRaises(usage.UsageError, tap.Options().parseOptions, [])
        self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                          ["--demo", "--config", self.ini()])

    def test_ini_mistake(self):
        message = self.refused(self.ini(phantomd="workers = lots"))
        self.assertIn("[phantomd] workers:", message)

    def test_bad_upstream_ca_file(self):
        ca = self.write("not a certificate\n")
        message = self.refused(self.ini(
            upstream="https://api.example.com",
            phantomd="upstream_ca_file = " + ca))
        self.assertIn("[phantomd] upstream_ca_file:", message)

    def test_bad_upstream_client_certificate_names_its_key(self):
        cert = self.write("not a certificate\n")
        key = self.write("not a key\n")
        message = self.refused(self.ini(
            upstream="https://api.example.com",
            phantomd="upstream_client_cert = %s\nupstream_client_key = %s"
                     % (cert, key)))
        self.assertIn("[phantomd] upstream_client_cert:", message)

    def test_bad_introspection_ca_file(self):
        ca = self.write("-----BEGIN CERTIFICATE-----\nnope\n")
        message = self.refused(self.ini(
            url="https://login.example.com/introspect",
            introspection="ca_file = " + ca))
        self.assertIn("[introspection] ca_file:", message)

    def test_bad_ca_file_with_an_http_token_service(self):
        """The same client fetches the JWKS, which may be https."""
        ca = self.write("not a certificate\n")
        message = self.refused(self.ini(introspection="ca_file = " + ca))
        self.assertIn("[introspection] ca_file:", message)

    def test_bad_minting_key_file(self):
        key = self.write('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
        message = self.refused(self.ini(
            introspection="response = json",
            extra="[minting]\nkey_file = %s\nissuer = https://gw\n" % key))
        self.assertIn("[minting] key_file:", message)

    def test_bad_private_key_jwt_key(self):
        key = self.write("not a key")
        message = self.refused(self.ini(
            introspection="auth_method = private_key_jwt\n"
                          "private_key_file = " + key))
        self.assertIn("[introspection] private_key_file:", message)
