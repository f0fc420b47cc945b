"""Routes end to end (DESIGN section 8): a real Gateway on loopback between
the fake token service and two fake APIs, one per upstream."""

from __future__ import annotations

from twisted.internet import reactor

from tests.robustness.fakes import FakeAPI, async_test, request_bytes, \
    one_request
from tests.test_gateway_e2e import GatewayCase, build


class RoutesE2E(GatewayCase):
    async def scene(self, **sections):
        self.orders = FakeAPI(reactor)
        port = self.orders_port = self.orders.listen()
        self.addCleanup(self.orders.stop)
        routes = {
            "route public": {"match": "/public", "auth": "none"},
            "route maybe": {"match": "/maybe", "auth": "optional",
                            "claim_headers": "X-User-Id=sub"},
            "route admin": {"match": "/admin", "required_scopes": "admin"},
            "route orders": {
                "match": "/orders", "methods": "GET POST",
                "upstream": "http://127.0.0.1:%d/base" % port,
                "required_scopes": "orders", "strip_prefix": "yes",
                "claim_headers": "X-User-Id=sub X-Tenant=tenant "
                                 "X-Roles=roles"},
        }
        routes.update(sections)
        self.s = await build(self, phantomd={"required_scopes": "read"},
                             **routes)
        return self.s

    async def send(self, method="GET", target="/", token=None, headers=()):
        return await one_request(reactor, self.s.front, request_bytes(
            method, target, token, headers, close=True))

    @async_test
    async def test_routes_pick_upstream_scopes_and_target(self):
        s = await self.scene()
        token, jwt = s.good_token(sub="alice", tenant="t1",
                                  roles=["a", "b"], scope="orders")
        r = await self.send("GET", "/orders/7?x=%2F", token, headers=[
            ("X-User-Id", "mallory"), ("X_Tenant", "evil"),
            ("x-roles", "root")])
        self.assertEqual(r.status, 200, r.body)
        got = self.orders.requests[-1]
        self.assertEqual(got.target, b"/base/7?x=%2F")
        self.assertEqual(got.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        # Claim headers carry the JWT's values; client copies are gone,
        # whatever their spelling.
        self.assertEqual(got.header(b"x-user-id"), [b"alice"])
        self.assertEqual(got.header(b"x-tenant"), [b"t1"])
        self.assertEqual(got.header(b"x-roles"), [b"a b"])
        self.assertNotIn(b"X_Tenant", got.raw())
        self.assertEqual(s.api.requests, [])
        # The default route's scopes (read) do not apply to /orders, and
        # /orders' do not apply elsewhere: checked on the cache hit too.
        r = await self.send("GET", "/elsewhere", token)
        self.assertError(r, 403, "insufficient_scope",
                         challenge="insufficient_scope", scope="read")
        r = await self.send("GET", "/admin/x", token)
        self.assertError(r, 403, "insufficient_scope",
                         challenge="insufficient_scope", scope="admin")
        # DELETE is not one of /orders' methods: the default route.
        r = await self.send("DELETE", "/orders/7", token)
        self.assertEqual(r.status, 403)
        self.assertEqual(len(s.ts.requests), 1)
        m = s.gw.metrics
        self.assertEqual(m.sample("phantomd_route_requests_total",
                                  {"route": "orders", "code": "2xx"}), 1)
        self.assertEqual(m.sample("phantomd_route_requests_total",
                                  {"route": "default", "code": "4xx"}), 2)
        self.assertEqual(m.sample("phantomd_route_requests_total",
                                  {"route": "admin", "code": "4xx"}), 1)
        self.assertEqual(m.sample(
            "phantomd_route_request_duration_seconds_count",
            {"route": "orders"}), 1)
        self.assertEqual(m.sample("phantomd_requests_total",
                                  {"code": "4xx"}), 3)

    @async_test
    async def test_claim_headers_are_sent_on_cache_hits_too(self):
        s = await self.scene()
        token, _ = s.good_token(sub="alice", tenant="t1", roles=["a", "b"],
                                scope="orders")
        for _ in range(3):
            r = await self.send("GET", "/orders/7", token,
                                headers=[("X-User-Id", "mallory")])
            self.assertEqual(r.status, 200, r.body)
            got = self.orders.requests[-1]
            self.assertEqual(got.header(b"x-user-id"), [b"alice"])
            self.assertEqual(got.header(b"x-tenant"), [b"t1"])
            self.assertEqual(got.header(b"x-roles"), [b"a b"])
        self.assertEqual(len(s.ts.requests), 1)  # two of them were hits

    @async_test
    async def test_public_and_optional_routes_never_forward_a_token(self):
        s = await self.scene()
        r = await self.send("GET", "/public/page", "opaque-secret-token",
                            headers=[("Authorization", "Basic eA==")])
        self.assertEqual(r.status, 200, r.body)
        got = s.api.requests[-1]
        self.assertEqual(got.header(b"authorization"), [])
        self.assertNotIn(b"opaque-secret-token", got.raw())
        # optional without a token: forwarded without one, and without the
        # client's claim headers.
        r = await self.send("GET", "/maybe", None,
                            headers=[("X-User-Id", "admin")])
        self.assertEqual(r.status, 200, r.body)
        got = s.api.requests[-1]
        self.assertEqual(got.header(b"authorization"), [])
        self.assertEqual(got.header(b"x-user-id"), [])
        # optional with a token: checked like required.
        r = await self.send("GET", "/maybe", "not-active")
        self.assertError(r, 401, "invalid_token", challenge="invalid_token")
        token, jwt = s.good_token(sub="bob", scope="read")
        r = await self.send("GET", "/maybe", token)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(s.api.requests[-1].header(b"x-user-id"), [b"bob"])
        self.assertEqual(len(s.ts.requests), 2)  # none for the public ones

    @async_test
    async def test_traversal_refused_before_routing(self):
        s = await self.scene()
        for target in ("/public/../admin", "/public/%2e%2e/admin",
                       "/public/.%2e/admin", "/public%2f..%2fadmin",
                       "/public/%c0%ae%c0%ae/admin", "/public/..;/admin",
                       "/public%5c..%5cadmin", "/public/%00"):
            r = await self.send("GET", target)
            self.assertError(r, 400, "invalid_request")
        self.assertNothingForwarded(s)
        self.assertEqual(s.ts.requests, [])
        # //admin and /admin;x are /admin to many servers: /admin's route.
        token, _ = s.good_token(sub="a", scope="read")
        for target in ("//admin", "/admin;x", "/%61dmin"):
            r = await self.send("GET", target, token)
            self.assertEqual(r.status, 403, target)
        # A query string is not a path.
        r = await self.send("GET", "/public?next=../admin")
        self.assertEqual(r.status, 200)
        self.assertEqual(s.api.requests[-1].target, b"/public?next=../admin")

    @async_test
    async def test_unsendable_claim_is_502(self):
        s = await self.scene()
        token, _ = s.good_token(sub="a\r\nX-Admin: 1", scope="orders")
        r = await self.send("GET", "/orders/1", token)
        self.assertError(r, 502, "bad_gateway")
        self.assertEqual(self.orders.requests, [])

    @async_test
    async def test_reload_applies_routes_and_keeps_old_on_mistake(self):
        from phantomd import config as configmod
        s = await self.scene()
        gw = s.gw.gateway
        r = await self.send("GET", "/public/x")
        self.assertEqual(r.status, 200)
        broken = s.ini.replace("[route public]", "[route public]\nmethod = GET")
        self.assertRaises(configmod.ConfigError, configmod.parse, broken)
        # A reload of a file with the public route now protected.
        new = s.ini.replace("auth = none", "auth = required")
        self.assertNotEqual(new, s.ini)
        old_pool = gw.route_pools[next(iter(gw.route_pools))]
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        gw.reload(configmod.parse(new, "<robustness.ini>"))
        [done] = [e for e in events if "configuration reloaded" in
                  e.get("log_format", "")]
        self.assertEqual(done["keys"], "[route public]")
        r = await self.send("GET", "/public/x")
        self.assertError(r, 401, None, challenge=None)
        # The orders upstream did not change: its pool is kept.
        self.assertIs(gw.route_pools[next(iter(gw.route_pools))], old_pool)
        # A route removed: its pool goes, its label too.
        gone = "\n".join(l for l in new.split("\n")
                         if "127.0.0.1:%d/base" % self.orders_port not in l)
        gw.reload(configmod.parse(gone, "<robustness.ini>"))
        self.assertEqual(gw.route_pools, {})


class ForwardAuthRoutes(GatewayCase):
    """The forward-auth checks take the route of the original request."""

    @async_test
    async def test_checks_use_the_original_requests_route(self):
        from tests.test_forward_auth import build_fa
        s = await build_fa(self, phantomd={"required_scopes": "read"}, **{
            "route public": {"match": "/public", "auth": "none"},
            "route admin": {"match": "/admin", "required_scopes": "admin"}})

        async def check(uri, token=None):
            return await one_request(reactor, s.fa, request_bytes(
                "GET", "/check", token,
                [("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", uri)],
                close=True))

        r = await check("/public/x", "opaque-tok")
        self.assertEqual(r.status, 200)
        # An empty Authorization, so that a proxy copying it drops the
        # client's (opaque) one rather than keeping it (issue 16).
        self.assertEqual(r.header(b"authorization"), [b""])
        self.assertNotIn(b"opaque-tok", repr(r.headers).encode())
        self.assertEqual(s.ts.requests, [])
        r = await check("/public/../admin")
        self.assertError(r, 400, "invalid_request")
        token, jwt = s.good_token(sub="a", scope="read")
        r = await check("/admin/x", token)
        self.assertError(r, 403, "insufficient_scope",
                         challenge="insufficient_scope", scope="admin")
        r = await check("/other", token)
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
