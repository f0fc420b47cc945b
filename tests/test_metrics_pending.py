"""Per-request counts wait in plain ints and reach prometheus_client in one
hand-over (phantomd.ops.metrics.PendingCount / PendingHistogram)."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from twisted.internet.task import Clock
from twisted.trial import unittest

from phantomd.ops import metrics as metricsmod
from phantomd.ops.metrics import Metrics, PendingHistogram


def own_value(metric, sample_name, labels=None):
    """A sample read from the metric itself, not through the registry (so
    without the hand-over a registry collection makes)."""
    for family in metric.collect():
        for s in family.samples:
            if s.name == sample_name and s.labels == (labels or {}):
                return s.value
    return None


def answered_2xx(m):
    """``phantomd_requests_total{code="2xx"}`` as prometheus_client has
    it (what was handed over so far)."""
    return own_value(m.requests, "phantomd_requests_total", {"code": "2xx"})


def scrape(registry):
    """The exposition without its creation times, which differ."""
    return "\n".join(line for line in generate_latest(registry).decode()
                     .splitlines() if "_created" not in line)


class HandOverTests(unittest.TestCase):
    def test_a_scrape_sees_every_count_without_a_flush(self):
        m = Metrics()
        for status in (200, 200, 404, 503):
            m.request_answered(status)
        m.lookup["hit"].inc()
        m.request_duration.observe(0.003)
        text = generate_latest(m.registry).decode()
        self.assertIn('phantomd_requests_total{code="2xx"} 2.0', text)
        self.assertIn('phantomd_requests_total{code="4xx"} 1.0', text)
        self.assertIn('phantomd_requests_total{code="5xx"} 1.0', text)
        self.assertIn('phantomd_cache_lookups_total{result="hit"} 1.0', text)
        self.assertIn('phantomd_request_duration_seconds_count 1.0', text)
        self.assertEqual(m.sample("phantomd_requests_total", {"code": "2xx"}),
                         2.0)
        # Scraping again counts nothing twice.
        text = generate_latest(m.registry).decode()
        self.assertIn('phantomd_requests_total{code="2xx"} 2.0', text)

    def on_clock(self):
        clock, m = Clock(), Metrics()
        m.use_clock(clock)
        return clock, m

    def test_counts_wait_until_the_turn_ends(self):
        clock, m = self.on_clock()
        m.request_answered(200)
        m.request_answered(201)
        self.assertEqual(answered_2xx(m), 0.0)
        clock.advance(0)
        self.assertEqual(answered_2xx(m), 2.0)
        # One hand-over per turn, however many requests it answered.
        self.assertEqual(clock.getDelayedCalls(), [])
        m.request_answered(200)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        m.request_answered(200)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(answered_2xx(m), 4.0)

    def test_forward_auth_checks_are_handed_over_at_the_turn_end(self):
        clock, m = self.on_clock()
        m.forward_auth_answered(401)
        child = m._checks_by_class["4xx"].child
        name = "phantomd_forward_auth_checks_total"
        self.assertEqual(own_value(child, name), 0.0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(own_value(child, name), 1.0)

    def test_a_removed_route_keeps_no_pending_count(self):
        m = Metrics()
        m.set_routes(["orders"])
        m.route_answered("orders", 200, 0.01)
        m.set_routes([])
        text = generate_latest(m.registry).decode()
        self.assertNotIn('route="orders"', text)
        m.route_answered("orders", 200, 0.01)  # its request ran on
        self.assertNotIn('route="orders"', generate_latest(m.registry).decode())


class CountTests(unittest.TestCase):
    def test_gauges_hand_over_their_latest_value(self):
        m = Metrics()
        for n in (1, 2, 3, 2):
            m.cache_entries.set(n)
        m.introspections_in_flight.set(5)
        m.introspections_in_flight.set(0)
        gauge = m.cache_entries.child
        self.assertEqual(own_value(gauge, "phantomd_cache_entries"), 0.0)
        self.assertEqual(m.sample("phantomd_cache_entries"), 2)  # flushed
        self.assertEqual(m.sample("phantomd_introspections_in_flight"), 0)
        self.assertEqual(own_value(gauge, "phantomd_cache_entries"), 2.0)
        m.cache_entries.set(7)
        self.assertIn("phantomd_cache_entries 7.0",
                      generate_latest(m.registry).decode())

    def test_zero_and_negative_increments(self):
        m = Metrics()
        hit = m.lookup["hit"]
        for _ in range(3):
            hit.inc(0)  # nothing to hand over, so nothing noted
        self.assertEqual(m._dirty, [])
        self.assertRaises(ValueError, hit.inc, -1)  # at once, as before
        hit.inc()
        hit.inc()
        self.assertEqual(m._dirty, [hit])  # noted once
        self.assertEqual(m.sample("phantomd_cache_lookups_total",
                                  {"result": "hit"}), 2.0)


class HistogramTests(unittest.TestCase):
    VALUES = (0.0, 0.0005, 0.0004999, 0.00050001, 0.001, 0.02, 0.025, 1.0,
              29.9, 30.0, 30.0001, 1e9, float("inf"), -1.0)

    def test_same_exposition_as_observing_one_by_one(self):
        direct, batched = CollectorRegistry(), CollectorRegistry()
        buckets = (0.0005, 0.001, 0.025, 1.0, 30.0)
        h1 = Histogram("h", "h", buckets=buckets, registry=direct)
        h2 = Histogram("h", "h", buckets=buckets, registry=batched)
        pending = PendingHistogram(h2, [])
        self.assertEqual(pending.observe, pending._observe)  # batched
        for v in self.VALUES:
            h1.observe(v)
            pending.observe(v)
        pending.flush()
        self.assertEqual(scrape(direct), scrape(batched))
        self.assertIn("h_count 14.0", scrape(batched))
        pending.flush()  # nothing twice
        self.assertEqual(scrape(direct), scrape(batched))

    def test_a_histogram_without_the_internals_is_not_batched(self):
        observed = []

        class Foreign:
            def observe(self, amount):
                observed.append(amount)
        pending = PendingHistogram(Foreign(), [])
        pending.observe(0.5)
        self.assertEqual(observed, [0.5])


class AtExitTests(unittest.TestCase):
    def test_pending_counts_are_written_when_the_interpreter_exits(self):
        m = Metrics()
        m.request_answered(200)
        metricsmod._flush_at_exit()
        self.assertEqual(answered_2xx(m), 1.0)


class WorkerHandOverTests(unittest.TestCase):
    def test_a_delayed_hand_over_serves_every_answer_meanwhile(self):
        clock, m = Clock(), Metrics()
        m.use_clock(clock, 0.05)
        m.request_answered(200)
        clock.advance(0.01)
        m.request_answered(200)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0.039)
        self.assertEqual(answered_2xx(m), 0.0)
        clock.advance(0.001)
        self.assertEqual(answered_2xx(m), 2.0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_only_a_worker_hands_over_after_answers(self):
        """In one process a scrape hands the counts over itself: no call
        per answer.  A worker (values in files) gets the delayed one."""
        import os
        import subprocess
        import sys
        import tempfile
        code = ("from twisted.internet.task import Clock\n"
                "from phantomd import config\n"
                "from phantomd.app import Gateway\n"
                "from tests.test_config import MINIMAL\n"
                "clock = Clock()\n"
                "gw = Gateway(clock, config.parse(MINIMAL), probe=False)\n"
                "gw.metrics.request_answered(200)\n"
                "print(len(clock.getDelayedCalls()))\n")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.pop("prometheus_multiproc_dir", None)
        alone = subprocess.run([sys.executable, "-c", code], env=env,
                               capture_output=True, text=True, check=True)
        with tempfile.TemporaryDirectory() as d:
            env["PROMETHEUS_MULTIPROC_DIR"] = d
            worker = subprocess.run([sys.executable, "-c", code], env=env,
                                    capture_output=True, text=True,
                                    check=True)
        self.assertEqual(int(alone.stdout.split()[-1]), 0)
        self.assertEqual(int(worker.stdout.split()[-1]), 1)
