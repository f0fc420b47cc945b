"""DPoP-bound tokens end to end (DESIGN section 12): a real Gateway on
loopback between the fake token service and API, proofs made by jwcrypto
as a client would."""

from __future__ import annotations

import json
import time

from jwcrypto import jwk, jws
from twisted.internet import reactor

from phantomd.token.dpop import access_token_hash
from tests.robustness.fakes import async_test
from tests.test_gateway_e2e import GatewayCase, build, forwarded_with

KEY = jwk.JWK.generate(kty="EC", crv="P-256")
OTHER = jwk.JWK.generate(kty="EC", crv="P-256")
URL = "http://api.example.test/resource"
_counter = [0]


def proof(token, key=KEY, htm="GET", htu=URL, iat=None, jti=None):
    _counter[0] += 1
    claims = {"jti": jti or "e2e-%d-%f" % (_counter[0], time.time()),
              "htm": htm, "htu": htu,
              "iat": int(time.time()) if iat is None else iat,
              "ath": access_token_hash(token)}
    s = jws.JWS(json.dumps(claims).encode())
    s.add_signature(key, alg="ES256", protected=json.dumps(
        {"typ": "dpop+jwt", "alg": "ES256",
         "jwk": key.export_public(as_dict=True)}))
    return s.serialize(compact=True)


def dpop_headers(token, p, extra=()):
    return [("Authorization", "DPoP " + token), ("DPoP", p)] + list(extra)


class DPoPEndToEnd(GatewayCase):

    async def scene(self, **sections):
        scene = await build(self, **sections)
        token, jwt = scene.good_token(cnf={"jkt": KEY.thumbprint()})
        return scene, token, jwt

    def assertDPoPRefused(self, r, error):
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(json.loads(r.body)["error"], error)
        [challenge] = r.header(b"www-authenticate")
        self.assertTrue(challenge.startswith(b'DPoP realm="api", error="%s"'
                                             % error.encode()), challenge)
        self.assertIn(b'algs="ES256 RS256 PS256 EdDSA"', challenge)

    @async_test
    async def test_bound_token_with_proof_reaches_api_as_bearer(self):
        scene, token, jwt = await self.scene()
        first = proof(token)
        r = await scene.get(headers=dpop_headers(token, first))
        self.assertEqual(r.status, 200, r.body)
        [api] = scene.api.requests
        forwarded_with(self, api, token, jwt)
        self.assertEqual(api.header(b"dpop"), [])
        self.assertNotIn(first.encode(), api.raw())
        # A cache hit: the proof is still checked, a fresh one passes...
        r = await scene.get(headers=dpop_headers(token, proof(token)))
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(len(scene.ts.requests), 1)
        # ... a replayed one does not, nor one for another URL.
        r = await scene.get(headers=dpop_headers(token, first))
        self.assertDPoPRefused(r, "invalid_dpop_proof")
        r = await scene.get(headers=dpop_headers(
            token, proof(token, htu="https://api.example.test/resource")))
        self.assertDPoPRefused(r, "invalid_dpop_proof")
        r = await scene.get(headers=dpop_headers(token, proof(token, OTHER)))
        self.assertDPoPRefused(r, "invalid_dpop_proof")
        self.assertEqual(len(scene.api.requests), 2)
        m = scene.gw.metrics
        for reason in ("replay", "htu", "binding"):
            self.assertEqual(m.sample("phantomd_dpop_failures_total",
                                      {"reason": reason}), 1, reason)

    @async_test
    async def test_bound_token_as_bearer_is_refused(self):
        scene, token, jwt = await self.scene()
        r = await scene.get(token, headers=[("DPoP", proof(token))])
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(json.loads(r.body)["error"], "invalid_token")
        bearer, dpop = r.header(b"www-authenticate")
        self.assertTrue(bearer.startswith(
            b'Bearer realm="api", error="invalid_token"'), bearer)
        self.assertEqual(dpop, b'DPoP realm="api", '
                               b'algs="ES256 RS256 PS256 EdDSA"')
        self.assertNothingForwarded(scene)

    @async_test
    async def test_unbound_token_with_dpop_scheme_is_refused(self):
        scene = await build(self)
        token, _ = scene.good_token()
        r = await scene.get(headers=dpop_headers(token, proof(token)))
        self.assertDPoPRefused(r, "invalid_token")
        self.assertNothingForwarded(scene)

    @async_test
    async def test_missing_proof_is_refused_before_introspection(self):
        scene, token, _ = await self.scene()
        r = await scene.get(headers=[("Authorization", "DPoP " + token)])
        self.assertDPoPRefused(r, "invalid_dpop_proof")
        self.assertEqual(scene.ts.requests, [])

    @async_test
    async def test_htu_from_trusted_proxy(self):
        """Behind a trusted proxy the proof names the public URL, which
        the proxy reports in X-Forwarded-Proto/-Host."""
        scene, token, _ = await self.scene(
            phantomd={"trusted_proxies": "127.0.0.1"})
        public = "https://public.example/resource"
        fwd = [("X-Forwarded-Proto", "https"),
               ("X-Forwarded-Host", "public.example")]
        r = await scene.get(headers=dpop_headers(
            token, proof(token, htu=public), fwd))
        self.assertEqual(r.status, 200, r.body)
        r = await scene.get(headers=dpop_headers(token, proof(token), fwd))
        self.assertDPoPRefused(r, "invalid_dpop_proof")

    @async_test
    async def test_forwarding_headers_of_untrusted_peer_are_ignored(self):
        scene, token, _ = await self.scene()
        public = "https://public.example/resource"
        fwd = [("X-Forwarded-Proto", "https"),
               ("X-Forwarded-Host", "public.example")]
        r = await scene.get(headers=dpop_headers(
            token, proof(token, htu=public), fwd))
        self.assertDPoPRefused(r, "invalid_dpop_proof")
        r = await scene.get(headers=dpop_headers(token, proof(token), fwd))
        self.assertEqual(r.status, 200, r.body)

    @async_test
    async def test_reload_applies_algs_and_max_age(self):
        """A reload's [dpop] algs and max_age apply to the next proof,
        the token's cached answer notwithstanding."""
        from phantomd import config
        scene, token, _ = await self.scene()
        r = await scene.get(headers=dpop_headers(token, proof(token)))
        self.assertEqual(r.status, 200, r.body)
        scene.gw.gateway.reload(config.parse(
            scene.ini + "\n[dpop]\nalgs = EdDSA\nmax_age = 10\n",
            "<reloaded.ini>"))
        r = await scene.get(headers=dpop_headers(token, proof(token)))
        self.assertEqual(r.status, 401, r.body)
        self.assertIn(b'algs="EdDSA"', r.first(b"www-authenticate"))
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_dpop_failures_total", {"reason": "alg"}), 1)
        scene.gw.gateway.reload(config.parse(
            scene.ini + "\n[dpop]\nmax_age = 10\n", "<reloaded.ini>"))
        r = await scene.get(headers=dpop_headers(
            token, proof(token, iat=int(time.time()) - 30)))
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_dpop_failures_total", {"reason": "iat"}), 1)
        r = await scene.get(headers=dpop_headers(token, proof(token)))
        self.assertEqual(r.status, 200, r.body)


from tests.test_fleet_e2e import FleetCase  # noqa: E402


class FleetReplay(FleetCase):
    """Two Gateways sharing a real redis-server: a proof accepted by one
    is a replay to the other."""

    @async_test
    async def test_proof_used_on_one_process_is_refused_on_another(self):
        f = await self.fleet(2)
        token = "opq-dpop-fleet-token"
        f.ts.activate(token, cnf={"jkt": KEY.thumbprint()})
        p = proof(token)
        r = await f.get(0, None, headers=dpop_headers(token, p))
        self.assertEqual(r.status, 200, r.body)
        r = await f.get(1, None, headers=dpop_headers(token, p))
        self.assertEqual(r.status, 401, r.body)
        self.assertIn(b"invalid_dpop_proof", r.body)
        r = await f.get(1, None, headers=dpop_headers(token, proof(token)))
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(len(f.api.requests), 2)


from tests.robustness.fakes import get, json_reply, new_token  # noqa: E402
from tests.test_modes_e2e import (  # noqa: E402
    ModesCase, bearer_of, introspection_claims, payload_of)


class MintedKeepsBinding(ModesCase):
    """response = json: the JWT phantomd mints keeps ``cnf``, and the
    binding is checked from it, on the miss and on the hit."""

    @async_test
    async def test_minted_jwt_keeps_cnf(self):
        await self.gateway("json")
        token = new_token()
        cnf = {"jkt": KEY.thumbprint()}
        self.answers[token] = json_reply(introspection_claims(
            self.ts, cnf=cnf))
        for _ in range(2):
            r = await get(reactor, self.gw.front, None,
                          headers=dpop_headers(token, proof(token)))
            self.assertEqual(r.status, 200, r.body)
        self.assertEqual(payload_of(bearer_of(self.api.requests[0]))["cnf"],
                         cnf)
        r = await get(reactor, self.gw.front, token)
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(len(self.ts.introspections()), 1)
