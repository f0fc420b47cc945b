"""pool.IdlePool on a fake clock with fake connections, and the token
service client's bound on parsed URLs."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from phantomd.http.client import MAX_TARGETS, HTTPClient
from phantomd.http.pool import IdlePool


class Conn:
    """What the pool needs of a connection; ``close`` only asks (the pool
    hears ``lost`` when the transport is gone)."""

    def __init__(self, key: Any = "a") -> None:
        self.key = key
        self.idle_since = 0.0
        self.closed = False
        self.idled = 0

    def close(self) -> None:
        self.closed = True

    def went_idle(self) -> None:
        self.idled += 1


class IdlePoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = IdlePool(self.clock, max_idle=2, idle_timeout=10,
                             on_idle=Conn.went_idle)

    def test_most_recently_used_first(self) -> None:
        first, second = Conn(), Conn()
        self.pool.put(first)
        self.pool.put(second)
        self.assertEqual((first.idled, second.idled), (1, 1))
        self.assertIs(self.pool.take("a"), second)
        self.assertIs(self.pool.take("a"), first)
        self.assertIsNone(self.pool.take("a"))

    def test_idle_bound_per_target(self) -> None:
        conns = [Conn() for _ in range(3)]
        for conn in conns:
            self.pool.put(conn)
        self.assertEqual([c.closed for c in conns], [False, False, True])
        self.assertEqual(self.pool.idle_count(), 2)
        other = Conn("b")
        self.pool.put(other)  # another target has its own bound
        self.assertFalse(other.closed)
        self.assertEqual(self.pool.idle_count(), 3)
        self.assertIsNone(self.pool.take("c"))
        self.assertIs(self.pool.take("b"), other)

    def test_too_old_is_closed_not_used(self) -> None:
        old = Conn()
        self.pool.put(old)
        self.clock.advance(5)
        young = Conn()
        self.pool.put(young)
        self.clock.advance(6)  # old: 11 s idle, young: 6 s
        self.assertIs(self.pool.take("a"), young)
        self.assertIsNone(self.pool.take("a"))
        self.assertTrue(old.closed)
        self.assertFalse(young.closed)

    def test_reconfigure_closes_the_oldest_beyond_the_bound(self) -> None:
        first, second = Conn(), Conn()
        self.pool.put(first)
        self.pool.put(second)
        self.pool.reconfigure(1, 10)
        self.assertEqual((first.closed, second.closed), (True, False))
        self.assertEqual(self.pool.idle_count(), 1)

    def test_discard(self) -> None:
        conn = Conn()
        self.pool.put(conn)
        self.pool.discard(conn)
        self.assertIsNone(self.pool.take("a"))
        self.pool.discard(conn)  # twice is harmless

    def test_close_waits_for_the_idle_ones(self) -> None:
        one, two = Conn("a"), Conn("b")
        self.pool.put(one)
        self.pool.put(two)
        fired: list = []
        self.pool.close().addCallback(fired.append)
        self.assertTrue(one.closed and two.closed)
        self.assertEqual(self.pool.idle_count(), 0)
        self.pool.lost(one)
        self.assertEqual(fired, [], "fired before the last one was gone")
        self.pool.lost(two)
        self.assertEqual(fired, [None])

    def test_after_close_handed_back_is_closed(self) -> None:
        self.assertEqual(self.successResultOf(self.pool.close()), None)
        late = Conn()
        self.pool.put(late)  # an exchange in flight at close() ends
        self.assertTrue(late.closed)
        self.assertEqual(self.pool.idle_count(), 0)


class ClientTargetsTests(unittest.TestCase):
    def test_parsed_urls_are_bounded(self) -> None:
        client = HTTPClient(MemoryReactorClock(), None, connect_timeout=1,
                            max_idle=1, idle_timeout=1, max_answer_bytes=99)
        for i in range(MAX_TARGETS * 3):
            client.fetch("GET", "http://127.0.0.1:%d/" % (1000 + i))
            self.assertLessEqual(len(client._targets), MAX_TARGETS)
        self.assertEqual(len(client.reactor.tcpClients), MAX_TARGETS * 3)
