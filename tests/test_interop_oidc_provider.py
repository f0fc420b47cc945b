"""Interop with a second real OAuth server: node oidc-provider, over loopback.

``tests/interop/oidc_provider/server.mjs`` runs oidc-provider (panva's
certified OpenID Provider for Node.js; in memory) as a child process on a
port the kernel picks.  What it shows about DESIGN section 14's keys:

* it form-decodes Basic credentials (RFC 6749 section 2.3.1) and answers
  bad ones with 401: the secret ``Secr3t!+tail`` works with
  ``basic_auth_encoding = form`` and not raw, and the log line says so;
* it sends ``Cache-Control: no-store`` on every introspection answer, so
  nothing is cached unless ``[cache] min_ttl`` is set;
* it takes a ``private_key_jwt`` assertion whose one ``aud`` is the
  introspection URL or its issuer (``assertion_audience``).

Needs Node.js and ``npm ci --prefix tests/interop/oidc_provider``; skipped
with that reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from jwcrypto import jwk, jws
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

import treq
from treq.client import HTTPClient

from tests.test_interop_dot import _DOTProcess, _RecordingAPI

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interop",
                    "oidc_provider")
NODE = shutil.which("node")
ISSUER = "https://phantomd.interop.test"
AUDIENCE = "https://api.interop.test"

if NODE is None:
    SKIP = "Node.js is not installed (apt-get install nodejs npm)"
elif not os.path.isdir(os.path.join(HERE, "node_modules", "oidc-provider")):
    SKIP = ("oidc-provider is not installed "
            "(npm ci --prefix tests/interop/oidc_provider)")
else:
    SKIP = None


class OIDCProviderTests(TestCase):
    skip = SKIP

    @inlineCallbacks
    def setUp(self):
        self.state = tempfile.mkdtemp(prefix="phantomd-op-")
        self.addCleanup(shutil.rmtree, self.state, True)
        self.client_key = jwk.JWK.generate(kty="EC", crv="P-256",
                                           kid="gw-jwt")
        self.op = _DOTProcess("oidc-provider")
        reactor.spawnProcess(
            self.op, NODE,
            [NODE, "server.mjs", self.client_key.export_public()],
            env=dict(os.environ), path=HERE)
        self.addCleanup(self._stop_op)
        self.op.ready.addTimeout(60, reactor)
        self.info = yield self.op.ready
        self.base = self.info["issuer"]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(pool.closeCachedConnections)
        self.events = []
        from phantomd.token import introspection
        self.patch(introspection, "log",
                   Logger(observer=self.events.append))

    def _stop_op(self):
        if self.op.ended.called:
            return self.op.ended
        self.op.transport.closeStdin()
        killer = reactor.callLater(10, self._kill)
        self.op.ended.addCallback(
            lambda _: killer.cancel() if killer.active() else None)
        return self.op.ended

    def _kill(self):
        try:
            self.op.transport.signalProcess("KILL")
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
        code, body = yield self.post("/token", {
            "grant_type": "client_credentials", "scope": "read"},
            self.info["webapp"])
        self.assertEqual(code, 200, body)
        return json.loads(body)["access_token"]

    @inlineCallbacks
    def revoke(self, token):
        code, body = yield self.post("/token/revocation", {"token": token},
                                     self.info["webapp"])
        self.assertEqual(code, 200, body)

    def write(self, name, doc):
        path = os.path.join(self.state, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        return path

    @inlineCallbacks
    def start_gateway(self, intro="", cache=""):
        from phantomd.app import Gateway
        from phantomd.config import parse
        from phantomd.ops.metrics import Metrics

        api = _RecordingAPI()
        api_port = reactor.listenTCP(0, Site(api), interface="127.0.0.1")
        self.addCleanup(api_port.stopListening)
        n = len(os.listdir(self.state))
        keys = self.write("gateway-%d.jwks" % n, {"keys": [
            jwk.JWK.generate(kty="EC", crv="P-256",
                             kid="interop-1").export(as_dict=True)]})
        if "private_key_jwt" not in intro:
            intro = "client_secret = %s\n%s" % (
                self.info["gateway"]["client_secret"], intro)
            client_id = self.info["gateway"]["client_id"]
        else:
            client_id = self.info["jwt_gateway"]["client_id"]
        config = parse("""
[phantomd]
listen = tcp:0:interface=127.0.0.1
upstream = http://127.0.0.1:%(api)d
[introspection]
url = %(op)s/token/introspection
client_id = %(client_id)s
response = json
%(intro)s
[minting]
key_file = %(keys)s
issuer = %(issuer)s
audience = %(audience)s
[cache]
%(cache)s
[metrics]
listen =
""" % {"api": api_port.getHost().port, "op": self.base, "keys": keys,
       "issuer": ISSUER, "audience": AUDIENCE, "client_id": client_id,
       "intro": intro, "cache": cache},
            os.path.join(self.state, "phantomd-%d.ini" % n))
        gateway = Gateway(reactor, config, Metrics())
        yield gateway.start()
        self.addCleanup(gateway.stop)
        self.keys = keys
        return api, "http://127.0.0.1:%d" % (
            gateway.front_ports[0].getHost().port)

    @inlineCallbacks
    def get(self, front, token):
        response = yield self.http.get(
            front + "/orders/42",
            headers={b"Authorization": [b"Bearer " + token.encode()]},
            timeout=30)
        body = yield treq.content(response)
        return response.code, body

    def forwarded_claims(self, api):
        [authorization] = api.requests[-1][1][b"authorization"]
        with open(self.keys) as f:
            keyset = jwk.JWKSet.from_json(f.read())
        checker = jws.JWS()
        checker.deserialize(authorization[len(b"Bearer "):].decode())
        checker.verify(keyset.get_key("interop-1"))
        return json.loads(checker.payload)

    def credential_log(self):
        return [formatEvent(e) for e in self.events
                if "refused phantomd's client" in e["log_format"]]

    @inlineCallbacks
    def test_form_encoded_secret_with_bang_and_plus(self):
        token = yield self.new_token()
        api, front = yield self.start_gateway()
        code, body = yield self.get(front, token)
        self.assertEqual(code, 200, body)
        claims = self.forwarded_claims(api)
        # client-credentials tokens have no sub: phantomd uses client_id
        self.assertEqual(
            (claims["sub"], claims["scope"], claims["iss"], claims["aud"]),
            (self.info["webapp"]["client_id"], "read", ISSUER, AUDIENCE))
        self.assertEqual(self.credential_log(), [])

    @inlineCallbacks
    def test_raw_secret_refused_and_log_names_form(self):
        token = yield self.new_token()
        api, front = yield self.start_gateway("basic_auth_encoding = raw")
        code, body = yield self.get(front, token)
        self.assertEqual(code, 502, body)
        self.assertEqual(api.requests, [])
        [line] = self.credential_log()
        self.assertIn("HTTP 401", line)
        self.assertIn("try [introspection] basic_auth_encoding = form", line)
        self.assertNotIn(self.info["gateway"]["client_secret"], line)

    @inlineCallbacks
    def test_no_store_everywhere_and_min_ttl(self):
        """Without min_ttl a revocation is seen at once (nothing cached:
        no-store); with it the cached answer keeps the token working."""
        api, front = yield self.start_gateway()
        token = yield self.new_token()
        self.assertEqual((yield self.get(front, token))[0], 200)
        yield self.revoke(token)
        self.assertEqual((yield self.get(front, token))[0], 401)

        api, front = yield self.start_gateway(cache="min_ttl = 300")
        token = yield self.new_token()
        self.assertEqual((yield self.get(front, token))[0], 200)
        yield self.revoke(token)
        self.assertEqual((yield self.get(front, token))[0], 200)
        self.assertEqual(len(api.requests), 2)

    @inlineCallbacks
    def test_private_key_jwt_audience(self):
        """One aud string: the introspection URL by default, the issuer
        with assertion_audience; a wrong one is refused (401, 502)."""
        path = self.write("client.jwk", json.loads(
            self.client_key.export_private()))
        base = ("auth_method = private_key_jwt\nprivate_key_file = %s\n"
                "private_key_alg = ES256\n" % path)
        for extra, status in [
                ("", 200),
                ("assertion_audience = %s\n" % self.base, 200),
                ("assertion_audience = https://elsewhere.example\n", 502)]:
            token = yield self.new_token()
            api, front = yield self.start_gateway(base + extra)
            code, body = yield self.get(front, token)
            self.assertEqual(code, status, (extra, body))
