"""phantomd.ops.probe: the start-up probe that makes /readyz mean it."""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from phantomd.ops.admin import Readiness
from phantomd.token.outcomes import Active, Inactive, IntrospectionFailed
from phantomd.ops.probe import PREFIX, StartupProbe


class ProbeTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.readiness = Readiness(self.clock)
        self.readiness.mark_listening()
        self.asked = []
        self.answers = []
        self.times = []

    def introspect(self, token):
        self.asked.append(token)
        self.times.append(self.clock.seconds())
        answer = self.answers.pop(0) if self.answers else Deferred()
        return answer

    def probe(self, **kw):
        p = StartupProbe(self.clock, self.readiness, self.introspect, **kw)
        self.addCleanup(p.stop)
        return p

    def test_a_random_inactive_token_makes_it_ready(self):
        self.answers = [succeed(Inactive(10))]
        self.probe().start()
        self.assertEqual(self.readiness(), (True, "ok"))
        self.assertEqual(len(self.asked), 1)
        self.assertTrue(self.asked[0].startswith(PREFIX))
        self.assertGreater(len(self.asked[0]), len(PREFIX) + 40)
        self.clock.advance(3600)
        self.assertEqual(len(self.asked), 1, "done once reached")

    def test_tokens_differ_between_processes(self):
        self.probe().start()
        self.probe().start()
        self.assertNotEqual(self.asked[0], self.asked[1])

    def test_failures_are_retried_with_backoff_and_shown(self):
        down = IntrospectionFailed("error", "token service unreachable")
        self.answers = [fail(down) for _ in range(6)]
        self.probe(backoff=1, max_backoff=8).start()
        self.assertEqual(self.readiness(), (
            False, "token service not reached yet (last attempt: error: "
            "token service unreachable)"))
        for _ in range(30):
            self.clock.advance(1)
        self.assertEqual(self.times, [0, 1, 3, 7, 15, 23])
        self.answers = [succeed(Inactive(None))]
        self.clock.advance(1)
        self.assertEqual(self.times[-1], 31)
        self.assertEqual(self.readiness(), (True, "ok"))
        self.clock.advance(100)
        self.assertEqual(len(self.asked), 7)

    def test_traffic_reaching_the_token_service_stops_the_retries(self):
        self.answers = [fail(IntrospectionFailed("timeout", "slow"))]
        self.probe().start()
        self.readiness.token_service_ok()  # the gate saw an answer
        self.clock.advance(100)
        self.assertEqual(len(self.asked), 1)

    def test_a_random_token_answered_active_refuses_readiness(self):
        """Such a token service lets anyone in: fail closed, say why."""
        self.answers = [succeed(Active("a.b.c", {}, 300))]
        self.probe().start()
        ready, reason = self.readiness()
        self.assertFalse(ready)
        self.assertIn("random token is active", reason)
        self.readiness.token_service_ok()
        self.assertFalse(self.readiness()[0])
        self.clock.advance(100)
        self.assertEqual(len(self.asked), 1)

    def test_keys_are_loaded_too_when_needed(self):
        self.readiness.expect_keys()
        loads = [fail(ValueError("JWKS answered HTTP 500")), succeed(None)]
        self.answers = [succeed(Inactive(0))]
        self.probe(load_keys=lambda: loads.pop(0)).start()
        self.assertEqual(self.readiness(), (
            False, "token service keys not loaded yet (JWKS answered HTTP "
            "500)"))
        self.clock.advance(1)
        self.assertEqual(self.readiness(), (True, "ok"))
        self.assertEqual(len(self.asked), 1, "not asked again once reached")

    def test_stop_cancels_what_is_in_flight_and_pending(self):
        cancelled = []
        self.answers = [Deferred(cancelled.append)]
        p = self.probe()
        p.start()
        p.stop()
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.readiness(), (
            False, "token service not reached yet"))
