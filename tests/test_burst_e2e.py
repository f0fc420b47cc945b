"""A burst of requests with one new token: one introspection serves them all.

A whole phantomd Gateway on loopback between a Curity-style fake token
service (200 with the JWT as body, ``application/jwt``, ``max-age=60``,
answering after 100 ms) and a fake API that records what it receives.
``bench/burst.py`` reuses these fakes to measure the burst's latencies.
"""

from __future__ import annotations

import base64
import json
from typing import Callable, Optional
from urllib.parse import parse_qs

import treq
from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web import http, resource, server
from twisted.web.client import HTTPConnectionPool

LOOPBACK = "127.0.0.1"
BURST = 200
TOKEN = "opaque-burst-token-0123456789abcdef"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(now: float, lifetime: int = 3600) -> str:
    claims = {"sub": "alice", "scope": "read", "iat": int(now),
              "exp": int(now) + lifetime, "iss": "https://login.example"}
    return "%s.%s.%s" % (b64(b'{"alg":"RS256","kid":"k1"}'),
                         b64(json.dumps(claims).encode()), b64(b"sig" * 80))


class _TrackedChannel(http.HTTPChannel):
    def connectionMade(self):
        super().connectionMade()
        self.factory.channels.add(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.channels.discard(self)
        for d in self.factory.waiting.pop(self, ()):
            d.callback(None)


class FakeServer(server.Site):
    """A loopback ``Site`` that can drop every connection it accepted."""

    protocol = _TrackedChannel

    def __init__(self, reactor, root: resource.Resource) -> None:
        super().__init__(root, reactor=reactor)
        self.reactor = reactor
        self.channels: set = set()
        self.waiting: dict = {}
        self.port = None

    def log(self, request) -> None:
        pass

    def listen(self) -> int:
        self.port = self.reactor.listenTCP(0, self, backlog=1024,
                                           interface=LOOPBACK)
        return self.port.getHost().port

    def stop(self) -> defer.Deferred:
        gone = []
        for channel in list(self.channels):
            d = defer.Deferred()
            self.waiting.setdefault(channel, []).append(d)
            gone.append(d)
            channel.transport.abortConnection()
        gone.append(defer.maybeDeferred(self.port.stopListening))
        return defer.gatherResults(gone)


class TokenServiceResource(resource.Resource):
    """Curity style: form ``token=<opaque>``, answer the JWT as the body.

    The answer is sent ``delay`` seconds after the request arrives, and not
    before ``hold()`` is false (polled every 10 ms, for at most
    ``max_hold`` seconds), so a test can keep the introspection in flight
    until every request of its burst has reached the gateway.
    """

    isLeaf = True

    def __init__(self, reactor, jwt: str, delay: float = 0.1,
                 hold: Optional[Callable[[], bool]] = None,
                 max_hold: float = 5.0) -> None:
        super().__init__()
        self.reactor = reactor
        self.jwt = jwt.encode("ascii")
        self.delay = delay
        self.hold = hold
        self.max_hold = max_hold
        self.tokens: list = []

    def render_POST(self, request):
        form = parse_qs(request.content.read().decode("ascii"))
        self.tokens.append(form.get("token", [""])[0])
        deadline = self.reactor.seconds() + self.max_hold
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def answer():
            if finished:
                return
            if self.hold is not None and self.hold() \
                    and self.reactor.seconds() < deadline:
                self.reactor.callLater(0.01, answer)
                return
            request.setHeader(b"Content-Type", b"application/jwt")
            request.setHeader(b"Cache-Control", b"max-age=60")
            request.setHeader(b"Content-Length", b"%d" % len(self.jwt))
            request.write(self.jwt)
            request.finish()

        self.reactor.callLater(self.delay, answer)
        return server.NOT_DONE_YET


class APIResource(resource.Resource):
    """Records each request's ``Authorization`` values; answers 200."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list = []

    def render(self, request):
        self.authorizations.append(
            request.requestHeaders.getRawHeaders(b"authorization"))
        request.setHeader(b"Content-Type", b"text/plain")
        return b"hello from the API\n"


# Twisted's default listen backlog (50) would drop some of a burst's SYNs
# and make those clients retry a second later; the burst wants them all in.
GATEWAY_INI = """\
[phantomd]
listen = tcp:0:interface=127.0.0.1:backlog={backlog}
upstream = http://127.0.0.1:{api_port}
drain_timeout = 1

[introspection]
url = http://127.0.0.1:{ts_port}/oauth/v2/introspect
client_id = gateway_client
client_secret = burst-test-secret
response = jwt
timeout = 10

[metrics]
listen =
"""


async def start_scene(reactor, ts_resource, api_resource, cleanup,
                      backlog: int = 1024):
    """Token service, API and a started Gateway; ``cleanup`` registers
    their shutdown (gateway first)."""
    from phantomd import config as configmod
    from phantomd.app import Gateway
    from phantomd.ops.metrics import Metrics

    ts = FakeServer(reactor, ts_resource)
    api = FakeServer(reactor, api_resource)
    ts_port, api_port = ts.listen(), api.listen()
    cleanup(ts.stop)
    cleanup(api.stop)
    config = configmod.parse(
        GATEWAY_INI.format(ts_port=ts_port, api_port=api_port,
                           backlog=backlog), "<burst>")
    metrics = Metrics()
    gateway = Gateway(reactor, config, metrics)
    await gateway.start()
    cleanup(gateway.stop)
    return gateway, metrics


async def burst(reactor, front_port: int, token: str, n: int,
                pool: HTTPConnectionPool, timings: Optional[list] = None,
                now: Optional[Callable[[], float]] = None):
    """``n`` concurrent GETs with ``token``: a list of (status, body).

    With ``timings``, each request's seconds from sending to its last body
    byte are appended, read from ``now`` (default ``reactor.seconds``).
    """
    url = "http://%s:%d/burst" % (LOOPBACK, front_port)
    headers = {b"Authorization": [b"Bearer " + token.encode("ascii")]}
    now = now or reactor.seconds

    async def one():
        start = now()
        response = await treq.get(url, headers=headers, pool=pool)
        body = await response.content()
        if timings is not None:
            timings.append(now() - start)
        return response.code, body

    return await defer.gatherResults(
        [defer.ensureDeferred(one()) for _ in range(n)])


class BurstTests(TestCase):
    async def test_one_introspection_for_a_burst_of_one_new_token(self):
        from twisted.internet import reactor

        jwt = make_jwt(reactor.seconds())
        metrics_ref = []

        def not_all_arrived():
            misses = metrics_ref[0].sample(
                "phantomd_cache_lookups_total", {"result": "miss"})
            return misses < BURST

        ts = TokenServiceResource(reactor, jwt, delay=0.1,
                                  hold=not_all_arrived)
        api = APIResource()
        gateway, metrics = await start_scene(reactor, ts, api,
                                             self.addCleanup)
        metrics_ref.append(metrics)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)

        results = await burst(reactor, gateway.front_ports[0].getHost().port,
                              TOKEN, BURST, pool)

        self.assertEqual(ts.tokens, [TOKEN])
        self.assertEqual(results,
                         [(200, b"hello from the API\n")] * BURST)
        self.assertEqual(api.authorizations,
                         [[b"Bearer " + jwt.encode("ascii")]] * BURST)
        sample = metrics.sample
        self.assertEqual(sample("phantomd_introspections_total",
                                {"outcome": "active"}), 1)
        self.assertEqual(sample("phantomd_coalesced_requests_total"),
                         BURST - 1)
        self.assertEqual(sample("phantomd_requests_total", {"code": "2xx"}),
                         BURST)
        self.assertEqual(sample("phantomd_cache_lookups_total",
                                {"result": "miss"}), BURST)
        self.assertEqual(sample("phantomd_introspections_in_flight"), 0)
        self.assertEqual(sample("phantomd_cache_entries"), 1)

        again = await burst(reactor, gateway.front_ports[0].getHost().port,
                            TOKEN, 3, pool)
        self.assertEqual([code for code, _ in again], [200] * 3)
        self.assertEqual(ts.tokens, [TOKEN], "later requests are cache hits")
        self.assertEqual(sample("phantomd_cache_lookups_total",
                                {"result": "hit"}), 3)
