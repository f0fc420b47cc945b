"""Tests for phantomd.token.introspection against an in-memory token service
(treq.testing.StubTreq, through tests.helpers_fetch) and a Clock: every response form, every status row,
each client authentication method's wire form, body framing and bounds,
timeouts."""

from __future__ import annotations

import base64
import json
from typing import Any, Optional
from urllib.parse import parse_qsl

from jwcrypto import jwk, jwt
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from phantomd import config

from phantomd.token import introspection, jose
from phantomd.token.introspection import Introspector
from tests.helpers_fetch import TreqFetcher
from phantomd.token.outcomes import Active, Inactive, IntrospectionFailed

URL = "https://login.example.com/oauth/v2/introspect"
NOW = 1_700_000_000
TOKEN = "opaque-Token_123"
SECRET = "S3cr:t +%\u00e9"

SIGNING_KEY = jwk.JWK.generate(kty="EC", crv="P-256", kid="ts")


def make_jwt(**claims: Any) -> str:
    body = {"sub": "alice", "scope": "read", "iat": NOW, "exp": NOW + 300}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    token = jwt.JWT(header={"alg": "ES256", "kid": "ts"}, claims=body)
    token.make_signed_token(SIGNING_KEY)
    return token.serialize()


def make_settings(**overrides: Any) -> config.Section:
    cfg = config.parse(
        "[phantomd]\nupstream = http://127.0.0.1:3000\n"
        "[introspection]\nurl = %s\nclient_id = gateway client\n"
        "client_secret = x\n" % URL)
    values = dict(cfg.introspection._values)
    values.update(overrides)
    return config.Section("introspection", values)


class Seen:
    def __init__(self, request: Any) -> None:
        self.method = request.method
        self.uri = request.uri
        self.headers = {k.lower(): v for k, v in
                        request.requestHeaders.getAllRawHeaders()}
        self.raw = request.content.read()
        self.form = parse_qsl(self.raw.decode("ascii"), strict_parsing=True)


class TokenService(Resource):
    """Answers with ``status``, ``headers`` and ``body``; ``body`` None
    hangs; a list is written chunk by chunk (chunked encoding), ending the
    answer only if ``finish`` is true."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Seen] = []
        self.pending: list[Any] = []
        self.lost: list[Any] = []
        self.answer(200, b"", content_type=None)

    def answer(self, status: int, body: Any = b"",
               content_type: Optional[str] = "application/jwt",
               finish: bool = True, **headers: str) -> None:
        self.status, self.body, self.finish = status, body, finish
        self.headers = dict(headers)
        self.content_type = content_type

    def render_POST(self, request: Any) -> Any:
        self.requests.append(Seen(request))
        request.notifyFinish().addErrback(self.lost.append)
        request.setResponseCode(self.status)
        request.defaultContentType = None
        if self.content_type is not None:
            request.setHeader("Content-Type", self.content_type)
        for name, value in self.headers.items():
            request.setHeader(name.replace("_", "-"), value)
        if self.body is None:
            self.pending.append(request)
            return NOT_DONE_YET
        if isinstance(self.body, list):
            for chunk in self.body:
                request.write(chunk)
            if self.finish:
                request.finish()
            else:
                self.pending.append(request)
            return NOT_DONE_YET
        return self.body


class FakeVerifier:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.seen: list[Any] = []

    def verify(self, value: Any) -> Deferred:
        self.seen.append(value)
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(self.result)


class IntrospectorTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.service = TokenService()
        self.stub = StubTreq(self.service)
        self.events: list[dict] = []
        self.patch(introspection, "log",
                   Logger(observer=self.events.append))

    def introspector(self, secret: Optional[str] = "x", **settings: Any
                     ) -> Introspector:
        extra = {k: settings.pop(k) for k in
                 ("minter", "response_verifier", "jwt_verifier")
                 if k in settings}
        return Introspector(self.clock, TreqFetcher(self.stub),
                            make_settings(**settings),
                            secret, **extra)

    def outcome(self, intro: Introspector, token: str = TOKEN) -> Any:
        d = intro.introspect(token)
        self.stub.flush()
        return self.successResultOf(d)

    def failure(self, intro: Introspector, kind: str,
                token: str = TOKEN) -> IntrospectionFailed:
        d = intro.introspect(token)
        self.stub.flush()
        e = self.failureResultOf(d, IntrospectionFailed).value
        self.assertEqual(e.kind, kind, e.description)
        return e

    def assertNothingSecretLogged(self, *secrets: str) -> None:
        text = repr(self.events)
        for s in (TOKEN,) + secrets:
            self.assertNotIn(s, text)


class WireFormTests(IntrospectorTestCase):
    """What the token service receives."""

    def setUp(self) -> None:
        super().setUp()
        self.service.answer(204)

    def test_basic(self):
        intro = self.introspector(secret=SECRET)
        self.assertIsInstance(self.outcome(intro), Inactive)
        [seen] = self.service.requests
        self.assertEqual(seen.method, b"POST")
        self.assertEqual(seen.uri, b"/oauth/v2/introspect")
        self.assertEqual(seen.form, [("token", TOKEN)])
        self.assertEqual(seen.headers[b"content-type"],
                         [b"application/x-www-form-urlencoded"])
        self.assertEqual(seen.headers[b"accept"], [b"application/jwt"])
        self.assertEqual(seen.headers[b"authorization"], [
            b"Basic " + base64.b64encode(
                b"gateway+client:S3cr%3At+%2B%25%C3%A9")])
        self.assertNotIn(b"cookie", seen.headers)

    def test_token_with_form_special_characters(self):
        """A b64token may hold + / =, which a form must escape."""
        intro = self.introspector(auth_method="client_secret_post")
        for token in ("a+b/c==", "plain-token_1.2~3", "x%2By"):
            self.outcome(intro, token)
            self.assertEqual(self.service.requests[-1].form[0],
                             ("token", token))
            self.assertEqual(self.service.requests[-1].form[1:], [
                ("client_id", "gateway client"), ("client_secret", "x")])

    def test_token_type_hint(self):
        self.outcome(self.introspector(token_type_hint="access_token"))
        self.assertEqual(self.service.requests[0].form, [
            ("token", TOKEN), ("token_type_hint", "access_token")])

    def test_post(self):
        self.outcome(self.introspector(secret=SECRET,
                                       auth_method="client_secret_post"))
        [seen] = self.service.requests
        self.assertNotIn(b"authorization", seen.headers)
        self.assertEqual(seen.form, [("token", TOKEN),
                                     ("client_id", "gateway client"),
                                     ("client_secret", SECRET)])

    def test_tls_client_auth(self):
        self.outcome(self.introspector(secret=None,
                                       auth_method="tls_client_auth"))
        [seen] = self.service.requests
        self.assertNotIn(b"authorization", seen.headers)
        self.assertEqual(seen.form, [("token", TOKEN),
                                     ("client_id", "gateway client")])

    def test_private_key_jwt(self):
        key = jwk.JWK.generate(kty="RSA", size=2048, kid="gw-1")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(key.export_private())
        intro = self.introspector(secret=None, auth_method="private_key_jwt",
                                  private_key_file=path,
                                  issuer="https://login.example.com")
        self.outcome(intro)
        self.outcome(intro)
        assertions = []
        for seen in self.service.requests:
            form = dict(seen.form)
            self.assertNotIn(b"authorization", seen.headers)
            self.assertEqual(form["client_assertion_type"],
                             "urn:ietf:params:oauth:client-assertion-type:"
                             "jwt-bearer")
            checked = jwt.JWT(jwt=form["client_assertion"], key=key,
                              algs=["RS256"], check_claims=False)
            assertions.append(json.loads(checked.claims))
        first, second = assertions
        self.assertEqual(first["iss"], "gateway client")
        self.assertEqual(first["sub"], "gateway client")
        # one string, even with issuer set (servers refuse a list)
        self.assertEqual(first["aud"], URL)
        self.assertLessEqual(first["exp"] - first["iat"], 60)
        self.assertEqual(first["iat"], NOW)
        self.assertNotEqual(first["jti"], second["jti"])

    def test_accept_per_response_form(self):
        minter = jose.Minter(self.clock, [jwk.JWK.generate(
            kty="EC", crv="P-256")], "https://gw.example", None, 60)
        for mode, accept in introspection.ACCEPT.items():
            self.service.requests.clear()
            intro = self.introspector(response=mode, minter=minter,
                                      response_verifier=FakeVerifier({}))
            d = intro.introspect(TOKEN)
            self.stub.flush()
            d.addErrback(lambda f: f.trap(IntrospectionFailed))
            self.assertEqual(self.service.requests[0].headers[b"accept"],
                             [accept], mode)

    def test_missing_collaborators(self):
        for kw, message in [
                (dict(response="json"), "minter"),
                (dict(response="token-introspection+jwt", minter=object()),
                 "response verifier"),
                (dict(verify_jwt=True), "JWT verifier")]:
            e = self.assertRaises(ValueError, self.introspector, **kw)
            self.assertIn(message, str(e))


class JWTFormTests(IntrospectorTestCase):
    def test_active(self):
        token = make_jwt()
        self.service.answer(200, token.encode(), Cache_Control="max-age=60")
        intro = self.introspector()
        self.assertIsNone(intro.last_success)
        result = self.outcome(intro)
        self.assertEqual(result, Active(token, jose.unverified_claims(
            token, NOW), 60.0))
        self.assertEqual(intro.last_success, NOW)
        self.assertNothingSecretLogged(token)

    def test_trailing_newline_and_charset(self):
        token = make_jwt()
        self.service.answer(200, token.encode() + b"\r\n",
                            content_type="Application/JWT; charset=utf-8")
        self.assertEqual(self.outcome(self.introspector()).jwt, token)

    def test_no_freshness_information(self):
        self.service.answer(200, make_jwt().encode())
        self.assertIsNone(self.outcome(self.introspector()).lifetime)

    def test_no_store(self):
        self.service.answer(200, make_jwt().encode(), Cache_Control="no-store")
        self.assertEqual(self.outcome(self.introspector()).lifetime, 0)

    def test_inactive_204(self):
        self.service.answer(204, Cache_Control="max-age=10")
        intro = self.introspector()
        self.assertEqual(self.outcome(intro), Inactive(10.0))
        self.assertEqual(intro.last_success, NOW)

    def test_inactive_json(self):
        self.service.answer(200, b'{"active": false}',
                            content_type="application/json")
        self.assertEqual(self.outcome(self.introspector()), Inactive(None))

    def test_unusable_answers(self):
        cases = [
            ("active JSON", 200, b'{"active": true}', "application/json",
             "active JSON"),
            ("JSON without active", 200, b'{}', "application/json",
             "no \"active\""),
            ("string active", 200, b'{"active": "false"}', "application/json",
             "non-boolean"),
            ("bad JSON", 200, b'{"active": fa', "application/json",
             "malformed JSON"),
            ("wrong type", 200, make_jwt().encode(), "text/plain",
             "Content-Type text/plain"),
            ("no type", 200, make_jwt().encode(), None, "Content-Type (none"),
            ("expired", 200, make_jwt(exp=NOW - 1).encode(),
             "application/jwt", "expired"),
            ("no exp", 200, make_jwt(exp=None).encode(), "application/jwt",
             "exp"),
            ("not yet valid", 200, make_jwt(nbf=NOW + 3600).encode(),
             "application/jwt", "nbf"),
            ("not a JWT", 200, b"hello", "application/jwt", "unusable JWT"),
            ("empty", 200, b"", "application/jwt", "unusable JWT"),
            ("not ASCII", 200, b"\xff\xfe", "application/jwt", "not ASCII"),
        ]
        intro = self.introspector()
        for name, status, body, ctype, message in cases:
            self.service.answer(status, body, content_type=ctype)
            e = self.failure(intro, "error")
            self.assertIn(message, e.description, name)
        self.assertIsNone(intro.last_success)
        self.assertNothingSecretLogged()

    def test_verify_jwt(self):
        token = make_jwt()
        self.service.answer(200, token.encode())
        verifier = FakeVerifier({"sub": "verified"})
        result = self.outcome(self.introspector(verify_jwt=True,
                                                jwt_verifier=verifier))
        self.assertEqual(result.claims, {"sub": "verified"})
        self.assertEqual(verifier.seen, [token])

    def test_verify_jwt_refused(self):
        self.service.answer(200, make_jwt().encode())
        verifier = FakeVerifier(jose.JOSEError("signature mismatch"))
        e = self.failure(self.introspector(verify_jwt=True,
                                           jwt_verifier=verifier), "error")
        self.assertIn("signature mismatch", e.description)


class PhantomTokenFormTests(IntrospectorTestCase):
    def answer(self, doc: Any) -> None:
        self.service.answer(200, json.dumps(doc).encode(),
                            content_type="application/json",
                            Cache_Control="max-age=30")

    def test_active(self):
        token = make_jwt()
        self.answer({"active": True, "phantom_token": token, "sub": "x"})
        result = self.outcome(self.introspector(response="phantom_token"))
        self.assertEqual((result.jwt, result.claims["sub"], result.lifetime),
                         (token, "alice", 30.0))

    def test_inactive(self):
        self.answer({"active": False})
        self.assertEqual(self.outcome(self.introspector(
            response="phantom_token")), Inactive(30.0))

    def test_unusable(self):
        intro = self.introspector(response="phantom_token")
        for doc, message in [
                ({"active": True}, "without a phantom_token"),
                ({"active": True, "phantom_token": 7}, "without a phantom"),
                ({"active": True, "phantom_token": "x.y.z"}, "unusable JWT"),
                ({"active": 1}, "non-boolean"),
                ({"phantom_token": make_jwt()}, "no \"active\""),
                ([True], "not an object"),
                ({"active": True, "phantom_token":
                  make_jwt(exp=NOW - 10)}, "expired"),
                ({"active": True, "phantom_token": make_jwt() + "\r\n"},
                 "not a compact JWS"),
                ({"active": True, "phantom_token": " " + make_jwt()},
                 "not a compact JWS")]:
            self.answer(doc)
            self.assertIn(message, self.failure(intro, "error").description)
        self.service.answer(200, make_jwt().encode())
        self.assertIn("expected application/json",
                      self.failure(intro, "error").description)

    def test_deep_json(self):
        self.service.answer(200, b"[" * 50000, content_type="application/json")
        self.failure(self.introspector(response="phantom_token",
                                       max_response_bytes=65536), "error")


class MintingFormTests(IntrospectorTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.key = jwk.JWK.generate(kty="EC", crv="P-256", kid="gw")
        self.minter = jose.Minter(self.clock, [self.key],
                                  "https://gw.example", None, 300)

    def test_json_active(self):
        self.service.answer(200, json.dumps({
            "active": True, "sub": "alice", "scope": "read write",
            "exp": NOW + 100}).encode(), content_type="application/json")
        result = self.outcome(self.introspector(response="json",
                                                minter=self.minter))
        checked = jwt.JWT(jwt=result.jwt, key=self.key, algs=["ES256"],
                          check_claims=False)
        claims = json.loads(checked.claims)
        self.assertEqual(claims, dict(result.claims))
        self.assertEqual((claims["sub"], claims["scope"], claims["exp"],
                          claims["iss"]),
                         ("alice", "read write", NOW + 100,
                          "https://gw.example"))

    def test_json_inactive_and_unusable(self):
        intro = self.introspector(response="json", minter=self.minter)
        self.service.answer(200, b'{"active": false}',
                            content_type="application/json")
        self.assertEqual(self.outcome(intro), Inactive(None))
        for body, message in [
                (b'{"active": true, "exp": %d}' % (NOW - 5), "expired"),
                (b'{"active": "yes"}', "non-boolean"),
                (b'{"active": true, "exp": "soon"}', "not a number")]:
            self.service.answer(200, body, content_type="application/json")
            self.assertIn(message, self.failure(intro, "error").description)
        # inactive_statuses (default 204) holds in every response form
        self.service.answer(204)
        self.assertEqual(self.outcome(intro), Inactive(None))
        self.service.answer(404)
        self.assertIn("HTTP 404", self.failure(intro, "error").description)

    def test_signed_answer(self):
        verifier = FakeVerifier({"active": True, "sub": "bob",
                                 "exp": NOW + 60})
        self.service.answer(200, b"signed.answer.body",
                            content_type="application/token-introspection+jwt",
                            Cache_Control="max-age=5")
        result = self.outcome(self.introspector(
            response="token-introspection+jwt", minter=self.minter,
            response_verifier=verifier, issuer="https://login.example.com"))
        self.assertEqual(verifier.seen, [b"signed.answer.body"])
        self.assertEqual((result.claims["sub"], result.lifetime), ("bob", 5))

    def test_signed_answer_inactive_and_refused(self):
        self.service.answer(200, b"a.b.c",
                            content_type="application/token-introspection+jwt")
        verifier = FakeVerifier({"active": False})
        kw = dict(response="token-introspection+jwt", minter=self.minter,
                  response_verifier=verifier, issuer="https://login.ex")
        self.assertEqual(self.outcome(self.introspector(**kw)),
                         Inactive(None))
        verifier.result = jose.JOSEError("iss is 'x'")
        self.assertIn("did not verify: iss is 'x'", self.failure(
            self.introspector(**kw), "error").description)
        self.service.answer(200, b'{"active": false}',
                            content_type="application/json")
        self.assertIn("expected application/token-introspection+jwt",
                      self.failure(self.introspector(**kw),
                                   "error").description)


class StatusTests(IntrospectorTestCase):
    def test_status_table(self):
        for status, kind in [(500, "error"), (502, "error"), (504, "error"),
                             (400, "error"), (404, "error"), (302, "error"),
                             (201, "error"), (429, "error"),
                             (503, "unavailable")]:
            self.service.requests.clear()
            self.service.answer(status, b"oops", content_type="text/plain",
                                Location="https://elsewhere.example/")
            e = self.failure(self.introspector(), kind)
            self.assertIn("HTTP %d" % status, e.description)
            self.assertEqual(len(self.service.requests), 1,
                             "a redirect was followed")

    def test_credentials_refused(self):
        for status in (401, 403):
            self.events.clear()
            self.clock.advance(introspection.LOG_INTERVAL)
            self.service.answer(status, b'{"error":"invalid_client"}',
                                content_type="application/json")
            e = self.failure(self.introspector(secret=SECRET), "error")
            self.assertIn("refused phantomd's client credentials",
                          e.description)
            [event] = self.events
            self.assertEqual(event["log_level"].name, "error")
            self.assertEqual(event["client_id"], "gateway client")
            self.assertEqual(event["status"], status)
            self.assertNothingSecretLogged(SECRET)

    def test_repeated_failures_are_logged_once_per_interval(self):
        self.service.answer(500)
        intro = self.introspector()
        for _ in range(5):
            self.failure(intro, "error")
        self.assertEqual(len(self.events), 1)
        self.clock.advance(introspection.LOG_INTERVAL)
        self.failure(intro, "error")
        self.assertEqual(len(self.events), 2)
        self.assertEqual(self.events[1]["suppressed"], 4)

    def test_retry_after(self):
        date = "Tue, 14 Nov 2023 22:13:40 GMT"  # NOW + 20 s
        for header, expected in [(None, 5), ("30", 30), ("0", 1),
                                 ("600", 60), ("99999999999", 60),
                                 ("soon", 5), ("-3", 5), ("1.5", 5),
                                 (date, 20)]:
            headers = {"Retry_After": header} if header is not None else {}
            self.service.answer(503, **headers)
            e = self.failure(self.introspector(), "unavailable")
            self.assertEqual(e.retry_after, expected, header)

    def test_unreachable(self):
        class Refusing:
            def request(self, *a, **kw):
                return fail(ConnectionRefusedError("127.0.0.1"))

        intro = Introspector(self.clock, TreqFetcher(Refusing()), make_settings(), "x")
        e = self.failureResultOf(intro.introspect(TOKEN),
                                 IntrospectionFailed).value
        self.assertEqual(e.kind, "error")
        self.assertIn("cannot reach the token service", e.description)


class BodyTests(IntrospectorTestCase):
    def test_chunked(self):
        token = make_jwt().encode()
        self.service.answer(200, [token[:10], token[10:20], token[20:]])
        self.assertEqual(self.outcome(self.introspector()).jwt,
                         token.decode())

    def test_oversize(self):
        intro = self.introspector(max_response_bytes=256)
        self.service.answer(200, b"a" * 257)
        self.assertIn("larger than max_response_bytes (256)",
                      self.failure(intro, "error").description)
        self.service.answer(200, [b"a" * 200, b"a" * 57])
        self.failure(intro, "error")

    def test_oversize_chunked_stops_reading(self):
        """The answer fails as soon as the bound is passed, while the token
        service is still sending, and the connection is dropped."""
        intro = self.introspector(max_response_bytes=256)
        self.service.answer(200, [b"a" * 300], finish=False)
        d = intro.introspect(TOKEN)
        self.stub.flush()
        self.assertIn("larger", self.failureResultOf(
            d, IntrospectionFailed).value.description)
        self.stub.flush()
        self.assertEqual(len(self.service.lost), 1)

    def test_error_status_with_large_body(self):
        self.service.answer(503, b"x" * 1000, Retry_After="7")
        e = self.failure(self.introspector(max_response_bytes=256),
                         "unavailable")
        self.assertEqual(e.retry_after, 7)


class TimeoutTests(IntrospectorTestCase):
    def test_no_answer(self):
        self.service.answer(200, None)
        d = self.introspector(timeout=2.5).introspect(TOKEN)
        self.stub.flush()
        self.clock.advance(2.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        e = self.failureResultOf(d, IntrospectionFailed).value
        self.assertEqual(e.kind, "timeout")
        self.stub.flush()
        self.assertEqual(len(self.service.lost), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_body_never_ends(self):
        self.service.answer(200, [b"eyJ"], finish=False)
        d = self.introspector(timeout=1).introspect(TOKEN)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.failureResultOf(
            d, IntrospectionFailed).value.kind, "timeout")
        self.stub.flush()
        self.assertEqual(len(self.service.lost), 1)

    def test_slow_verification(self):
        self.service.answer(200, make_jwt().encode())

        class Stuck:
            def verify(self, jwt):
                return Deferred()

        d = self.introspector(timeout=1, verify_jwt=True,
                              jwt_verifier=Stuck()).introspect(TOKEN)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.failureResultOf(
            d, IntrospectionFailed).value.kind, "timeout")

    def test_answer_in_time_cancels_timer(self):
        self.service.answer(204)
        self.outcome(self.introspector())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self):
        self.service.answer(200, None)
        intro = self.introspector()
        d = intro.introspect(TOKEN)
        self.stub.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.stub.flush()
        self.assertEqual(len(self.service.lost), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.events, [])


class TokenServiceKeysTests(IntrospectorTestCase):
    """DESIGN section 14: accept, phantom_token_field, inactive_statuses,
    basic_auth_encoding and the 401 hint, as the token service sees them."""

    def keycloak_answer(self, **extra: Any) -> bytes:
        self.jwt = make_jwt()
        doc = {"active": True, "sub": "alice", "scope": "read",
               "jwt": self.jwt}
        doc.update(extra)
        return json.dumps(doc).encode()

    def test_keycloak_jwt_field(self):
        """Keycloak >= 25: Accept: application/jwt, JSON answer, JWT in its
        ``jwt`` member."""
        self.service.answer(200, self.keycloak_answer(),
                            content_type="application/json")
        intro = self.introspector(response="phantom_token",
                                  phantom_token_field="jwt",
                                  accept="application/jwt")
        result = self.outcome(intro)
        self.assertEqual(result.jwt, self.jwt)
        [seen] = self.service.requests
        self.assertEqual(seen.headers[b"accept"], [b"application/jwt"])

    def test_default_field_does_not_read_keycloak(self):
        self.service.answer(200, self.keycloak_answer(),
                            content_type="application/json")
        e = self.failure(self.introspector(response="phantom_token"), "error")
        self.assertIn("phantom_token member (phantom_token_field)",
                      e.description)

    def test_field_of_the_wrong_type(self):
        self.service.answer(200, self.keycloak_answer(jwt=42),
                            content_type="application/json")
        e = self.failure(self.introspector(response="phantom_token",
                                           phantom_token_field="jwt"),
                         "error")
        self.assertIn("without a jwt member", e.description)

    def test_accept_does_not_change_the_expected_content_type(self):
        """accept = application/json in jwt mode: an answer that is not
        application/jwt is still refused."""
        self.service.answer(200, make_jwt().encode(),
                            content_type="text/plain")
        intro = self.introspector(accept="application/json")
        self.failure(intro, "error")
        [seen] = self.service.requests
        self.assertEqual(seen.headers[b"accept"], [b"application/json"])

    def test_empty_400_is_inactive_when_listed(self):
        self.service.answer(400, b"", content_type=None,
                            Cache_Control="max-age=5")
        intro = self.introspector(inactive_statuses=frozenset({204, 400}))
        self.assertEqual(self.outcome(intro), Inactive(5.0))
        # not listed: a failure (502), as before
        self.assertIn("HTTP 400", self.failure(self.introspector(),
                                                "error").description)

    def test_400_with_a_body_stays_a_failure(self):
        """A 400 that says something (invalid_client, invalid_request) is
        about phantomd's request, not the token."""
        self.service.answer(400, b'{"error": "invalid_client"}',
                            content_type="application/json")
        intro = self.introspector(inactive_statuses=frozenset({204, 400}))
        e = self.failure(intro, "error")
        self.assertIn("with a body", e.description)

    def test_refused_statuses_cannot_be_inactive(self):
        """Even when settings are built by hand, past config."""
        for status in (401, 403, 500, 503, 200):
            self.assertRaises(ValueError, self.introspector,
                              inactive_statuses=frozenset({204, status}))

    def test_empty_401_still_refused_credentials(self):
        self.service.answer(401, b"", content_type=None)
        intro = self.introspector(inactive_statuses=frozenset({204, 400}))
        self.failure(intro, "error")

    def test_raw_basic_on_the_wire(self):
        self.service.answer(204)
        self.outcome(self.introspector(secret="Secr3t!",
                                       basic_auth_encoding="raw"))
        [seen] = self.service.requests
        self.assertEqual(seen.headers[b"authorization"], [
            b"Basic " + base64.b64encode(b"gateway client:Secr3t!")])

    def credential_log(self) -> str:
        [event] = [e for e in self.events
                   if "refused phantomd's client" in e["log_format"]]
        return formatEvent(event)

    def test_401_hint_names_the_key_to_try(self):
        self.service.answer(401, b"", content_type=None)
        self.failure(self.introspector(secret="Secr3t!"), "error")
        line = self.credential_log()
        self.assertIn("try [introspection] basic_auth_encoding = raw", line)
        self.assertNotIn("Secr3t", line)
        self.assertNothingSecretLogged("Secr3t!")

    def test_401_hint_back_to_form(self):
        self.service.answer(401, b"", content_type=None)
        self.failure(self.introspector(secret="a+b",
                                       basic_auth_encoding="raw"), "error")
        self.assertIn("basic_auth_encoding = form", self.credential_log())

    def test_no_hint_when_encoding_cannot_matter(self):
        self.service.answer(401, b"", content_type=None)
        self.failure(self.introspector(secret="plain_secret",
                                       client_id="gw"), "error")
        self.assertNotIn("basic_auth_encoding", self.credential_log())
        self.events.clear()
        self.clock.advance(60)
        self.failure(self.introspector(secret="Secr3t!",
                                       auth_method="client_secret_post"),
                     "error")
        self.assertNotIn("basic_auth_encoding", self.credential_log())

    def test_floorable(self):
        """Which answers [cache] min_ttl may keep longer."""
        for headers, floorable in [
                ({}, True),
                ({"Cache_Control": "no-store"}, True),
                ({"Cache_Control": "no-cache"}, True),
                ({"Cache_Control": "max-age=0, no-cache, no-store, "
                  "must-revalidate, private"}, True),  # Django never_cache
                ({"Cache_Control": "max-age=0"}, False),
                ({"Cache_Control": "max-age=60"}, False),
                ({"Cache_Control": "private"}, False),
                ({"Cache_Control": "max-age=abc"}, False),
                ({"Cache_Control": "no-store, max-age=\"x"}, False)]:
            self.service.answer(200, make_jwt().encode(), **headers)
            result = self.outcome(self.introspector())
            self.assertEqual(result.floorable, floorable, headers)
