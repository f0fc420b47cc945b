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
                # Set, or shown commented out (;key = example).
                self.assertRegex(text, r"(?m)^;?%s =" % key)

    def test_example_sets_one_client_secret_and_shows_the_other(self):
        """Both set is an error: the example ships client_secret and shows
        client_secret_file commented out, so uncommenting it alone (after
        removing client_secret) is the documented switch."""
        with open(EXAMPLE) as f:
            text = f.read()
        self.assertRegex(text, r"(?m)^client_secret = ")
        self.assertRegex(text, r"(?m)^;client_secret_file = /")
        self.assertIsNone(config.load(EXAMPLE).introspection.client_secret_file)
        both = text.replace(";client_secret_file = /etc/phantomd/client-secret",
                            "client_secret_file = " + EXAMPLE)
        e = self.assertRaises(config.ConfigError, config.parse, both, "x.ini")
        self.assertIn("not both", str(e))

    def test_example_documents_private_key_alg_and_log_level_values(self):
        with open(EXAMPLE) as f:
            text = f.read()
        alg_doc = text[:text.index("\nprivate_key_alg =")]
        alg_doc = alg_doc[alg_doc.rindex("private_key_jwt"):]
        accept = config.SCHEMA["introspection"]["private_key_alg"].parse
        for alg in ("RS256", "PS256", "ES256", "EdDSA"):
            self.assertEqual(accept(alg), alg)
            self.assertIn(alg, alg_doc)
        level_doc = text[text.index("[log]"):text.index("\nlevel =")]
        for level in ("debug", "info", "warn", "error"):
            self.assertIn(level, level_doc)

    def test_defaults(self):
        c = config.parse(MINIMAL)
        self.assertEqual(c.phantomd.realm, "api")
        self.assertEqual(c.phantomd.required_scopes, ())
        self.assertEqual(c.introspection.timeout, 5.0)
        self.assertEqual(c.introspection.auth_method, "client_secret_basic")
        self.assertEqual(c.cache.negative_ttl, 10.0)
        self.assertEqual(c.metrics.listen, ("tcp:8084:interface=127.0.0.1",))

    def test_metrics_port_is_not_another_exporters(self):
        """9100 is node_exporter's: the README's own apt command installs
        it, and the two then fight over the port.  The shipped ini says
        the same as the default."""
        default = config.parse(MINIMAL).metrics.listen
        self.assertEqual(default, ("tcp:8084:interface=127.0.0.1",))
        with open(EXAMPLE) as f:
            shipped = [line for line in f.read().split("\n[metrics]\n")[1]
                       .split("\n[")[0].splitlines()
                       if line.startswith("listen")]
        self.assertEqual(shipped, ["listen = " + default[0]])

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
    # A check that cannot apply is a mistake, not a silent no-op.
    (_with(extra_intro="response = json\nverify_jwt = yes\n"
           "jwks_url = https://idp.test/jwks\n",
           extra="[minting]\nkey_file = %s\nissuer = https://gw\n"
           % __file__), "introspection", "verify_jwt", "phantomd signs"),
    # Keys only over TLS when the issuer is TLS (issue 19), configured too.
    (_with(extra_intro="verify_jwt = yes\nissuer = https://idp.test\n"
           "jwks_url = http://idp.test/jwks\n"), "introspection", "jwks_url",
     "not https"),
    # A DPoP proof signed with a MAC, or not at all, proves no key.
    (_with(extra="[dpop]\nalgs = ES256 none\n"), "dpop", "algs",
     "asymmetric"),
    (_with(extra="[dpop]\nalgs = HS256\n"), "dpop", "algs", "asymmetric"),
    (_with(extra="[dpop]\nalgs =\n"), "dpop", "algs", "no algorithm"),
    (_with(extra="[dpop]\nmax_age = 0\n"), "dpop", "max_age", "range"),
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


class StrictReaderTests(SynchronousTestCase):
    """DESIGN section 7: an indented line is an error naming file and line,
    a UTF-8 BOM is accepted, an unknown key names the closest known one."""

    def test_indented_line_is_refused_not_folded_into_the_value_above(self):
        # configparser would read realm as "api\nrequired_scopes = read"
        # and leave required_scopes empty: the scope check silently off.
        text = MINIMAL.replace(
            "upstream = http://127.0.0.1:3000\n",
            "upstream = http://127.0.0.1:3000\nrealm = api\n"
            "  required_scopes = read\n")
        with self.assertRaises(config.ConfigError) as cm:
            config.parse(text, "/etc/phantomd/phantomd.ini")
        message = str(cm.exception)
        self.assertTrue(message.startswith("/etc/phantomd/phantomd.ini: "),
                        message)
        self.assertIn("line 4 is indented", message)
        self.assertIn("[phantomd]", message)
        self.assertIn("realm", message)
        self.assertNotIn("\n", message)

    def test_indented_tab_and_section_lines_are_refused_too(self):
        for text, line in (
                (MINIMAL.replace("client_id", "\tclient_id"), 5),
                (MINIMAL.replace("[introspection]", " [introspection]"), 3)):
            with self.assertRaises(config.ConfigError) as cm:
                config.parse(text, "f.ini")
            self.assertIn("line %d is indented" % line, str(cm.exception))

    def test_indented_comments_and_blank_lines_are_fine(self):
        c = config.parse(MINIMAL.replace(
            "[introspection]",
            "realm = api      ; the realm\n"
            "                 ; a comment aligned under it\n"
            "   \n"
            "    # another\n"
            "[introspection]"), "f.ini")
        self.assertEqual(c.phantomd.realm, "api")

    def test_utf8_bom_is_accepted(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + MINIMAL.encode())
        self.assertEqual(config.load(path).phantomd.upstream,
                         "http://127.0.0.1:3000")
        self.assertEqual(config.parse("\ufeff" + MINIMAL).introspection
                         .client_id, "gw")

    def test_unknown_key_names_the_closest_known_one(self):
        for text, words in (
                (_with("required_scope = read\n"),
                 "[phantomd] required_scope: unknown key; did you mean "
                 "required_scopes?"),
                (_with(extra_intro="clientsecret = x\n"),
                 "[introspection] clientsecret: unknown key; did you mean "
                 "client_secret?"),
                (_with("ca_file = /x\n"),
                 "[phantomd] ca_file: unknown key; did you mean "
                 "upstream_ca_file?"),
                (_with("key_file = /x\n"),
                 "[phantomd] key_file: unknown key; it is a key of "
                 "[minting]"),
                (_with(extra="[introspect]\nurl = x\n"),
                 "[introspect]: unknown section; did you mean "
                 "introspection?")):
            with self.assertRaises(config.ConfigError, msg=text) as cm:
                config.parse(text, "f.ini")
            self.assertEqual(str(cm.exception), "f.ini: " + words)


class SchemaTagTests(SynchronousTestCase):
    """Every key states whether it decides what is trusted (issue 19): the
    cache identity is built from the tags, so a key cannot be forgotten."""

    def test_every_key_states_trust(self):
        for section, keys in config.SCHEMA.items():
            for name, key in keys.items():
                self.assertIsInstance(key, config.Key, (section, name))
                self.assertIs(type(key.trust), bool, (section, name))

    def test_a_key_without_a_trust_tag_cannot_be_declared(self):
        self.assertRaises(TypeError, config.Key, config.text, "")
        for bad in ({"k": (config.text, "")},
                    {"k": config.Key(config.text, "", trust=None)}):
            self.assertRaises(TypeError, config._check_schema, {"s": bad})

    def test_keys_that_decide_trust_are_tagged_so(self):
        trusted = {(s, k) for s, keys in config.SCHEMA.items()
                   for k, key in keys.items() if key.trust}
        for key in (("introspection", "url"), ("introspection", "response"),
                    ("introspection", "verify_jwt"),
                    ("introspection", "issuer"),
                    ("introspection", "jwks_url"),
                    ("introspection", "ca_file"),
                    ("introspection", "client_id"),
                    ("minting", "key_file"), ("minting", "issuer"),
                    ("minting", "audience")):
            self.assertIn(key, trusted)

    def test_identity_changes_with_each_trusted_value_and_file_contents(self):
        ca = self.mktemp()
        with open(ca, "w") as f:
            f.write("one")
        base = MINIMAL + "ca_file = %s\n" % ca
        before = config.identity(config.parse(base))
        self.assertEqual(before, config.identity(config.parse(base)))
        # Not about trust: the identity stays.
        self.assertEqual(before, config.identity(config.parse(
            base.replace("client_secret = s3cret", "client_secret = other")
            + "timeout = 9\n")))
        for changed in (
                base + "verify_jwt = yes\njwks_url = http://k.test/jwks\n",
                base + "issuer = https://other.test\n",
                base + "response = phantom_token\n",
                base.replace("client_id = gw", "client_id = gw2"),
                base.replace(":8443/", ":8444/")):
            self.assertNotEqual(before, config.identity(
                config.parse(changed)), changed)
        with open(ca, "w") as f:
            f.write("two")  # same path, new contents
        self.assertNotEqual(before, config.identity(config.parse(base)))


class ReadmeReloadSectionTests(SynchronousTestCase):
    """README's reload section lists exactly the keys SCHEMA tags: those
    whose change empties the cache (trust) and those needing a restart."""

    def bullet(self, starts: str) -> set:
        import re
        with open(os.path.join(HERE, os.pardir, "README.rst"),
                  encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("Reloading (SIGHUP)"):]
        section = section[:section.index("\nCaching and coalescing")]
        [item] = [b for b in section.split("\n* ") if b.startswith(starts)]
        return set(re.findall(r"``\[(\w+)\]\s+(\w+)``", item))

    def tagged(self, flag: str) -> set:
        return {(s, k) for s, keys in config.SCHEMA.items()
                for k, key in keys.items() if getattr(key, flag)}

    def test_trust_keys_listed(self):
        self.assertEqual(self.bullet("The token cache is emptied"),
                         self.tagged("trust"))

    def test_restart_keys_listed(self):
        self.assertEqual(self.bullet("Need a restart"),
                         self.tagged("restart"))


class ListenerFilesTests(SynchronousTestCase):
    def test_listener_certificate_rewritten_in_place_is_a_pending_restart(self):
        """A reload cannot re-read an ``ssl:`` listener's certificate: its
        contents count as a change of ``[phantomd] listen`` (restart-only,
        so the reload warns) instead of passing unnoticed."""
        from tests.robustness.fakes import self_signed
        base = os.path.abspath(self.mktemp())
        cert, key = self_signed(os.path.join(base, "a"))
        other_cert, other_key = self_signed(os.path.join(base, "b"))
        text = MINIMAL.replace(
            "[introspection]",
            "listen = ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s\n"
            "[introspection]" % (key, cert))
        before = config.parse(text)
        self.assertEqual(config.changed(before, config.parse(text)), [])
        with open(other_cert, "rb") as f, open(cert, "wb") as g:
            g.write(f.read())
        with open(other_key, "rb") as f, open(key, "wb") as g:
            g.write(f.read())
        after = config.parse(text)
        self.assertEqual(config.changed(before, after,
                                        lambda k: k.restart),
                         [("phantomd", "listen")])
        self.assertEqual(config.identity(before), config.identity(after))
