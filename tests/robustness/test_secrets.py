"""No token, JWT or client secret escapes: not in a log event, not in the
metrics, not in any answer phantomd itself writes.

One full run drives every path that logs -- success, inactive, each kind of
token-service and upstream fault, framing errors, shedding, a token in the
query string with the access log on -- while an observer on
``globalLogPublisher`` keeps every event.  Hostile token-service answers
echo the token and the JWT back, so a log line quoting "what the token
service said" would leak them.
"""

from __future__ import annotations

import base64
import io
import json
from urllib.parse import quote

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from .fakes import (
    CLIENT_SECRET, Delayed, Hang, Raw, Reply, Scene, async_test, exchange,
    jwt_reply, make_jwt, new_token, request_bytes, response_head,
)


class Capture:
    """Every log event, rendered the ways an operator could see it."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event):
        self.events.append(event)

    def rendered(self) -> str:
        """formatEvent + failure tracebacks + phantomd's own observers."""
        out = []
        for e in self.events:
            try:
                out.append(formatEvent(e))
            except Exception as x:  # a broken format string is a bug too
                out.append("<unformattable %r>" % x)
            f = e.get("log_failure")
            if f is not None:
                out.append(f.getTraceback())
        try:
            from phantomd.ops import logs
        except ImportError:
            return "\n".join(out)
        for make in (lambda s: logs.JSONLinesObserver(s),
                     lambda s: logs.TextObserver(s)):
            stream = io.StringIO()
            observer = make(stream)
            for e in self.events:
                observer(e)
            out.append(stream.getvalue())
        return "\n".join(out)

    def fields(self) -> str:
        """Every plain field value of every event, recursively."""
        out = []

        def walk(v, depth=0):
            if depth > 5:
                return
            if isinstance(v, (str, bytes)):
                out.append(v if isinstance(v, str)
                           else v.decode("latin-1"))
            elif isinstance(v, dict):
                for k, x in v.items():
                    walk(k, depth + 1)
                    walk(x, depth + 1)
            elif isinstance(v, (list, tuple, set, frozenset)):
                for x in v:
                    walk(x, depth + 1)
            elif isinstance(v, BaseException):
                out.append(repr(v))
        for e in self.events:
            walk({k: v for k, v in e.items() if k != "log_logger"})
        return "\n".join(out)


class NoSecretsEscape(unittest.TestCase):
    timeout = 30

    async def full_run(self):
        """Drive every path; return the secrets used and what came out."""
        capture = Capture()
        globalLogPublisher.addObserver(capture)
        self.addCleanup(globalLogPublisher.removeObserver, capture)
        try:
            from phantomd.ops.logs import AccessLog
            access_log = AccessLog()
        except ImportError:
            access_log = None
        s = await Scene.build(self, reactor, access_log=access_log,
                              introspection={"max_in_flight": "2"})
        secrets = {"client secret": CLIENT_SECRET,
                   "client secret (form-encoded)": quote(CLIENT_SECRET,
                                                         safe=""),
                   "basic credentials": base64.b64encode(
                       ("gateway_client:" + CLIENT_SECRET).encode()).decode()}
        bodies = []

        def remember(label, token, jwt=None):
            secrets["token " + label] = token
            if jwt:
                secrets["jwt " + label] = jwt
                secrets["jwt signature " + label] = jwt.rsplit(".", 1)[1]

        async def ask(label, token, behaviour=None, jwt=None, **kw):
            remember(label, token, jwt)
            s.ts.behaviour = behaviour
            r = await s.get(token, **kw)
            bodies.append((label, r))
            return r

        token, jwt = s.good_token()
        self.assertEqual((await ask("good", token, jwt=jwt)).status, 200)
        self.assertEqual((await ask("good again", token, jwt=jwt)).status,
                         200)
        self.assertEqual((await ask("query", token, jwt=jwt,
                                    target="/r?access_token=" + token)
                          ).status, 200)
        self.assertEqual((await ask("inactive", new_token())).status, 401)

        def echoing(status):
            def answer(req):
                leak = make_jwt()
                remember("echoed %d" % status, new_token(), leak)
                body = json.dumps({"error": "bad", "token": req.token,
                                   "jwt": leak}).encode()
                return Reply(status, ((b"Content-Type",
                                       b"application/json"),), body)
            return answer
        for status in (500, 401, 400, 404, 503):
            r = await ask("fault %d" % status, new_token(), echoing(status))
            self.assertIn(r.status, (502, 503))
        leaked_jwt = make_jwt()
        r = await ask("html", new_token(), Reply(
            200, ((b"Content-Type", b"text/html"),),
            b"<p>" + leaked_jwt.encode() + b"</p>"), jwt=leaked_jwt)
        self.assertEqual(r.status, 502)
        # A signature long enough not to occur in any English message
        # ("sig" is in "unsigned").
        bad_jwt = "eyJhbGciOiJub25lIn0.%s.%s" % (new_token(), new_token())
        r = await ask("bad jwt", new_token(), jwt_reply(bad_jwt),
                      jwt=bad_jwt)
        self.assertEqual(r.status, 502)
        secrets["bad jwt whole"] = bad_jwt
        r = await ask("truncated", new_token(), Raw(response_head(
            200, [(b"Content-Length", 5000)]) + b"eyJ" + b"a" * 100))
        self.assertEqual(r.status, 502)
        r = await ask("timeout", new_token(), Hang())
        self.assertEqual(r.status, 504)
        expired = make_jwt(lifetime=-60)
        r = await ask("expired", new_token(), jwt_reply(expired),
                      jwt=expired)
        self.assertNotEqual(r.status, 200)

        # shedding: max_in_flight = 2, three slow introspections at once
        slow = Delayed(0.3, Reply(204))
        s.ts.behaviour = slow
        shed_tokens = [new_token() for _ in range(4)]
        for i, t in enumerate(shed_tokens):
            remember("shed %d" % i, t)
        from twisted.internet import defer
        rs = await defer.gatherResults([defer.ensureDeferred(s.get(t))
                                        for t in shed_tokens])
        bodies.extend(("shed", r) for r in rs)
        self.assertIn(503, [r.status for r in rs])
        s.ts.behaviour = None

        # upstream faults, with a good token
        s.api.behaviour = Raw(b"", then="reset")
        r = await ask("upstream reset", token, jwt=jwt)
        self.assertEqual(r.status, 502)
        s.api.behaviour = Hang()
        r = await ask("upstream hang", token, jwt=jwt)
        self.assertEqual(r.status, 504)
        s.api.behaviour = None

        # hostile clients carrying tokens
        hostile = [new_token() for _ in range(6)]
        for i, t in enumerate(hostile):
            remember("hostile %d" % i, t)
        raw_answers = []
        for label, data in (
                ("bad char", request_bytes(token=hostile[0] + "!",
                                           close=True)),
                ("two creds", request_bytes(
                    token=hostile[1], headers=[(
                        "Authorization", "Bearer " + hostile[2])],
                    close=True)),
                ("huge", request_bytes(token=hostile[3] * 3000,
                                       close=True)),
                ("framing", request_bytes(
                    "POST", token=hostile[4], body=b"x",
                    headers=[("Content-Length", "1"),
                             ("Transfer-Encoding", "chunked")],
                    close=True)),
                ("line too long", request_bytes(
                    target="/" + "p" * 20000, token=hostile[5],
                    close=True))):
            client = await exchange(reactor, s.front, data, 3.0)
            raw_answers.append((label, client.received))

        metrics = b""
        if s.gw.admin is not None:
            for path in ("/metrics", "/readyz", "/healthz", "/",
                         "/.well-known/jwks.json", "/nope"):
                client = await exchange(reactor, s.gw.admin, request_bytes(
                    target=path, close=True), 3.0)
                metrics += client.received
            self.assertIn(b"phantomd_requests_total", metrics)
        from prometheus_client import generate_latest
        metrics += generate_latest(s.gw.metrics.registry)
        return capture, secrets, bodies, raw_answers, metrics

    def assertNoSecret(self, where: str, text: str, secrets: dict,
                       allow=()):
        for label, secret in secrets.items():
            if label in allow:
                continue
            self.assertNotIn(secret, text, "%s contains the %s" % (
                where, label))

    @async_test
    async def test_nothing_leaks(self):
        capture, secrets, bodies, raw_answers, metrics = await self.full_run()
        self.assertTrue(capture.events, "no log events captured at all")
        self.assertNoSecret("the rendered logs", capture.rendered(), secrets)
        self.assertNoSecret("the metrics", metrics.decode("latin-1"),
                            secrets)
        for label, r in bodies:
            if r.status != 200:
                self.assertNoSecret(
                    "the error answer for %r" % label, r.body.decode(
                        "latin-1") + repr(r.headers), secrets)
            else:  # the API's answer; phantomd must add no JWT to it
                self.assertNoSecret("the headers for %r" % label,
                                    repr(r.headers), secrets)
        for label, raw in raw_answers:
            self.assertNoSecret("the raw answer to %r" % label,
                                raw.decode("latin-1"), secrets)
        self.assertBoundedLabels(metrics.decode("latin-1"))

    def assertBoundedLabels(self, text: str) -> None:
        """DESIGN section 5: label values come from fixed sets, never from
        requests, whatever the run threw at phantomd."""
        import re
        allowed = {
            "code": {"1xx", "2xx", "3xx", "4xx", "5xx"},
            "result": {"hit", "miss", "negative_hit",
                       # phantomd_shared_cache_lookups / _leases
                       "refused", "acquired", "waited", "expired"},
            "outcome": {"active", "inactive", "error", "timeout", "shed"},
        }
        for line in text.splitlines():
            if not line.startswith("phantomd_") or "{" not in line:
                continue
            for name, value in re.findall(r'(\w+)="([^"]*)"',
                                          line.split("}")[0]):
                if name == "le":
                    float(value.replace("+Inf", "inf"))
                elif name in allowed:
                    self.assertIn(value, allowed[name], line)
                else:
                    self.assertLess(len(value), 40, line)
                    self.assertNotIn("/", value, line)

    @async_test
    async def test_no_log_event_carries_a_secret_in_any_field(self):
        """Stricter: even fields a redacting observer would hide must not
        hold a secret (ARCHITECTURE: log token_id, never the token), since
        any other observer -- twistd's default, a test's -- sees them."""
        capture, secrets, _, _, _ = await self.full_run()
        self.assertNoSecret("a log event field", capture.fields(), secrets)


class NothingToAnImpostor(unittest.TestCase):
    """Over https, a peer whose certificate does not verify gets nothing:
    not the JWT (API), not the token or the client secret (token
    service).  The client gets 502."""

    timeout = 15

    async def build(self, api_trusted: bool, ts_trusted: bool,
                    api_host: str = "127.0.0.1"):
        import os
        from .fakes import (FakeAPI, TokenService, gateway_ini, self_signed,
                            start_gateway)
        base = os.path.abspath(self.mktemp())
        api_cert, api_key = self_signed(os.path.join(base, "api"))
        ts_cert, ts_key = self_signed(os.path.join(base, "ts"))
        stranger, _ = self_signed(os.path.join(base, "stranger"))
        self.api, self.ts = FakeAPI(reactor), TokenService(reactor)
        api_port = self.api.listen_tls(api_cert, api_key)
        ts_port = self.ts.listen_tls(ts_cert, ts_key)
        self.addCleanup(self.api.stop)
        self.addCleanup(self.ts.stop)
        ini = gateway_ini(ts_port, api_port, phantomd={
            "upstream": "https://%s:%d" % (api_host, api_port),
            "upstream_ca_file": api_cert if api_trusted else stranger,
        }, introspection={
            "url": "https://127.0.0.1:%d/introspect" % ts_port,
            "ca_file": ts_cert if ts_trusted else stranger,
        })
        self.gw = await start_gateway(self, reactor, ini)
        self.token = new_token()
        self.jwt = self.ts.activate(self.token)

    async def ask(self):
        from .fakes import get
        return await get(reactor, self.gw.front, self.token)

    @async_test
    async def test_trusted_both_ways_works(self):
        await self.build(True, True)
        self.assertEqual((await self.ask()).status, 200)
        self.assertEqual(self.api.requests[0].header(b"authorization"),
                         [b"Bearer " + self.jwt.encode()])

    @async_test
    async def test_untrusted_token_service_gets_nothing(self):
        await self.build(True, False)
        self.assertEqual((await self.ask()).status, 502)
        self.assertEqual(self.ts.requests, [])
        self.assertEqual(self.api.requests, [])

    @async_test
    async def test_untrusted_api_gets_no_jwt(self):
        await self.build(False, True)
        self.assertEqual((await self.ask()).status, 502)
        self.assertEqual(self.api.requests, [])

    @async_test
    async def test_api_certificate_for_another_name_gets_no_jwt(self):
        """The API's certificate is trusted but names 127.0.0.1, while
        the upstream URL says localhost: a name mismatch is refused."""
        await self.build(True, True, api_host="localhost")
        self.assertEqual((await self.ask()).status, 502)
        self.assertGreaterEqual(self.api.connections_made, 1,
                                "never reached the API: not a name check")
        self.assertEqual(self.api.requests, [])
