"""/readyz and /healthz of a real Gateway on loopback, with its start-up
probe (phantomd.ops.probe) talking to a real (fake) token service."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial import unittest

from phantomd.ops.probe import PREFIX
from tests.robustness.fakes import (
    Reply, TokenService, async_test, closed_port, gateway_ini, get,
    jwt_reply, make_jwt, start_gateway, wait_for)


class ReadinessE2ETests(unittest.TestCase):
    timeout = 60

    async def gateway(self, ts_port: int):
        ini = gateway_ini(ts_port, closed_port(reactor),
                          introspection={"timeout": "2"})
        return await start_gateway(self, reactor, ini, probe=True)

    async def readyz(self, gw):
        response = await get(reactor, gw.admin, target="/readyz")
        return response.status, response.json()

    async def ready_within(self, gw, seconds: float):
        answers = []

        async def check():
            answers.append(await self.readyz(gw))
            return answers[-1][0] == 200
        deadline = reactor.seconds() + seconds
        while not await check() and reactor.seconds() < deadline:
            await wait_for(reactor, lambda: False, 0.1)
        return answers[-1]

    def service(self) -> TokenService:
        ts = TokenService(reactor)
        ts.listen()
        self.addCleanup(ts.stop)
        return ts

    @async_test
    async def test_not_ready_while_the_token_service_cannot_be_reached(self):
        """Today's bug: 200 with a token service nobody can reach, so a
        load balancer sends traffic that all gets 502."""
        gw = await self.gateway(closed_port(reactor))
        await wait_for(reactor, lambda: False, 0.5)
        status, doc = await self.readyz(gw)
        self.assertEqual(status, 503)
        self.assertFalse(doc["ready"])
        self.assertIn("token service not reached yet", doc["reason"])
        self.assertIn("last attempt: error", doc["reason"])
        health = await get(reactor, gw.admin, target="/healthz")
        self.assertEqual(health.status, 200)

    @async_test
    async def test_ready_once_the_probe_got_an_inactive_answer(self):
        ts = self.service()
        ts.default = Reply(204, ((b"Cache-Control", b"max-age=10"),))
        gw = await self.gateway(ts.portnum)
        self.assertEqual(await self.ready_within(gw, 10),
                         (200, {"ready": True, "reason": "ok"}))
        self.assertEqual(len(ts.requests), 1)
        self.assertTrue(ts.requests[0].token.startswith(PREFIX))
        self.assertTrue(ts.requests[0].header(b"authorization"),
                        "with phantomd's client credentials")
        self.assertEqual(gw.metrics.sample(
            "phantomd_introspections_total", {"outcome": "inactive"}), 0,
            "the probe is not client traffic")
        # Reached once is the contract: the token service going away later
        # does not pull phantomd out of the load balancer.
        await ts.stop()
        status, doc = await self.readyz(gw)
        self.assertEqual(status, 200)

    @async_test
    async def test_a_token_service_that_calls_any_token_active(self):
        ts = self.service()
        jwt = make_jwt({"sub": "anyone"})
        ts.behaviour = jwt_reply(jwt)
        gw = await self.gateway(ts.portnum)
        self.assertTrue(await wait_for(reactor, lambda: ts.calls >= 1, 10))
        await wait_for(reactor, lambda: False, 0.3)
        status, doc = await self.readyz(gw)
        self.assertEqual(status, 503)
        self.assertIn("random token is active", doc["reason"])
        self.flushLoggedErrors()

    @async_test
    async def test_the_probe_retries_until_the_token_service_answers(self):
        ts = self.service()
        ts.behaviour = Reply(500, ((b"Content-Length", b"0"),))
        gw = await self.gateway(ts.portnum)
        self.assertTrue(await wait_for(reactor, lambda: ts.calls >= 1, 10))
        status, doc = await self.readyz(gw)
        self.assertEqual(status, 503)
        ts.behaviour = None  # 204 from now on
        self.assertEqual((await self.ready_within(gw, 10))[0], 200)
        self.assertGreaterEqual(ts.calls, 2)
