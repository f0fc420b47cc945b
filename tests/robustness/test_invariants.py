"""Invariants over generated requests and token-service answers.

Hypothesis draws the cases (derandomized, bounded); each test then plays
them, one after another, through one gateway over loopback and checks every
request the API received:

* the opaque token never reaches it, anywhere in the request;
* it always carries exactly one ``Authorization: Bearer <jwt>``, the JWT the
  token service issued for that very token;
* ``X-Forwarded-For/-Proto/-Host`` are phantomd's, never the client's, even
  when the client sends them, in any case, or names them in ``Connection``;
* distinct tokens never share a cache entry (``a`` / ``A`` / ``a=``).

Hypothesis cannot drive a Deferred-returning test itself (trial's reactor
is already running), so the cases are drawn first, then played; a failure
message names the case.
"""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial import unittest

from phantomd.http.routes import UnsafePath, segments

from .fakes import (
    Reply, Scene, async_test, exchange, json_reply, jwt_reply, make_jwt,
    request_bytes,
)

B64TOKEN = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
            "0123456789-._~+/")
SPOOFED = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host",
           "Forwarded", "x-forwarded-for", "X-FORWARDED-HOST")


def draw(strategy, n: int) -> list:
    """``n`` derandomized examples of ``strategy`` (no shrinking: the
    cases are played afterwards, outside hypothesis)."""
    out: list = []

    @settings(derandomize=True, max_examples=n, database=None,
              deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x):
        out.append(x)
    collect()
    return out


# A distinctive prefix, so finding the token in what the API received
# cannot be a coincidence with "127.0.0.1" or a path.
tokens = (st.text(B64TOKEN, min_size=1, max_size=40) | st.text(
    B64TOKEN, min_size=1, max_size=8).map(lambda t: t + "=")).map(
    lambda t: "Zq9Xw7" + t)
answers = st.sampled_from(["active", "active", "active", "inactive",
                           "error"])
cache_controls = st.sampled_from([None, "max-age=60", "no-store",
                                  "s-maxage=5, max-age=60", "private",
                                  "max-age=0"])
header_value = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
    max_size=20)
spoofs = st.lists(st.tuples(st.sampled_from(SPOOFED), header_value),
                  max_size=4)
connection_names = st.lists(st.sampled_from(
    ["keep-alive", "close", "Authorization", "X-Forwarded-For",
     "X-Forwarded-Proto", "X-Forwarded-Host", "Host", "Forwarded",
     "Content-Length", "X-Custom"]), max_size=3)
cases = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    "path": st.text("abcXYZ019-._~/%", max_size=30).map(lambda p: "/" + p),
    "query": st.one_of(st.none(), st.text("abc=&019", max_size=20)),
    "token": tokens,
    "scheme": st.sampled_from(["Bearer", "bearer", "BEARER"]),
    "answer": answers,
    "cache_control": cache_controls,
    "spoofs": spoofs,
    "connection": connection_names,
    "body": st.one_of(st.just(b""), st.binary(max_size=64)),
    "host": st.sampled_from(["api.example.test", "h.test:8443", "x"]),
    "repeat": st.integers(1, 2),
})


class Invariants(unittest.TestCase):
    timeout = 60

    async def scene(self, response="jwt"):
        s = await Scene.build(self, reactor, response=response,
                              cache={"negative_ttl": "30"})
        self.issued: dict = {}   # token -> JWT handed out
        self.answer_of: dict = {}  # token -> (answer, cache_control)

        def answer(req):
            t = req.token
            kind, cc = self.answer_of.get(t, ("inactive", "no-store"))
            if kind == "error":
                return Reply(500, body=b"oops")
            if kind == "inactive":
                if response == "phantom_token":
                    return json_reply({"active": False}, cc)
                return (Reply(204, ((b"Cache-Control", cc),)) if cc
                        else Reply(204))
            jwt = self.issued.setdefault(t, make_jwt({"tok_n": len(
                self.issued)}))
            if response == "phantom_token":
                return json_reply(dict(active=True, phantom_token=jwt), cc)
            return jwt_reply(jwt, cc)
        s.ts.behaviour = answer
        return s

    def check_forwarded(self, s, case, before: int, label: str) -> None:
        new = s.api.requests[before:]
        token = case["token"]
        kind = self.answer_of[token][0]
        if kind != "active":
            self.assertEqual(new, [], "%s: forwarded a %s token" % (
                label, kind))
            return
        self.assertEqual(len(new), 1, label)
        up = new[0]
        # phantomd's own X-Request-Id is 32 random hex digits: a short
        # token such as 'f8b' turns up in one by chance.
        raw = re.sub(rb"(?im)^x-request-id: [0-9a-f]{32}\r\n", b"",
                     up.raw())
        self.assertNotIn(token.encode(), raw.replace(
            b"Bearer " + self.issued[token].encode(), b""),
            "%s: the opaque token reached the API" % label)
        self.assertEqual(up.header(b"authorization"),
                         [b"Bearer " + self.issued[token].encode()],
                         "%s: wrong or missing Bearer JWT" % label)
        self.assertEqual(len(up.header(b"host")), 1, label)
        self.assertEqual(up.header(b"x-forwarded-for"), [b"127.0.0.1"],
                         label)
        self.assertEqual(up.header(b"x-forwarded-proto"), [b"http"], label)
        self.assertEqual(up.header(b"x-forwarded-host"),
                         [case["host"].encode()], label)
        spoofed_values = {v.encode() for _, v in case["spoofs"]}
        for name in (b"forwarded", b"x-forwarded-for", b"x-forwarded-proto",
                     b"x-forwarded-host"):
            for v in up.header(name):
                self.assertNotIn(v, spoofed_values - {
                    b"127.0.0.1", b"http", case["host"].encode()},
                    "%s: client value reached the API in %s" % (label, name))
        self.assertEqual(up.body, case["body"], label)

    async def play(self, s, case, label):
        headers = [(n, v) for n, v in case["spoofs"]]
        if case["connection"]:
            headers.append(("Connection", ", ".join(case["connection"])))
        target = case["path"] + ("?" + case["query"]
                                 if case["query"] is not None else "")
        data = request_bytes(
            case["method"], target, None, headers=[
                ("Authorization", "%s %s" % (case["scheme"], case["token"]))
            ] + headers, body=case["body"], host=case["host"])
        # Force close so each case is one exchange (the client's own
        # Connection header may say keep-alive).
        data = data.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        before = len(s.api.requests)
        client = await exchange(reactor, s.front, data, 3.0)
        responses = client.responses()
        self.assertTrue(responses, "%s: no answer" % label)
        status = responses[0].status
        try:
            segments(case["path"].encode())
        except UnsafePath:
            # DESIGN section 8: refused before any route or token check.
            self.assertEqual(status, 400, label)
            self.assertEqual(len(s.api.requests), before, label)
            return
        kind = self.answer_of[case["token"]][0]
        expected = {"active": 200, "inactive": 401, "error": 502}[kind]
        self.assertEqual(status, expected, "%s: %r" % (
            label, responses[0].body[:200]))
        self.check_forwarded(s, case, before, label)

    async def run_cases(self, response, n):
        s = await self.scene(response)
        drawn = draw(cases, n)
        for i, case in enumerate(drawn):
            # a token keeps the answer it got first; the cache may hold it
            self.answer_of.setdefault(case["token"], (
                case["answer"], case["cache_control"]))
            for r in range(case["repeat"]):
                label = "case %d/%d %s" % (i, r, json.dumps(
                    case, default=repr)[:300])
                await self.play(s, case, label)

    @async_test
    async def test_forwarded_requests_jwt_mode(self):
        await self.run_cases("jwt", 150)

    @async_test
    async def test_forwarded_requests_phantom_token_mode(self):
        await self.run_cases("phantom_token", 60)

    @async_test
    async def test_near_identical_tokens_never_share_an_entry(self):
        """Every token gets its own answer, also when served from the
        cache: a mix-up would show as another token's JWT or status."""
        s = await self.scene()
        families = draw(st.lists(st.tuples(
            st.sampled_from(["a", "A", "a=", "a==", "aa", "a.", "a~",
                             "a-", "a_", "a+", "a/", "Aa", "aA", "b"]),
            st.sampled_from(["active", "inactive"])),
            min_size=3, max_size=12, unique_by=lambda x: x[0]), 15)
        for i, family in enumerate(families):
            prefix = "f%d" % i
            for token, kind in family:
                self.answer_of[prefix + token] = (kind, "max-age=300")
            for round_ in range(2):  # the second round is from the cache
                for token, _ in family:
                    case = {"token": prefix + token, "scheme": "Bearer",
                            "method": "GET", "path": "/t", "query": None,
                            "spoofs": [], "connection": [], "body": b"",
                            "host": "api.example.test"}
                    await self.play(s, case, "family %d round %d token %r"
                                    % (i, round_, prefix + token))
        for token, (kind, _) in self.answer_of.items():
            self.assertLessEqual(s.ts.calls_for(token), 1,
                                 "%r was introspected twice despite max-age"
                                 % token)

    @async_test
    async def test_trailing_whitespace_is_not_part_of_the_token(self):
        """``Bearer a `` is ``a`` (OWS), so it must get a's answer, and
        ``A`` must not."""
        s = await self.scene()
        self.answer_of["wsA"] = ("inactive", "max-age=300")
        self.answer_of["wsa"] = ("active", "max-age=300")
        for token_sent, expected in (("wsa", 200), ("wsa ", 200),
                                     ("wsA", 401), ("wsa\t", 200),
                                     ("wsA ", 401), ("wsa", 200)):
            data = (b"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + token_sent.encode() + b"\r\nConnection: close\r\n\r\n")
            client = await exchange(reactor, s.front, data, 3.0)
            self.assertEqual(client.responses()[0].status, expected,
                             repr(token_sent))
        self.assertEqual(sorted(set(r.token for r in s.ts.requests)),
                         ["wsA", "wsa"])


class ConcurrentInvariants(unittest.TestCase):
    timeout = 20

    @async_test
    async def test_out_of_order_answers_are_never_cross_wired(self):
        """60 clients, 60 tokens (some shared), answers arriving in a
        drawn order: each request reaches the API with its own token's
        JWT, whatever order the token service answered in."""
        from twisted.internet import defer
        from .fakes import Delayed, get
        s = await Scene.build(self, reactor, introspection={
            "max_in_flight": "64", "timeout": "3"})
        plan = draw(st.lists(st.tuples(st.integers(0, 39),
                                       st.integers(0, 200)),
                             min_size=60, max_size=60), 1)[0]
        tokens = ["Zq9Xw7cc%02d" % i for i in range(40)]
        issued = {t: make_jwt({"n": t}) for t in tokens}
        delays = {}
        for index, delay_ms in plan:
            delays.setdefault(tokens[index], delay_ms / 1000)

        def answer(req):
            return Delayed(delays.get(req.token, 0), jwt_reply(
                issued[req.token], "max-age=60"))
        s.ts.behaviour = answer
        rs = await defer.gatherResults([defer.ensureDeferred(get(
            reactor, s.front, tokens[index], target="/c%d/%d" % (i, index)))
            for i, (index, _) in enumerate(plan)])
        self.assertEqual({r.status for r in rs}, {200})
        self.assertEqual(len(s.api.requests), 60)
        for up in s.api.requests:
            index = int(up.target.split(b"/")[2])
            self.assertEqual(up.header(b"authorization"),
                             [b"Bearer " + issued[tokens[index]].encode()],
                             up.target)
        self.assertEqual(s.ts.calls, len(delays))
