"""The admin listener: /metrics, /healthz, /readyz, the JWKS, readiness."""

import json

import treq
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from phantomd.ops.admin import Readiness, make_admin_site
from phantomd.ops.metrics import Metrics

JWKS = b'{"keys":[{"kty":"OKP","crv":"Ed25519","x":"abc","kid":"k1"}]}'


def always_ready():
    return True, "ok"


class AdminSiteTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics()
        self.ready = (True, "ok")
        self.jwks_calls = 0

    def jwks(self):
        self.jwks_calls += 1
        return JWKS

    def client(self, **kwargs):
        kwargs.setdefault("jwks", self.jwks)
        site = make_admin_site(self.clock, self.metrics,
                               lambda: self.ready, **kwargs)
        return StubTreq(site.resource)

    def fetch(self, stub, path, method="GET"):
        response = self.successResultOf(
            stub.request(method, "http://admin" + path))
        return response, self.successResultOf(response.content())

    def test_metrics_shows_known_traffic(self):
        self.metrics.request_answered(200)
        self.metrics.request_answered(204)
        self.metrics.request_answered(503)
        self.metrics.coalesced.inc(7)
        self.metrics.cache_entries.set(42)
        response, body = self.fetch(self.client(), "/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         [CONTENT_TYPE_LATEST])
        lines = body.decode().splitlines()
        for line in ['phantomd_requests_total{code="2xx"} 2.0',
                     'phantomd_requests_total{code="5xx"} 1.0',
                     'phantomd_requests_total{code="4xx"} 0.0',
                     "phantomd_coalesced_requests_total 7.0",
                     "phantomd_cache_entries 42.0"]:
            self.assertIn(line, lines)

    def test_metrics_shows_build_info_and_process(self):
        import phantomd
        _, body = self.fetch(self.client(), "/metrics")
        lines = body.decode().splitlines()
        self.assertIn('phantomd_build_info{version="%s"} 1.0'
                      % phantomd.__version__, lines)
        for name in ("process_resident_memory_bytes",
                     "process_cpu_seconds_total", "process_open_fds",
                     "process_start_time_seconds"):
            self.assertEqual(
                len([line for line in lines if line.startswith(name + " ")]),
                1, name)

    def test_metrics_from_another_registry(self):
        registry = CollectorRegistry()
        Counter("phantomd_workers_aggregated", "x", registry=registry).inc(3)
        _, body = self.fetch(self.client(registry=registry), "/metrics")
        self.assertIn("phantomd_workers_aggregated_total 3.0",
                      body.decode().splitlines())
        self.assertNotIn(b"phantomd_requests_total", body)

    def test_healthz(self):
        self.ready = (False, "listeners are not up yet")
        response, body = self.fetch(self.client(), "/healthz")
        self.assertEqual((response.code, body), (200, b"ok\n"))

    def test_readyz(self):
        stub = self.client()
        response, body = self.fetch(stub, "/readyz")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), {"ready": True, "reason": "ok"})
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"),
                         ["no-store"])
        self.ready = (False, "token service not reached yet")
        response, body = self.fetch(stub, "/readyz")
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body), {
            "ready": False, "reason": "token service not reached yet"})

    def test_readyz_when_the_check_raises(self):
        site = make_admin_site(self.clock, self.metrics, lambda: 1 / 0)
        response, body = self.fetch(StubTreq(site.resource), "/readyz")
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body), {
            "ready": False, "reason": "readiness check failed"})
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_jwks(self):
        response, body = self.fetch(self.client(), "/.well-known/jwks.json")
        self.assertEqual((response.code, body), (200, JWKS))
        self.assertEqual(response.headers.getRawHeaders("cache-control"),
                         ["max-age=300"])
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["application/json"])

    def test_jwks_at_a_configured_path(self):
        stub = self.client(jwks_path="/keys")
        response, body = self.fetch(stub, "/keys")
        self.assertEqual((response.code, body), (200, JWKS))
        response, _ = self.fetch(stub, "/.well-known/jwks.json")
        self.assertEqual(response.code, 404)

    def test_jwks_follows_the_callable(self):
        """None while phantomd mints nothing, the keys once it does (a
        reload may switch minting on without a new admin site)."""
        keys = [None]
        stub = self.client(jwks=lambda: keys[0])
        response, _ = self.fetch(stub, "/.well-known/jwks.json")
        self.assertEqual(response.code, 404)
        keys[0] = JWKS
        response, body = self.fetch(stub, "/.well-known/jwks.json")
        self.assertEqual((response.code, body), (200, JWKS))

    def test_no_jwks_callable_means_404(self):
        response, _ = self.fetch(self.client(jwks=None),
                                 "/.well-known/jwks.json")
        self.assertEqual(response.code, 404)

    def test_unknown_paths_are_404(self):
        stub = self.client()
        for path in ["/", "/metrics/", "/metricsx", "/healthz/x", "/admin"]:
            with self.subTest(path):
                response, _ = self.fetch(stub, path)
                self.assertEqual(response.code, 404)

    def test_query_string_is_ignored(self):
        response, _ = self.fetch(self.client(), "/healthz?verbose=1")
        self.assertEqual(response.code, 200)

    def test_other_methods_are_405(self):
        response, _ = self.fetch(self.client(), "/metrics", method="POST")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"),
                         ["GET, HEAD"])


class ReadinessTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.readiness = Readiness(self.clock, window=60)

    def test_not_ready_before_listening(self):
        ready, reason = self.readiness()
        self.assertFalse(ready)
        self.assertIn("listeners are not bound yet", reason)

    def test_not_ready_until_the_token_service_answered_once(self):
        """Listening is not enough: phantomd would answer every request
        502 while its token service is unresolvable."""
        r = self.readiness
        r.mark_listening()
        self.assertEqual(r(), (False, "token service not reached yet"))
        r.token_service_failed("error: DNS lookup failed for login.invalid")
        self.assertEqual(r(), (False, "token service not reached yet (last "
                               "attempt: error: DNS lookup failed for "
                               "login.invalid)"))
        r.token_service_ok()
        self.assertEqual(r(), (True, "ok"))

    def test_stays_ready_when_the_token_service_goes_away_later(self):
        """Reached once is the contract: a token service blip must not pull
        a whole fleet out of its load balancer; the reason tells."""
        r = self.readiness
        r.mark_listening()
        r.token_service_ok()
        self.clock.advance(30)
        r.token_service_failed()
        self.assertEqual(r(), (True, "ok"))
        self.clock.advance(300)
        r.token_service_failed()
        ready, reason = r()
        self.assertTrue(ready)
        self.assertIn("every token service request in the last 60 s failed "
                      "(last success 330 s ago)", reason)
        self.clock.advance(60)
        self.assertEqual(r(), (True, "ok"))

    def test_keys_when_expected(self):
        r = self.readiness
        r.mark_listening()
        r.token_service_ok()
        r.expect_keys()
        r.keys_failed("JWKS http://ts/jwks answered HTTP 500")
        self.assertEqual(r(), (False, "token service keys not loaded yet "
                               "(JWKS http://ts/jwks answered HTTP 500)"))
        r.keys_loaded()
        self.assertEqual(r(), (True, "ok"))

    def test_every_missing_piece_is_named(self):
        r = self.readiness
        r.expect_keys()
        r.add_check(lambda: "0 of 2 workers serving")
        self.assertEqual(r()[1], "listeners are not bound yet; token service "
                         "not reached yet; token service keys not loaded "
                         "yet; 0 of 2 workers serving")

    def test_added_checks(self):
        r = self.readiness
        r.mark_listening()
        r.token_service_ok()
        why = ["no worker serving"]
        r.add_check(lambda: why[0])
        self.assertEqual(r(), (False, "no worker serving"))
        why[0] = None
        self.assertEqual(r(), (True, "ok"))

    def test_refusal_is_final(self):
        r = self.readiness
        r.mark_listening()
        r.refuse("the token service says a random token is active")
        r.token_service_ok()
        self.assertEqual(r(), (False, "the token service says a random "
                               "token is active"))

    def test_window_must_be_positive(self):
        self.assertRaises(ValueError, Readiness, self.clock, window=0)


class LoopbackTests(TestCase):
    """The admin site on a real socket, as Prometheus would scrape it."""

    def setUp(self):
        self.metrics = Metrics()
        site = make_admin_site(reactor, self.metrics, always_ready,
                               jwks=lambda: JWKS)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.base = "http://127.0.0.1:%d" % self.port.getHost().port

    async def test_scrapes_see_live_values(self):
        for expected in (1, 2):
            self.metrics.request_answered(201)
            response = await treq.get(self.base + "/metrics", pool=self.pool)
            self.assertEqual(response.code, 200)
            body = await response.text()
            self.assertIn('phantomd_requests_total{code="2xx"} %d.0'
                          % expected, body.splitlines())
        response = await treq.get(self.base + "/readyz", pool=self.pool)
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.json(), {"ready": True,
                                                 "reason": "ok"})

    async def test_head_gets_the_headers_and_no_warning(self):
        """HEAD /metrics (a load balancer's or curl -I's check): the
        headers of the GET, no body, and nothing in the log."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for path in ("/metrics", "/healthz", "/readyz", "/nothing"):
            get = await treq.get(self.base + path, pool=self.pool)
            body = await get.content()
            head = await treq.head(self.base + path, pool=self.pool)
            self.assertEqual(await head.content(), b"")
            self.assertEqual(head.code, get.code)
            self.assertEqual(head.headers.getRawHeaders("content-type"),
                             get.headers.getRawHeaders("content-type"))
            length = int(head.headers.getRawHeaders("content-length")[0])
            self.assertGreater(length, 0)
            if path != "/metrics":  # a scrape's own size may change
                self.assertEqual(length, len(body))
        web = [e for e in events if e.get("log_namespace", "").startswith(
            ("twisted.web.server", "twisted.web.http", "phantomd"))]
        self.assertEqual(web, [], [formatEvent(e) for e in web])


class BodyBoundTests(SynchronousTestCase):
    """Nothing on the admin listener takes a big body (POST /revoke reads
    8 KiB), and a body arrives before any bearer is checked: twisted.web
    would spool any size to a temporary file for anyone who can connect."""

    def connect(self):
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport
        site = make_admin_site(Clock(), Metrics(), always_ready)
        proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_huge_content_length_is_refused_before_the_body(self):
        proto, transport = self.connect()
        proto.dataReceived(b"POST /revoke HTTP/1.1\r\nHost: a\r\n"
                           b"Content-Length: 10000000000\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "),
                        transport.value())
        self.assertTrue(transport.disconnecting)

    def test_endless_chunked_body_is_cut_at_the_bound(self):
        proto, transport = self.connect()
        proto.dataReceived(b"POST /revoke HTTP/1.1\r\nHost: a\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            proto.dataReceived(b"1000\r\n" + b"x" * 4096 + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "),
                        transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)

    def test_small_body_still_reaches_the_resource(self):
        proto, transport = self.connect()
        proto.dataReceived(b"POST /metrics HTTP/1.1\r\nHost: a\r\n"
                           b"Content-Length: 5\r\n\r\nhello")
        self.assertNotIn(b" 413 ", transport.value())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 "))
