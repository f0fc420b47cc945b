"""Every ``[introspection] response`` form and every ``auth_method``, end to
end: a real phantomd ``Gateway`` on loopback between a fake token service
and a fake API (``tests.robustness.fakes``), asserting what a user sees.

* ``token-introspection+jwt`` (RFC 9701): the token service signs its answer
  with its own key and serves its JWKS (at ``jwks_url``, or found through
  ``{issuer}/.well-known/openid-configuration``); the API receives an
  ``at+jwt`` minted by phantomd that verifies against the JWKS phantomd
  publishes on its admin listener; forged, unsigned or misaddressed answers
  and an unreachable JWKS are 502 and reach nothing upstream.
* ``json`` (plain RFC 7662): phantomd mints the JWT.
* ``private_key_jwt`` (RFC 7523): the fake token service checks the client
  assertion as a real one would.
* ``tls_client_auth`` (RFC 8705) over https with a CA made here.
* ``verify_jwt = yes`` with ``response = jwt``.
* An https upstream trusted through ``upstream_ca_file``.

Keys and certificates are generated at run time; nothing secret is
committed.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Optional

from jwcrypto import jwk, jws, jwt as jcjwt
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.robustness.fakes import (
    LOOPBACK, FakeAPI, Reply, ServerConnection, TokenService, async_test,
    closed_port, gateway_ini, get, json_reply, jwt_reply, make_jwt,
    new_token, start_gateway)
from tests.test_tls import PKI

CLIENT_ID = "gateway_client"
INTROSPECT_PATH = "/oauth/v2/introspect"
JWKS_PATH = "/jwks"
MINT_ISSUER = "https://gateway.modes.test"
ADMIN_JWKS_PATH = "/.well-known/phantomd-jwks.json"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# Generous timeouts: two shared cores; only the answers matter here.
LENIENT = {"phantomd": {"header_timeout": "5", "idle_timeout": "10",
                        "upstream_timeout": "5",
                        "upstream_connect_timeout": "5"},
           "introspection": {"timeout": "5"}}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ec_key(kid: str) -> jwk.JWK:
    return jwk.JWK.generate(kty="EC", crv="P-256", kid=kid)


def sign(key: jwk.JWK, claims: dict, typ: str, alg: str = "ES256",
         kid: Optional[str] = None) -> str:
    header = {"alg": alg, "typ": typ, "kid": kid or key.get("kid")}
    token = jws.JWS(json.dumps(claims).encode())
    token.add_signature(key, alg, protected=json.dumps(header))
    return token.serialize(compact=True)


def unsigned(claims: dict, typ: str) -> str:
    header = {"alg": "none", "typ": typ}
    return "%s.%s." % (b64url(json.dumps(header).encode()),
                       b64url(json.dumps(claims).encode()))


def public_jwks(*keys: jwk.JWK) -> bytes:
    out = []
    for k in keys:
        entry = k.export_public(as_dict=True)
        entry.update(alg="ES256", use="sig")
        out.append(entry)
    return json.dumps({"keys": out}).encode()


def payload_of(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def header_of(token: str) -> dict:
    part = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def bearer_of(request) -> str:
    values = request.header(b"authorization")
    assert len(values) == 1, values
    scheme, _, credential = values[0].decode("ascii").partition(" ")
    assert scheme == "Bearer", scheme
    return credential


class _PeerRecordingConnection(ServerConnection):
    """Records the CN of the TLS client certificate of each request."""

    def dataReceived(self, data):
        try:
            cert = self.transport.getPeerCertificate()
        except AttributeError:
            cert = None
        if cert is not None:
            cn = cert.get_subject().CN
            if cn not in self.server.peer_cns:
                self.server.peer_cns.append(cn)
        super().dataReceived(data)


class ModesTokenService(TokenService):
    """A token service with an introspection endpoint (``answer(request)``
    gives the Behaviour), a JWKS endpoint and an OpenID discovery document.
    ``rejections`` lists why client assertions were refused."""

    def __init__(self, reactor, key: jwk.JWK) -> None:
        super().__init__(reactor, "jwt")
        self.key = key
        self.jwks_body = public_jwks(key)
        self.answer = None
        self.peer_cns: list = []
        self.client_key: Optional[jwk.JWK] = None  # private_key_jwt check
        self.jtis: set = set()
        self.rejections: list = []
        self.discovery_calls = 0
        self.jwks_calls = 0
        self.scheme = "http"

    def buildProtocol(self, addr):
        return _PeerRecordingConnection(self)

    @property
    def base(self) -> str:
        return "%s://%s:%d" % (self.scheme, LOOPBACK, self.portnum)

    @property
    def issuer(self) -> str:
        return self.base + "/as"

    @property
    def introspection_url(self) -> str:
        return self.base + INTROSPECT_PATH

    def introspections(self) -> list:
        return [r for r in self.requests
                if r.target.decode() == INTROSPECT_PATH]

    def behaviour_for(self, request):
        path = request.target.decode("latin-1")
        if path == JWKS_PATH:
            self.jwks_calls += 1
            return Reply(200, ((b"Content-Type", b"application/json"),),
                         self.jwks_body)
        if path == "/as/.well-known/openid-configuration":
            self.discovery_calls += 1
            return json_reply({"issuer": self.issuer,
                               "jwks_uri": self.base + JWKS_PATH,
                               "introspection_endpoint":
                                   self.introspection_url}, None)
        if path != INTROSPECT_PATH:
            return Reply(404)
        if self.client_key is not None:
            why = self.check_assertion(request)
            if why:
                self.rejections.append(why)
                return json_reply({"error": "invalid_client",
                                   "error_description": why}, None, 401)
        return self.answer(request)

    def check_assertion(self, request) -> Optional[str]:
        """RFC 7523 section 3, as a token service checks it."""
        form = request.form
        if form.get("client_assertion_type") != [ASSERTION_TYPE]:
            return "client_assertion_type"
        assertion = form.get("client_assertion", [""])[0]
        try:
            parsed = jcjwt.JWT(jwt=assertion, key=self.client_key,
                               algs=["ES256"], check_claims=False)
            claims = json.loads(parsed.claims)
        except Exception as e:
            return "signature (%s)" % type(e).__name__
        if claims.get("iss") != CLIENT_ID or claims.get("sub") != CLIENT_ID:
            return "iss/sub"
        if form.get("client_id", [CLIENT_ID]) != [CLIENT_ID]:
            return "client_id"
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if self.introspection_url not in auds:
            return "aud %r" % (aud,)
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or not now < exp <= now + 61:
            return "exp"
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or jti in self.jtis:
            return "jti"
        self.jtis.add(jti)
        return None


def introspection_claims(token_service: ModesTokenService, active=True,
                         **extra) -> dict:
    now = int(time.time())
    answer = {"active": active}
    if active:
        answer.update(sub="alice-%s" % os.urandom(3).hex(),
                      scope="read write", client_id="web-app",
                      exp=now + 600, iat=now)
    answer.update(extra)
    return answer


def rfc9701(token_service: ModesTokenService, answer: dict,
            key: Optional[jwk.JWK] = None, aud: str = CLIENT_ID,
            alg_none: bool = False) -> Reply:
    claims = {"iss": token_service.issuer, "aud": aud,
              "iat": int(time.time()), "token_introspection": answer}
    typ = "token-introspection+jwt"
    body = unsigned(claims, typ) if alg_none else sign(
        key or token_service.key, claims, typ)
    return Reply(200, ((b"Content-Type",
                        b"application/token-introspection+jwt"),
                       (b"Cache-Control", b"no-store")), body.encode())


class ModesCase(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ts = ModesTokenService(reactor, ec_key("ts-1"))
        self.api = FakeAPI(reactor)
        self.mint_key = ec_key("gw-1")
        self.key_file = self.write("mint.jwks", json.dumps(
            {"keys": [self.mint_key.export(as_dict=True)]}).encode())
        self.answers: dict = {}  # token -> Behaviour
        self.ts.answer = lambda request: self.answers.get(
            request.token, Reply(204, ((b"Cache-Control", b"no-store"),)))
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver,
                        self.events.append)

    def assert_logged(self, *fragments: str) -> None:
        """Some phantomd log line says why (each fragment appears)."""
        lines = [formatEvent(e) for e in self.events
                 if e.get("log_namespace", "").startswith("phantomd")]
        for line in lines:
            if all(f in line for f in fragments):
                return
        self.fail("no log line with %r in:\n%s" % (fragments,
                                                  "\n".join(lines)))

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def listen_ts(self, options=None) -> None:
        if options is None:
            self.ts.listen()
        else:
            self.ts.scheme = "https"
            self.ts.port = reactor.listenSSL(0, self.ts, options,
                                             interface=LOOPBACK)
        self.addCleanup(self.ts.stop)

    def listen_api(self, options=None) -> str:
        if options is None:
            self.api.listen()
            scheme = "http"
        else:
            self.api.port = reactor.listenSSL(0, self.api, options,
                                              interface=LOOPBACK)
            scheme = "https"
        self.addCleanup(self.api.stop)
        return "%s://%s:%d" % (scheme, LOOPBACK, self.api.portnum)

    async def gateway(self, response: str, upstream: Optional[str] = None,
                      **sections):
        """Start phantomd between ``self.ts`` (listening already) and
        ``self.api`` (listened here unless ``upstream`` is given)."""
        if self.ts.port is None:
            self.listen_ts()
        if upstream is None:
            upstream = self.listen_api()
        merged = {name: dict(keys) for name, keys in LENIENT.items()}
        merged["phantomd"]["upstream"] = upstream
        merged["introspection"]["url"] = self.ts.introspection_url
        if response in ("json", "token-introspection+jwt"):
            merged["minting"] = {"key_file": self.key_file,
                                 "issuer": MINT_ISSUER,
                                 "jwks_path": ADMIN_JWKS_PATH}
        for name, keys in sections.items():
            merged.setdefault(name, {}).update(keys)
        ini = gateway_ini(self.ts.portnum, 1, response, **merged)
        self.gw = await start_gateway(self, reactor, ini)
        return self.gw

    async def get(self, token: str):
        return await get(reactor, self.gw.front, token)

    async def phantomd_jwks(self) -> jwk.JWKSet:
        r = await get(reactor, self.gw.admin, target=ADMIN_JWKS_PATH)
        self.assertEqual(r.status, 200, r.body)
        published = r.json()["keys"]
        self.assertEqual([k["kid"] for k in published], ["gw-1"])
        for private in ("d", "p", "q", "dp", "dq", "qi", "k"):
            self.assertNotIn(private, published[0])
        return jwk.JWKSet.from_json(r.body)

    async def assert_minted(self, answer: dict) -> dict:
        """The API got exactly one request, carrying an at+jwt phantomd
        signed that verifies against phantomd's published JWKS and carries
        the introspection answer's identity."""
        self.assertEqual(len(self.api.requests), 1)
        minted = bearer_of(self.api.requests[0])
        keys = await self.phantomd_jwks()
        checked = jcjwt.JWT(jwt=minted, key=keys, algs=["ES256"],
                            check_claims={"iss": MINT_ISSUER,
                                          "exp": None})
        claims = json.loads(checked.claims)
        self.assertEqual(header_of(minted)["typ"], "at+jwt")
        self.assertEqual(header_of(minted)["kid"], "gw-1")
        for name in ("sub", "scope", "client_id"):
            self.assertEqual(claims[name], answer[name], name)
        self.assertLessEqual(claims["exp"], answer["exp"])
        return claims

    def assert_bad_gateway(self, r, api_before: int = 0):
        self.assertEqual(r.status, 502, r.body)
        self.assertEqual(r.json()["error"], "bad_gateway")
        self.assertEqual(r.first(b"cache-control"), b"no-store")
        self.assertEqual(len(self.api.requests), api_before)


class SignedAnswers(ModesCase):
    """response = token-introspection+jwt (RFC 9701)."""

    async def signed_gateway(self, discovery: bool = False, **introspection):
        self.listen_ts()
        keys = {"issuer": self.ts.issuer}
        if not discovery:
            keys["jwks_url"] = self.ts.base + JWKS_PATH
        keys.update(introspection)
        return await self.gateway("token-introspection+jwt",
                                  introspection=keys)

    async def active(self) -> tuple:
        token = new_token()
        answer = introspection_claims(self.ts)
        self.answers[token] = rfc9701(self.ts, answer)
        return token, answer

    @async_test
    async def test_active_answer_from_jwks_url(self):
        await self.signed_gateway()
        token, answer = await self.active()
        r = await self.get(token)
        self.assertEqual(r.status, 200, r.body)
        await self.assert_minted(answer)
        self.assertNotIn(token.encode(), self.api.requests[0].raw())
        intro = self.ts.introspections()
        self.assertEqual(len(intro), 1)
        self.assertEqual(intro[0].header(b"accept"),
                         [b"application/token-introspection+jwt"])
        self.assertEqual(self.ts.jwks_calls, 1)
        self.assertEqual(self.ts.discovery_calls, 0)

    @async_test
    async def test_active_answer_keys_discovered(self):
        await self.signed_gateway(discovery=True)
        token, answer = await self.active()
        r = await self.get(token)
        self.assertEqual(r.status, 200, r.body)
        await self.assert_minted(answer)
        self.assertEqual(self.ts.discovery_calls, 1)
        self.assertEqual(self.ts.jwks_calls, 1)

    @async_test
    async def test_inactive_answer_is_401(self):
        await self.signed_gateway()
        token = new_token()
        self.answers[token] = rfc9701(self.ts, {"active": False})
        r = await self.get(token)
        self.assertEqual(r.status, 401, r.body)
        self.assertIn(b'error="invalid_token"',
                      r.first(b"www-authenticate", b""))
        self.assertEqual(self.api.requests, [])

    @async_test
    async def test_unsigned_answer_is_502(self):
        await self.signed_gateway()
        token = new_token()
        self.answers[token] = rfc9701(
            self.ts, introspection_claims(self.ts), alg_none=True)
        self.assert_bad_gateway(await self.get(token))
        self.assertEqual(len(self.ts.introspections()), 1)
        self.assert_logged("did not verify", "unsigned (alg none)")

    async def signed_by_stranger(self, kid: str, why: str):
        await self.signed_gateway()
        token = new_token()
        self.answers[token] = rfc9701(
            self.ts, introspection_claims(self.ts), key=ec_key(kid))
        self.assert_bad_gateway(await self.get(token))
        self.assert_logged("did not verify", why)

    @async_test
    async def test_stranger_key_under_known_kid_is_502(self):
        """A key the JWKS does not hold, under the token service's kid:
        the signature itself must be checked."""
        await self.signed_by_stranger("ts-1", "bad signature")

    @async_test
    async def test_stranger_key_under_unknown_kid_is_502(self):
        await self.signed_by_stranger("rogue-1", "unknown key id 'rogue-1'")

    @async_test
    async def test_answer_for_another_client_is_502(self):
        await self.signed_gateway()
        token = new_token()
        self.answers[token] = rfc9701(
            self.ts, introspection_claims(self.ts), aud="someone_else")
        self.assert_bad_gateway(await self.get(token))
        self.assert_logged("did not verify", "does not name this client")

    @async_test
    async def test_jwks_down_is_502(self):
        await self.signed_gateway(
            jwks_url="http://%s:%d/jwks" % (LOOPBACK, closed_port(reactor)))
        token, _ = await self.active()
        self.assert_bad_gateway(await self.get(token))
        self.assertEqual(len(self.ts.introspections()), 1)
        self.assert_logged("did not verify", "keys unavailable")


class PlainAnswers(ModesCase):
    """response = json (plain RFC 7662): phantomd mints the JWT."""

    @async_test
    async def test_active_answer_minted(self):
        await self.gateway("json")
        token = new_token()
        answer = introspection_claims(self.ts)
        self.answers[token] = json_reply(answer)
        r = await self.get(token)
        self.assertEqual(r.status, 200, r.body)
        await self.assert_minted(answer)
        self.assertEqual(self.ts.introspections()[0].header(b"accept"),
                         [b"application/json"])


class PrivateKeyJWT(ModesCase):
    """auth_method = private_key_jwt (RFC 7523)."""

    async def pkjwt_gateway(self, key: jwk.JWK):
        path = self.write("client.jwk", key.export(private_key=True)
                          .encode())
        return await self.gateway("jwt", introspection={
            "auth_method": "private_key_jwt", "client_secret": "",
            "private_key_file": path, "private_key_alg": "ES256"})

    @async_test
    async def test_accepted_assertion(self):
        client_key = ec_key("client-1")
        self.ts.client_key = jwk.JWK(**client_key.export_public(
            as_dict=True))
        await self.pkjwt_gateway(client_key)
        for _ in range(2):  # two introspections: a fresh jti each
            token = new_token()
            issued = make_jwt()
            self.answers[token] = jwt_reply(issued)
            r = await self.get(token)
            self.assertEqual(r.status, 200, (r.body, self.ts.rejections))
            self.assertEqual(bearer_of(self.api.requests[-1]), issued)
        self.assertEqual(self.ts.rejections, [])
        self.assertEqual(len(self.ts.jtis), 2)
        for request in self.ts.introspections():
            self.assertNotIn(b"authorization", request.header_names())
            self.assertNotIn("client_secret", request.form)

    @async_test
    async def test_wrong_key_is_502(self):
        self.ts.client_key = jwk.JWK(**ec_key("client-1").export_public(
            as_dict=True))
        await self.pkjwt_gateway(ec_key("client-1"))
        token = new_token()
        self.answers[token] = jwt_reply(make_jwt())
        self.assert_bad_gateway(await self.get(token))
        self.assertEqual(len(self.ts.rejections), 1)
        self.assertTrue(self.ts.rejections[0].startswith("signature"),
                        self.ts.rejections)
        self.assert_logged("refused phantomd's client credentials",
                           "HTTP 401", "auth_method=private_key_jwt")


class TLSClientAuth(ModesCase):
    """auth_method = tls_client_auth over https (RFC 8705)."""

    def setUp(self):
        super().setUp()
        self.pki = PKI(os.path.join(self.dir, "pki"))
        cert, key, _ = self.pki.issue("token-service", ips=["127.0.0.1"])
        self.client_cert, self.client_key, _ = self.pki.issue(
            "gateway-client-cert", client=True)
        self.listen_ts(self.pki.server_options(cert, key,
                                               require_client_cert=True))

    async def mtls_gateway(self, ca_file: str):
        return await self.gateway("jwt", introspection={
            "auth_method": "tls_client_auth", "client_secret": "",
            "ca_file": ca_file, "client_cert": self.client_cert,
            "client_key": self.client_key})

    @async_test
    async def test_client_certificate_accepted(self):
        await self.mtls_gateway(self.pki.ca_file)
        token, issued = new_token(), make_jwt()
        self.answers[token] = jwt_reply(issued)
        r = await self.get(token)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(bearer_of(self.api.requests[0]), issued)
        self.assertEqual(self.ts.peer_cns, ["gateway-client-cert"])
        form = self.ts.introspections()[0].form
        self.assertEqual(form["client_id"], [CLIENT_ID])
        self.assertEqual(form["token"], [token])
        self.assertNotIn("client_secret", form)

    @async_test
    async def test_unknown_ca_is_502(self):
        other = PKI(os.path.join(self.dir, "other"), name="another CA")
        await self.mtls_gateway(other.ca_file)
        token = new_token()
        self.answers[token] = jwt_reply(make_jwt())
        self.assert_bad_gateway(await self.get(token))
        # The handshake failed: not one byte of the request (token, client
        # id) reached the token service's application layer.
        self.assertEqual(self.ts.requests, [])
        self.assertEqual(self.ts.bytes_received, 0)
        self.assert_logged("TLS handshake failed")


class VerifiedJWT(ModesCase):
    """response = jwt with verify_jwt = yes."""

    async def verifying_gateway(self):
        self.listen_ts()
        return await self.gateway("jwt", introspection={
            "verify_jwt": "yes", "jwks_url": self.ts.base + JWKS_PATH})

    def jwt_signed_by(self, key: jwk.JWK) -> str:
        now = int(time.time())
        return sign(key, {"iss": "https://login.modes.test", "sub": "bob",
                          "scope": "read", "iat": now, "exp": now + 600},
                    "at+jwt")

    @async_test
    async def test_token_service_key_passes(self):
        await self.verifying_gateway()
        token, issued = new_token(), self.jwt_signed_by(self.ts.key)
        self.answers[token] = jwt_reply(issued)
        r = await self.get(token)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(bearer_of(self.api.requests[0]), issued)

    @async_test
    async def test_other_key_is_502(self):
        await self.verifying_gateway()
        token = new_token()
        self.answers[token] = jwt_reply(self.jwt_signed_by(ec_key("ts-1")))
        self.assert_bad_gateway(await self.get(token))
        self.assert_logged("JWT did not verify", "bad signature")


class HTTPSUpstream(ModesCase):
    """[phantomd] upstream_ca_file: the API served over TLS."""

    def setUp(self):
        super().setUp()
        self.pki = PKI(os.path.join(self.dir, "pki"))

    async def https_gateway(self, server_pki: PKI):
        cert, key, _ = server_pki.issue("api", ips=["127.0.0.1"])
        upstream = self.listen_api(server_pki.server_options(cert, key))
        return await self.gateway("jwt", upstream=upstream, phantomd={
            "upstream_ca_file": self.pki.ca_file})

    def active(self) -> tuple:
        token, issued = new_token(), make_jwt()
        self.answers[token] = jwt_reply(issued)
        return token, issued

    @async_test
    async def test_trusted_upstream_gets_the_jwt(self):
        await self.https_gateway(self.pki)
        token, issued = self.active()
        r = await self.get(token)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json()["ok"], True)
        self.assertEqual(bearer_of(self.api.requests[0]), issued)

    @async_test
    async def test_upstream_from_another_ca_is_502(self):
        await self.https_gateway(PKI(os.path.join(self.dir, "other"),
                                     name="another CA"))
        token, _ = self.active()
        self.assert_bad_gateway(await self.get(token))
        self.assertEqual(self.api.bytes_received, 0)
