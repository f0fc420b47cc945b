"""Interop with a real OAuth server: Django OAuth Toolkit, over loopback.

``tests/interop/run_dot.py`` runs DOT (sqlite in a temporary directory) as a
child process on a port the kernel picks.  A password-grant token from it
goes through a real phantomd (``response = json``: phantomd mints the JWT
from DOT's RFC 7662 answer) to a recording API; the API must receive a JWT
that verifies against phantomd's published JWKS.  Then the token is revoked
at DOT and phantomd must answer 401.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile

from jwcrypto import jwk, jws
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

import treq
from treq.client import HTTPClient

from phantomd.token import jose
from phantomd.token.keysource import KeySource
from tests.helpers_fetch import TreqFetcher

try:
    import django  # noqa: F401
    import oauth2_provider  # noqa: F401
except ImportError:
    SKIP = ("Django OAuth Toolkit is not installed "
            "(pip install django-oauth-toolkit)")
else:
    SKIP = None

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "interop", "run_dot.py")
ISSUER = "https://phantomd.interop.test"
AUDIENCE = "https://api.interop.test"


class _DOTProcess(ProcessProtocol):
    """The launcher's first stdout line (JSON) fires ``ready``; its stderr is
    kept (bounded to the last 64 KiB) to explain a failed start."""

    def __init__(self, name: str = "Django OAuth Toolkit") -> None:
        self.name = name
        self.ready: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self._out = b""
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        if self.ready.called:
            return
        self._out += data
        if b"\n" in self._out:
            self.ready.callback(json.loads(self._out.split(b"\n")[0]))

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-65536:]

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(
                "%s launcher exited before serving: %s" % (
                    self.name, self.err.decode("utf-8", "replace")[-2000:])))
        self.ended.callback(None)


class _RecordingAPI(Resource):
    """The API behind phantomd: remembers every request's headers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, dict]] = []

    def render(self, request):
        self.requests.append((request.uri, {
            k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}))
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from the API"


class DjangoOAuthToolkitTests(TestCase):
    skip = SKIP

    @inlineCallbacks
    def setUp(self):
        self.state = tempfile.mkdtemp(prefix="phantomd-dot-")
        self.addCleanup(shutil.rmtree, self.state, True)
        self.dot = _DOTProcess()
        reactor.spawnProcess(self.dot, sys.executable,
                             [sys.executable, LAUNCHER, self.state],
                             env=dict(os.environ))
        self.addCleanup(self._stop_dot)
        self.dot.ready.addTimeout(60, reactor)
        self.info = yield self.dot.ready
        self.base = "http://127.0.0.1:%d" % self.info["port"]

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(pool.closeCachedConnections)

    def _stop_dot(self) -> Deferred:
        """Closing stdin stops the launcher; SIGKILL if it lingers."""
        if self.dot.ended.called:
            return self.dot.ended
        self.dot.transport.closeStdin()
        killer = reactor.callLater(10, self._kill)
        self.dot.ended.addCallback(
            lambda _: killer.cancel() if killer.active() else None)
        return self.dot.ended

    def _kill(self) -> None:
        try:
            self.dot.transport.signalProcess("KILL")
        except Exception:
            pass

    @inlineCallbacks
    def post(self, path, data, client):
        response = yield self.http.post(
            self.base + path, data=data,
            auth=(client["client_id"], client["client_secret"]), timeout=30)
        body = yield treq.content(response)
        return response.code, body

    @inlineCallbacks
    def new_token(self):
        user = self.info["user"]
        code, body = yield self.post("/o/token/", {
            "grant_type": "password", "username": user["username"],
            "password": user["password"], "scope": "read write"},
            self.info["webapp"])
        self.assertEqual(code, 200, body)
        return json.loads(body)["access_token"]

    @inlineCallbacks
    def introspect(self, token):
        code, body = yield self.post("/o/introspect/", {"token": token},
                                     self.info["gateway"])
        self.assertEqual(code, 200, body)
        return json.loads(body)

    @inlineCallbacks
    def revoke(self, token):
        code, body = yield self.post("/o/revoke_token/", {"token": token},
                                     self.info["webapp"])
        self.assertEqual(code, 200, body)

    def write_keys(self) -> str:
        fd, path = tempfile.mkstemp(suffix=".jwks", dir=self.state)
        os.close(fd)
        os.unlink(path)
        key = jwk.JWK.generate(kty="EC", crv="P-256", kid="interop-1")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [key.export(as_dict=True)]}, f)
        return path

    def verify(self, token: str, jwks_body: bytes) -> tuple[dict, dict]:
        keyset = jwk.JWKSet.from_json(jwks_body)
        checker = jws.JWS()
        checker.deserialize(token)
        kid = checker.jose_header["kid"]
        checker.verify(keyset.get_key(kid))
        return checker.jose_header, json.loads(checker.payload)

    @inlineCallbacks
    def test_minting_from_dot_introspection(self):
        """DOT's RFC 7662 answer (no sub, username, exp) mints a JWT that
        verifies against the published set."""
        token = yield self.new_token()
        answer = yield self.introspect(token)
        self.assertTrue(answer["active"])
        minter = jose.Minter.from_file(reactor, self.write_keys(), ISSUER,
                                       AUDIENCE, 300)
        jwt, claims = minter.mint(answer)
        header, payload = self.verify(jwt, minter.jwks_json())
        self.assertEqual(header["typ"], "at+jwt")
        self.assertEqual(payload, claims)
        self.assertEqual(
            (payload["sub"], payload["scope"], payload["client_id"],
             payload["iss"], payload["aud"]),
            ("alice", "read write", self.info["webapp"]["client_id"],
             ISSUER, AUDIENCE))
        self.assertLessEqual(payload["exp"], answer["exp"])
        yield self.revoke(token)
        answer = yield self.introspect(token)
        self.assertEqual(answer, {"active": False})

    @inlineCallbacks
    def test_discovered_jwks_verifies_dot_id_token(self):
        """KeySource finds DOT's keys from its issuer (OpenID discovery) and
        JWTVerifier accepts DOT's RS256 id_token, refusing a forged one."""
        user = self.info["user"]
        code, body = yield self.post("/o/token/", {
            "grant_type": "password", "username": user["username"],
            "password": user["password"], "scope": "openid read"},
            self.info["webapp"])
        self.assertEqual(code, 200, body)
        # DOT issues id_tokens on refresh, not on the password grant itself.
        code, body = yield self.post("/o/token/", {
            "grant_type": "refresh_token",
            "refresh_token": json.loads(body)["refresh_token"]},
            self.info["webapp"])
        self.assertEqual(code, 200, body)
        id_token = json.loads(body)["id_token"]

        issuer = self.base + "/o"
        keys = KeySource(reactor, TreqFetcher(self.http), issuer=issuer)
        claims = yield jose.JWTVerifier(reactor, keys).verify(id_token)
        self.assertEqual((claims["iss"], claims["aud"]),
                         (issuer, self.info["webapp"]["client_id"]))

        head, payload, signature = id_token.split(".")
        forged = dict(claims, sub="admin")
        forged_token = "%s.%s.%s" % (head, base64.urlsafe_b64encode(
            json.dumps(forged).encode()).rstrip(b"=").decode(), signature)
        error = yield self.assertFailure(
            jose.JWTVerifier(reactor, keys).verify(forged_token),
            jose.JOSEError)
        self.assertIn("bad signature", str(error))

    @inlineCallbacks
    def start_gateway(self, client_secret=None, client=None, intro="",
                      cache="max_ttl = 0\n"):
        """A real phantomd in front of a recording API, introspecting at DOT
        with ``response = json``; returns (api, front URL, admin URL).
        ``intro`` and ``cache`` are extra ini lines for those sections."""
        from phantomd.app import Gateway
        from phantomd.config import parse
        from phantomd.ops.metrics import Metrics

        api = _RecordingAPI()
        api_port = reactor.listenTCP(0, Site(api), interface="127.0.0.1")
        self.addCleanup(api_port.stopListening)
        gateway_client = dict(self.info[client or "gateway"])
        if client_secret is not None:
            gateway_client["client_secret"] = client_secret

        # [cache] max_ttl = 0: nothing is cached, so the revocation at DOT
        # is seen by the very next request (DOT sends no Cache-Control
        # either, and default_ttl is 0; max_ttl = 0 makes it certain).
        config = parse("""
[phantomd]
listen = tcp:0:interface=127.0.0.1
upstream = http://127.0.0.1:%(api)d
[introspection]
url = %(dot)s/o/introspect/
client_id = %(client_id)s
client_secret = %(client_secret)s
response = json
%(intro)s
[minting]
key_file = %(keys)s
issuer = %(issuer)s
audience = %(audience)s
[cache]
%(cache)s
[metrics]
listen = tcp:0:interface=127.0.0.1
""" % {"api": api_port.getHost().port, "dot": self.base,
       "keys": self.write_keys(), "issuer": ISSUER, "audience": AUDIENCE,
       "intro": intro, "cache": cache,
       **gateway_client}, os.path.join(self.state, "phantomd.ini"))
        gateway = Gateway(reactor, config, Metrics())
        yield gateway.start()
        self.addCleanup(gateway.stop)
        return (api,
                "http://127.0.0.1:%d" % gateway.front_ports[0].getHost().port,
                "http://127.0.0.1:%d" % gateway.admin_ports[0].getHost().port)

    @inlineCallbacks
    def test_gateway_swaps_dot_token_and_honours_revocation(self):
        api, front, admin = yield self.start_gateway()
        token = yield self.new_token()
        response = yield self.http.get(
            front + "/orders/42?x=1",
            headers={b"Authorization": [b"Bearer " + token.encode()]},
            timeout=30)
        body = yield treq.content(response)
        self.assertEqual((response.code, body), (200, b"hello from the API"))
        self.assertEqual(len(api.requests), 1)
        uri, headers = api.requests[0]
        self.assertEqual(uri, b"/orders/42?x=1")
        for values in headers.values():
            for value in values:
                self.assertNotIn(token.encode(), value)
        [authorization] = headers[b"authorization"]
        self.assertTrue(authorization.startswith(b"Bearer "))
        jwt = authorization[len(b"Bearer "):].decode()

        response = yield self.http.get(admin + "/.well-known/jwks.json",
                                       timeout=30)
        self.assertEqual(response.code, 200)
        jwks_body = yield treq.content(response)
        self.assertNotIn(b'"d"', jwks_body)
        header, claims = self.verify(jwt, jwks_body)
        self.assertEqual((header["typ"], header["kid"]),
                         ("at+jwt", "interop-1"))
        self.assertEqual(
            (claims["sub"], claims["scope"], claims["client_id"],
             claims["iss"], claims["aud"]),
            ("alice", "read write", self.info["webapp"]["client_id"],
             ISSUER, AUDIENCE))

        yield self.revoke(token)
        response = yield self.http.get(
            front + "/orders/42",
            headers={b"Authorization": [b"Bearer " + token.encode()]},
            timeout=30)
        yield treq.content(response)
        self.assertEqual(response.code, 401)
        [challenge] = response.headers.getRawHeaders(b"www-authenticate")
        self.assertIn(b'error="invalid_token"', challenge)
        self.assertEqual(len(api.requests), 1)

    @inlineCallbacks
    def test_gateway_with_wrong_client_secret_answers_502(self):
        """DOT answers bad client credentials with 403, not 401: phantomd
        must treat that as its own misconfiguration (502), not as an
        invalid token, and forward nothing."""
        api, front, _ = yield self.start_gateway(client_secret="wrong")
        token = yield self.new_token()
        response = yield self.http.get(
            front + "/orders/42",
            headers={b"Authorization": [b"Bearer " + token.encode()]},
            timeout=30)
        body = yield treq.content(response)
        self.assertEqual(response.code, 502, body)
        self.assertEqual(api.requests, [])

    @inlineCallbacks
    def get(self, front, token):
        response = yield self.http.get(
            front + "/orders/42",
            headers={b"Authorization": [b"Bearer " + token.encode()]},
            timeout=30)
        body = yield treq.content(response)
        return response.code, body

    @inlineCallbacks
    def test_secret_with_bang_and_plus_needs_form_encoding(self):
        """DOT form-decodes Basic credentials (RFC 6749 section 2.3.1): the
        secret ``Secr3t!+tail`` works with basic_auth_encoding = form (the
        default) and is refused raw (its '+' arrives as a space), and the
        log line then says to try form."""
        events = []
        from phantomd.token import introspection
        self.patch(introspection, "log", Logger(observer=events.append))
        token = yield self.new_token()
        api, front, _ = yield self.start_gateway(client="special")
        code, body = yield self.get(front, token)
        self.assertEqual(code, 200, body)

        api, front, _ = yield self.start_gateway(
            client="special", intro="basic_auth_encoding = raw")
        code, body = yield self.get(front, token)
        self.assertEqual(code, 502, body)
        self.assertEqual(api.requests, [])
        [line] = [formatEvent(e) for e in events
                  if "refused phantomd's client" in e["log_format"]]
        self.assertIn("HTTP 403", line)
        self.assertIn("try [introspection] basic_auth_encoding = form", line)
        self.assertNotIn(self.info["special"]["client_secret"], line)

    @inlineCallbacks
    def test_min_ttl_keeps_dot_answers_past_revocation(self):
        """DOT sends no freshness information on introspection answers, so
        nothing is cached by default (the revocation test above); with
        min_ttl the answer is kept, and a revocation at DOT then takes up
        to min_ttl to be seen (README's trade-off): the token still works
        from the cache."""
        api, front, _ = yield self.start_gateway(
            cache="max_ttl = 3600\nmin_ttl = 300\n")
        token = yield self.new_token()
        code, _ = yield self.get(front, token)
        self.assertEqual(code, 200)
        yield self.revoke(token)
        answer = yield self.introspect(token)
        self.assertEqual(answer, {"active": False})
        code, _ = yield self.get(front, token)
        self.assertEqual(code, 200)
        self.assertEqual(len(api.requests), 2)
        self.assertEqual(api.requests[0][1][b"authorization"],
                         api.requests[1][1][b"authorization"])
