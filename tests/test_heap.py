"""What the garbage collector skips once phantomd has started, and what a
reload gives back to it (phantomd/ops/heap.py)."""

import gc
import signal
import weakref

from twisted.internet import defer
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from phantomd import config, tap
from phantomd.ops import heap
from tests.test_tap import BASE

INI = BASE.format(upstream="http://127.0.0.1:3000",
                  url="http://127.0.0.1:1/introspect",
                  phantomd="listen = tcp:0", introspection="", extra="")


class Node:
    """Something that can be part of a reference cycle and be watched."""


def cycle() -> "weakref.ref[Node]":
    """A cycle referenced from nowhere else, and a way to see it go."""
    node = Node()
    node.me = node
    return weakref.ref(node)


def frozen_cycle() -> "weakref.ref[Node]":
    """A cycle frozen while alive, then dropped: garbage that collections
    skip until the next ``settle``."""
    node = Node()
    node.me = node
    watch = weakref.ref(node)
    heap.settle()
    del node
    return watch


def tracked(obj) -> bool:
    """Whether the collector's generations hold ``obj`` (frozen ones are
    in none of them)."""
    return any(o is obj for o in gc.get_objects())


class FakeGateway:
    front = None
    front_ports = ()

    def __init__(self, reactor, config, access_log=None):
        self.reloaded = []

    def start(self, front_ports=None):
        return defer.succeed(None)

    def reload(self, new):
        self.reloaded.append(new)

    def stop(self):
        return defer.succeed(None)


class HeapTestCase(SynchronousTestCase):
    def setUp(self):
        # Only the collections a test makes: none in between.
        gc.disable()
        self.addCleanup(gc.enable)
        gc.collect()  # no stray cycles of other tests in what gets frozen
        self.addCleanup(gc.unfreeze)


class SettleTests(HeapTestCase):
    def test_what_is_alive_is_left_out_of_collections(self):
        kept = Node()
        kept.me = kept
        self.assertTrue(tracked(kept))
        heap.settle()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertFalse(tracked(kept))
        # Still freed by reference counting when its last reference goes.
        plain = Node()
        heap.settle()
        watch = weakref.ref(plain)
        del plain
        self.assertIsNone(watch())

    def test_a_frozen_cycle_goes_at_the_next_settle(self):
        watch = frozen_cycle()
        gc.collect()
        self.assertIsNotNone(watch(), "frozen: skipped by collections")
        heap.settle()
        self.assertIsNone(watch())


class GatewayServiceTests(HeapTestCase):
    """The service settles the heap once started and after each reload
    that applied, and not after one that was refused."""

    def setUp(self):
        super().setUp()
        old = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, old)
        self.reactor = MemoryReactor()
        self.next_ini = INI
        self.service = tap.GatewayService(
            self.reactor, config.parse(INI), gateway_factory=FakeGateway,
            load=lambda path: config.parse(self.next_ini, path))
        self.service.privilegedStartService()
        self.service.startService()

    def started(self):
        for f, args, kw in self.reactor.triggers["after"]["startup"]:
            f(*args, **kw)

    def test_settled_once_started(self):
        watch = cycle()
        self.assertIsNotNone(watch())
        self.started()
        self.assertIsNone(watch(), "collected before freezing")
        node = Node()
        self.assertTrue(tracked(node))
        self.started()
        self.assertFalse(tracked(node))

    def test_a_reload_gives_the_old_cycles_back(self):
        self.started()
        watch = frozen_cycle()
        self.next_ini = INI + "[cache]\nmax_entries = 5\n"
        self.service.reload()
        self.assertEqual(len(self.service.gateway.reloaded), 1)
        self.assertIsNone(watch())

    def test_a_refused_reload_changes_nothing(self):
        self.started()
        watch = frozen_cycle()
        self.next_ini = INI + "[cache]\nmax_entries = none\n"
        self.service.reload()
        self.assertEqual(self.service.gateway.reloaded, [])
        self.assertIsNotNone(watch(), "no collection for a refused reload")
