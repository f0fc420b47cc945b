"""Tests for phantomd.token.clientauth: each auth method's exact wire form."""

from __future__ import annotations

import base64
import json
import os
from urllib.parse import unquote_plus

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings, strategies as st
from jwcrypto import jwk, jwt
from twisted.internet.task import Clock
from twisted.trial import unittest

from phantomd.token import clientauth
from phantomd.token.clientauth import ASSERTION_TYPE, ClientAuth

URL = "https://login.example.com/oauth/v2/introspect"
ISSUER = "https://login.example.com/oauth/v2/oauth-anonymous"


def _decode_basic(value: bytes) -> tuple[str, str]:
    scheme, _, encoded = value.partition(b" ")
    assert scheme == b"Basic"
    pair = base64.b64decode(encoded).decode("ascii")
    user, _, password = pair.partition(":")
    return unquote_plus(user), unquote_plus(password)


class BasicTests(unittest.SynchronousTestCase):
    # (client_id, secret, the user:password that is base64-encoded)
    TABLE = [
        ("gateway_client", "Secr3t!", "gateway_client:Secr3t%21"),
        ("gateway client", "a:b", "gateway+client:a%3Ab"),
        ("id+1", "p%20q", "id%2B1:p%2520q"),
        ("caf\u00e9", "\u00fcber/secret=", "caf%C3%A9:%C3%BCber%2Fsecret%3D"),
        ("a.b-c_d~e", "*", "a.b-c_d~e:%2A"),
    ]

    def test_table(self):
        for client_id, secret, pair in self.TABLE:
            auth = ClientAuth(Clock(), "client_secret_basic", client_id,
                              secret)
            form, headers = auth.credentials()
            self.assertEqual(form, [])
            self.assertEqual(headers, {b"Authorization": [
                b"Basic " + base64.b64encode(pair.encode("ascii"))]},
                (client_id, secret))

    @settings(derandomize=True, max_examples=200)
    @given(st.text(min_size=1), st.text(min_size=1))
    def test_round_trip(self, client_id, secret):
        """Any id and secret survive the server's decoding, even with ':'."""
        value = clientauth.basic_authorization(client_id, secret)
        self.assertEqual(_decode_basic(value), (client_id, secret))

    # (client_id, secret, the user:password that is base64-encoded, raw)
    RAW_TABLE = [
        ("gateway_client", "Secr3t!", "gateway_client:Secr3t!"),
        ("gateway client", "a:b", "gateway client:a:b"),
        ("id+1", "p%20q", "id+1:p%20q"),
        ("caf\u00e9", "\u00fcber/secret=", "caf\u00e9:\u00fcber/secret="),
    ]

    def test_raw_table(self):
        """raw sends the UTF-8 id and secret as written: what a server
        that compares without form-decoding (most of them) expects."""
        for client_id, secret, pair in self.RAW_TABLE:
            auth = ClientAuth(Clock(), "client_secret_basic", client_id,
                              secret, basic_encoding="raw")
            self.assertEqual(auth.credentials(), ([], {b"Authorization": [
                b"Basic " + base64.b64encode(pair.encode("utf-8"))]}),
                (client_id, secret))

    def test_raw_id_with_colon_refused(self):
        """The server splits at the first ':', so such an id would be read
        as a shorter id and a different secret."""
        e = self.assertRaises(ValueError, ClientAuth, Clock(),
                              "client_secret_basic", "tenant:gw", "s",
                              basic_encoding="raw")
        self.assertIn("':'", str(e))
        # form encodes it, so it is fine there
        ClientAuth(Clock(), "client_secret_basic", "tenant:gw", "s")

    def test_unknown_encoding(self):
        e = self.assertRaises(ValueError, ClientAuth, Clock(),
                              "client_secret_basic", "gw", "s",
                              basic_encoding="base64")
        self.assertIn("basic_auth_encoding", str(e))

    def test_encoding_hint(self):
        for client_id, secret, encoding, hint in [
                ("gw", "Secr3t!", "form", "basic_auth_encoding = raw"),
                ("gw client", "s", "form", "basic_auth_encoding = raw"),
                ("gw", "a+b", "raw", "basic_auth_encoding = form"),
                ("gw", "plain-secret_1.~", "form", None),
                ("gw", "plain-secret_1.~", "raw", None)]:
            auth = ClientAuth(Clock(), "client_secret_basic", client_id,
                              secret, basic_encoding=encoding)
            got = auth.encoding_hint()
            if hint is None:
                self.assertIsNone(got, (client_id, secret, encoding))
            else:
                self.assertIn(hint, got)
                if len(secret) > 3:
                    self.assertNotIn(secret, got)
        post = ClientAuth(Clock(), "client_secret_post", "gw", "Secr3t!")
        self.assertIsNone(post.encoding_hint())

    def test_secret_required(self):
        for method in ("client_secret_basic", "client_secret_post"):
            e = self.assertRaises(ValueError, ClientAuth, Clock(), method,
                                  "id", None)
            self.assertIn(method, str(e))

    def test_repr_hides_secret(self):
        auth = ClientAuth(Clock(), "client_secret_basic", "id", "hunter2")
        self.assertNotIn("hunter2", repr(auth))


class PostAndTLSTests(unittest.SynchronousTestCase):
    def test_post(self):
        auth = ClientAuth(Clock(), "client_secret_post", "gw", "s:e cret")
        self.assertEqual(auth.credentials(), (
            [("client_id", "gw"), ("client_secret", "s:e cret")], {}))

    def test_tls_client_auth_sends_only_the_id(self):
        auth = ClientAuth(Clock(), "tls_client_auth", "gw")
        self.assertEqual(auth.credentials(), ([("client_id", "gw")], {}))

    def test_unknown_method(self):
        e = self.assertRaises(ValueError, ClientAuth, Clock(), "none", "gw")
        self.assertIn("unknown auth_method", str(e))


class _Settings:
    def __init__(self, **kw):
        self.__dict__.update(dict(
            url=URL, issuer=None, client_id="gw",
            auth_method="private_key_jwt", private_key_file=None,
            private_key_alg="RS256", assertion_audience=None,
            basic_auth_encoding="form"), **kw)


class PrivateKeyJWTTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def write(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def rsa_pem(self):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return self.write("key.pem", pem), jwk.JWK.from_pem(pem)

    def assertion(self, auth):
        form, headers = auth.credentials()
        self.assertEqual(headers, {})
        fields = dict(form)
        self.assertEqual([k for k, _ in form], [
            "client_id", "client_assertion_type", "client_assertion"])
        self.assertEqual(fields["client_assertion_type"], ASSERTION_TYPE)
        return fields["client_assertion"]

    def verify(self, assertion, public, alg):
        token = jwt.JWT(jwt=assertion, key=public, algs=[alg],
                        check_claims=False)
        return json.loads(token.claims)

    def test_rs256_pem_key(self):
        path, key = self.rsa_pem()
        auth = ClientAuth.from_settings(
            self.clock, _Settings(private_key_file=path), None)
        first = self.assertion(auth)
        claims = self.verify(first, key, "RS256")
        self.assertEqual(claims["iss"], "gw")
        self.assertEqual(claims["sub"], "gw")
        self.assertEqual(claims["aud"], URL)
        self.assertEqual(claims["iat"], 1_700_000_000)
        self.assertTrue(0 < claims["exp"] - claims["iat"] <= 60)
        self.assertTrue(claims["jti"])
        second = self.verify(self.assertion(auth), key, "RS256")
        self.assertNotEqual(second["jti"], claims["jti"])

    def test_audience_is_one_string(self):
        """With ``issuer`` set (RFC 9701), ``aud`` stays the URL alone:
        servers that compare it with one string refuse a list."""
        path, key = self.rsa_pem()
        auth = ClientAuth.from_settings(
            self.clock, _Settings(private_key_file=path, issuer=ISSUER,
                                  private_key_alg="PS256"), None)
        claims = self.verify(self.assertion(auth), key, "PS256")
        self.assertEqual(claims["aud"], URL)

    def test_assertion_audience(self):
        path, key = self.rsa_pem()
        auth = ClientAuth.from_settings(
            self.clock, _Settings(private_key_file=path, issuer=ISSUER,
                                  assertion_audience=ISSUER), None)
        claims = self.verify(self.assertion(auth), key, "RS256")
        self.assertEqual(claims["aud"], ISSUER)

    def test_audience_list_refused(self):
        path, _ = self.rsa_pem()
        e = self.assertRaises(ValueError, ClientAuth, self.clock,
                              "private_key_jwt", "gw", None, [URL, ISSUER],
                              path)
        self.assertIn("one string", str(e))

    def test_es256_jwk_and_jwk_set(self):
        key = jwk.JWK.generate(kty="EC", crv="P-256", kid="k1")
        single = self.write("key.jwk", key.export_private().encode())
        keyset = self.write("keys.jwks", json.dumps({"keys": [
            jwk.JWK.generate(kty="EC", crv="P-256").export_public(
                as_dict=True),
            json.loads(key.export_private())]}).encode())
        for path in (single, keyset):
            auth = ClientAuth.from_settings(
                self.clock, _Settings(private_key_file=path,
                                      private_key_alg="ES256"), None)
            assertion = self.assertion(auth)
            self.assertEqual(self.verify(assertion, key, "ES256")["sub"], "gw")
            header = json.loads(base64.urlsafe_b64decode(
                assertion.split(".")[0] + "=="))
            self.assertEqual(header.get("kid"), "k1")

    def test_bad_key_files(self):
        ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        public = jwk.JWK.generate(kty="EC", crv="P-256").export_public()
        encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"))
        cases = [
            ("missing", None, "RS256", "cannot read"),
            ("garbage", b"hello", "RS256", "is not a private JWK"),
            ("json-list", b"[1]", "RS256", "is not a private JWK"),
            ("public", public.encode(), "ES256", "public key only"),
            ("public-set", json.dumps({"keys": [json.loads(public)]}).encode(),
             "ES256", "no private key"),
            ("encrypted", encrypted, "ES256", "encrypted"),
            ("wrong-alg", ec_pem, "RS256", "cannot be used with RS256"),
        ]
        for name, data, alg, message in cases:
            path = (self.write(name, data) if data is not None
                    else os.path.join(self.dir, name))
            e = self.assertRaises(ValueError, ClientAuth.from_settings,
                                  self.clock, _Settings(private_key_file=path,
                                                        private_key_alg=alg),
                                  None)
            self.assertIn(name, str(e))
            self.assertIn(message.lower(), str(e).lower(), name)
