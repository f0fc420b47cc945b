"""DPoP proof checks (RFC 9449 section 4.3): a good proof made by jwcrypto,
and for every check a proof that fails only that check."""

from __future__ import annotations

import base64
import hashlib
import json

from jwcrypto import jwk, jws
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from phantomd.token.dpop import (
    ProofChecker, ProofError, ReplayCacheFull, access_token_hash,
    normalize_uri, parse_algs, request_url)

TOKEN = "opaque-token-1"
URL = "https://api.example/orders"
NOW = 1_700_000_000.0

EC_KEY = jwk.JWK.generate(kty="EC", crv="P-256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_proof(key=EC_KEY, alg="ES256", header=None, jti="jti-1",
               htm="GET", htu=URL, iat=NOW, ath=None, drop=(), **extra):
    """A proof signed by ``key`` (jwcrypto does the signing)."""
    h = {"typ": "dpop+jwt", "alg": alg,
         "jwk": key.export_public(as_dict=True)}
    h.update(header or {})
    claims = {"jti": jti, "htm": htm, "htu": htu, "iat": iat,
              "ath": access_token_hash(TOKEN) if ath is None else ath}
    claims.update(extra)
    for name in drop:
        claims.pop(name)
    s = jws.JWS(json.dumps(claims).encode())
    s.add_signature(key, alg=alg, protected=json.dumps(h))
    return s.serialize(compact=True).encode("ascii")


def hand_made(header: dict, claims: dict, signature: bytes = b"") -> bytes:
    return ("%s.%s.%s" % (b64(json.dumps(header).encode()),
                          b64(json.dumps(claims).encode()),
                          b64(signature))).encode("ascii")


class ProofTests(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.checker = ProofChecker(self.clock, max_age=60)

    def check(self, values, method=b"GET", url=URL, token=TOKEN):
        return self.checker.check(values, method, url, token)

    def refused(self, values, reason, **kw):
        e = self.assertRaises(ProofError, self.check, values, **kw)
        self.assertEqual(e.reason, reason, e.description)
        return e

    def test_good_proof(self):
        """A proof made by jwcrypto passes; its thumbprint is RFC 7638's."""
        proof = self.check([make_proof()])
        self.assertEqual(proof.jkt, EC_KEY.thumbprint())
        self.checker.remember(proof)

    def test_other_algorithms(self):
        for key, alg in [(jwk.JWK.generate(kty="RSA", size=2048), "RS256"),
                         (jwk.JWK.generate(kty="RSA", size=2048), "PS256"),
                         (jwk.JWK.generate(kty="OKP", crv="Ed25519"),
                          "EdDSA")]:
            proof = self.check([make_proof(key=key, alg=alg, jti=alg)])
            self.assertEqual(proof.jkt, key.thumbprint())

    def test_alg_not_configured(self):
        checker = ProofChecker(self.clock, algs=["RS256"])
        e = self.assertRaises(ProofError, checker.check, [make_proof()],
                              b"GET", URL, TOKEN)
        self.assertEqual(e.reason, "alg")

    def test_missing(self):
        self.refused([], "missing")

    def test_two_headers(self):
        p = make_proof()
        self.refused([p, p], "multiple")

    def test_not_a_jws(self):
        self.refused([b"not a jws"], "malformed")
        self.refused([b"a.b.c" * 3000], "malformed")

    def test_critical_header_parameters(self):
        c = {"jti": "x", "htm": "GET", "htu": URL, "iat": NOW,
             "ath": access_token_hash(TOKEN)}
        for extra in ({"crit": ["exp"], "exp": 1},
                      {"b64": False, "crit": ["b64"]}):
            h = dict({"typ": "dpop+jwt", "alg": "ES256",
                      "jwk": EC_KEY.export_public(as_dict=True)}, **extra)
            # refused before the signature is looked at
            self.refused([hand_made(h, c, b"x" * 64)], "malformed")

    def test_non_canonical_base64(self):
        """The signature is checked over the bytes sent, nothing else."""
        head, payload, sig = make_proof().split(b".")
        self.refused([b".".join((head + b"=", payload, sig))], "malformed")

    def test_wrong_typ(self):
        self.refused([make_proof(header={"typ": "JWT"})], "typ")
        self.refused([make_proof(header={"typ": None})], "typ")

    def test_alg_none(self):
        h = {"typ": "dpop+jwt", "alg": "none",
             "jwk": EC_KEY.export_public(as_dict=True)}
        c = {"jti": "x", "htm": "GET", "htu": URL, "iat": NOW,
             "ath": access_token_hash(TOKEN)}
        self.refused([hand_made(h, c)], "alg")

    def test_hs256(self):
        """A MAC is no proof of possession: HS256 with a symmetric jwk."""
        secret = jwk.JWK.generate(kty="oct", size=256)
        s = jws.JWS(json.dumps({"jti": "x", "htm": "GET", "htu": URL,
                                "iat": NOW,
                                "ath": access_token_hash(TOKEN)}).encode())
        s.add_signature(secret, alg="HS256", protected=json.dumps(
            {"typ": "dpop+jwt", "alg": "HS256",
             "jwk": secret.export(as_dict=True)}))
        self.refused([s.serialize(compact=True).encode()], "alg")
        checker = ProofChecker(self.clock)
        # Even were it listed, a symmetric jwk is refused as a key.
        checker.algs = ("HS256",)
        e = self.assertRaises(ProofError, checker.check,
                              [s.serialize(compact=True).encode()],
                              b"GET", URL, TOKEN)
        self.assertEqual(e.reason, "key")

    def test_private_jwk(self):
        self.refused([make_proof(header={
            "jwk": EC_KEY.export_private(as_dict=True)})], "key")

    def test_no_jwk(self):
        self.refused([make_proof(header={"jwk": "abc"})], "key")

    def test_bad_signature(self):
        head, payload, sig = make_proof().split(b".")
        other = make_proof(jti="other").split(b".")[2]
        self.refused([b".".join((head, payload, other))], "signature")

    def test_signed_by_another_key(self):
        """The header names one key, the signature is by another."""
        self.refused([make_proof(header={
            "jwk": jwk.JWK.generate(kty="EC", crv="P-256").export_public(
                as_dict=True)})], "signature")

    def test_wrong_htm(self):
        self.refused([make_proof(htm="POST")], "htm")
        self.refused([make_proof(htm="get")], "htm")

    def test_wrong_htu(self):
        self.refused([make_proof(htu="https://api.example/other")], "htu")
        self.refused([make_proof(htu="http://api.example/orders")], "htu")
        self.refused([make_proof(htu="https://evil.example/orders")], "htu")
        self.refused([make_proof(drop=("htu",))], "htu")
        self.refused([make_proof()], "htu", url=None)

    def test_htu_normalised(self):
        """RFC 9449 section 4.3: query and fragment ignored, RFC 3986
        normalisation applies."""
        for i, htu in enumerate([
                "https://API.Example/orders?x=1", "HTTPS://api.example:443/"
                "orders#f", "https://api.example/%6Frders"]):
            self.check([make_proof(htu=htu, jti=str(i))])

    def test_old_iat(self):
        self.refused([make_proof(iat=NOW - 66)], "iat")
        self.check([make_proof(iat=NOW - 64)])

    def test_future_iat(self):
        self.refused([make_proof(iat=NOW + 6)], "iat")
        self.refused([make_proof(iat="now")], "iat")
        # NaN compares false both ways: it would never grow old.
        self.refused([make_proof(iat=float("nan"))], "iat")
        self.refused([make_proof(iat=float("inf"))], "iat")
        self.check([make_proof(iat=NOW + 4)])

    def test_wrong_ath(self):
        self.refused([make_proof(ath=access_token_hash("another"))], "ath")
        self.refused([make_proof(drop=("ath",))], "ath")

    def test_no_jti(self):
        self.refused([make_proof(drop=("jti",))], "malformed")

    def test_replayed_jti(self):
        p = make_proof()
        self.checker.remember(self.check([p]))
        self.refused([p], "replay")
        # A new proof with the same jti is the same proof to the cache.
        self.refused([make_proof(iat=NOW + 1)], "replay")

    def test_replay_race(self):
        """Two requests checked before either was let through: the second
        to be remembered is refused."""
        p = make_proof()
        first, second = self.check([p]), self.check([p])
        self.checker.remember(first)
        e = self.assertRaises(ProofError, self.checker.remember, second)
        self.assertEqual(e.reason, "replay")

    def test_replay_window_expires(self):
        """Once the iat window is over the jti is forgotten (and the proof
        refused for its age anyway)."""
        p = make_proof()
        self.checker.remember(self.check([p]))
        self.clock.advance(71)
        self.assertEqual(len(self.checker.replays), 1)
        self.refused([p], "iat")
        self.check([make_proof(jti="new", iat=NOW + 71)])
        self.assertEqual(len(self.checker.replays), 0)

    def test_replay_cache_full_fails_closed(self):
        checker = ProofChecker(self.clock, max_entries=2)
        for jti in ("a", "b"):
            checker.remember(checker.check([make_proof(jti=jti)], b"GET",
                                           URL, TOKEN))
        proof = checker.check([make_proof(jti="c")], b"GET", URL, TOKEN)
        self.assertRaises(ReplayCacheFull, checker.remember, proof)
        # "a" and "b" are still refused: nothing was evicted.
        for jti in ("a", "b"):
            e = self.assertRaises(ProofError, checker.check,
                                  [make_proof(jti=jti)], b"GET", URL, TOKEN)
            self.assertEqual(e.reason, "replay")
        self.clock.advance(71)
        checker.remember(checker.check([make_proof(jti="c", iat=NOW + 70)],
                                       b"GET", URL, TOKEN))


class HelperTests(SynchronousTestCase):

    def test_parse_algs(self):
        self.assertEqual(parse_algs("ES256 EdDSA"), ("ES256", "EdDSA"))
        for bad in ("none", "HS256", "ES256 HS512", ""):
            self.assertRaises(ValueError, parse_algs, bad)

    def test_ath(self):
        self.assertEqual(access_token_hash(TOKEN), b64(
            hashlib.sha256(TOKEN.encode()).digest()))

    def test_normalize(self):
        self.assertEqual(normalize_uri("HTTP://A.b:80"), "http://a.b/")
        self.assertEqual(normalize_uri("https://a.b:8443/x%2fy?q"),
                         "https://a.b:8443/x%2Fy")
        self.assertEqual(normalize_uri("http://[::1]:8080/"),
                         "http://[::1]:8080/")
        for bad in ("ftp://a/", "/x", "http://u@a/", "http://a:x/"):
            self.assertIsNone(normalize_uri(bad), bad)

    def test_request_url(self):
        self.assertEqual(request_url(b"https", b"API.example:443",
                                     b"/o?x=1"), "https://api.example/o")
        self.assertIsNone(request_url(b"http", None, b"/"))
        self.assertIsNone(request_url(b"http", b"a\xff", b"/"))
