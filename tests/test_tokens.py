"""Bearer token extraction: one row per kind of Authorization header."""

import random
import re

from twisted.trial.unittest import SynchronousTestCase

from phantomd.token.outcomes import Reject
from phantomd.token.tokens import (
    MAX_TOKEN_LENGTH, b64token, jwt_shaped, parse_authorization,
    parse_credentials, token_id, token_key)

# (headers, expected token or (status, error))
ROWS = [
    ([], (401, None)),
    ([b"Basic dXNlcjpwYXNz"], (401, None)),
    ([b"Digest username=x"], (401, None)),
    ([b"Bearer abc.DEF-123_~+/"], "abc.DEF-123_~+/"),
    ([b"bearer abc"], "abc"),
    ([b"BEARER abc=="], "abc=="),
    ([b"Bearer   abc"], "abc"),
    ([b"  Bearer abc  "], "abc"),
    ([b"Bearer"], (400, "invalid_request")),
    ([b"Bearer "], (400, "invalid_request")),
    ([b"Bearer\tabc"], (400, "invalid_request")),
    ([b"Bearer a=b"], (400, "invalid_request")),
    ([b"Bearer abc def"], (400, "invalid_request")),
    ([b"Bearer abc, Bearer def"], (400, "invalid_request")),
    ([b"Bearer abc", b"Bearer abc"], (400, "invalid_request")),
    ([b"Bearer abc", b"Basic eA=="], (400, "invalid_request")),
    ([b"Bearer ab\"c"], (400, "invalid_request")),
    ([b"Bearer \xc3\xa9t\xc3\xa9"], (400, "invalid_request")),
    ([b"Bearer abc\x00"], (400, "invalid_request")),
    ([b"Bearer " + b"a" * MAX_TOKEN_LENGTH], "a" * MAX_TOKEN_LENGTH),
    ([b"Bearer " + b"a" * (MAX_TOKEN_LENGTH + 1)], (400, "invalid_request")),
    ([b""], (401, None)),
]


class ParseAuthorizationTests(SynchronousTestCase):
    def test_rows(self):
        for headers, expected in ROWS:
            got = parse_authorization(headers)
            if isinstance(expected, str):
                self.assertEqual(got, expected, headers)
            else:
                self.assertIsInstance(got, Reject, headers)
                self.assertEqual((got.status, got.error), expected, headers)

    def test_challenge_without_error_for_missing_credentials(self):
        r = parse_authorization([])
        self.assertEqual(r.challenge("api"), b'Bearer realm="api"')

    def test_challenge_with_error(self):
        r = parse_authorization([b"Bearer"])
        self.assertEqual(
            r.challenge("api"),
            b'Bearer realm="api", error="invalid_request", '
            b'error_description="empty bearer token"')


class DigestTests(SynchronousTestCase):
    def test_distinct_tokens_distinct_keys(self):
        keys = {token_key(t) for t in ("a", "A", "a=", "aa", "b")}
        self.assertEqual(len(keys), 5)

    def test_token_id_is_short_and_not_the_token(self):
        tid = token_id(token_key("secret-opaque-token"))
        self.assertEqual(len(tid), 12)
        self.assertNotIn("secret", tid)


class GrammarTests(SynchronousTestCase):
    """``b64token`` and ``jwt_shaped`` are RFC 6750's b64token and a
    compact JWS's shape, written with ``bytes.translate`` for speed: they
    must accept exactly what the grammars' regular expressions accept."""

    B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z").match
    JWT = re.compile(rb"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]*)*\Z").match

    def samples(self):
        edge = [b"", b"=", b"==", b"a", b"a=", b"a==", b"=a", b"a=b", b".",
                b"..", b".a", b"a.", b"a..b", b"a.b.c", b"-_", b"+/~",
                b"a b", b"a\n", b"a\x00", b"\xff", b"a\xc3\xa9", b"?",
                b"eyJ.eyJ.sig", b"eyJ.eyJ.", b"a" * 5000]
        rng = random.Random(6750)
        alphabet = (b"AZaz09-._~+/=?% \t\r\n,;\"\x00\x7f\x80\xff")
        for _ in range(20000):
            edge.append(bytes(rng.choice(alphabet)
                              for _ in range(rng.randint(0, 12))))
        return edge

    def test_b64token_is_the_grammar(self):
        for value in self.samples():
            self.assertEqual(b64token(value), bool(self.B64TOKEN(value)),
                             value)

    def test_jwt_shaped_is_the_grammar(self):
        for value in self.samples():
            self.assertEqual(jwt_shaped(value), bool(self.JWT(value)), value)

    def test_the_bearer_fast_path_reads_as_the_grammar_does(self):
        # "Bearer " takes a shortcut past the scheme regex; "bearer "
        # (same scheme, RFC 7235 case-insensitive) still goes through it.
        rng = random.Random(7235)
        tails = [b"", b" ", b"  x", b"\tx", b"x y", b"x,y", b"abc==",
                 b"a" * (MAX_TOKEN_LENGTH + 1), b"\xff", b"x\r\ny"]
        alphabet = b"Aa0-._~+/= \t,\"\x00\xff"
        for _ in range(5000):
            tails.append(bytes(rng.choice(alphabet)
                               for _ in range(rng.randint(0, 10))))
        for tail in tails:
            for lead in (b"", b" ", b"\t "):
                fast = parse_credentials([lead + b"Bearer " + tail])
                slow = parse_credentials([lead + b"bearer " + tail])
                self.assertEqual(type(fast), type(slow), tail)
                if isinstance(fast, Reject):
                    self.assertEqual(
                        (fast.status, fast.error, fast.description),
                        (slow.status, slow.error, slow.description), tail)
                else:
                    self.assertEqual(fast, slow, tail)
