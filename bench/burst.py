"""Latency of a burst of concurrent requests carrying one new token.

Starts a phantomd Gateway on loopback between the fake token service of
tests/test_burst_e2e.py (Curity style, answering after --delay seconds) and
its fake API, then for each round sends --burst concurrent requests with a
fresh token and measures each one from sending to the last body byte.  The
client runs in the same process and reactor as the gateway, so its own work
is part of the figures.  Prints p50/p99/max per round and overall, and the
number of introspections the token service saw.

    PYTHONPATH=. python bench/burst.py [--burst 200] [--rounds 5]
        [--delay 0.1] [--backlog 1024]
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import defer, task
from twisted.web.client import HTTPConnectionPool

from tests.test_burst_e2e import (
    APIResource, TokenServiceResource, burst, make_jwt, start_scene)


def percentile(values, p):
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))
    return ordered[k]


async def run(reactor, args) -> None:
    jwt = make_jwt(reactor.seconds())
    ts = TokenServiceResource(reactor, jwt, delay=args.delay)
    api = APIResource()
    cleanups = []
    gateway, metrics = await start_scene(reactor, ts, api, cleanups.append,
                                         backlog=args.backlog)
    pool = HTTPConnectionPool(reactor, persistent=False)
    port = gateway.front_ports[0].getHost().port
    everything = []
    try:
        for r in range(args.rounds):
            timings: list = []
            token = "opaque-bench-token-%d-%d" % (r, int(time.time()))
            before = len(ts.tokens)
            results = await burst(reactor, port, token, args.burst, pool,
                                  timings, now=time.perf_counter)
            codes = {code for code, _ in results}
            everything += timings
            print("round %d: %d requests, statuses %s, introspections %d, "
                  "p50 %.1f ms, p99 %.1f ms, max %.1f ms"
                  % (r + 1, len(results), sorted(codes),
                     len(ts.tokens) - before,
                     1000 * percentile(timings, 50),
                     1000 * percentile(timings, 99), 1000 * max(timings)))
        print("overall (%d requests, token service delay %.0f ms): "
              "p50 %.1f ms, p99 %.1f ms, max %.1f ms"
              % (len(everything), 1000 * args.delay,
                 1000 * percentile(everything, 50),
                 1000 * percentile(everything, 99), 1000 * max(everything)))
        print("metrics: introspections active %d, coalesced %d, "
              "requests 2xx %d"
              % (metrics.sample("phantomd_introspections_total",
                                {"outcome": "active"}),
                 metrics.sample("phantomd_coalesced_requests_total"),
                 metrics.sample("phantomd_requests_total", {"code": "2xx"})))
    finally:
        await pool.closeCachedConnections()
        for stop in reversed(cleanups):
            await defer.maybeDeferred(stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.1,
                        help="token service answer delay, seconds")
    parser.add_argument("--backlog", type=int, default=1024,
                        help="listen backlog of the gateway's front "
                        "(Twisted's default is 50)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
