"""``twistd -n phantomd --demo``: phantomd between a demo token service and
an echo API, all on loopback ports chosen by the kernel.

The demo token service issues opaque tokens (``POST /token``) and
introspects them the way Curity does (``Accept: application/jwt``, the JWT is
the whole 200 body, 204 for unknown tokens, ``Cache-Control: max-age``).  The
echo API answers every request with what it received, so the JWT that
replaced the opaque token is visible.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
from collections import OrderedDict

from jwcrypto import jwk, jwt
from twisted.application import service
from twisted.web import resource, server

from phantomd import config as configmod

CLIENT_ID = "gateway_client"
CLIENT_SECRET = "demo-secret"
TOKEN_LIFETIME = 3600
MAX_TOKENS = 10000


class DemoTokenService(resource.Resource):
    """Issues and introspects opaque tokens.  At ``MAX_TOKENS`` issued
    tokens the oldest is forgotten (and so becomes inactive)."""

    isLeaf = True

    def __init__(self, clock) -> None:
        super().__init__()
        self.clock = clock
        self.key = jwk.JWK.generate(kty="EC", crv="P-256", kid="demo-1")
        self.tokens: "OrderedDict[str, dict]" = OrderedDict()
        self.introspections = 0

    def issue(self, scope: str = "read write", sub: str = "demo-user") -> str:
        token = secrets.token_urlsafe(24)
        now = int(self.clock.seconds())
        self.tokens[token] = {
            "sub": sub, "scope": scope, "client_id": "demo-app",
            "iat": now, "exp": now + TOKEN_LIFETIME,
        }
        while len(self.tokens) > MAX_TOKENS:
            self.tokens.popitem(last=False)
        return token

    def render_POST(self, request) -> bytes:
        path = request.path.rstrip(b"/")
        if path == b"/token":
            scope = request.args.get(b"scope", [b"read write"])[0].decode()
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return json.dumps({
                "access_token": self.issue(scope), "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME, "scope": scope}).encode()
        if path == b"/introspect":
            return self._introspect(request)
        request.setResponseCode(404)
        return b""

    def _introspect(self, request) -> bytes:
        expected = b"Basic " + base64.b64encode(
            ("%s:%s" % (CLIENT_ID, CLIENT_SECRET)).encode())
        if request.getHeader(b"authorization") != expected:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="demo"')
            return b""
        self.introspections += 1
        token = request.args.get(b"token", [b""])[0].decode("ascii",
                                                             "replace")
        claims = self.tokens.get(token)
        now = self.clock.seconds()
        if claims is None or claims["exp"] <= now:
            request.setResponseCode(204)
            request.setHeader(b"cache-control", b"max-age=10")
            return b""
        body = dict(claims, iss="https://demo-token-service.local",
                    jti=secrets.token_hex(8))
        t = jwt.JWT(header={"alg": "ES256", "kid": "demo-1", "typ": "JWT"},
                    claims=body)
        t.make_signed_token(self.key)
        request.setHeader(b"content-type", b"application/jwt")
        request.setHeader(b"cache-control", b"max-age=%d" % min(
            300, int(claims["exp"] - now)))
        return t.serialize().encode()


class EchoAPI(resource.Resource):
    """Answers every request with what it received, JWT claims decoded."""

    isLeaf = True

    def render(self, request) -> bytes:
        auth = (request.getHeader(b"authorization") or b"").decode("latin-1")
        claims = None
        if auth.startswith("Bearer "):
            try:
                payload = auth[7:].split(".")[1]
                claims = json.loads(base64.urlsafe_b64decode(
                    payload + "=" * (-len(payload) % 4)))
            except (IndexError, ValueError):
                claims = "not a JWT"
        request.setHeader(b"content-type", b"application/json")
        return (json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "authorization": auth,
            "jwt_claims": claims,
            "x_forwarded_for": (request.getHeader(b"x-forwarded-for")
                                or b"").decode(),
        }, indent=2) + "\n").encode()


DEMO_INI = """\
[phantomd]
listen = tcp:0:interface=127.0.0.1:backlog=1024
upstream = http://127.0.0.1:{api}
realm = demo
required_scopes = read

[introspection]
url = http://127.0.0.1:{tokens}/introspect
client_id = {client_id}
client_secret = {client_secret}
response = jwt

[metrics]
listen = tcp:0:interface=127.0.0.1:backlog=1024
"""


class DemoService(service.MultiService):
    def __init__(self, reactor, out=None) -> None:
        super().__init__()
        self.reactor = reactor
        self.out = out
        self.token_service = DemoTokenService(reactor)
        self.gateway = None
        self.ports: list = []

    def privilegedStartService(self) -> None:
        from phantomd.tap import GatewayService

        r = self.reactor
        self.ports.append(r.listenTCP(0, server.Site(self.token_service),
                                      interface="127.0.0.1"))
        self.ports.append(r.listenTCP(0, server.Site(EchoAPI()),
                                      interface="127.0.0.1"))
        text = DEMO_INI.format(
            api=self.ports[1].getHost().port,
            tokens=self.ports[0].getHost().port,
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
        cfg = configmod.parse(text, "<demo>")
        gs = GatewayService(r, cfg)
        gs.setServiceParent(self)
        super().privilegedStartService()
        self.gateway = gs.gateway
        self._announce()

    def stopService(self):
        d = super().stopService()
        for p in self.ports:
            p.stopListening()
        return d

    def _announce(self) -> None:
        front = self.gateway.front_ports[0].getHost().port
        metrics = self.gateway.admin_ports[0].getHost().port
        tokens = self.ports[0].getHost().port
        good = self.token_service.issue("read write")
        weak = self.token_service.issue("profile")
        base = "http://127.0.0.1:%d" % front
        text = f"""
phantomd demo is running.
  phantomd        {base}   (forwards to the echo API)
  token service   http://127.0.0.1:{tokens}   (POST /token, POST /introspect)
                  phantomd introspects as client_id={CLIENT_ID}
                  client_secret={CLIENT_SECRET} (HTTP Basic, client_secret_basic)
  metrics         http://127.0.0.1:{metrics}/metrics

Try these (each prints the status line first):

  # 200: the API received a JWT instead of the opaque token
  curl -si {base}/hello -H 'Authorization: Bearer {good}'

  # 401 invalid_token: a token the token service does not know
  curl -si {base}/hello -H 'Authorization: Bearer not-a-real-token'

  # 401 with a bare Bearer challenge: no token at all
  curl -si {base}/hello

  # 403 insufficient_scope: a real token without the required scope "read"
  curl -si {base}/hello -H 'Authorization: Bearer {weak}'

  # a fresh opaque token from the demo token service
  curl -s -X POST http://127.0.0.1:{tokens}/token -d scope=read

  # introspect a token yourself, with phantomd's credentials (the JWT it gets)
  curl -s -u {CLIENT_ID}:{CLIENT_SECRET} http://127.0.0.1:{tokens}/introspect -d token={good}

  # cache and introspection metrics
  curl -s http://127.0.0.1:{metrics}/metrics | grep '^phantomd_'

Stop with Ctrl-C.
"""
        out = self.out or sys.__stdout__
        out.write(text)
        out.flush()
