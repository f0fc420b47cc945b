"""Each ``[introspection] response`` form's reader on its own
(phantomd.token.readers): a table of (media type, body) -> verdict per
reader, on a Clock, with fake verifiers and a real Minter."""

from __future__ import annotations

import json
from typing import Any

from jwcrypto import jwk, jwt
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from phantomd.token import jose, readers
from phantomd.token.outcomes import Active, Inactive, IntrospectionFailed

NOW = 1_700_000_000
KEY = jwk.JWK.generate(kty="EC", crv="P-256", kid="ts")
FRESH = (120.0, False)


def make_jwt(**claims: Any) -> str:
    body = {"sub": "alice", "iat": NOW, "exp": NOW + 300}
    body.update(claims)
    token = jwt.JWT(header={"alg": "ES256", "kid": "ts"},
                    claims={k: v for k, v in body.items() if v is not None})
    token.make_signed_token(KEY)
    return token.serialize()


GOOD = make_jwt()
EXPIRED = make_jwt(exp=NOW - 1)


def doc(**members: Any) -> bytes:
    return json.dumps(members).encode()


class Forwards:
    """A table row's verdict: Active, with this JWT and ``FRESH``; a plain
    string is (part of) an IntrospectionFailed's description instead."""

    def __init__(self, jwt: str) -> None:
        self.jwt = jwt


class Verifier:
    """``verify`` succeeds with ``result`` or fails with JOSEError."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.seen: list[Any] = []

    def verify(self, value: Any) -> Any:
        self.seen.append(value)
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(self.result)


class ReaderCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    def verdict(self, reader: Any, media_type: Any, body: bytes) -> Any:
        """The verdict, or the IntrospectionFailed's description."""
        try:
            result = reader.read(media_type, body, FRESH)
        except IntrospectionFailed as e:
            return e.description
        if hasattr(result, "addCallback"):
            failure = []
            result.addErrback(failure.append)
            if failure:
                failure[0].trap(IntrospectionFailed)
                return failure[0].value.description
            return self.successResultOf(result)
        return result

    def table(self, reader: Any, rows: list) -> None:
        for media_type, body, expected in rows:
            with self.subTest(media_type=media_type, body=body[:40]):
                got = self.verdict(reader, media_type, body)
                if isinstance(expected, Forwards):
                    self.assertIsInstance(got, Active, got)
                    self.assertEqual(got.jwt, expected.jwt)
                    self.assertEqual(got.lifetime, FRESH[0])
                    self.assertEqual(got.floorable, FRESH[1])
                elif isinstance(expected, str):
                    self.assertIsInstance(got, str, repr(got)[:300])
                    self.assertIn(expected, got)
                elif expected is Inactive:
                    self.assertEqual(got, Inactive(FRESH[0]))
                else:
                    self.fail("bad row %r" % (expected,))


class JWTReaderTests(ReaderCase):
    def test_table(self):
        self.table(readers.JWTReader(self.clock), [
            ("application/jwt", GOOD.encode(), Forwards(GOOD)),
            ("application/jwt", b"  %s\n" % GOOD.encode(), Forwards(GOOD)),
            ("application/json", doc(active=False), Inactive),
            ("application/json", doc(active=True),
             "active JSON to a request for application/jwt"),
            ("application/json", b"{", "malformed JSON"),
            ("application/json", doc(active="no"), "non-boolean"),
            ("text/plain", GOOD.encode(), "Content-Type text/plain"),
            (None, GOOD.encode(), "(none or several)"),
            ("application/jwt", EXPIRED.encode(), "unusable JWT: expired"),
            ("application/jwt", b"a.b", "unusable JWT"),
            ("application/jwt", "\u00e9".encode(), "not ASCII"),
        ])

    def test_signature_checked_with_a_verifier(self):
        good = Verifier({"sub": "alice", "exp": NOW + 300})
        reader = readers.JWTReader(self.clock, good)
        self.assertEqual(self.verdict(reader, "application/jwt",
                                      GOOD.encode()).claims,
                         {"sub": "alice", "exp": NOW + 300})
        self.assertEqual(good.seen, [GOOD])
        bad = readers.JWTReader(self.clock,
                                Verifier(jose.JOSEError("bad signature")))
        self.assertIn("JWT did not verify: bad signature",
                      self.verdict(bad, "application/jwt", GOOD.encode()))

    def test_expired_never_reaches_the_verifier(self):
        verifier = Verifier({})
        reader = readers.JWTReader(self.clock, verifier)
        self.verdict(reader, "application/jwt", EXPIRED.encode())
        self.assertEqual(verifier.seen, [])


class FieldReaderTests(ReaderCase):
    def test_table(self):
        self.table(readers.FieldReader(self.clock, "jwt"), [
            ("application/json", doc(active=True, jwt=GOOD), Forwards(GOOD)),
            ("application/json", doc(active=False), Inactive),
            ("application/json", doc(active=True),
             "without a jwt member (phantom_token_field)"),
            ("application/json", doc(active=True, jwt=""),
             "without a jwt member"),
            ("application/json", doc(active=True, jwt=7),
             "without a jwt member"),
            ("application/json", doc(active=True, jwt=" " + GOOD),
             "not a compact JWS"),
            ("application/json", doc(active=True, jwt=EXPIRED), "expired"),
            ("application/json", doc(jwt=GOOD), "no \"active\" member"),
            ("application/json", b"[1]", "not an object"),
            ("application/jwt", doc(active=True, jwt=GOOD),
             "Content-Type application/jwt, expected application/json"),
        ])


class MintingReaderTests(ReaderCase):
    def setUp(self) -> None:
        super().setUp()
        self.minter = jose.Minter(self.clock, [KEY], "https://phantomd",
                                  "api", 300)

    def test_table(self):
        reader = readers.MintingReader(self.minter)
        rows = [
            ("application/json", doc(active=False), Inactive),
            ("application/json", doc(active=True, exp=NOW - 5),
             "cannot mint a JWT from the token service's answer: expired"),
            ("application/json", doc(active=True, sub=5), "wrong type"),
            ("application/json", b"nope", "malformed JSON"),
            ("application/jwt", doc(active=True), "Content-Type"),
        ]
        self.table(reader, rows)
        minted = self.verdict(reader, "application/json",
                              doc(active=True, sub="bob", exp=NOW + 60))
        self.assertIsInstance(minted, Active)
        self.assertEqual((minted.claims["sub"], minted.claims["exp"],
                          minted.lifetime), ("bob", NOW + 60, FRESH[0]))


class SignedReaderTests(ReaderCase):
    MEDIA = "application/token-introspection+jwt"

    def setUp(self) -> None:
        super().setUp()
        self.minter = jose.Minter(self.clock, [KEY], "https://phantomd",
                                  "api", 300)

    def reader(self, result: Any) -> Any:
        self.verifier = Verifier(result)
        return readers.SignedReader(self.minter, self.verifier)

    def test_table(self):
        for result, expected in [
                ({"active": False}, Inactive),
                (jose.JOSEError("aud 'x' does not name this client"),
                 "signed introspection answer did not verify: aud"),
                ({"active": True, "exp": NOW - 1}, "cannot mint")]:
            self.table(self.reader(result), [(self.MEDIA, b"jws", expected)])
            self.assertEqual(self.verifier.seen, [b"jws"])
        active = self.verdict(self.reader({"active": True, "sub": "carol"}),
                              self.MEDIA, b"jws")
        self.assertEqual(active.claims["sub"], "carol")

    def test_wrong_media_type_is_not_verified(self):
        reader = self.reader({"active": True})
        self.assertIn("expected application/token-introspection+jwt",
                      self.verdict(reader, "application/jwt", b"jws"))
        self.assertEqual(self.verifier.seen, [])


class ForModeTests(SynchronousTestCase):
    def test_one_reader_per_mode(self):
        clock, minter, verifier = Clock(), object(), object()
        for mode, kind in [("jwt", readers.JWTReader),
                           ("phantom_token", readers.FieldReader),
                           ("json", readers.MintingReader),
                           ("token-introspection+jwt", readers.SignedReader)]:
            reader = readers.for_mode(mode, clock, "jwt", minter, verifier)
            self.assertIs(type(reader), kind)
            self.assertEqual(reader.media_type,
                             readers.ACCEPT[mode].decode())

    def test_missing_parts_refused(self):
        for args, message in [
                (("xml",), "unknown response form"),
                (("json",), "needs a minter"),
                (("token-introspection+jwt",), "needs a minter"),
                (("token-introspection+jwt", object()),
                 "needs a response verifier")]:
            mode, rest = args[0], args[1:]
            e = self.assertRaises(ValueError, readers.for_mode, mode, Clock(),
                                  "jwt", *rest)
            self.assertIn(message, str(e))
