"""The shared tier's three figures, with a real redis-server and four
phantomd processes on loopback (fake token service and API in this one):

1. introspections per new token when all four processes get it at once
   (goal: exactly 1);
2. latency of a cached token (a local hit) with ``[shared_cache]`` on and
   off: the local tier must keep hits off the network;
3. revocation fan-out: from ``POST /revoke`` on one process until every
   process answers 401 for the token.

    python bench/fleet.py [tokens] [hits]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from twisted.internet import defer, reactor, task  # noqa: E402

from tests.helpers_redis import REDIS_SERVER, RedisServer  # noqa: E402
from tests.robustness.fakes import (  # noqa: E402
    FakeAPI, GatewayProcess, TokenService, gateway_ini, get, new_token,
    one_request)

PROCESSES = 4
BEARER = b"bench-revocation-bearer-0123456789"


async def spawn(ini: str, directory: str, n: int) -> list:
    path = os.path.join(directory, "gw-%d.ini" % len(os.listdir(directory)))
    with open(path, "w") as f:
        f.write(ini)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    procs = []
    for _ in range(n):
        p = GatewayProcess()
        reactor.spawnProcess(p, sys.executable, [
            sys.executable, "-c",
            "import sys; from tests.robustness.fakes import serve_gateway; "
            "serve_gateway(sys.argv[1])", path], env=env, path=root)
        await p.ready
        procs.append(p)
    await task.deferLater(reactor, 1.0, lambda: None)  # Redis connections
    return procs


async def hit_latency(port: int, token: str, n: int) -> tuple:
    times = []
    for _ in range(n):
        start = reactor.seconds()
        r = await get(reactor, port, token)
        assert r.status == 200, r.status
        times.append(reactor.seconds() - start)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


async def revoke(port: int, token: str):
    body = b"token=" + token.encode()
    return await one_request(reactor, port, b"\r\n".join([
        b"POST /revoke HTTP/1.1", b"Host: a", b"Connection: close",
        b"Authorization: Bearer " + BEARER,
        b"Content-Type: application/x-www-form-urlencoded",
        b"Content-Length: %d" % len(body), b"", body]))


async def main(ntokens: int, nhits: int) -> None:
    directory = tempfile.mkdtemp(prefix="phantomd-bench-")
    redis = RedisServer().start()
    secret = os.path.join(directory, "secret")
    bearer = os.path.join(directory, "bearer")
    with open(secret, "wb") as f:
        f.write(os.urandom(32).hex().encode())
    with open(bearer, "wb") as f:
        f.write(BEARER)
    ts, api = TokenService(reactor), FakeAPI(reactor)
    ts_port, api_port = ts.listen(), api.listen()
    lenient = {"phantomd": {"header_timeout": "5", "idle_timeout": "10",
                            "upstream_timeout": "5"},
               "introspection": {"timeout": "5"},
               "revocation": {"token_file": bearer}}
    on = gateway_ini(ts_port, api_port, "jwt", shared_cache={
        "url": redis.url, "secret_file": secret}, **lenient)
    lenient["revocation"] = {}
    off = gateway_ini(ts_port, api_port, "jwt", **lenient)
    procs = []
    try:
        fleet = await spawn(on, directory, PROCESSES)
        procs += fleet
        tokens = [new_token() for _ in range(ntokens)]
        for t in tokens:
            ts.activate(t)
        for t in tokens:
            await defer.gatherResults([defer.ensureDeferred(
                get(reactor, p.front, t)) for p in fleet])
        calls = [ts.calls_for(t) for t in tokens]
        print("introspections per new token, %d processes at once: "
              "mean %.2f, max %d (%d tokens)"
              % (PROCESSES, sum(calls) / len(calls), max(calls), ntokens))

        solo = await spawn(off, directory, 1)
        procs += solo
        for label, port in (("on ", fleet[0].front), ("off", solo[0].front)):
            token = new_token()
            ts.activate(token)
            await get(reactor, port, token)
            med, p99 = await hit_latency(port, token, nhits)
            print("hit latency, shared tier %s: median %.3f ms, p99 %.3f ms "
                  "(%d requests, each on a new connection)"
                  % (label, med * 1000, p99 * 1000, nhits))

        fanout = []
        for _ in range(20):
            token = new_token()
            ts.activate(token)
            for p in fleet:
                await get(reactor, p.front, token)
            del ts.tokens[token]
            start = reactor.seconds()
            pending = [p for p in fleet]
            d = defer.ensureDeferred(revoke(fleet[0].admin, token))
            while pending:
                statuses = await defer.gatherResults([defer.ensureDeferred(
                    get(reactor, p.front, token)) for p in pending])
                pending = [p for p, r in zip(pending, statuses)
                           if r.status != 401]
            fanout.append(reactor.seconds() - start)
            assert (await d).status == 200
        fanout.sort()
        print("revocation fan-out to %d processes (until every one answers "
              "401): median %.1f ms, max %.1f ms (20 runs)"
              % (PROCESSES, statistics.median(fanout) * 1000,
                 fanout[-1] * 1000))
    finally:
        for p in procs:
            await p.stop(reactor)
        await ts.stop()
        await api.stop()
        redis.stop()


if __name__ == "__main__":
    if REDIS_SERVER is None:
        sys.exit("redis-server is not installed")
    args = [int(a) for a in sys.argv[1:]]
    ntokens = args[0] if args else 50
    nhits = args[1] if len(args) > 1 else 500
    task.react(lambda _: defer.ensureDeferred(main(ntokens, nhits)))
