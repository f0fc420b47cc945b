"""Floods: a random-token flood must not grow memory past the cache bound,
must not push more than ``max_in_flight`` introspections at the token
service, and must not starve a client whose token is good.

phantomd runs in a child process here, so its RSS is its own and not the
flood client's; the token service, the API and the clients stay in this
process, on the other core.
"""

from __future__ import annotations

import os
from collections import Counter

from twisted.internet import defer, reactor
from twisted.trial import unittest

from .fakes import (
    Delayed, FakeAPI, TokenService, async_test, connect_http, exchange,
    gateway_ini, jwt_reply, make_jwt, new_token, request_bytes,
    spawn_gateway,
)

MB = 1 << 20

#: Requests in the flood; 50 in flight at a time.
FLOOD = 20_000
CONCURRENCY = 50
MAX_IN_FLIGHT = 8
MAX_ENTRIES = 100
#: Each random token is answered active with a distinct ~22 KB JWT (a
#: 16 KB claim), so every cache entry costs some 40 KB (the JWT plus its
#: decoded claims).  Bounded at 100 entries that is ~4 MB, reached before
#: the "warm" sample; an unbounded cache holding the thousands of answers
#: the flood gets (the rest is shed) would add 80 MB or more.  25 MB
#: leaves room for allocator noise and connection buffers.
PAD = 16384
RSS_GROWTH_BOUND = 25 * MB


class RandomTokenFlood(unittest.TestCase):
    timeout = 180

    @async_test
    async def test_flood_with_random_tokens(self):
        ts = TokenService(reactor)
        api = FakeAPI(reactor)
        ts_port, api_port = ts.listen(), api.listen()
        self.addCleanup(ts.stop)
        self.addCleanup(api.stop)
        good, good_jwt = new_token("good"), make_jwt()

        def answer(req):
            if req.token == good:
                return jwt_reply(good_jwt, "max-age=3600")
            return Delayed(0.001, jwt_reply(make_jwt(
                {"pad": os.urandom(PAD // 2).hex()}), "max-age=3600"))
        ts.behaviour = answer
        ini = gateway_ini(
            ts_port, api_port,
            phantomd={"header_timeout": "10", "idle_timeout": "30",
                      "upstream_timeout": "10"},
            introspection={"max_in_flight": str(MAX_IN_FLIGHT),
                           "timeout": "5", "max_response_bytes": "65536"},
            cache={"max_entries": str(MAX_ENTRIES)})
        gw = await spawn_gateway(self, reactor, ini)

        statuses: Counter = Counter()
        good_statuses: Counter = Counter()
        remaining = [FLOOD]
        rss = {}
        flooding = [True]

        async def flooder():
            client = None
            while remaining[0] > 0:
                remaining[0] -= 1
                if remaining[0] == FLOOD - 2000:
                    rss["warm"] = gw.rss_bytes()
                if client is None or client.lost:
                    client = await connect_http(reactor, gw.front)
                try:
                    r = await client.request(request_bytes(
                        token=new_token("rnd")))
                except Exception as e:
                    statuses[type(e).__name__] += 1
                    client = None
                    continue
                statuses[r.status] += 1
            if client is not None and not client.lost:
                client.transport.loseConnection()

        async def good_client():
            client = None
            while flooding[0]:
                if client is None or client.lost:
                    client = await connect_http(reactor, gw.front)
                try:
                    r = await client.request(request_bytes(token=good))
                except Exception as e:
                    good_statuses[type(e).__name__] += 1
                    client = None
                    continue
                good_statuses[r.status] += 1
            if client is not None and not client.lost:
                client.transport.loseConnection()

        rss["start"] = gw.rss_bytes()
        good_run = defer.ensureDeferred(good_client())
        await defer.gatherResults([defer.ensureDeferred(flooder())
                                   for _ in range(CONCURRENCY)])
        flooding[0] = False
        await good_run
        rss["end"] = gw.rss_bytes()

        summary = "flood %s; good token %s; rss %s MB; token service " \
            "max in flight %d, calls %d" % (
                dict(statuses), dict(good_statuses),
                {k: round(v / MB, 1) for k, v in rss.items()},
                ts.max_in_flight, ts.calls)
        self.assertEqual(sum(statuses.values()), FLOOD, summary)
        self.assertLessEqual(set(statuses), {200, 503}, summary)
        self.assertLessEqual(ts.max_in_flight, MAX_IN_FLIGHT, summary)
        self.assertGreater(good_statuses[200], 50, summary)
        self.assertEqual(set(good_statuses), {200}, summary)
        self.assertLess(rss["end"] - rss["warm"], RSS_GROWTH_BOUND, summary)
        # the flood did reach the cache: many more answers than entries
        self.assertGreater(statuses[200], 10 * MAX_ENTRIES, summary)
        metrics = await exchange(reactor, gw.admin, request_bytes(
            target="/metrics", close=True), 5.0)
        entries = [float(line.split()[1]) for line in
                   metrics.received.decode("latin-1").splitlines()
                   if line.startswith("phantomd_cache_entries ")]
        self.assertEqual(len(entries), 1, summary)
        self.assertLessEqual(entries[0], MAX_ENTRIES, summary)
        print("\n" + summary)
