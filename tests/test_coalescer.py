"""The coalescer: one work per key, an answer per caller, Shed at a bound.

Most rows ask through ``Runner.run``, a Deferred over ``Coalescer.join``,
so each caller's answer is easy to hold; ``JoinTests`` use ``join`` bare,
as the gate does."""

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from phantomd.direct import as_deferred, then

from phantomd.token.coalescer import Coalescer
from phantomd.ops.metrics import Metrics
from phantomd.token.outcomes import Active, IntrospectionFailed, Shed

ANSWER = Active(jwt="h.p.s", claims={"sub": "alice"}, lifetime=60)


class FakeIntrospector:
    """Hands out Deferreds the test fires by hand, and counts calls."""

    def __init__(self):
        self.pending = []

    def work(self):
        d = Deferred()
        self.pending.append(d)
        return d


class Runner:
    """A coalescer asked with Deferreds: ``run(key, work)`` gives a new
    Deferred of the shared ``work()``, which may return a Deferred or a
    value, or raise."""

    def __init__(self, coalescer):
        self.coalescer = coalescer

    def __len__(self):
        return len(self.coalescer)

    def reconfigure(self, max_in_flight):
        self.coalescer.reconfigure(max_in_flight)

    def run(self, key, work):
        def start(finish):
            try:
                shared = work()
            except BaseException:
                shared = Failure()
            then(shared, finish)

        return as_deferred(lambda done: self.coalescer.join(key, start,
                                                            done))


class CoalescerTestCase(SynchronousTestCase):
    def setUp(self):
        self.metrics = Metrics()
        self.fake = FakeIntrospector()

    def coalescer(self, max_in_flight=10):
        return Runner(Coalescer(self.metrics, max_in_flight))

    def coalesced(self):
        return self.metrics.sample("phantomd_coalesced_requests_total")

    def in_flight(self):
        return self.metrics.sample("phantomd_introspections_in_flight")


class SharingTests(CoalescerTestCase):
    def test_n_waiters_one_call(self):
        c = self.coalescer()
        results = []
        waiters = [c.run(b"k", self.fake.work) for _ in range(50)]
        for w in waiters:
            w.addCallback(results.append)
        self.assertEqual(len(self.fake.pending), 1)
        self.assertEqual(self.coalesced(), 49)
        self.assertEqual(self.in_flight(), 1)
        self.assertEqual(results, [])
        self.fake.pending[0].callback(ANSWER)
        self.assertEqual(results, [ANSWER] * 50)
        self.assertEqual(self.in_flight(), 0)
        self.assertEqual(len(c), 0)

    def test_every_caller_gets_its_own_deferred(self):
        c = self.coalescer()
        a, b = c.run(b"k", self.fake.work), c.run(b"k", self.fake.work)
        self.assertIsNot(a, b)
        a.addCallback(lambda _: "changed by a's own callback")
        got = []
        b.addCallback(got.append)
        self.fake.pending[0].callback(ANSWER)
        self.assertEqual(got, [ANSWER])

    def test_different_keys_run_separately(self):
        c = self.coalescer()
        c.run(b"k1", self.fake.work)
        c.run(b"k2", self.fake.work)
        self.assertEqual(len(self.fake.pending), 2)
        self.assertEqual(self.coalesced(), 0)
        self.assertEqual(self.in_flight(), 2)

    def test_key_is_free_again_after_the_work_ends(self):
        c = self.coalescer()
        c.run(b"k", self.fake.work)
        self.fake.pending[0].callback(ANSWER)
        c.run(b"k", self.fake.work)
        self.assertEqual(len(self.fake.pending), 2)

    def test_waiter_callback_starting_new_work_for_the_same_key(self):
        c = self.coalescer()
        again = []
        c.run(b"k", self.fake.work).addCallback(
            lambda _: again.append(c.run(b"k", self.fake.work)))
        self.fake.pending[0].callback(ANSWER)
        self.assertEqual(len(self.fake.pending), 2)
        self.assertNoResult(again[0])

    def test_synchronous_result(self):
        c = self.coalescer()
        self.assertIs(self.successResultOf(c.run(b"k", lambda: ANSWER)),
                      ANSWER)
        self.assertEqual(len(c), 0)
        self.assertEqual(self.in_flight(), 0)

    def test_synchronous_exception(self):
        c = self.coalescer()

        def boom():
            raise IntrospectionFailed("error", "token service said 500")
        f = self.failureResultOf(c.run(b"k", boom), IntrospectionFailed)
        self.assertEqual(f.value.kind, "error")
        self.assertEqual(len(c), 0)
        self.assertEqual(self.in_flight(), 0)


class FailureTests(CoalescerTestCase):
    def test_failure_reaches_all_and_is_not_remembered(self):
        c = self.coalescer()
        waiters = [c.run(b"k", self.fake.work) for _ in range(3)]
        self.fake.pending[0].errback(IntrospectionFailed("timeout", "slow"))
        for w in waiters:
            self.assertEqual(
                self.failureResultOf(w, IntrospectionFailed).value.kind,
                "timeout")
        again = c.run(b"k", self.fake.work)
        self.assertEqual(len(self.fake.pending), 2)
        self.fake.pending[1].callback(ANSWER)
        self.assertIs(self.successResultOf(again), ANSWER)


class CancelTests(CoalescerTestCase):
    def test_cancel_one_waiter_others_still_get_the_result(self):
        c = self.coalescer()
        a, b, d = (c.run(b"k", self.fake.work) for _ in range(3))
        b.cancel()
        self.failureResultOf(b, CancelledError)
        self.assertFalse(self.fake.pending[0].called)
        self.fake.pending[0].callback(ANSWER)
        self.assertIs(self.successResultOf(a), ANSWER)
        self.assertIs(self.successResultOf(d), ANSWER)

    def test_cancel_the_first_caller_does_not_cancel_the_work(self):
        c = self.coalescer()
        first = c.run(b"k", self.fake.work)
        second = c.run(b"k", self.fake.work)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.fake.pending[0].callback(ANSWER)
        self.assertIs(self.successResultOf(second), ANSWER)

    def test_all_cancelled_work_still_runs_to_the_end(self):
        c = self.coalescer()
        w = c.run(b"k", self.fake.work)
        w.cancel()
        self.failureResultOf(w, CancelledError)
        self.assertEqual(self.in_flight(), 1)
        joined = c.run(b"k", self.fake.work)
        self.assertEqual(len(self.fake.pending), 1)
        self.fake.pending[0].errback(IntrospectionFailed("error", "x"))
        self.failureResultOf(joined, IntrospectionFailed)
        self.assertEqual(self.in_flight(), 0)

    def test_a_waiter_cancelling_another_while_results_are_delivered(self):
        c = self.coalescer()
        a, b, d = (c.run(b"k", self.fake.work) for _ in range(3))
        a.addCallback(lambda r: b.cancel() or r)
        self.fake.pending[0].callback(ANSWER)
        self.assertIs(self.successResultOf(a), ANSWER)
        self.failureResultOf(b, CancelledError)
        self.assertIs(self.successResultOf(d), ANSWER)


class ShedTests(CoalescerTestCase):
    def test_shed_at_max_in_flight(self):
        c = self.coalescer(max_in_flight=2)
        c.run(b"k1", self.fake.work)
        c.run(b"k2", self.fake.work)
        self.failureResultOf(c.run(b"k3", self.fake.work), Shed)
        self.assertEqual(len(self.fake.pending), 2)
        self.assertEqual(self.in_flight(), 2)

    def test_joining_an_in_flight_key_is_allowed_at_the_bound(self):
        c = self.coalescer(max_in_flight=1)
        c.run(b"k1", self.fake.work)
        joined = c.run(b"k1", self.fake.work)
        self.fake.pending[0].callback(ANSWER)
        self.assertIs(self.successResultOf(joined), ANSWER)

    def test_room_again_once_a_work_ends(self):
        c = self.coalescer(max_in_flight=1)
        c.run(b"k1", self.fake.work)
        self.fake.pending[0].callback(ANSWER)
        self.assertNoResult(c.run(b"k2", self.fake.work))

    def test_reconfigure_lower_bound_sheds_new_keys(self):
        c = self.coalescer(max_in_flight=3)
        c.run(b"k1", self.fake.work)
        c.run(b"k2", self.fake.work)
        c.reconfigure(1)
        self.failureResultOf(c.run(b"k3", self.fake.work), Shed)
        self.fake.pending[0].callback(ANSWER)
        self.failureResultOf(c.run(b"k3", self.fake.work), Shed)
        self.fake.pending[1].callback(ANSWER)
        self.assertNoResult(c.run(b"k3", self.fake.work))

    def test_bad_bound_refused(self):
        self.assertRaises(ValueError, self.coalescer, max_in_flight=0)


class JoinTests(CoalescerTestCase):
    """``join``: the coalescer without Deferreds, as the gate's miss path
    uses it."""

    def coalescer(self, max_in_flight=10):
        return Coalescer(self.metrics, max_in_flight)

    def start(self, finish):
        self.finishes.append(finish)

    def setUp(self):
        super().setUp()
        self.finishes = []

    def test_every_waiter_gets_the_result_once(self):
        c = self.coalescer()
        got = []
        handles = [c.join(b"k", self.start, got.append) for _ in range(3)]
        self.assertEqual(len(self.finishes), 1)
        self.assertNotIn(None, handles)
        self.finishes[0](ANSWER)
        self.assertEqual(got, [ANSWER] * 3)
        self.assertEqual(len(c), 0)

    def test_a_waiter_that_raises_does_not_starve_the_others(self):
        c = self.coalescer()
        got = []

        def broken(result):
            raise ZeroDivisionError("a caller's bug")

        c.join(b"k", self.start, got.append)
        c.join(b"k", self.start, broken)
        c.join(b"k", self.start, got.append)
        self.finishes[0](ANSWER)
        self.assertEqual(got, [ANSWER, ANSWER])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_start_that_raises_fails_every_waiter_and_frees_the_key(self):
        c = self.coalescer()
        got = []

        def broken(finish):
            raise RuntimeError("work could not start")

        c.join(b"k", broken, got.append)
        [f] = got
        self.assertTrue(f.check(RuntimeError))
        self.assertEqual((len(c), self.in_flight()), (0, 0))
        c.join(b"k", self.start, got.append)
        self.assertEqual(len(self.finishes), 1)

    def test_cancelled_waiter_never_called(self):
        c = self.coalescer()
        got, other = [], []
        c.join(b"k", self.start, got.append).cancel()
        c.join(b"k", self.start, other.append)
        self.finishes[0](ANSWER)
        self.assertEqual((got, other), ([], [ANSWER]))

    def test_shed_gives_no_handle(self):
        c = self.coalescer(max_in_flight=1)
        c.join(b"k1", self.start, lambda r: None)
        got = []
        self.assertIsNone(c.join(b"k2", self.start, got.append))
        self.assertTrue(got[0].check(Shed))
        self.assertEqual(len(self.finishes), 1)
