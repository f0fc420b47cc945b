"""phantomd.direct: plain callbacks and the Deferreds built over them keep
one promise -- ``done`` exactly once, or never after ``cancel()``."""

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from phantomd.direct import as_deferred, then


class Handle:
    def __init__(self):
        self.cancelled = 0

    def cancel(self):
        self.cancelled += 1


class ThenTests(SynchronousTestCase):
    def test_plain_value_and_failure_delivered_at_once(self):
        got = []
        self.assertIsNone(then("value", got.append))
        failure = Failure(ValueError("x"))
        self.assertIsNone(then(failure, got.append))
        self.assertEqual(got, ["value", failure])

    def test_fired_deferred_delivered_at_once(self):
        got = []
        self.assertIsNone(then(succeed("value"), got.append))
        self.assertEqual(got, ["value"])

    def test_waiting_deferred_delivered_when_it_fires(self):
        got, d = [], Deferred()
        handle = then(d, got.append)
        self.assertIsNotNone(handle)
        self.assertEqual(got, [])
        d.callback("later")
        self.assertEqual(got, ["later"])

    def test_cancel_cancels_the_deferred_and_delivers_nothing(self):
        cancelled, got = [], []
        d = Deferred(cancelled.append)
        then(d, got.append).cancel()
        self.assertEqual(cancelled, [d])
        self.assertEqual(got, [])
        self.assertTrue(d.called)  # and its CancelledError was consumed

    def test_cancel_drops_whatever_failure_the_deferred_ends_with(self):
        got = []
        d = Deferred(lambda d: d.errback(ValueError("cancelled its way")))
        then(d, got.append).cancel()
        self.assertEqual(got, [])
        self.assertIsNone(self.successResultOf(d))  # consumed, not unhandled

    def test_cancel_after_it_fired_delivers_it_once(self):
        got, d = [], Deferred()
        handle = then(d, got.append)
        d.callback("once")
        handle.cancel()
        self.assertEqual(got, ["once"])


class AsDeferredTests(SynchronousTestCase):
    def test_result_and_failure(self):
        self.assertEqual(
            self.successResultOf(as_deferred(lambda done: done(42))), 42)
        d = as_deferred(lambda done: done(Failure(KeyError("k"))))
        self.failureResultOf(d, KeyError)

    def test_cancel_reaches_the_handle(self):
        handle = Handle()
        d = as_deferred(lambda done: handle)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(handle.cancelled, 1)

    def test_cancel_after_the_result_leaves_the_handle(self):
        handle = Handle()

        def start(done):
            done("at once")
            return handle

        d = as_deferred(start)
        d.cancel()
        self.assertEqual(self.successResultOf(d), "at once")
        self.assertEqual(handle.cancelled, 0)
