"""The ini file: the example parses, and every kind of mistake is refused
with one line naming the file, the section and the key."""

import os

from twisted.trial.unittest import SynchronousTestCase

from phantomd import config

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, os.pardir, "etc", "phantomd.ini")

MINIMAL = """\
[phantomd]
upstream = http://127.0.0.1:3000
[introspection]
url = http://127.0.0.1:8443/introspect
client_id = gw
client_secret = s3cret
"""


class ExampleTests(SynchronousTestCase):
    def test_shipped_example_is_valid(self):
        c = config.load(EXAMPLE)
        self.assertEqual(c.phantomd.listen, ("tcp:8080:interface=127.0.0.1:backlog=1024",))
        self.assertEqual(c.introspection.response, "jwt")
        self.assertEqual(c.cache.max_entries, 100000)
        self.assertEqual(c.client_secret, "Secr3t!")

    def test_example_documents_every_key(self):
        with open(EXAMPLE) as f:
            text = f.read()
        for section, keys in config.SCHEMA.items():
            self.assertIn("[%s]" % section, text)
            for key in keys:
                self.assertRegex(text, r"(?m)^%s =" % key)

    def test_defaults(self):
        c = config.parse(MINIMAL)
        self.assertEqual(c.phantomd.realm, "api")
        self.assertEqual(c.phantomd.required_scopes, ())
        self.assertEqual(c.introspection.timeout, 5.0)
        self.assertEqual(c.introspection.auth_method, "client_secret_basic")
        self.assertEqual(c.cache.negative_ttl, 10.0)
        self.assertEqual(c.metrics.listen, ("tcp:9100:interface=127.0.0.1",))

    def test_inline_comments_and_scopes(self):
        c = config.parse(MINIMAL.replace(
            "[introspection]",
            "required_scopes = read  write ; both\n"
            "listen = tcp:0 tcp:0:interface=\\:\\:1\n"
            "[introspection]"))
        self.assertEqual(c.phantomd.required_scopes, ("read", "write"))
        self.assertEqual(len(c.phantomd.listen), 2)

    def test_immutable(self):
        c = config.parse(MINIMAL)
        self.assertRaises(AttributeError, setattr, c.phantomd, "realm", "x")

    def test_secret_not_in_repr(self):
        c = config.parse(MINIMAL)
        self.assertNotIn("s3cret", repr(c.introspection))

    def test_secret_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from-file\n")
        c = config.parse(MINIMAL.replace(
            "client_secret = s3cret", "client_secret_file = " + path))
        self.assertEqual(c.client_secret, "from-file")


def _with(extra_phantomd="", extra_intro="", extra="", drop=()):
    lines = [l for l in MINIMAL.splitlines()
             if not any(l.startswith(d) for d in drop)]
    text = "\n".join(lines) + "\n"
    text = text.replace("[introspection]\n",
                        extra_phantomd + "[introspection]\n")
    return text + extra_intro + extra


# (ini text, section, key, words the message must contain)
MISTAKES = [
    (_with(extra="[nonsense]\na = b\n"), "nonsense", None, "unknown section"),
    (_with("colour = blue\n"), "phantomd", "colour", "unknown key"),
    (_with(drop=("upstream",)), "phantomd", "upstream", "required"),
    (_with(drop=("url",)), "introspection", "url", "required"),
    (MINIMAL.replace("http://127.0.0.1:3000", "ftp://x"),
     "phantomd", "upstream", "http"),
    (MINIMAL.replace("http://127.0.0.1:3000", "http://:80"),
     "phantomd", "upstream", "host"),
    (MINIMAL.replace("http://127.0.0.1:3000", "http://h:99999"),
     "phantomd", "upstream", "URL"),
    (_with("listen = tcp:http-ish\n"), "phantomd", "listen", "endpoint"),
    (_with("listen = carrier-pigeon:1\n"), "phantomd", "listen", "endpoint"),
    (_with("header_timeout = soon\n"), "phantomd", "header_timeout",
     "not a number"),
    (_with("max_connections = -3\n"), "phantomd", "max_connections", "range"),
    (_with("workers = many\n"), "phantomd", "workers", "whole number"),
    (_with(extra_intro="auth_method = telepathy\n"), "introspection",
     "auth_method", "one of"),
    (_with(extra_intro="response = xml\n"), "introspection", "response",
     "one of"),
    (_with(drop=("client_secret",)), "introspection", "client_secret",
     "required"),
    (_with(extra_intro="client_secret_file = /nonexistent/secret\n"),
     "introspection", "client_secret_file", "cannot read"),
    (_with(extra_intro="response = json\n"), "minting", "key_file",
     "required"),
    (_with(extra_intro="response = json\n",
           extra="[minting]\nkey_file = %s\n" % __file__), "minting",
     "issuer", "required"),
    (_with(extra_intro="verify_jwt = yes\n"), "introspection", "jwks_url",
     "required"),
    (_with(extra_intro="verify_jwt = perhaps\n"), "introspection",
     "verify_jwt", "yes or no"),
    (_with(extra_intro="auth_method = private_key_jwt\n"), "introspection",
     "private_key_file", "required"),
    (_with(extra_intro="auth_method = tls_client_auth\n"), "introspection",
     "client_cert", "required"),
    (_with(extra_intro="client_id = twice\n"), "introspection", "client_id",
     "twice"),
    (_with(extra="[cache]\nmax_ttl = forever\n"), "cache", "max_ttl",
     "number"),
    (_with(extra="[metrics]\nlisten = tcp:abc\n"), "metrics", "listen",
     "endpoint"),
    (_with(extra="[minting]\njwks_path = jwks\n"), "minting", "jwks_path",
     "path"),
    (_with(extra="[log]\nformat = xml\n"), "log", "format", "one of"),
    # DESIGN section 14: the keys for more token services
    (_with(extra_intro="basic_auth_encoding = base64\n"), "introspection",
     "basic_auth_encoding", "one of"),
    (_with(extra_intro="basic_auth_encoding = raw\n").replace(
        "client_id = gw", "client_id = tenant:gw"), "introspection",
     "client_id", "':'"),
    (_with(extra_intro="basic_auth_encoding = raw\n"
           "auth_method = client_secret_post\n"), "introspection",
     "basic_auth_encoding", "client_secret_basic only"),
    (_with(extra_intro="assertion_audience = https://a https://b\n"),
     "introspection", "assertion_audience", "one value"),
    (_with(extra_intro="assertion_audience = https://a,https://b\n"),
     "introspection", "assertion_audience", "one value"),
    (_with(extra_intro="assertion_audience = https://idp\n"),
     "introspection", "assertion_audience", "private_key_jwt only"),
    (_with(extra_intro="phantom_token_field = jwt\n"), "introspection",
     "phantom_token_field", "response = phantom_token only"),
    (_with(extra_intro="response = phantom_token\n"
           "phantom_token_field = my jwt\n"), "introspection",
     "phantom_token_field", "JSON member"),
    (_with(extra_intro="accept = jwt\n"), "introspection", "accept",
     "Accept value"),
    (_with(extra_intro="inactive_statuses = 204 401\n"), "introspection",
     "inactive_statuses", "refused phantomd's own credentials"),
    (_with(extra_intro="inactive_statuses = 403\n"), "introspection",
     "inactive_statuses", "refused phantomd's own credentials"),
    (_with(extra_intro="inactive_statuses = 400 502\n"), "introspection",
     "inactive_statuses", "5xx is a failure"),
    (_with(extra_intro="inactive_statuses = 500\n"), "introspection",
     "inactive_statuses", "5xx is a failure"),
    (_with(extra_intro="inactive_statuses = 200\n"), "introspection",
     "inactive_statuses", "status of an answer"),
    (_with(extra_intro="inactive_statuses = 429\n"), "introspection",
     "inactive_statuses", "shedding load"),
    (_with(extra_intro="inactive_statuses = 302\n"), "introspection",
     "inactive_statuses", "moved"),
    (_with(extra_intro="inactive_statuses = 4OO\n"), "introspection",
     "inactive_statuses", "not an HTTP status"),
    (_with(extra="[minting]\nforce_audience = perhaps\n"), "minting",
     "force_audience", "yes or no"),
    (_with(extra="[minting]\nforce_audience = yes\n"), "minting",
     "force_audience", "only when phantomd mints"),
    (_with(extra_intro="response = json\n",
           extra="[minting]\nkey_file = %s\nissuer = https://gw\n"
           "force_audience = yes\n" % __file__), "minting", "audience",
     "required for force_audience"),
    (_with(extra="[cache]\nmin_ttl = -1\n"), "cache", "min_ttl", "range"),
    (_with(extra="[cache]\nmin_ttl = 7200\n"), "cache", "min_ttl",
     "above max_ttl"),
    (_with(extra="[cache]\nmax_ttl = 0\nmin_ttl = 1\n"), "cache",
     "min_ttl", "above max_ttl"),
]


class TokenServiceKeyTests(SynchronousTestCase):
    """DESIGN section 14's keys: defaults, and the values they accept."""

    def test_defaults(self):
        c = config.parse(MINIMAL)
        i = c.introspection
        self.assertEqual(
            (i.basic_auth_encoding, i.assertion_audience,
             i.phantom_token_field, i.accept, i.inactive_statuses),
            ("form", None, "phantom_token", None, frozenset({204})))
        self.assertIs(c.minting.force_audience, False)
        self.assertEqual(c.cache.min_ttl, 0)

    def test_values(self):
        c = config.parse(_with(
            extra_intro="response = phantom_token\n"
            "phantom_token_field = jwt\naccept = application/jwt\n"
            "inactive_statuses = 204, 400\nbasic_auth_encoding = raw\n",
            extra="[cache]\nmin_ttl = 30\n"))
        i = c.introspection
        self.assertEqual(
            (i.basic_auth_encoding, i.phantom_token_field, i.accept,
             i.inactive_statuses),
            ("raw", "jwt", "application/jwt", frozenset({204, 400})))
        self.assertEqual(c.cache.min_ttl, 30)

    def test_empty_inactive_statuses(self):
        """Nothing but a 200 answer then counts: stricter, never looser."""
        c = config.parse(_with(extra_intro="inactive_statuses =\n"))
        self.assertEqual(c.introspection.inactive_statuses, frozenset())

    def test_raw_with_a_form_safe_colon_free_id(self):
        c = config.parse(_with(extra_intro="basic_auth_encoding = raw\n"))
        self.assertEqual(c.introspection.basic_auth_encoding, "raw")


class MistakeTests(SynchronousTestCase):
    def test_each_mistake_is_one_line_naming_file_section_key(self):
        for text, section, key, words in MISTAKES:
            with self.assertRaises(config.ConfigError, msg=text) as cm:
                config.parse(text, "/etc/phantomd/phantomd.ini")
            message = str(cm.exception)
            self.assertNotIn("\n", message)
            self.assertTrue(message.startswith("/etc/phantomd/phantomd.ini: "),
                            message)
            self.assertIn("[%s]" % section, message)
            if key:
                self.assertIn(" %s:" % key, message)
            self.assertIn(words, message)

    def test_missing_file(self):
        with self.assertRaises(config.ConfigError) as cm:
            config.load("/nonexistent/phantomd.ini")
        self.assertIn("/nonexistent/phantomd.ini", str(cm.exception))
        self.assertIn("cannot read", str(cm.exception))

    def test_key_outside_section(self):
        with self.assertRaises(config.ConfigError) as cm:
            config.parse("upstream = x\n", "f.ini")
        self.assertIn("before any [section]", str(cm.exception))
