"""CORS (DESIGN section 9): the policy's pure functions, the [cors] keys'
mistakes, and end to end the answers a browser app sees through phantomd:
its preflight answered without a token, the 401/403 it can read, the
upstream's own CORS headers replaced, and the hostile origins."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from phantomd import config

from phantomd.http import cors
from tests.robustness.fakes import Reply, async_test, one_request, \
    request_bytes
from tests.test_config import MINIMAL
from tests.test_gateway_e2e import GatewayCase, build

APP = "https://app.example.com"


class PolicyTests(SynchronousTestCase):
    def policy(self, **keys):
        text = MINIMAL + "[cors]\nallow_origins = %s\n" % APP + "".join(
            "%s = %s\n" % kv for kv in keys.items())
        return cors.from_config(config.parse(text).cors)

    def test_off_without_allow_origins(self):
        self.assertIsNone(cors.from_config(config.parse(MINIMAL).cors))

    def test_origins_compared_exactly(self):
        p = self.policy()
        self.assertTrue(p.allowed(APP.encode()))
        for hostile in (b"null", b"https://app.example.com.evil.test",
                        b"https://APP.example.com", b"http://app.example.com",
                        b"https://app.example.com:443",
                        b"https://evil.test/https://app.example.com",
                        b"https://app.example.com/", b"", None):
            self.assertFalse(p.allowed(hostile), hostile)
            # No CORS header, but Vary: a cache must not hand this answer
            # to an allowed origin's fetch.
            self.assertEqual(p.answer_headers(hostile), [(b"Vary", b"Origin")])

    def test_two_origins_are_none(self):
        self.assertEqual(cors.request_origin(
            [(b"Origin", APP.encode()), (b"origin", APP.encode()),
             (b"Access-Control-Request-Method", b"GET")]), (None, True))
        self.assertEqual(cors.request_origin(
            [(b"ORIGIN", APP.encode())]), (APP.encode(), False))

    def test_answer_headers(self):
        p = self.policy(allow_credentials="yes")
        self.assertEqual(p.answer_headers(APP.encode()), [
            (b"Access-Control-Allow-Origin", APP.encode()),
            (b"Vary", b"Origin"),
            (b"Access-Control-Allow-Credentials", b"true"),
            (b"Access-Control-Expose-Headers", b"WWW-Authenticate")])
        star = cors.from_config(config.parse(
            MINIMAL + "[cors]\nallow_origins = *\n").cors)
        self.assertEqual(star.answer_headers(b"null")[0],
                         (b"Access-Control-Allow-Origin", b"*"))

    MISTAKES = [
        ("allow_origins = * https://a.test\n", "allow_origins", "alone"),
        ("allow_origins = null\n", "allow_origins", "null"),
        ("allow_origins = https://a.test/\n", "allow_origins", "not an origin"),
        ("allow_origins = https://a.test/x\n", "allow_origins", "not an origin"),
        ("allow_origins = https://A.test\n", "allow_origins", "lower case"),
        ("allow_origins = a.test\n", "allow_origins", "not an origin"),
        ("allow_origins = *\nallow_credentials = yes\n", "allow_credentials",
         "allow_origins = *"),
        ("max_age = 600000\n", "max_age", "out of range"),
        ("allow_methods = GET\n", "allow_methods", "without allow_origins"),
        ("allow_credentials = yes\n", "allow_credentials",
         "without allow_origins"),
        ("allow_origin = *\n", "allow_origin", "did you mean allow_origins?"),
    ]

    def test_mistakes(self):
        for extra, key, words in self.MISTAKES:
            e = self.assertRaises(config.ConfigError, config.parse,
                                  MINIMAL + "[cors]\n" + extra, "p.ini")
            self.assertEqual((e.section, e.key), ("cors", key), extra)
            self.assertIn(words, str(e), extra)


class CorsE2E(GatewayCase):
    async def send(self, method="GET", target="/resource", token=None,
                   headers=()):
        return await one_request(reactor, self.s.front, request_bytes(
            method, target, token, headers, close=True))

    async def scene(self, with_cors=True, **sections):
        if with_cors:
            sections["cors"] = {"allow_origins": APP}
        sections.setdefault("route public", {"match": "/public",
                                             "auth": "none"})
        self.s = await build(self, phantomd={"required_scopes": "read"},
                             **sections)
        return self.s

    def assertAllowed(self, r):
        self.assertEqual(r.header(b"access-control-allow-origin"),
                         [APP.encode()])
        self.assertIn(b"Origin", r.header(b"vary"))

    PREFLIGHT = [("Origin", APP), ("Access-Control-Request-Method", "GET"),
                 ("Access-Control-Request-Headers", "authorization")]

    @async_test
    async def test_browser_sequence(self):
        s = await self.scene()
        # 1. The preflight: answered by phantomd, no token, 204.
        r = await self.send("OPTIONS", "/resource", headers=self.PREFLIGHT)
        self.assertEqual(r.status, 204, r.body)
        self.assertAllowed(r)
        self.assertEqual(r.header(b"content-length"), [])
        self.assertIn(b"Authorization",
                      r.first(b"access-control-allow-headers"))
        self.assertIn(b"GET", r.first(b"access-control-allow-methods"))
        self.assertEqual(r.header(b"access-control-max-age"), [b"600"])
        self.assertNothingForwarded(s)
        self.assertEqual(s.ts.requests, [])
        # 2. No token: a 401 the app can read (ACAO + exposed challenge).
        r = await self.send(headers=[("Origin", APP)])
        self.assertError(r, 401, None, challenge=None)
        self.assertAllowed(r)
        self.assertEqual(r.header(b"access-control-expose-headers"),
                         [b"WWW-Authenticate"])
        # 3. A token lacking the scope: 403, readable too.
        token, _ = s.good_token(sub="a", scope="other")
        r = await self.send(token=token, headers=[("Origin", APP)])
        self.assertError(r, 403, "insufficient_scope",
                         challenge="insufficient_scope", scope="read")
        self.assertAllowed(r)
        # 4. A good one: the upstream's CORS headers are replaced.
        s.api.behaviour = Reply(200, (
            (b"Access-Control-Allow-Origin", b"*"),
            (b"access-control-allow-credentials", b"true"),
            (b"Content-Type", b"text/plain")), b"ok")
        token, _ = s.good_token(sub="a", scope="read")
        r = await self.send(token=token, headers=[("Origin", APP)])
        self.assertEqual(r.status, 200)
        self.assertAllowed(r)
        self.assertEqual(r.header(b"access-control-allow-credentials"), [])
        # A 5xx of phantomd's own carries them as well.
        await s.ts.stop()
        other, _ = (token + "x"), None
        r = await self.send(token=other, headers=[("Origin", APP)])
        self.assertGreaterEqual(r.status, 500)
        self.assertAllowed(r)

    @async_test
    async def test_hostile_origins_get_no_cors_headers(self):
        s = await self.scene()
        s.api.behaviour = Reply(200, (
            (b"Access-Control-Allow-Origin", b"*"),), b"ok")
        for origins in ([("Origin", "null")],
                        [("Origin", APP + ".evil.test")],
                        [("Origin", "https://APP.example.com")],
                        [("Origin", APP), ("Origin", APP)],
                        [("Origin", APP + ", https://evil.test")]):
            r = await self.send("OPTIONS", "/resource", headers=origins + [
                ("Access-Control-Request-Method", "GET")])
            self.assertEqual(r.status, 204)
            self.assertEqual(r.header(b"access-control-allow-origin"), [])
            self.assertEqual(r.header(b"access-control-allow-methods"), [])
            r = await self.send("GET", "/public", headers=origins)
            self.assertEqual(r.status, 200)
            # Not even the upstream's own: phantomd owns CORS here.
            self.assertEqual(r.header(b"access-control-allow-origin"), [])
        self.assertEqual(s.ts.requests, [])

    @async_test
    async def test_unsafe_path_preflight_is_400(self):
        s = await self.scene()
        r = await self.send("OPTIONS", "/public/../admin",
                            headers=self.PREFLIGHT)
        self.assertError(r, 400, "invalid_request")
        self.assertAllowed(r)
        self.assertNothingForwarded(s)

    @async_test
    async def test_without_cors_preflight_is_forwarded_without_token(self):
        s = await self.scene(with_cors=False)
        s.api.behaviour = Reply(204, (
            (b"Access-Control-Allow-Origin", APP.encode()),), b"")
        r = await self.send("OPTIONS", "/resource", token="opaque-tok",
                            headers=self.PREFLIGHT)
        self.assertEqual(r.status, 204)
        # Without [cors] the upstream's answer is its own.
        self.assertEqual(r.header(b"access-control-allow-origin"),
                         [APP.encode()])
        [got] = s.api.requests
        self.assertEqual(got.header(b"authorization"), [])
        self.assertNotIn(b"opaque-tok", got.raw())
        self.assertEqual(s.ts.requests, [])
        # An OPTIONS that is not a preflight still needs a token.
        r = await self.send("OPTIONS", "/resource",
                            headers=[("Origin", APP)])
        self.assertError(r, 401, None, challenge=None)
        self.assertEqual(r.header(b"access-control-allow-origin"), [])

    @async_test
    async def test_route_cors_no_is_as_without_cors(self):
        # DESIGN section 9's route override: [route internal] cors = no.
        s = await self.scene(**{"route internal": {
            "match": "/internal", "required_scopes": "admin",
            "cors": "no"}})
        s.api.behaviour = Reply(204, (
            (b"Access-Control-Allow-Origin", b"https://upstream.test"),), b"")
        # Its preflight is not answered by phantomd: forwarded with no
        # Authorization, and the upstream's answer is its own.
        r = await self.send("OPTIONS", "/internal/x", token="opaque-tok",
                            headers=self.PREFLIGHT)
        self.assertEqual(r.status, 204)
        self.assertEqual(r.header(b"access-control-allow-origin"),
                         [b"https://upstream.test"])
        self.assertEqual(r.header(b"access-control-allow-methods"), [])
        [got] = s.api.requests
        self.assertEqual(got.target, b"/internal/x")
        self.assertEqual(got.header(b"authorization"), [])
        self.assertNotIn(b"opaque-tok", got.raw())
        # phantomd's own 401 and 403 on it carry no Access-Control-*.
        r = await self.send("GET", "/internal/x", headers=[("Origin", APP)])
        self.assertError(r, 401, None, challenge=None)
        self.assertEqual([n for n, _ in r.headers
                          if n.lower().startswith(b"access-control-")], [])
        token, _ = s.good_token(sub="a", scope="read")
        r = await self.send("GET", "/internal/x", token=token,
                            headers=[("Origin", APP)])
        self.assertError(r, 403, "insufficient_scope",
                         challenge="insufficient_scope", scope="admin")
        self.assertEqual(r.header(b"access-control-allow-origin"), [])
        self.assertEqual(r.header(b"access-control-expose-headers"), [])
        self.assertEqual(len(s.ts.requests), 1)
        # Every other route keeps [cors].
        r = await self.send("OPTIONS", "/resource", headers=self.PREFLIGHT)
        self.assertEqual(r.status, 204)
        self.assertAllowed(r)
        self.assertEqual(len(s.api.requests), 1)
