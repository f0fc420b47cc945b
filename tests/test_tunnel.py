"""phantomd.http.tunnel: the WebSocket relay on StringTransports and a Clock."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from phantomd.http.tunnel import LINGER, Tunnel
from phantomd.ops.metrics import Metrics


class TunnelTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.client = StringTransport()
        self.upstream = StringTransport()
        self.metrics = Metrics()
        self.ended = []

    def tunnel(self, idle=300.0, expires_at=None, **start):
        t = Tunnel(self.clock, self.client, self.upstream, idle, expires_at,
                   self.metrics.tunnels, self.ended.append)
        t.start(**start)
        return t

    def gauge(self):
        return self.metrics.sample("phantomd_tunnels_open")

    def test_relays_both_ways_early_bytes_first(self):
        t = self.tunnel(from_client=b"c0", from_upstream=b"u0")
        t.from_client(b"c1")
        t.from_upstream(b"u1")
        self.assertEqual(self.upstream.value(), b"c0c1")
        self.assertEqual(self.client.value(), b"u0u1")
        self.assertEqual(self.gauge(), 1)

    def test_a_full_upstream_pauses_the_client_and_back(self):
        self.tunnel()
        self.upstream.producer.pauseProducing()
        self.assertEqual(self.client.producerState, "paused")
        self.assertEqual(self.upstream.producerState, "producing")
        self.upstream.producer.resumeProducing()
        self.assertEqual(self.client.producerState, "producing")

    def test_a_full_client_pauses_the_upstream_and_back(self):
        self.tunnel()
        self.client.producer.pauseProducing()
        self.assertEqual(self.upstream.producerState, "paused")
        self.client.producer.resumeProducing()
        self.assertEqual(self.upstream.producerState, "producing")

    def test_idle_timeout_closes_both_and_traffic_postpones_it(self):
        t = self.tunnel(idle=10)
        self.clock.advance(9)
        t.from_upstream(b"x")
        self.clock.advance(9)
        t.from_client(b"y")
        self.clock.advance(9.5)
        self.assertEqual(self.ended, [])
        self.assertTrue(t.open)
        self.clock.advance(0.5)
        self.assertEqual(self.ended, ["idle"])
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.upstream.disconnecting)
        self.assertEqual(self.gauge(), 0)
        t.from_client(b"late")
        self.assertEqual(self.upstream.value(), b"y")

    def test_the_token_exp_closes_it_despite_traffic(self):
        t = self.tunnel(idle=10, expires_at=1025)
        for _ in range(4):
            self.clock.advance(6)
            t.from_client(b"ping")
        self.assertEqual(self.ended, [])
        self.clock.advance(1)  # 1025
        self.assertEqual(self.ended, ["expired"])
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.upstream.disconnecting)
        self.assertEqual(self.gauge(), 0)

    def test_an_already_expired_token_closes_at_once(self):
        self.tunnel(expires_at=999)
        self.clock.advance(0)
        self.assertEqual(self.ended, ["expired"])

    def test_one_side_closing_closes_the_other(self):
        t = self.tunnel()
        t.client_lost()
        self.assertEqual(self.ended, ["closed"])
        self.assertTrue(self.upstream.disconnecting)
        self.assertIsNone(self.upstream.producer)
        self.assertEqual(self.gauge(), 0)
        t.upstream_lost()  # its own loss later: counted once
        self.assertEqual(self.ended, ["closed"])
        self.assertEqual(self.gauge(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_side_that_will_not_flush_is_cut_after_linger(self):
        aborted = []
        self.client.abortConnection = lambda: aborted.append("client")
        t = self.tunnel()
        t.upstream_lost()
        self.assertTrue(self.client.disconnecting)
        self.clock.advance(LINGER)
        self.assertIn("client", aborted)

    def test_close_for_drain_cuts_both(self):
        t = self.tunnel()
        t.close("drain")
        self.assertEqual(self.ended, ["drain"])
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.upstream.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.gauge(), 0)
