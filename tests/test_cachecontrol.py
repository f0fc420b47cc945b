"""Freshness lifetimes from introspection response headers (RFC 9111)."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from phantomd.token.cachecontrol import (floor_applies, freshness,
                                       freshness_lifetime, parse_http_date)

NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
IMF_NOW = "Sun, 06 Nov 1994 08:49:37 GMT"
IMF_PLUS_60 = "Sun, 06 Nov 1994 08:50:37 GMT"
IMF_PLUS_120 = "Sun, 06 Nov 1994 08:51:37 GMT"

CC = "cache-control"

# (description, headers, expected lifetime)
CASES = [
    ("no headers at all", {}, None),
    ("unrelated headers only", {"content-type": ["application/jwt"]}, None),
    ("directives without freshness", {CC: ["public, must-revalidate"]}, None),
    ("Age alone is no freshness information", {"age": ["5"]}, None),
    ("max-age", {CC: ["max-age=60"]}, 60.0),
    ("max-age=0", {CC: ["max-age=0"]}, 0.0),
    ("directive names are case-insensitive", {CC: ["Max-Age=60"]}, 60.0),
    ("quoted max-age is accepted", {CC: ['max-age="60"']}, 60.0),
    ("s-maxage wins over a longer max-age",
     {CC: ["max-age=600, s-maxage=60"]}, 60.0),
    ("s-maxage wins over a shorter max-age",
     {CC: ["max-age=10, s-maxage=60"]}, 60.0),
    ("Age is subtracted", {CC: ["max-age=60"], "age": ["15"]}, 45.0),
    ("Age beyond max-age is 0, never negative",
     {CC: ["max-age=60"], "age": ["90"]}, 0.0),
    ("no-store", {CC: ["no-store, max-age=60"]}, 0.0),
    ("no-cache", {CC: ["max-age=60, no-cache"]}, 0.0),
    ("no-cache with a field list", {CC: ['no-cache="set-cookie", max-age=60']},
     0.0),
    ("private", {CC: ["private, max-age=60"]}, 0.0),
    ("NO-STORE in capitals", {CC: ["NO-STORE"]}, 0.0),
    ("no-store on a second line", {CC: ["max-age=60", "no-store"]}, 0.0),
    ("directives spread over lines", {CC: ["public", "max-age=60"]}, 60.0),
    ("empty list elements are allowed", {CC: [" , max-age=60 ,, "]}, 60.0),
    ("whitespace around elements", {CC: ["\tpublic ,  max-age=60\t"]}, 60.0),
    ("huge max-age is clamped to 2**31", {CC: ["max-age=99999999999999"]},
     2.0 ** 31),
    ("bytes values are accepted", {CC: [b"max-age=60"]}, 60.0),
    ("a bare string value is one line", {CC: "max-age=60"}, 60.0),
    # malformed -> stale
    ("max-age not a number", {CC: ["max-age=abc"]}, 0.0),
    ("max-age negative", {CC: ["max-age=-1"]}, 0.0),
    ("max-age with a sign", {CC: ["max-age=+60"]}, 0.0),
    ("max-age fractional", {CC: ["max-age=1.5"]}, 0.0),
    ("max-age without a value", {CC: ["max-age"]}, 0.0),
    ("max-age empty value", {CC: ["max-age="]}, 0.0),
    ("max-age non-ASCII digits", {CC: ["max-age=\u0666\u0660"]}, 0.0),
    ("spaces around =", {CC: ["max-age = 60"]}, 0.0),
    ("unterminated quote", {CC: ['max-age="60']}, 0.0),
    ("garbage in the list", {CC: ["max-age=60, {oops}"]}, 0.0),
    ("s-maxage malformed even with a good max-age",
     {CC: ["s-maxage=x, max-age=60"]}, 0.0),
    ("Age malformed", {CC: ["max-age=60"], "age": ["ten"]}, 0.0),
    # duplicates
    ("identical duplicate max-age", {CC: ["max-age=60, max-age=60"]}, 60.0),
    ("conflicting max-age in one line", {CC: ["max-age=60, max-age=30"]},
     0.0),
    ("conflicting max-age across lines", {CC: ["max-age=30", "max-age=60"]},
     0.0),
    ("conflicting Age", {CC: ["max-age=60"], "age": ["1", "2"]}, 0.0),
    ("identical Age lines", {CC: ["max-age=60"], "age": ["5", "5"]}, 55.0),
    # Expires and Date
    ("Expires - Date", {"expires": [IMF_PLUS_60], "date": [IMF_NOW]}, 60.0),
    ("Expires without Date uses now", {"expires": [IMF_PLUS_120]}, 120.0),
    ("Expires in RFC 850 form",
     {"expires": ["Sunday, 06-Nov-94 08:50:37 GMT"], "date": [IMF_NOW]},
     60.0),
    ("Expires in asctime form",
     {"expires": ["Sun Nov  6 08:50:37 1994"], "date": [IMF_NOW]}, 60.0),
    ("Expires in the past", {"expires": [IMF_NOW],
                             "date": [IMF_PLUS_60]}, 0.0),
    ("Expires minus Age", {"expires": [IMF_PLUS_60], "date": [IMF_NOW],
                           "age": ["10"]}, 50.0),
    ("max-age wins over Expires", {CC: ["max-age=5"],
                                   "expires": [IMF_PLUS_120]}, 5.0),
    ("max-age wins over a malformed Expires", {CC: ["max-age=5"],
                                               "expires": ["0"]}, 5.0),
    ("no-store wins over Expires", {CC: ["no-store"],
                                    "expires": [IMF_PLUS_120]}, 0.0),
    ("Expires: 0 means already expired", {"expires": ["0"]}, 0.0),
    ("Expires with a bad day of month",
     {"expires": ["Sun, 31 Nov 1994 08:49:37 GMT"]}, 0.0),
    ("Expires not in GMT", {"expires": ["Sun, 06 Nov 1994 08:50:37 PST"]},
     0.0),
    ("Date malformed", {"expires": [IMF_PLUS_60], "date": ["yesterday"]},
     0.0),
    ("conflicting Expires",
     {"expires": [IMF_PLUS_60, IMF_PLUS_120], "date": [IMF_NOW]}, 0.0),
    ("conflicting Date",
     {"expires": [IMF_PLUS_120], "date": [IMF_NOW, IMF_PLUS_60]}, 0.0),
]


class FreshnessLifetimeTests(SynchronousTestCase):
    def test_table(self):
        for description, headers, expected in CASES:
            with self.subTest(description):
                self.assertEqual(freshness_lifetime(headers, NOW), expected)

    def test_same_answer_every_time(self):
        """Parsed values are remembered: a value seen before (fresh,
        stale, or too long to remember) gives the same answer again, and
        memory of them stays bounded."""
        long_value = "max-age=60, " + ", ".join(
            "x%d=%s" % (i, "y" * 20) for i in range(20))
        cases = [({"cache-control": ["max-age=60"]}, 60.0),
                 ({"cache-control": ["max-age=60, max-age=30"]}, 0.0),
                 ({"cache-control": ["max-age=60", "no-store"]}, 0.0),
                 ({"cache-control": [long_value]}, 60.0)]
        for _ in range(3):
            for headers, expected in cases:
                self.assertEqual(freshness_lifetime(headers, NOW), expected)
        for i in range(500):
            self.assertEqual(freshness_lifetime(
                {"cache-control": ["max-age=%d" % i]}, NOW), float(i))
        from phantomd.token import cachecontrol
        self.assertLessEqual(len(cachecontrol._PARSED),
                             cachecontrol._MAX_PARSED)

    def test_result_depends_on_now_only_without_date(self):
        headers = {"expires": [IMF_PLUS_60]}
        self.assertEqual(freshness_lifetime(headers, NOW + 20), 40.0)
        self.assertEqual(freshness_lifetime(headers, NOW + 100), 0.0)


HTTP_DATES = [
    ("Sun, 06 Nov 1994 08:49:37 GMT", NOW),
    ("Sunday, 06-Nov-94 08:49:37 GMT", NOW),
    ("Sun Nov  6 08:49:37 1994", NOW),
    ("Sun Nov 06 08:49:37 1994", NOW),
    ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
    ("Tue, 29 Feb 2028 00:00:00 GMT", 1835395200.0),
    ("Sun, 29 Feb 2027 00:00:00 GMT", None),
    ("Sun, 06 Nov 1994 24:00:00 GMT", None),
    ("Sun, 6 Nov 1994 08:49:37 GMT", None),
    ("06 Nov 1994 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 08:49:37 +0000", None),
    ("", None),
    ("0", None),
]


class HTTPDateTests(SynchronousTestCase):
    def test_table(self):
        for value, expected in HTTP_DATES:
            with self.subTest(value):
                self.assertEqual(parse_http_date(value, NOW), expected)

    def test_two_digit_year_more_than_50_years_ahead_is_last_century(self):
        now_2030 = 1893456000.0  # 2030-01-01
        for value, expected in [
                ("Tuesday, 01-Jan-80 00:00:00 GMT", "Tue, 01 Jan 2080"),
                ("Thursday, 01-Jan-81 00:00:00 GMT", "Thu, 01 Jan 1981"),
                ("Thursday, 01-Jan-70 00:00:00 GMT", "Thu, 01 Jan 2070")]:
            with self.subTest(value):
                self.assertEqual(
                    parse_http_date(value, now_2030),
                    parse_http_date(expected + " 00:00:00 GMT", now_2030))


_HEADER_NAMES = st.sampled_from(
    ["cache-control", "expires", "date", "age", "pragma"])
_CC_PIECES = st.sampled_from(
    ["max-age", "s-maxage", "no-store", "no-cache", "private", "public",
     "=", ",", '"', "\\", " ", "\t", "0", "60", "-1", "99999999999999999999",
     "GMT", "Sun, 06 Nov 1994 08:49:37 GMT", "\u0666", "\x00", "\n"])
_VALUES = st.one_of(
    st.text(max_size=40),
    st.lists(_CC_PIECES, max_size=12).map("".join),
    st.binary(max_size=20))


class NeverRaisesTests(SynchronousTestCase):
    @settings(derandomize=True, max_examples=500, deadline=None)
    @given(headers=st.dictionaries(
        _HEADER_NAMES, st.lists(_VALUES, max_size=3), max_size=5),
        now=st.floats(allow_nan=True, allow_infinity=True))
    def test_any_input(self, headers, now):
        lifetime = freshness_lifetime(headers, now)
        self.assertTrue(lifetime is None or lifetime >= 0, lifetime)


class FreshnessTests(SynchronousTestCase):
    """``freshness`` (one reading, used by the introspector) says exactly
    what ``freshness_lifetime`` and ``floor_applies`` say."""

    FLOOR_CASES = [({CC: ["no-store"]}, True), ({CC: ["no-cache"]}, True),
                   ({CC: ["private"]}, False), ({}, True),
                   ({CC: ["max-age=0"]}, False), ({CC: ["max-age=x"]}, False),
                   ({CC: ["max-age=60, max-age=30"]}, False)]

    def test_table(self):
        for description, headers, expected in CASES:
            with self.subTest(description):
                self.assertEqual(freshness(headers, NOW),
                                 (expected, floor_applies(headers, NOW)))
        for headers, floorable in self.FLOOR_CASES:
            self.assertEqual(freshness(headers, NOW)[1], floorable, headers)

    @settings(derandomize=True, max_examples=500, deadline=None)
    @given(headers=st.dictionaries(
        _HEADER_NAMES, st.lists(_VALUES, max_size=3), max_size=5),
        now=st.floats(allow_nan=False, allow_infinity=False))
    def test_any_input(self, headers, now):
        self.assertEqual(freshness(headers, now),
                         (freshness_lifetime(headers, now),
                          floor_applies(headers, now)))
