"""JOSE: parsing, minting, the token service's keys, RFC 9701 answers.

Time comes from a ``Clock``; the token service's JWKS and discovery
documents are served by an in-memory resource through ``StubTreq``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import tempfile

from hypothesis import given, settings, strategies as st
from jwcrypto import jwk, jws
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from phantomd.token import jose
from phantomd.token import keysource
from phantomd.token.keysource import KeySource
from tests.helpers_fetch import TreqFetcher

NOW = 1_800_000_000.0
ISSUER = "https://login.example.com"
CLIENT_ID = "gateway_client"

# Generated once: RSA key generation is slow enough to matter per test.
RSA_KEY = jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-1")
EC_KEY = jwk.JWK.generate(kty="EC", crv="P-256", kid="ec-1")
ED_KEY = jwk.JWK.generate(kty="OKP", crv="Ed25519", kid="ed-1")
OTHER_RSA = jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-1")
OTHER_RSA_2 = jwk.JWK(**dict(OTHER_RSA.export(as_dict=True), kid="rsa-2"))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj) -> str:
    return b64(json.dumps(obj).encode())


def raw_jwt(header, payload, signature=b"sig") -> str:
    """A compact JWS with whatever header and payload, signature unchecked."""
    return "%s.%s.%s" % (b64json(header), b64json(payload), b64(signature))


def signed(key, header, payload, alg=None) -> str:
    alg = alg or header["alg"]
    token = jws.JWS(json.dumps(payload).encode())
    token.add_signature(key, alg=alg, protected=json.dumps(header))
    return token.serialize(compact=True)


def public_jwks(*keys) -> bytes:
    return json.dumps({"keys": [k.export_public(as_dict=True)
                                for k in keys]}).encode()


# -- unverified_claims --------------------------------------------------------

GOOD = {"sub": "alice", "exp": NOW + 60, "iat": NOW - 1}
HS = {"alg": "RS256", "typ": "JWT"}

# (token, expected claims or the JOSEError message fragment)
CLAIM_ROWS = [
    (raw_jwt(HS, GOOD), GOOD),
    (raw_jwt(HS, dict(GOOD, nbf=NOW + 29)), dict(GOOD, nbf=NOW + 29)),
    (raw_jwt(HS, dict(GOOD, iat=NOW + 30)), dict(GOOD, iat=NOW + 30)),
    ("  " + raw_jwt(HS, GOOD) + "\n", GOOD),
    (raw_jwt(HS, dict(GOOD, exp=NOW)), "expired"),
    (raw_jwt(HS, dict(GOOD, exp=NOW - 3600)), "expired"),
    (raw_jwt(HS, {"sub": "alice"}), "no exp"),
    (raw_jwt(HS, dict(GOOD, exp="tomorrow")), "exp is not a number"),
    (raw_jwt(HS, dict(GOOD, exp=True)), "exp is not a number"),
    (raw_jwt(HS, dict(GOOD, nbf=NOW + 31)), "not valid yet"),
    (raw_jwt(HS, dict(GOOD, iat=NOW + 31)), "issued in the future"),
    (raw_jwt({"alg": "none"}, GOOD), "alg none"),
    (raw_jwt({"alg": "NONE"}, GOOD), "alg none"),
    (raw_jwt({"typ": "JWT"}, GOOD), "no alg"),
    (raw_jwt({"alg": 256}, GOOD), "no alg"),
    (raw_jwt(dict(HS, crit=["exp"]), GOOD), "critical"),
    (raw_jwt(HS, GOOD, signature=b""), "empty signature"),
    (raw_jwt(["RS256"], GOOD), "header is not a JSON object"),
    (raw_jwt(HS, [GOOD]), "payload is not a JSON object"),
    (b64json(HS) + "." + b64json(GOOD), "three parts (2 found)"),
    (raw_jwt(HS, GOOD) + ".x", "three parts (4 found)"),
    ("", "three parts (1 found)"),
    ("a+b." + b64json(GOOD) + ".c2ln", "header is not base64url"),
    (b64json(HS) + ".!!!!.c2ln", "payload is not base64url"),
    (b64json(HS) + "." + b64json(GOOD) + ".c2l+", "signature is not base64url"),
    (b64json(HS) + "." + b64json(GOOD) + ".c2lnb", "signature is not base64url"),
    (b64json(HS) + "." + b64json(GOOD) + ".c2l\u00e9", "signature is not base64url"),
    (b64json(HS) + "." + b64json(GOOD) + ".c2l=", "signature is not base64url"),
    # base64's own alphabet, padding, a stray length or a space inside a
    # segment: each refused, where a lax decoder would skip or accept it.
    (b64json(HS) + "." + b64json(GOOD)[:-1] + "+.c2ln", "payload is not base64url"),
    (b64json(HS) + "." + b64json(GOOD)[:-1] + "/.c2ln", "payload is not base64url"),
    (b64json(HS) + "." + b64(b'{"exp": 1}') + "==.c2ln", "payload is not base64url"),
    (b64json(HS) + "." + b64json(GOOD) + "A" * ((1 - len(b64json(GOOD))) % 4)
     + ".c2ln", "payload is not base64url"),
    (b64json(HS) + "." + b64json(GOOD)[:8] + " " + b64json(GOOD)[8:] + ".c2ln",
     "payload is not base64url"),
    (b64json(HS) + "." + b64json(GOOD)[:8] + "\u00e9" + b64json(GOOD)[8:] + ".c2ln",
     "payload is not base64url"),
    (b64json(HS) + "." + b64(b"\xff\xfe") + ".c2ln", "payload is not JSON"),
    (b64json(HS) + "." + b64(b'{"exp": NaN}') + ".c2ln",
     "NaN is not valid JSON"),
    (b64json(HS) + "." + b64(('{"exp": %d, "sub": "a", "sub": "b"}'
                              % (NOW + 60)).encode()) + ".c2ln",
     "'sub' appears twice"),
]


class UnverifiedClaimsTests(SynchronousTestCase):
    def test_table(self):
        for token, expected in CLAIM_ROWS:
            if isinstance(expected, dict):
                self.assertEqual(jose.unverified_claims(token, NOW), expected,
                                 token)
            else:
                e = self.assertRaises(jose.JOSEError, jose.unverified_claims,
                                      token, NOW)
                self.assertIn(expected, str(e), token)

    def test_table_again_with_headers_remembered(self):
        """Checked headers are remembered; a refused one never is, and
        neither grows without bound."""
        for _ in range(2):
            self.test_table()
        for i in range(200):
            token = raw_jwt(dict(HS, kid="k%d" % i), GOOD)
            self.assertEqual(jose.unverified_claims(token, NOW), GOOD)
        self.assertLessEqual(len(jose._HEADERS), jose._MAX_HEADERS)
        self.assertNotIn(b64json({"alg": "none"}), jose._HEADERS)

    def test_leeway_is_a_parameter(self):
        token = raw_jwt(HS, dict(GOOD, nbf=NOW + 5))
        self.assertRaises(jose.JOSEError, jose.unverified_claims, token, NOW,
                          leeway=0)

    def test_error_never_repeats_the_token(self):
        token = raw_jwt(HS, dict(GOOD, exp=NOW - 1, secret="s3cr3t-value"))
        e = self.assertRaises(jose.JOSEError, jose.unverified_claims,
                              token, NOW)
        self.assertNotIn("s3cr3t", str(e))
        self.assertNotIn(token[:20], str(e))

    @settings(derandomize=True, max_examples=300)
    @given(st.text(alphabet="ab.-_=+/ {}\"'\\\x00é", max_size=80))
    def test_garbage_is_always_a_jose_error(self, text):
        try:
            jose.unverified_claims(text, NOW)
        except jose.JOSEError:
            pass

    @settings(derandomize=True, max_examples=200)
    @given(st.dictionaries(st.text(max_size=5),
                           st.one_of(st.none(), st.booleans(), st.integers(),
                                     st.floats(), st.text(max_size=5)),
                           max_size=5))
    def test_any_payload_is_accepted_or_refused_cleanly(self, payload):
        token = "%s.%s.c2ln" % (b64json(HS), b64(json.dumps(payload).encode()))
        try:
            claims = jose.unverified_claims(token, NOW)
        except jose.JOSEError:
            return
        self.assertGreater(claims["exp"], NOW)


# -- minting ------------------------------------------------------------------

INTRO = {"active": True, "sub": "alice", "scope": "read write",
         "client_id": "web-app", "exp": NOW + 3600, "username": "alice@x",
         "acr": "urn:mace:incommon:iap:silver", "token_type": "Bearer",
         "unlisted": "not copied"}


def verify_with_jwks(token: str, jwks: bytes) -> tuple[dict, dict]:
    """What an API would do: pick the key by kid from the published set."""
    keyset = jwk.JWKSet.from_json(jwks)
    header = json.loads(base64.urlsafe_b64decode(
        token.split(".")[0] + "=="))
    checker = jws.JWS()
    checker.deserialize(token)
    checker.verify(keyset.get_key(header["kid"]))
    return header, json.loads(checker.payload)


class MinterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)

    def minter(self, keys=(EC_KEY,), audience="https://api.example.com",
               lifetime=300):
        return jose.Minter(self.clock, list(keys), "https://gw.example.com",
                           audience, lifetime)

    def test_rfc9068_header_and_claims(self):
        token, claims = self.minter().mint(INTRO)
        header, payload = verify_with_jwks(token,
                                           self.minter().jwks_json())
        self.assertEqual(header, {"alg": "ES256", "kid": "ec-1",
                                  "typ": "at+jwt"})
        self.assertEqual(payload, claims)
        jti = claims.pop("jti")
        self.assertGreaterEqual(len(jti), 16)
        self.assertEqual(claims, {
            "iss": "https://gw.example.com", "aud": "https://api.example.com",
            "sub": "alice", "scope": "read write", "client_id": "web-app",
            "username": "alice@x", "acr": "urn:mace:incommon:iap:silver",
            "iat": int(NOW), "exp": int(NOW) + 300})

    def test_claims_of_the_wrong_type_are_not_signed(self):
        for name, value in (("sub", 123), ("scope", ["read", 5]),
                            ("scope", 7), ("client_id", ["c"]),
                            ("username", {"a": 1}), ("aud", ["api", 5]),
                            ("aud", {"x": 1}), ("auth_time", "yesterday"),
                            ("amr", "pwd")):
            with self.assertRaises(jose.JOSEError, msg=(name, value)):
                self.minter().mint(dict(INTRO, **{name: value}))

    def test_not_yet_valid_answer_is_not_minted(self):
        with self.assertRaises(jose.JOSEError):
            self.minter().mint(dict(INTRO, nbf=NOW + 3600))
        self.minter().mint(dict(INTRO, nbf=NOW - 10))

    def test_sub_falls_back_to_username_then_client_id(self):
        intro = dict(INTRO)
        del intro["sub"]
        self.assertEqual(self.minter().mint(intro)[1]["sub"], "alice@x")
        del intro["username"]
        self.assertEqual(self.minter().mint(intro)[1]["sub"], "web-app")

    def test_cnf_is_kept(self):
        """A sender-constrained token stays bound in the minted JWT (the
        gate checks the binding from these claims; DESIGN section 12)."""
        cnf = {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}
        token, claims = self.minter().mint(dict(INTRO, cnf=cnf))
        self.assertEqual(claims["cnf"], cnf)
        self.assertEqual(jose.unverified_claims(token, NOW)["cnf"], cnf)
        with self.assertRaises(jose.JOSEError):
            self.minter().mint(dict(INTRO, cnf="jkt"))

    def test_jti_is_fresh_each_time(self):
        m = self.minter()
        self.assertNotEqual(m.mint(INTRO)[1]["jti"], m.mint(INTRO)[1]["jti"])

    def test_exp_never_outlives_the_opaque_token(self):
        _, claims = self.minter().mint(dict(INTRO, exp=NOW + 42))
        self.assertEqual(claims["exp"], int(NOW) + 42)

    def test_exp_never_beyond_lifetime(self):
        _, claims = self.minter(lifetime=60).mint(dict(INTRO, exp=NOW + 1e6))
        self.assertEqual(claims["exp"], int(NOW) + 60)

    def test_no_exp_in_answer_caps_at_lifetime(self):
        intro = dict(INTRO)
        del intro["exp"]
        _, claims = self.minter(lifetime=120).mint(intro)
        self.assertEqual(claims["exp"], int(NOW) + 120)

    def test_expired_answer_refused(self):
        for exp in (NOW, NOW - 10, NOW + 0.5):
            e = self.assertRaises(jose.JOSEError, self.minter().mint,
                                  dict(INTRO, exp=exp))
            self.assertEqual(str(e), "expired")

    def test_non_numeric_exp_refused(self):
        self.assertRaises(jose.JOSEError, self.minter().mint,
                          dict(INTRO, exp="soon"))

    def test_introspection_aud_wins_over_configured(self):
        _, claims = self.minter().mint(dict(INTRO, aud=["a", "b"]))
        self.assertEqual(claims["aud"], ["a", "b"])
        _, claims = self.minter(audience=None).mint(INTRO)
        self.assertNotIn("aud", claims)

    def test_each_key_type_signs_and_verifies(self):
        for key, alg in ((RSA_KEY, "RS256"), (EC_KEY, "ES256"),
                         (ED_KEY, "EdDSA")):
            m = self.minter(keys=[key])
            token, claims = m.mint(INTRO)
            header, payload = verify_with_jwks(token, m.jwks_json())
            self.assertEqual((header["alg"], payload), (alg, claims))

    def test_explicit_alg_on_the_key_is_used(self):
        key = jwk.JWK(**dict(RSA_KEY.export(as_dict=True), alg="PS256"))
        token, _ = self.minter(keys=[key]).mint(INTRO)
        self.assertEqual(json.loads(base64.urlsafe_b64decode(
            token.split(".")[0] + "=="))["alg"], "PS256")

    def test_minted_token_passes_unverified_claims(self):
        token, claims = self.minter().mint(INTRO)
        self.assertEqual(jose.unverified_claims(token, NOW), claims)

    def test_published_set_is_public_only(self):
        doc = json.loads(self.minter(keys=[EC_KEY, RSA_KEY, ED_KEY])
                         .jwks_json())
        self.assertEqual([k["kid"] for k in doc["keys"]],
                         ["ec-1", "rsa-1", "ed-1"])
        for k in doc["keys"]:
            for private in ("d", "p", "q", "dp", "dq", "qi"):
                self.assertNotIn(private, k)
            self.assertEqual(k["use"], "sig")
        self.assertEqual([k["alg"] for k in doc["keys"]],
                         ["ES256", "RS256", "EdDSA"])

    def test_rotation_first_signs_all_published(self):
        new_first = self.minter(keys=[ED_KEY, EC_KEY])
        token, _ = new_first.mint(INTRO)
        header, _ = verify_with_jwks(token, new_first.jwks_json())
        self.assertEqual(header["kid"], "ed-1")
        old_token, old_claims = self.minter(keys=[EC_KEY]).mint(INTRO)
        _, payload = verify_with_jwks(old_token, new_first.jwks_json())
        self.assertEqual(payload, old_claims)

    def test_key_without_kid_gets_its_thumbprint(self):
        bare = jwk.JWK.generate(kty="EC", crv="P-256")
        m = self.minter(keys=[bare])
        token, _ = m.mint(INTRO)
        header, _ = verify_with_jwks(token, m.jwks_json())
        self.assertEqual(header["kid"], bare.thumbprint())

    def test_bad_key_sets(self):
        secp = jwk.JWK.generate(kty="EC", crv="secp256k1", kid="k")
        rows = [
            ([], "empty"),
            ([jwk.JWK(**EC_KEY.export_public(as_dict=True))],
             "no private part"),
            ([jwk.JWK.generate(kty="oct", size=256)], "symmetric"),
            ([secp], "unsupported key type"),
            ([jwk.JWK(**dict(RSA_KEY.export(as_dict=True), alg="ES256"))],
             "cannot be used with ES256"),
            ([jwk.JWK(**dict(RSA_KEY.export(as_dict=True), alg="HS256"))],
             "not supported"),
            ([EC_KEY, jwk.JWK(**dict(RSA_KEY.export(as_dict=True),
                                     kid="ec-1"))], "used twice"),
            (_two_key_set(), "no order"),
        ]
        for keys, message in rows:
            e = self.assertRaises(ValueError, jose.Minter, self.clock, keys,
                                  "https://gw", None, 300)
            self.assertIn(message, str(e))

    def test_one_key_jwkset_is_accepted(self):
        keyset = jwk.JWKSet()
        keyset.add(EC_KEY)
        token, _ = jose.Minter(self.clock, keyset, "https://gw", None,
                               300).mint(INTRO)
        self.assertEqual(jose.unverified_claims(token, NOW)["sub"], "alice")

    def test_bad_parameters(self):
        for issuer, lifetime in (("", 300), ("https://gw", 0),
                                 ("https://gw", True), ("https://gw", 1.5)):
            self.assertRaises(ValueError, jose.Minter, self.clock, [EC_KEY],
                              issuer, None, lifetime)


def _two_key_set():
    keyset = jwk.JWKSet()
    keyset.add(EC_KEY)
    keyset.add(ED_KEY)
    return keyset


class ForceAudienceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)

    def minter(self, force):
        return jose.Minter(self.clock, [EC_KEY], "https://gw.example.com",
                           "https://api.example.com", 300,
                           force_audience=force)

    def test_answer_aud_wins_without_force(self):
        _, claims = self.minter(False).mint(dict(INTRO, aud="webapp"))
        self.assertEqual(claims["aud"], "webapp")

    def test_force_audience(self):
        """Some token services put the calling client's id in aud."""
        for aud in ("webapp", ["webapp", "other"], None):
            intro = dict(INTRO, aud=aud)
            token, claims = self.minter(True).mint(intro)
            self.assertEqual(claims["aud"], "https://api.example.com")
            _, payload = verify_with_jwks(token,
                                          self.minter(True).jwks_json())
            self.assertEqual(payload["aud"], "https://api.example.com")

    def test_force_needs_an_audience(self):
        e = self.assertRaises(ValueError, jose.Minter, self.clock, [EC_KEY],
                              "https://gw", None, 300, force_audience=True)
        self.assertIn("audience", str(e))


class MinterFromFileTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, content) -> str:
        path = os.path.join(self.dir, "keys.jwks")
        with open(path, "w" if isinstance(content, str) else "wb") as f:
            f.write(content)
        return path

    def load(self, path):
        return jose.Minter.from_file(self.clock, path, "https://gw", "api",
                                     300)

    def test_file_order_is_kept(self):
        path = self.write(json.dumps({"keys": [
            ED_KEY.export(as_dict=True), RSA_KEY.export(as_dict=True),
            EC_KEY.export(as_dict=True)]}))
        m = self.load(path)
        self.assertEqual((m.kid, m.alg), ("ed-1", "EdDSA"))
        self.assertEqual([k["kid"] for k in json.loads(m.jwks_json())["keys"]],
                         ["ed-1", "rsa-1", "ec-1"])

    def test_bad_files(self):
        rows = [
            ("not json", "not JSON"),
            ("[]", "not a JSON object"),
            ("{}", "not a JWK set"),
            ('{"keys": []}', "not a JWK set"),
            ('{"keys": [1]}', "key 1 is not a JSON object"),
            ('{"keys": [{"kty": "RSA", "n": "x"}]}', "key 1 is not a valid"),
            ('{"keys": [{"kty": "XYZ"}]}', "key 1 is not a valid"),
            (public_jwks(EC_KEY).decode(), "no private part"),
            (json.dumps({"keys": [jwk.JWK.generate(kty="oct", size=256)
                                  .export(as_dict=True)]}), "symmetric"),
        ]
        for content, message in rows:
            path = self.write(content)
            e = self.assertRaises(ValueError, self.load, path)
            self.assertIn(message, str(e), content)
            self.assertTrue(str(e).startswith(path + ":"), str(e))

    def test_missing_file(self):
        e = self.assertRaises(ValueError, self.load,
                              os.path.join(self.dir, "absent"))
        self.assertIn("cannot read", str(e))


# -- the token service: a JWKS and discovery documents over StubTreq ------------

class TokenService(Resource):
    """Serves JSON documents by path; ``hold`` parks requests until
    ``release()``; ``hits`` counts requests per path."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.documents: dict[bytes, tuple[int, bytes]] = {}
        self.hits: dict[bytes, int] = {}
        self.hold = False
        self.held: list = []
        self.locations: dict[bytes, bytes] = {}

    def serve(self, path: bytes, body, code=200):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.documents[path] = (code, body)

    def render_GET(self, request):
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return self.answer(request)

    def answer(self, request):
        code, body = self.documents.get(request.path, (404, b"{}"))
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        if request.path in self.locations:
            request.setHeader(b"location", self.locations[request.path])
        return body

    def release(self):
        held, self.held = self.held, []
        for request in held:
            request.write(self.answer(request))
            request.finish()

    def count(self, path: bytes) -> int:
        return self.hits.get(path, 0)


JWKS_URL = "https://login.example.com/jwks"


class KeySourceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.service = TokenService()
        self.service.serve(b"/jwks", public_jwks(RSA_KEY, EC_KEY))
        self.stub = StubTreq(self.service)

    def source(self, **kw):
        kw.setdefault("jwks_url", JWKS_URL)
        return KeySource(self.clock, TreqFetcher(self.stub), **kw)

    def get(self, source, kid, alg="RS256"):
        d = source.key(kid, alg)
        self.stub.flush()
        return self.successResultOf(d)

    def refused(self, source, kid, alg="RS256"):
        d = source.key(kid, alg)
        self.stub.flush()
        return self.failureResultOf(d, jose.JOSEError).value

    def test_keys_are_fetched_once_and_cached(self):
        source = self.source()
        self.assertEqual(self.get(source, "rsa-1").thumbprint(),
                         RSA_KEY.thumbprint())
        self.assertEqual(self.get(source, "ec-1", "ES256").thumbprint(),
                         EC_KEY.thumbprint())
        self.assertEqual(self.service.count(b"/jwks"), 1)

    def test_unknown_kid_refetches_once_then_fails(self):
        source = self.source()
        self.get(source, "rsa-1")
        self.clock.advance(30)
        e = self.refused(source, "new-key")
        self.assertIn("unknown key id 'new-key'", str(e))
        self.assertEqual(self.service.count(b"/jwks"), 2)

    def test_refetch_rate_limited(self):
        source = self.source(min_refresh_interval=30)
        self.get(source, "rsa-1")
        self.clock.advance(30)
        self.refused(source, "forged-1")
        for kid in ("forged-2", "forged-3", "forged-4"):
            self.clock.advance(5)
            self.refused(source, kid)
        self.assertEqual(self.service.count(b"/jwks"), 2)
        self.assertEqual(self.get(source, "rsa-1").thumbprint(),
                         RSA_KEY.thumbprint())
        self.clock.advance(15)
        self.refused(source, "forged-5")
        self.assertEqual(self.service.count(b"/jwks"), 3)

    def test_rotated_key_is_found_by_refetch(self):
        source = self.source()
        self.get(source, "rsa-1")
        self.clock.advance(30)
        self.service.serve(b"/jwks", public_jwks(RSA_KEY, ED_KEY))
        self.assertEqual(self.get(source, "ed-1", "EdDSA").thumbprint(),
                         ED_KEY.thumbprint())

    def test_concurrent_refetches_share_one_request(self):
        source = self.source()
        self.service.hold = True
        first = source.key("rsa-1", "RS256")
        second = source.key("ec-1", "ES256")
        third = source.key("unknown", "ES256")
        third.cancel()
        self.failureResultOf(third, CancelledError)
        self.stub.flush()
        self.assertNoResult(first)
        self.assertEqual(self.service.count(b"/jwks"), 1)
        self.service.release()
        self.stub.flush()
        self.assertEqual(self.successResultOf(first).get("kid"), "rsa-1")
        self.assertEqual(self.successResultOf(second).get("kid"), "ec-1")
        self.assertEqual(self.service.count(b"/jwks"), 1)

    def test_outages_are_errors(self):
        rows = [
            ((500, b"oops"), "answered HTTP 500"),
            ((200, b"<html>"), "is not JSON"),
            ((200, b'{"no": "keys"}'), 'no "keys" list'),
            ((200, b'{"keys": [{"kty": "oct", "k": "AAAA", "kid": "rsa-1"}]}'),
             "no usable signing key"),
            ((200, json.dumps({"keys": [{"kty": "RSA"}]}).encode()),
             "no usable signing key"),
            ((200, b" " * 300 * 1024), "larger than"),
        ]
        for (code, body), message in rows:
            self.service.serve(b"/jwks", body, code)
            e = self.refused(self.source(), "rsa-1")
            self.assertIn("token service keys unavailable", str(e))
            self.assertIn(message, str(e))

    def test_redirect_is_not_followed(self):
        self.service.serve(b"/jwks", b"", 302)
        self.service.locations[b"/jwks"] = b"https://login.example.com/elsewhere"
        self.service.serve(b"/elsewhere", public_jwks(RSA_KEY))
        e = self.refused(self.source(), "rsa-1")
        self.assertIn("answered HTTP 302", str(e))
        self.assertEqual(self.service.count(b"/elsewhere"), 0)

    def test_outage_is_not_retried_at_every_request(self):
        self.service.serve(b"/jwks", b"down", 503)
        source = self.source(min_refresh_interval=30)
        self.refused(source, "rsa-1")
        e = self.refused(source, "rsa-1")
        self.assertIn("answered HTTP 503", str(e))
        self.assertEqual(self.service.count(b"/jwks"), 1)
        self.clock.advance(30)
        self.service.serve(b"/jwks", public_jwks(RSA_KEY))
        self.assertEqual(self.get(source, "rsa-1").get("kid"), "rsa-1")

    def test_fetch_times_out(self):
        self.service.hold = True
        source = self.source(timeout=10)
        d = source.key("rsa-1", "RS256")
        self.stub.flush()
        self.clock.advance(10)
        self.assertIn("unavailable",
                      str(self.failureResultOf(d, jose.JOSEError).value))

    def test_key_must_fit_the_algorithm(self):
        source = self.source()
        e = self.refused(source, "rsa-1", "ES256")
        self.assertIn("key type 'RSA' cannot be used with ES256", str(e))
        e = self.refused(source, "ec-1", "ES384")
        self.assertIn("curve 'P-256' cannot be used with ES384", str(e))

    def test_private_parts_are_dropped(self):
        self.service.serve(b"/jwks", json.dumps(
            {"keys": [RSA_KEY.export(as_dict=True)]}).encode())
        self.assertFalse(self.get(self.source(), "rsa-1").has_private)

    def test_max_keys_bound(self):
        self.service.serve(b"/jwks", public_jwks(RSA_KEY, EC_KEY, ED_KEY))
        source = self.source(max_keys=2)
        self.get(source, "ec-1", "ES256")
        self.refused(source, "ed-1", "EdDSA")

    def test_no_kid_needs_exactly_one_fitting_key(self):
        source = self.source()
        self.assertEqual(self.get(source, None, "ES256").get("kid"), "ec-1")
        self.service.serve(b"/jwks", public_jwks(RSA_KEY, OTHER_RSA_2))
        self.clock.advance(30)
        source = self.source()
        self.assertIn("unknown key id None",
                      str(self.refused(source, None, "RS256")))

    def test_needs_a_url_or_issuer(self):
        self.assertRaises(ValueError, KeySource, self.clock,
                          TreqFetcher(self.stub))

    def test_discovery_openid_configuration(self):
        self.service.serve(b"/.well-known/openid-configuration",
                           {"issuer": ISSUER, "jwks_uri": JWKS_URL})
        source = KeySource(self.clock, TreqFetcher(self.stub), issuer=ISSUER)
        self.assertEqual(self.get(source, "rsa-1").get("kid"), "rsa-1")

    def test_discovery_falls_back_to_rfc8414(self):
        issuer = "https://login.example.com/tenant"
        self.service.serve(
            b"/.well-known/oauth-authorization-server/tenant",
            {"issuer": issuer, "jwks_uri": JWKS_URL})
        source = KeySource(self.clock, TreqFetcher(self.stub), issuer=issuer)
        self.assertEqual(self.get(source, "rsa-1").get("kid"), "rsa-1")
        self.assertEqual(
            self.service.count(b"/tenant/.well-known/openid-configuration"), 1)

    def test_discovery_issuer_must_match(self):
        self.service.serve(b"/.well-known/openid-configuration",
                           {"issuer": "https://evil.example",
                            "jwks_uri": JWKS_URL})
        source = KeySource(self.clock, TreqFetcher(self.stub), issuer=ISSUER)
        e = self.refused(source, "rsa-1")
        self.assertIn("names issuer 'https://evil.example'", str(e))

    def test_discovery_without_jwks_uri(self):
        self.service.serve(b"/.well-known/oauth-authorization-server",
                           {"issuer": ISSUER})
        source = KeySource(self.clock, TreqFetcher(self.stub), issuer=ISSUER)
        self.assertIn("no usable jwks_uri", str(self.refused(source, "x")))

    def test_discovery_refuses_plain_http_jwks_uri_of_an_https_issuer(self):
        """Keys fetched in clear are keys anyone on the path can choose:
        an https issuer's jwks_uri must be https too.  Refused without
        fetching it, with one log line per attempt."""
        from twisted.logger import Logger
        events: list = []
        self.patch(keysource, "log", Logger(observer=events.append))
        self.service.serve(b"/.well-known/openid-configuration",
                           {"issuer": ISSUER, "jwks_uri":
                            "http://login.example.com/jwks"})
        source = KeySource(self.clock, TreqFetcher(self.stub), issuer=ISSUER)
        e = self.refused(source, "rsa-1")
        self.assertIn("not https like its issuer", str(e))
        self.assertEqual(self.service.count(b"/jwks"), 0)
        self.assertEqual(len(events), 1)
        self.assertIn("http://login.example.com/jwks", str(events[0]["why"]))
        # Refused again after min_refresh_interval: nothing was remembered.
        self.clock.advance(31)
        self.refused(source, "rsa-1")
        self.assertEqual(self.service.count(b"/jwks"), 0)

    def test_discovery_of_a_plain_http_issuer_may_use_http(self):
        """Nothing to downgrade: an http issuer (a test rig) keeps working."""
        issuer = "http://login.example.com"
        self.service.serve(b"/.well-known/openid-configuration",
                           {"issuer": issuer,
                            "jwks_uri": "http://login.example.com/jwks"})
        source = KeySource(self.clock, TreqFetcher(self.stub), issuer=issuer)
        self.assertEqual(self.get(source, "rsa-1").get("kid"), "rsa-1")


# -- RFC 9701 answers -----------------------------------------------------------

ANSWER = {"active": True, "sub": "alice", "scope": "read",
          "client_id": "web-app", "exp": NOW + 3600}
RFC9701_HEADER = {"alg": "RS256", "kid": "rsa-1",
                  "typ": "token-introspection+jwt"}


def rfc9701_claims(**changes):
    claims = {"iss": ISSUER, "aud": CLIENT_ID, "iat": NOW - 2,
              "token_introspection": ANSWER}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


class IntrospectionResponseVerifierTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.service = TokenService()
        self.service.serve(b"/jwks", public_jwks(RSA_KEY, EC_KEY, ED_KEY))
        self.stub = StubTreq(self.service)
        self.keys = KeySource(self.clock, TreqFetcher(self.stub), jwks_url=JWKS_URL)
        self.verifier = jose.IntrospectionResponseVerifier(
            self.clock, self.keys, ISSUER, CLIENT_ID, max_age=60)

    def verify(self, body):
        if isinstance(body, str):
            body = body.encode()
        d = self.verifier.verify(body)
        self.stub.flush()
        return d

    def accepted(self, body):
        return self.successResultOf(self.verify(body))

    def refused(self, body, message):
        e = self.failureResultOf(self.verify(body), jose.JOSEError).value
        self.assertIn(message, str(e))

    def test_good_answer_for_each_algorithm(self):
        for key, alg in ((RSA_KEY, "RS256"), (RSA_KEY, "PS256"),
                         (EC_KEY, "ES256"), (ED_KEY, "EdDSA")):
            header = dict(RFC9701_HEADER, alg=alg, kid=key.get("kid"))
            self.assertEqual(
                self.accepted(signed(key, header, rfc9701_claims())), ANSWER)

    def test_typ_with_media_type_prefix_and_aud_list(self):
        header = dict(RFC9701_HEADER,
                      typ="application/token-introspection+jwt")
        body = signed(RSA_KEY, header,
                      rfc9701_claims(aud=["other", CLIENT_ID]))
        self.assertEqual(self.accepted(body), ANSWER)

    def test_inactive_answer_is_returned(self):
        body = signed(RSA_KEY, RFC9701_HEADER,
                      rfc9701_claims(token_introspection={"active": False}))
        self.assertEqual(self.accepted(body), {"active": False})

    def test_alg_none(self):
        body = raw_jwt(dict(RFC9701_HEADER, alg="none"), rfc9701_claims(),
                       signature=b"")
        self.refused(body, "alg none")
        body = raw_jwt(dict(RFC9701_HEADER, alg="none"), rfc9701_claims())
        self.refused(body, "alg none")

    def test_hs256_signed_with_the_public_key_bytes(self):
        """Key confusion: an attacker who knows the RSA public key signs an
        HMAC with it; a verifier that let the header pick the algorithm
        would use the public key as the HMAC secret and accept it."""
        pem = RSA_KEY.export_to_pem()
        signing_input = "%s.%s" % (
            b64json(dict(RFC9701_HEADER, alg="HS256")),
            b64json(rfc9701_claims()))
        for secret in (pem, RSA_KEY.export_public().encode()):
            mac = hmac.new(secret, signing_input.encode(),
                           hashlib.sha256).digest()
            self.refused(signing_input + "." + b64(mac),
                         "algorithm 'HS256' is not allowed")

    def test_hs_and_none_cannot_be_allowed(self):
        for algs in (("RS256", "HS256"), ("none",), ()):
            self.assertRaises(ValueError, jose.IntrospectionResponseVerifier,
                              self.clock, self.keys, ISSUER, CLIENT_ID,
                              allowed_algs=algs)

    def test_alg_outside_the_allow_list(self):
        verifier = jose.IntrospectionResponseVerifier(
            self.clock, self.keys, ISSUER, CLIENT_ID, allowed_algs=("ES256",))
        d = verifier.verify(signed(RSA_KEY, RFC9701_HEADER,
                                   rfc9701_claims()).encode())
        self.stub.flush()
        self.failureResultOf(d, jose.JOSEError)

    def test_alg_of_another_family_for_the_kid(self):
        body = signed(EC_KEY, dict(RFC9701_HEADER, alg="ES256"),
                      rfc9701_claims())
        self.refused(body, "key type 'RSA' cannot be used with ES256")

    def test_wrong_claims(self):
        rows = [
            (rfc9701_claims(aud="someone-else"), "aud 'someone-else'"),
            (rfc9701_claims(aud=["a", "b"]), "does not name this client"),
            (rfc9701_claims(aud=None), "aud None"),
            (rfc9701_claims(iss="https://evil.example"),
             "iss is 'https://evil.example'"),
            (rfc9701_claims(iss=None), "iss is None"),
            (rfc9701_claims(iat=NOW - 61), "too old"),
            (rfc9701_claims(iat=NOW + 6), "issued in the future"),
            (rfc9701_claims(iat=None), "no iat"),
            (rfc9701_claims(iat="now"), "iat is not a number"),
            (rfc9701_claims(exp=NOW - 1), "expired"),
            (rfc9701_claims(token_introspection=None),
             "no token_introspection"),
            (rfc9701_claims(token_introspection="active"),
             "no token_introspection"),
            (rfc9701_claims(token_introspection={"active": "true"}),
             "no boolean active"),
            (rfc9701_claims(token_introspection={}), "no boolean active"),
        ]
        for claims, message in rows:
            self.refused(signed(RSA_KEY, RFC9701_HEADER, claims), message)

    def test_age_within_limits(self):
        for iat in (NOW - 60, NOW + 5):
            body = signed(RSA_KEY, RFC9701_HEADER, rfc9701_claims(iat=iat))
            self.assertEqual(self.accepted(body), ANSWER)

    def test_wrong_typ(self):
        for typ in ("JWT", "at+jwt", None, 7):
            header = dict(RFC9701_HEADER, typ=typ)
            if typ is None:
                del header["typ"]
            self.refused(signed(RSA_KEY, header, rfc9701_claims()),
                         "not token-introspection+jwt")

    def test_tampered_payload(self):
        body = signed(RSA_KEY, RFC9701_HEADER, rfc9701_claims())
        head, _, sig = body.split(".")
        forged = rfc9701_claims(token_introspection=dict(ANSWER,
                                                         scope="admin"))
        self.refused("%s.%s.%s" % (head, b64json(forged), sig),
                     "bad signature")

    def test_signed_by_another_key_with_the_same_kid(self):
        self.refused(signed(OTHER_RSA, RFC9701_HEADER, rfc9701_claims()),
                     "bad signature")

    def test_unknown_kid(self):
        header = dict(RFC9701_HEADER, kid="nobody")
        self.refused(signed(RSA_KEY, header, rfc9701_claims()),
                     "unknown key id 'nobody'")
        self.assertEqual(self.service.count(b"/jwks"), 1)

    def test_not_a_jws(self):
        for body in (b"", b"{\"active\": true}", b"\xff.\xfe.\xfd"):
            self.failureResultOf(self.verify(body), jose.JOSEError)

    def test_jwks_outage(self):
        self.service.serve(b"/jwks", b"", 502)
        self.refused(signed(RSA_KEY, RFC9701_HEADER, rfc9701_claims()),
                     "token service keys unavailable")


class JWTVerifierTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.service = TokenService()
        self.service.serve(b"/jwks", public_jwks(RSA_KEY, ED_KEY))
        self.stub = StubTreq(self.service)
        self.verifier = jose.JWTVerifier(
            self.clock, KeySource(self.clock, TreqFetcher(self.stub),
                                       jwks_url=JWKS_URL))

    def verify(self, token):
        d = self.verifier.verify(token)
        self.stub.flush()
        return d

    def test_good(self):
        claims = {"sub": "alice", "exp": NOW + 10}
        token = signed(ED_KEY, {"alg": "EdDSA", "kid": "ed-1"}, claims)
        self.assertEqual(self.successResultOf(self.verify(token)), claims)

    def test_refused(self):
        header = {"alg": "RS256", "kid": "rsa-1"}
        rows = [
            (signed(RSA_KEY, header, {"exp": NOW}), "expired"),
            (signed(RSA_KEY, header, {"sub": "a"}), "no exp"),
            (signed(OTHER_RSA, header, {"exp": NOW + 10}), "bad signature"),
            (raw_jwt(dict(header, alg="none"), {"exp": NOW + 10}),
             "alg none"),
            (raw_jwt(dict(header, alg="HS256"), {"exp": NOW + 10}),
             "not allowed"),
        ]
        for token, message in rows:
            e = self.failureResultOf(self.verify(token), jose.JOSEError).value
            self.assertIn(message, str(e))


# -- client assertions --------------------------------------------------------

class ClientAssertionTests(SynchronousTestCase):
    def test_rfc7523_claims_and_signature(self):
        clock = Clock()
        clock.advance(NOW)
        for key, alg in ((RSA_KEY, "RS256"), (RSA_KEY, "PS256"),
                         (EC_KEY, "ES256"), (ED_KEY, "EdDSA")):
            token = jose.client_assertion(clock, key, CLIENT_ID,
                                          ISSUER + "/token", alg)
            checker = jws.JWS()
            checker.deserialize(token)
            checker.verify(jwk.JWK(**key.export_public(as_dict=True)), alg)
            claims = json.loads(checker.payload)
            self.assertEqual(checker.jose_header["kid"], key.get("kid"))
            jti = claims.pop("jti")
            self.assertGreaterEqual(len(jti), 16)
            self.assertEqual(claims, {
                "iss": CLIENT_ID, "sub": CLIENT_ID, "aud": ISSUER + "/token",
                "iat": int(NOW), "exp": int(NOW) + 60})

    def test_key_must_fit(self):
        clock = Clock()
        rows = [(EC_KEY, "RS256"), (RSA_KEY, "HS256"), (RSA_KEY, "none"),
                (jwk.JWK(**RSA_KEY.export_public(as_dict=True)), "RS256")]
        for key, alg in rows:
            self.assertRaises(ValueError, jose.client_assertion, clock, key,
                              CLIENT_ID, ISSUER, alg)
