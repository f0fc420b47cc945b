"""phantomd.http.deadline: the one timer every connection uses."""

from twisted.internet.task import Clock
from twisted.trial import unittest

from phantomd.http.deadline import Deadline


class DeadlineTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.fired = []
        self.d = Deadline(self.clock, self.fired.append)

    def test_fires_once_with_its_kind(self):
        self.d.arm(5, "head")
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, ["head"])
        self.clock.advance(100)
        self.assertEqual(self.fired, ["head"])
        self.assertFalse(self.d.armed)

    def test_a_later_time_keeps_one_call_and_waits_for_it(self):
        self.d.arm(5, "a")
        self.clock.advance(3)
        self.d.arm(5, "b")  # now due at 8
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(2)  # the old call wakes at 5 and sleeps again
        self.assertEqual(self.fired, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(3)
        self.assertEqual(self.fired, ["b"])

    def test_an_earlier_time_moves_the_call_forward(self):
        self.d.arm(300, "idle")
        self.d.arm(10, "head")
        self.clock.advance(10)
        self.assertEqual(self.fired, ["head"])

    def test_disarm_means_it_never_fires(self):
        self.d.arm(5, "a")
        self.d.disarm()
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    def test_cancel_leaves_no_call_behind(self):
        self.d.arm(5, "a")
        self.d.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    def test_can_be_armed_again_from_its_own_callback(self):
        def fire(kind):
            self.fired.append(kind)
            if kind == "first":
                self.d.arm(2, "second")
        d = self.d = Deadline(self.clock, fire)
        d.arm(1, "first")
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertEqual(self.fired, ["first", "second"])
