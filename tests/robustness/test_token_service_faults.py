"""The token service misbehaves; phantomd fails closed (DESIGN section 2).

Every fault case checks the same four things a user would notice:

1. the client gets the documented status (502 unreadable/unreachable/5xx,
   503 + Retry-After for the service's 503, 504 when too slow) as a small
   JSON error with ``Cache-Control: no-store``;
2. the API received nothing;
3. nothing was cached: the next request for the same token introspects again;
4. once the token service recovers, that next request succeeds with the
   JWT the service issued.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.trial import unittest

from .fakes import (
    Delayed, Dribble, Hang, Raw, Reply, Scene, Stream, async_test, json_reply,
    jwt_reply, make_jwt, new_token, response_head, wait_for,
)

JWT_TYPE = ((b"Content-Type", b"application/jwt"),)


class FailClosed(unittest.TestCase):
    timeout = 10

    async def check_fault(self, make_behaviour, status, response="jwt",
                          statuses=None):
        """Run one fault case; ``make_behaviour(token, jwt)`` builds the
        token service's misbehaviour for the first request."""
        scene = await Scene.build(self, reactor, response=response)
        token, jwt = scene.good_token()
        scene.ts.behaviour = make_behaviour(token, jwt)

        r = await scene.get(token)
        if statuses:
            self.assertIn(r.status, statuses, r.body)
        else:
            self.assertEqual(r.status, status, r.body)
        self.assertError(r)
        if r.status == 503:
            self.assertTrue(r.header(b"retry-after"),
                            "503 without Retry-After")
        self.assertEqual(scene.api.requests, [],
                         "a request reached the API on a failed introspection")
        calls = scene.ts.calls
        self.assertGreaterEqual(calls, 1)

        scene.ts.behaviour = None  # recovered: answers active with `jwt`
        r = await scene.get(token)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(scene.ts.calls, calls + 1,
                         "the failure was cached (or the retry skipped)")
        self.assertEqual(len(scene.api.requests), 1)
        self.assertEqual(scene.api.requests[0].header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        return scene

    def assertError(self, r):
        """DESIGN section 2: error bodies are small JSON, never stored."""
        self.assertEqual(r.first(b"cache-control"), b"no-store")
        doc = json.loads(r.body)
        self.assertIsInstance(doc.get("error"), str)
        self.assertLess(len(r.body), 1024)


def case(make_behaviour, status, response="jwt", statuses=None):
    @async_test
    async def test(self):
        await self.check_fault(make_behaviour, status, response, statuses)
    return test


class StatusFaults(FailClosed):
    """Non-success statuses: 5xx and our credentials refused are 502; the
    service's own 503 is passed on as 503 with Retry-After."""

    test_500 = case(lambda t, j: Reply(500, body=b"internal"), 502)
    test_502 = case(lambda t, j: Reply(502, body=b"bad gateway"), 502)
    test_503 = case(lambda t, j: Reply(
        503, ((b"Retry-After", b"7"),), b"busy"), 503)
    test_503_without_retry_after = case(
        lambda t, j: Reply(503, body=b"busy"), 503)
    test_401_to_our_credentials = case(lambda t, j: Reply(
        401, ((b"WWW-Authenticate", b'Basic realm="x"'),), b"no"), 502)
    test_403_to_our_credentials = case(lambda t, j: Reply(403, body=b"no"),
                                       502)
    test_404_wrong_url = case(lambda t, j: Reply(404, body=b"not found"), 502)
    test_400 = case(lambda t, j: Reply(
        400, ((b"Content-Type", b"application/json"),),
        b'{"error":"invalid_request"}'), 502)
    test_500_with_a_jwt_body = case(
        lambda t, j: Reply(500, JWT_TYPE, j.encode()), 502)


class BodyFaults(FailClosed):
    """200 answers that cannot be understood are 502, never forwarded."""

    test_empty_200 = case(lambda t, j: Reply(200, JWT_TYPE, b""), 502)
    test_truncated_body = case(lambda t, j: Raw(response_head(
        200, JWT_TYPE + ((b"Content-Length", len(j) + 100),)) + j.encode(),
        then="close"), 502)
    test_truncated_chunked_body = case(lambda t, j: Raw(response_head(
        200, JWT_TYPE + ((b"Transfer-Encoding", b"chunked"),))
        + b"%x\r\n%s\r\n" % (len(j) // 2, j[:len(j) // 2].encode()),
        then="close"), 502)
    test_reset_mid_answer = case(lambda t, j: Raw(response_head(
        200, JWT_TYPE + ((b"Content-Length", len(j)),)) + j[:20].encode(),
        then="reset"), 502)
    test_closed_without_answer = case(lambda t, j: Raw(b"", then="close"),
                                      502)
    test_reset_without_answer = case(lambda t, j: Raw(b"", then="reset"),
                                     502)
    test_garbage_status_line = case(
        lambda t, j: Raw(b"HTTP/1.1 2OO fine\r\n\r\n" + j.encode()), 502)
    test_body_larger_than_max_response_bytes = case(
        lambda t, j: jwt_reply(make_jwt({"pad": "p" * 8000})), 502)
    test_endless_chunked_body = case(lambda t, j: Stream(
        total=None, chunked=True, headers=JWT_TYPE, block=1024), 502)
    # A head that never ends must be refused as unreadable (502) within
    # bounded memory, not read until the timeout (504).
    test_endless_header_line = case(lambda t, j: Stream(
        total=None, chunked=False, prefix=b"HTTP/1.1 200 OK\r\nX-Big: "),
        502)
    test_endless_header_lines = case(lambda t, j: Stream(
        total=None, chunked=False, prefix=b"HTTP/1.1 200 OK\r\n",
        filler=b"X-Many: header\r\n"), 502)
    test_wrong_content_type = case(lambda t, j: Reply(
        200, ((b"Content-Type", b"text/html"),),
        b"<html><body>Please log in</body></html>"), 502)
    test_not_a_jwt = case(lambda t, j: Reply(200, JWT_TYPE, b"not-a-jwt"),
                          502)
    test_jwt_with_unreadable_payload = case(lambda t, j: Reply(
        200, JWT_TYPE, b"eyJhbGciOiJSUzI1NiJ9.%%%%.c2ln"), 502)
    test_jwt_with_non_json_payload = case(lambda t, j: Reply(
        200, JWT_TYPE, b"eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln"), 502)
    # DESIGN is silent between 401 (expired) and 502 (unusable answer);
    # either fails closed.  Forwarding it, or caching it, does not.
    test_expired_jwt = case(lambda t, j: jwt_reply(make_jwt(
        lifetime=-600)), None, statuses=(401, 502))
    test_not_yet_valid_jwt = case(lambda t, j: jwt_reply(make_jwt(
        {"nbf": 4102444800, "exp": 4102448400})), None, statuses=(401, 502))


def raw_jwt(payload: str) -> str:
    """A JWT around exactly this payload text (which may not be JSON an
    ordinary encoder would write: NaN, duplicate keys, deep nesting)."""
    from .fakes import b64url
    return "eyJhbGciOiJSUzI1NiJ9.%s.c2ln" % b64url(payload.encode())


def claims_case(payload: str):
    return case(lambda t, j: jwt_reply(raw_jwt(payload)), 502)


class HostileClaims(FailClosed):
    """Claims a JSON parser accepts but a NumericDate is not: unusable,
    so 502 and nothing cached -- never forwarded with an expiry nobody
    can compare."""

    test_exp_string = claims_case('{"exp": "tomorrow", "sub": "x"}')
    test_exp_nan = claims_case('{"exp": NaN, "sub": "x"}')
    test_exp_infinity = claims_case('{"exp": Infinity, "sub": "x"}')
    test_exp_overflowing_float = claims_case('{"exp": 1e400, "sub": "x"}')
    test_exp_boolean = claims_case('{"exp": true, "sub": "x"}')
    test_exp_null = claims_case('{"exp": null, "sub": "x"}')
    test_nbf_nan = claims_case('{"exp": 4102444800, "nbf": NaN}')
    test_duplicate_exp = claims_case('{"exp": 1, "exp": 4102444800}')
    test_payload_array = claims_case('[1, 2]')
    test_deeply_nested_payload = claims_case(
        '{"exp": 4102444800, "x": ' + "[" * 5000 + "]" * 5000 + '}')


class PhantomTokenJSONFaults(FailClosed):
    """``response = phantom_token``: the JSON must be RFC 7662 with a
    boolean ``active`` and, when active, a ``phantom_token``."""

    test_invalid_json = case(lambda t, j: json_reply(b'{"active": tru'),
                             502, response="phantom_token")
    test_json_not_an_object = case(lambda t, j: json_reply(b'[true]'),
                                   502, response="phantom_token")
    test_active_missing = case(lambda t, j: json_reply(
        {"phantom_token": j, "sub": "x"}), 502, response="phantom_token")
    test_active_not_a_boolean = case(lambda t, j: json_reply(
        {"active": "true", "phantom_token": j}), 502,
        response="phantom_token")
    test_active_one = case(lambda t, j: json_reply(
        {"active": 1, "phantom_token": j}), 502, response="phantom_token")
    test_active_without_phantom_token = case(lambda t, j: json_reply(
        {"active": True, "sub": "x"}), 502, response="phantom_token")
    test_phantom_token_not_a_jwt = case(lambda t, j: json_reply(
        {"active": True, "phantom_token": "opaque-again"}), 502,
        response="phantom_token")


class SlowFaults(FailClosed):
    """Too slow is 504 after ``[introspection] timeout`` (0.5 s here), even
    when bytes keep trickling in faster than any per-read timer."""

    test_accept_and_never_answer = case(lambda t, j: Hang(), 504)
    test_head_one_byte_at_a_time = case(lambda t, j: Dribble(
        response_head(200, JWT_TYPE + ((b"Content-Length", len(j)),))
        + j.encode(), interval=0.1), 504)
    test_body_one_byte_at_a_time = case(lambda t, j: Dribble(
        j.encode(), interval=0.1, prefix=response_head(
            200, JWT_TYPE + ((b"Content-Length", len(j)),))), 504)


class GoodButUnusualAnswers(unittest.TestCase):
    """Valid answers in less common framing must work (Curity's nginx module
    crashes without Content-Length; DESIGN section 6)."""

    timeout = 10

    async def forwarded(self, make_behaviour):
        scene = await Scene.build(self, reactor)
        token, jwt = scene.good_token()
        scene.ts.behaviour = make_behaviour(jwt)
        r = await scene.get(token)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(scene.api.requests[0].header(b"authorization"),
                         [b"Bearer " + jwt.encode()])

    @async_test
    async def test_chunked_jwt(self):
        await self.forwarded(lambda j: Raw(response_head(
            200, JWT_TYPE + ((b"Transfer-Encoding", b"chunked"),
                             (b"Cache-Control", b"max-age=60")))
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p.encode())
                       for p in (j[:10], j[10:])) + b"0\r\n\r\n",
            then="keep"))

    @async_test
    async def test_body_delimited_by_close(self):
        await self.forwarded(lambda j: Raw(response_head(
            200, JWT_TYPE + ((b"Connection", b"close"),)) + j.encode(),
            then="close"))

    @async_test
    async def test_jwt_content_type_with_parameters(self):
        await self.forwarded(lambda j: jwt_reply(
            j, content_type=b"application/jwt; charset=utf-8"))


class InactiveTokens(unittest.TestCase):
    timeout = 10

    async def rejected(self, scene, token):
        r = await scene.get(token)
        self.assertEqual(r.status, 401, r.body)
        challenge = r.first(b"www-authenticate", b"")
        self.assertTrue(challenge.lower().startswith(b"bearer "), challenge)
        self.assertIn(b'error="invalid_token"', challenge)
        self.assertEqual(scene.api.requests, [])

    @async_test
    async def test_204_is_401_and_remembered(self):
        """A client hammering a bad token does not hammer the token
        service (DESIGN section 4, capped by negative_ttl)."""
        scene = await Scene.build(self, reactor)
        scene.ts.default = Reply(204, ((b"Cache-Control", b"max-age=60"),))
        token = new_token()
        await self.rejected(scene, token)
        await self.rejected(scene, token)
        self.assertEqual(scene.ts.calls_for(token), 1)

    @async_test
    async def test_204_no_store_is_asked_again(self):
        scene = await Scene.build(self, reactor)
        token = new_token()  # the default answer is 204 no-store
        await self.rejected(scene, token)
        await self.rejected(scene, token)
        self.assertEqual(scene.ts.calls_for(token), 2)

    @async_test
    async def test_active_false_json(self):
        scene = await Scene.build(self, reactor, response="phantom_token")
        scene.ts.default = json_reply({"active": False}, "no-store")
        await self.rejected(scene, new_token())


class Unreachable(unittest.TestCase):
    timeout = 10

    @async_test
    async def test_refused_then_back(self):
        """Nothing listening: 502; when it listens again (same port), the
        same token works, so the failure was not remembered."""
        scene = await Scene.build(self, reactor)
        token, jwt = scene.good_token()
        port = scene.ts.portnum
        await scene.ts.stop()
        r = await scene.get(token)
        self.assertEqual(r.status, 502, r.body)
        self.assertEqual(scene.api.requests, [])
        scene.ts.listen(port)
        r = await scene.get(token)
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(scene.ts.calls_for(token), 1)

    @async_test
    async def test_hung_introspection_connection_is_not_reused(self):
        """After a timeout, the hung token-service connection is closed,
        not returned to the pool where the next request would wait on it."""
        scene = await Scene.build(self, reactor)
        token, jwt = scene.good_token()
        scene.ts.behaviour = Hang()
        r = await scene.get(token)
        self.assertEqual(r.status, 504, r.body)
        self.assertTrue(await wait_for(
            reactor, lambda: not scene.ts.connections, 2.0),
            "the timed-out connection to the token service is still open")
        scene.ts.behaviour = None
        r = await scene.get(token)
        self.assertEqual(r.status, 200, r.body)



class CoalescedFaults(unittest.TestCase):
    """Many clients, one token, the token service failing: one
    introspection, every waiter gets the failure, nothing is remembered."""

    timeout = 10

    async def crowd(self, behaviour, expected):
        from twisted.internet import defer
        scene = await Scene.build(self, reactor)
        token, jwt = scene.good_token()
        scene.ts.behaviour = behaviour
        rs = await defer.gatherResults([defer.ensureDeferred(
            scene.get(token)) for _ in range(30)])
        self.assertEqual({r.status for r in rs}, {expected})
        self.assertEqual(scene.ts.calls, 1)
        self.assertEqual(scene.api.requests, [])
        scene.ts.behaviour = None
        self.assertEqual((await scene.get(token)).status, 200)
        self.assertEqual(scene.ts.calls, 2)

    @async_test
    async def test_slow_500_reaches_every_waiter(self):
        await self.crowd(Delayed(0.2, Reply(500)), 502)

    @async_test
    async def test_timeout_reaches_every_waiter(self):
        await self.crowd(Hang(), 504)

    async def leave_while_waiting(self):
        """10 clients ask and disconnect while the introspection is slow;
        10 others ask and stay."""
        from twisted.internet import defer
        from .fakes import connect_raw, exchange, request_bytes, sleep
        scene = await Scene.build(self, reactor)
        token, jwt = scene.good_token()
        scene.ts.behaviour = Delayed(0.3, jwt_reply(jwt))
        leavers = [await connect_raw(reactor, scene.front)
                   for _ in range(10)]
        for c in leavers:
            c.send(request_bytes(token=token, target="/leaver"))
        stayers = [defer.ensureDeferred(exchange(
            reactor, scene.front, request_bytes(
                token=token, target="/stayer", close=True), 3.0))
            for _ in range(10)]
        await sleep(reactor, 0.1)
        for c in leavers:
            c.transport.abortConnection()
        done = await defer.gatherResults(stayers)
        return scene, done

    @async_test
    async def test_waiters_that_leave_do_not_cancel_the_others(self):
        """The shared introspection is not cancelled by the leavers."""
        scene, done = await self.leave_while_waiting()
        self.assertEqual([c.responses()[0].status for c in done], [200] * 10)
        self.assertEqual(scene.ts.calls, 1)
        self.assertEqual(sum(r.target == b"/stayer"
                             for r in scene.api.requests), 10)

    @async_test
    async def test_clients_that_left_are_not_forwarded(self):
        """A request whose client disconnected while it waited for the
        token service is not sent to the API afterwards."""
        scene, done = await self.leave_while_waiting()
        from .fakes import sleep
        await sleep(reactor, 0.2)
        self.assertEqual([r.target for r in scene.api.requests
                          if r.target == b"/leaver"], [])


class CacheLifetimes(unittest.TestCase):
    """What is remembered stops being used when it should (DESIGN 4)."""

    timeout = 10

    @async_test
    async def test_jwt_expiry_caps_a_long_max_age(self):
        """max-age=3600 but the JWT expires in ~1.5 s: once it has
        expired, phantomd asks again rather than forward a dead JWT."""
        import time
        from .fakes import sleep
        scene = await Scene.build(self, reactor)
        token = new_token()
        exp = int(time.time()) + 2
        short = make_jwt(exp=exp)
        scene.ts.behaviour = jwt_reply(short, "max-age=3600")
        self.assertEqual((await scene.get(token)).status, 200)
        await sleep(reactor, max(0.0, exp - time.time()) + 0.3)
        fresh = scene.ts.activate(token)
        scene.ts.behaviour = None
        self.assertEqual((await scene.get(token)).status, 200)
        self.assertEqual(scene.ts.calls, 2)
        self.assertEqual(scene.api.requests[-1].header(b"authorization"),
                         [b"Bearer " + fresh.encode()])

    @async_test
    async def test_negative_ttl_caps_a_long_inactive_answer(self):
        """A token first unknown (204, max-age=3600) and then issued is
        usable once negative_ttl (1 s here) has passed."""
        from .fakes import sleep
        scene = await Scene.build(self, reactor, cache={"negative_ttl": "1"})
        token = new_token()
        scene.ts.default = Reply(204, ((b"Cache-Control", b"max-age=3600"),))
        self.assertEqual((await scene.get(token)).status, 401)
        self.assertEqual((await scene.get(token)).status, 401)
        self.assertEqual(scene.ts.calls, 1)
        scene.ts.activate(token)
        await sleep(reactor, 1.3)
        self.assertEqual((await scene.get(token)).status, 200)
        self.assertEqual(scene.ts.calls, 2)

    @async_test
    async def test_unusable_cache_control_is_not_stored(self):
        scene = await Scene.build(self, reactor)
        for cc in ("max-age=-1", "max-age=abc", "max-age=60, no-store",
                   "no-cache", "private", "max-age=0"):
            token, jwt = scene.good_token()
            scene.ts.cache_control = cc
            for _ in range(2):
                self.assertEqual((await scene.get(token)).status, 200)
            self.assertEqual(scene.ts.calls_for(token), 2, cc)


class DuringOutages(unittest.TestCase):
    timeout = 10

    @async_test
    async def test_cached_tokens_survive_a_token_service_outage(self):
        scene = await Scene.build(self, reactor)
        token, _ = scene.good_token()
        self.assertEqual((await scene.get(token)).status, 200)
        await scene.ts.stop()
        for _ in range(3):
            self.assertEqual((await scene.get(token)).status, 200)
        other, _ = scene.good_token()
        self.assertEqual((await scene.get(other)).status, 502)

    @async_test
    async def test_saturation_does_not_shed_a_token_already_in_flight(self):
        """max_in_flight = 1 and one slow introspection running: a second
        request for that same token joins it instead of getting 503."""
        from twisted.internet import defer
        scene = await Scene.build(self, reactor, introspection={
            "max_in_flight": "1", "timeout": "3"})
        token, jwt = scene.good_token()
        scene.ts.behaviour = Delayed(0.4, jwt_reply(jwt))
        first = defer.ensureDeferred(scene.get(token))
        await wait_for(reactor, lambda: scene.ts.calls == 1, 2.0)
        second = await scene.get(token)
        self.assertEqual(second.status, 200, second.body)
        self.assertEqual((await first).status, 200)
        self.assertEqual(scene.ts.calls, 1)


class ReloadInFlight(unittest.TestCase):
    """A reload that replaces the introspection client while an
    introspection is in flight: that request still gets its answer, later
    ones use the new settings, and no connection is left behind."""

    timeout = 10

    @async_test
    async def test_reload_during_a_slow_introspection(self):
        from twisted.internet import defer
        from phantomd import config as configmod
        scene = await Scene.build(self, reactor)
        token, jwt = scene.good_token()
        scene.ts.behaviour = Delayed(0.4, jwt_reply(jwt))
        first = defer.ensureDeferred(scene.get(token))
        await wait_for(reactor, lambda: scene.ts.calls == 1, 2.0)
        new = configmod.parse(scene.ini.replace(
            "client_id = gateway_client", "client_id = gateway_client_2"),
            "<reloaded.ini>")
        scene.gw.gateway.reload(new)
        self.assertEqual((await first).status, 200)
        scene.ts.behaviour = None
        other, _ = scene.good_token()
        self.assertEqual((await scene.get(other)).status, 200)
        import base64
        auth = scene.ts.requests[-1].header(b"authorization")
        self.assertEqual(
            base64.b64decode(auth[0].split()[1]).split(b":")[0],
            b"gateway_client_2")
        self.assertTrue(await wait_for(
            reactor, lambda: len(scene.ts.connections) <= 1, 3.0),
            "the replaced introspection client left %d connections open"
            % (len(scene.ts.connections) - 1))


class MintedFromHostileJSON(unittest.TestCase):
    """``response = json``: phantomd signs the JWT itself from the token
    service's RFC 7662 answer, so what it signs is its own word.  A claim
    of the wrong JSON type must not be signed as if it were valid (RFC
    7519 section 4.1, RFC 9068 section 2.2): the answer is refused (502) or
    the claim is left out -- never a signed ``sub`` that is an object."""

    timeout = 15

    async def scene(self):
        import json as jsonlib
        import os
        from jwcrypto import jwk
        key = jwk.JWK.generate(kty="EC", crv="P-256", kid="robust",
                               alg="ES256", use="sig")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(jsonlib.dumps({"keys": [jsonlib.loads(
                key.export_private())]}))
        return await Scene.build(self, reactor, response="json", minting={
            "key_file": path, "issuer": "https://gateway.example.test"})

    async def minted(self, scene, document):
        """(status, claims of the JWT the API received or None)."""
        from .fakes import jwt_claims
        token = new_token()
        scene.ts.behaviour = json_reply(document, "max-age=60")
        before = len(scene.api.requests)
        r = await scene.get(token)
        if r.status != 200:
            self.assertEqual(len(scene.api.requests), before)
            return r.status, None
        auth = scene.api.requests[-1].header(b"authorization")[0]
        return r.status, jwt_claims(auth.split()[1].decode())

    @async_test
    async def test_registered_claims_keep_their_types(self):
        scene = await self.scene()
        for document in ({"active": True, "sub": 123},
                         {"active": True, "sub": {"a": 1}},
                         {"active": True, "username": {"a": 1}},
                         {"active": True, "username": ["u"]},
                         {"active": True, "aud": {"x": 1}},
                         {"active": True, "aud": ["api", 5]},
                         {"active": True, "scope": ["read", 5]},
                         {"active": True, "scope": 7},
                         {"active": True, "client_id": ["c"]},
                         {"active": True, "iss": 1}):
            status, claims = await self.minted(scene, document)
            if status == 502:
                continue
            self.assertEqual(status, 200, document)
            for name in ("sub", "scope", "client_id", "iss", "jti"):
                if name in claims:
                    self.assertIsInstance(claims[name], str, "%r signed "
                                          "as %r" % (document, claims))
            aud = claims.get("aud", "")
            self.assertTrue(isinstance(aud, str) or (
                isinstance(aud, list) and all(isinstance(a, str)
                                              for a in aud)),
                (document, claims))

    @async_test
    async def test_not_yet_valid_answer_is_not_minted_valid_now(self):
        """An answer with ``nbf`` an hour ahead: refused, or the minted
        JWT keeps that nbf so the API refuses it too."""
        import time
        scene = await self.scene()
        nbf = int(time.time()) + 3600
        status, claims = await self.minted(scene, {
            "active": True, "sub": "u", "nbf": nbf, "exp": nbf + 600})
        if status == 200:
            self.assertGreaterEqual(claims.get("nbf", 0), nbf, claims)
        else:
            self.assertIn(status, (401, 502))

    @async_test
    async def test_unusable_answers(self):
        scene = await self.scene()
        for document in (b'{"active": tru', b"[]", {"sub": "x"},
                         {"active": "true"}, {"active": 1},
                         {"active": True, "exp": "soon"}):
            status, _ = await self.minted(scene, document)
            self.assertEqual(status, 502, document)


class Redirects(unittest.TestCase):
    """A redirect from the token service is never followed: a 307/308
    would re-send the token (and credentials) elsewhere, and any redirect
    would let another server's answer decide who is let in."""

    timeout = 10

    @async_test
    async def test_redirects_are_not_followed(self):
        from .fakes import TokenService
        scene = await Scene.build(self, reactor)
        evil = TokenService(reactor)
        evil_port = evil.listen()
        self.addCleanup(evil.stop)
        evil.behaviour = lambda req: jwt_reply(make_jwt())
        for status in (301, 302, 303, 307, 308):
            token = new_token()
            scene.ts.behaviour = Reply(status, (
                (b"Location", b"http://127.0.0.1:%d/steal" % evil_port),))
            r = await scene.get(token)
            self.assertEqual(r.status, 502, "HTTP %d: %r" % (status, r.body))
            self.assertEqual(evil.requests, [], "followed a %d" % status)
        self.assertEqual(scene.api.requests, [])


class RetryAfter(unittest.TestCase):
    """The token service's Retry-After reaches clients as a small whole
    number of seconds, whatever it said (a hostile or broken value must
    not tell every client to go away for a year, nor be echoed raw)."""

    timeout = 10

    @async_test
    async def test_retry_after_is_sane(self):
        scene = await Scene.build(self, reactor)
        for value in (b"7", b"999999999999", b"-5", b"soon", b"1e9",
                      b"Wed, 21 Oct 2099 07:28:00 GMT", b"0", b"\t3 "):
            scene.ts.behaviour = Reply(503, ((b"Retry-After", value),))
            r = await scene.get(new_token())
            self.assertEqual(r.status, 503)
            after = r.header(b"retry-after")
            self.assertEqual(len(after), 1, value)
            self.assertTrue(after[0].isdigit(), (value, after))
            self.assertTrue(1 <= int(after[0]) <= 3600, (value, after))
