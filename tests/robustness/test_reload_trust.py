"""Trust after change (issue 19): what a SIGHUP reload must not keep.

Each test runs a real gateway between a fake token service and a fake API
over loopback, changes the configuration or a file it names *in place*,
calls ``Gateway.reload`` (what SIGHUP does), and checks what a client and
the API see afterwards.
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from phantomd import config as configmod

from .fakes import (
    Scene, async_test, json_reply, jwt_claims, make_jwt, new_token, set_keys,
    self_signed)


def jwks_file(path: str, *kids: str) -> list:
    """Write a JWK set of new EC P-256 keys (the first signs); return the
    keys."""
    from jwcrypto import jwk
    keys = [jwk.JWK.generate(kty="EC", crv="P-256", kid=kid, alg="ES256",
                             use="sig") for kid in kids]
    with open(path, "w") as f:
        json.dump({"keys": [json.loads(k.export_private()) for k in keys]},
                  f)
    os.chmod(path, 0o600)
    return keys


def kid_of(jwt: str) -> str:
    header = jwt.split(".")[0]
    import base64
    return json.loads(base64.urlsafe_b64decode(
        header + "=" * (-len(header) % 4)))["kid"]


class LogLines:
    """Formatted text of every log event while a test runs."""

    def __init__(self, testcase) -> None:
        from twisted.logger import formatEvent
        self.lines: list = []
        self._observer = lambda event: self.lines.append(formatEvent(event))
        globalLogPublisher.addObserver(self._observer)
        testcase.addCleanup(globalLogPublisher.removeObserver,
                            self._observer)

    def matching(self, words: str) -> list:
        return [line for line in self.lines if words in line]


class Reloads:
    def reload(self, scene: Scene, **sections) -> None:
        """Reload the scene's gateway with its ini, keys replaced or
        added as ``gateway_ini`` does."""
        scene.ini = set_keys(scene.ini, sections)
        scene.gw.gateway.reload(configmod.parse(scene.ini, "<reloaded.ini>"))


class CacheIdentity(Reloads, unittest.TestCase):
    timeout = 15

    @async_test
    async def test_forged_jwt_cached_without_verification_is_not_served_after_verify_jwt_on(self):
        """A JWT with a forged signature cached while ``verify_jwt = no``
        must not reach the API once ``verify_jwt = yes`` is reloaded."""
        from jwcrypto import jwk, jwt as jwtlib
        scene = await Scene.build(self, reactor)
        key = jwk.JWK.generate(kty="EC", crv="P-256", kid="robust-1",
                               alg="ES256", use="sig")
        ts = scene.ts

        def behaviour(request):
            if request.target.startswith(b"/jwks"):
                return json_reply({"keys": [json.loads(
                    key.export_public())]})
            jwt = ts.tokens.get(request.token)
            return ts.active_reply(jwt) if jwt else ts.default
        ts.behaviour = behaviour
        forged_token, forged = scene.good_token()  # random signature
        self.assertEqual((await scene.get(forged_token)).status, 200)
        self.assertEqual(len(scene.api.requests), 1)

        self.reload(scene, introspection={
            "verify_jwt": "yes",
            "jwks_url": "http://127.0.0.1:%d/jwks" % ts.portnum})
        r = await scene.get(forged_token)
        self.assertEqual(r.status, 502, r.body)
        self.assertEqual(len(scene.api.requests), 1,
                         "the forged JWT cached before the reload was "
                         "forwarded after verify_jwt was turned on")

        # A JWT the token service really signed still passes.
        good = jwtlib.JWT(header={"alg": "ES256", "kid": "robust-1",
                                  "typ": "JWT"},
                          claims=jwt_claims(make_jwt()))
        good.make_signed_token(key)
        token = new_token()
        ts.activate(token, good.serialize())
        self.assertEqual((await scene.get(token)).status, 200)

    @async_test
    async def test_token_service_ca_replaced_in_place_is_used(self):
        """``[introspection] ca_file`` rewritten in place (same path) with
        a CA that does not vouch for the token service: after the reload
        neither a cached nor a new token passes, since the new settings
        would not trust the answers."""
        base = os.path.abspath(self.mktemp())
        ts_cert, ts_key = self_signed(os.path.join(base, "ts"))
        stranger, _ = self_signed(os.path.join(base, "stranger"))
        ca = os.path.join(base, "ca.pem")
        shutil.copy(ts_cert, ca)
        scene = Scene()
        from .fakes import FakeAPI, TokenService, gateway_ini, start_gateway
        scene.reactor = reactor
        scene.ts, scene.api = TokenService(reactor), FakeAPI(reactor)
        ts_port = scene.ts.listen_tls(ts_cert, ts_key)
        self.addCleanup(scene.ts.stop)
        api_port = scene.api.listen()
        self.addCleanup(scene.api.stop)
        scene.ini = gateway_ini(ts_port, api_port, introspection={
            "url": "https://127.0.0.1:%d/introspect" % ts_port,
            "ca_file": ca})
        scene.gw = await start_gateway(self, reactor, scene.ini)
        cached, _ = scene.good_token()
        self.assertEqual((await scene.get(cached)).status, 200)

        shutil.copy(stranger, ca)
        self.reload(scene)
        self.assertEqual((await scene.get(cached)).status, 502)
        fresh, _ = scene.good_token()
        self.assertEqual((await scene.get(fresh)).status, 502)
        self.assertEqual(len(scene.api.requests), 1)

    @async_test
    async def test_a_change_that_decides_nothing_keeps_the_cache(self):
        scene = await Scene.build(self, reactor)
        token, _ = scene.good_token()
        self.assertEqual((await scene.get(token)).status, 200)
        self.reload(scene, introspection={"timeout": "0.7"},
                    phantomd={"realm": "other"})
        self.assertEqual((await scene.get(token)).status, 200)
        self.assertEqual(scene.ts.calls_for(token), 1)


class FilesReReadOnReload(Reloads, unittest.TestCase):
    timeout = 15

    @async_test
    async def test_minting_key_rotated_in_place_signs_and_is_published(self):
        """README's rotation: the new key goes first in the same key_file,
        the old one stays published; after SIGHUP phantomd signs with the
        new key (cached JWTs included) and its JWKS carries both."""
        path = os.path.abspath(self.mktemp())
        jwks_file(path, "old")
        scene = await Scene.build(self, reactor, response="json", minting={
            "key_file": path, "issuer": "https://gateway.example.test"})
        token = new_token()
        scene.ts.behaviour = json_reply(
            {"active": True, "sub": "alice", "scope": "read"}, "max-age=300")
        self.assertEqual((await scene.get(token)).status, 200)
        first = scene.api.requests[-1].header(b"authorization")[0].split()[1]
        self.assertEqual(kid_of(first.decode()), "old")

        old_public = json.loads(open(path).read())["keys"][0]
        from jwcrypto import jwk
        new = jwk.JWK.generate(kty="EC", crv="P-256", kid="new", alg="ES256",
                               use="sig")
        with open(path, "w") as f:
            json.dump({"keys": [json.loads(new.export_private()),
                                old_public]}, f)
        self.reload(scene)

        for t in (token, new_token()):
            self.assertEqual((await scene.get(t)).status, 200)
            jwt = scene.api.requests[-1].header(b"authorization")[0].split()[1]
            self.assertEqual(kid_of(jwt.decode()), "new",
                             "still signing with the key the file held "
                             "before the reload")
        from .fakes import get
        r = await get(reactor, scene.gw.admin, target="/.well-known/jwks.json")
        self.assertEqual(r.status, 200)
        self.assertEqual([k["kid"] for k in json.loads(r.body)["keys"]],
                         ["new", "old"])

    @async_test
    async def test_private_key_file_rotated_in_place_signs_the_assertion(self):
        """``private_key_jwt``: the client assertion is signed with the key
        the file holds after the reload."""
        path = os.path.abspath(self.mktemp())
        jwks_file(path, "assert-1")
        scene = await Scene.build(self, reactor, introspection={
            "auth_method": "private_key_jwt", "private_key_file": path,
            "private_key_alg": "ES256"})

        def assertion_kid():
            form = scene.ts.requests[-1].form
            return kid_of(form["client_assertion"][0])
        token, _ = scene.good_token()
        self.assertEqual((await scene.get(token)).status, 200)
        self.assertEqual(assertion_kid(), "assert-1")
        jwks_file(path, "assert-2")
        self.reload(scene)
        other, _ = scene.good_token()
        self.assertEqual((await scene.get(other)).status, 200)
        self.assertEqual(assertion_kid(), "assert-2")

    @async_test
    async def test_upstream_ca_replaced_in_place_is_used(self):
        """``[phantomd] upstream_ca_file`` rewritten in place with a CA that
        does not vouch for the API: the reload builds a new pool that
        refuses it (502), instead of keeping the old trust."""
        from .fakes import FakeAPI, TokenService, gateway_ini, start_gateway
        base = os.path.abspath(self.mktemp())
        api_cert, api_key = self_signed(os.path.join(base, "api"))
        stranger, _ = self_signed(os.path.join(base, "stranger"))
        ca = os.path.join(base, "upstream-ca.pem")
        shutil.copy(api_cert, ca)
        scene = Scene()
        scene.reactor = reactor
        scene.ts, scene.api = TokenService(reactor), FakeAPI(reactor)
        ts_port = scene.ts.listen()
        self.addCleanup(scene.ts.stop)
        api_port = scene.api.listen_tls(api_cert, api_key)
        self.addCleanup(scene.api.stop)
        scene.ini = gateway_ini(ts_port, api_port, phantomd={
            "upstream": "https://127.0.0.1:%d" % api_port,
            "upstream_ca_file": ca})
        scene.gw = await start_gateway(self, reactor, scene.ini)
        token, _ = scene.good_token()
        self.assertEqual((await scene.get(token)).status, 200)
        shutil.copy(stranger, ca)
        self.reload(scene)
        self.assertEqual((await scene.get(token)).status, 502)
        self.assertEqual(len(scene.api.requests), 1)


class RestartOnlyKeys(Reloads, unittest.TestCase):
    timeout = 15

    @async_test
    async def test_reverted_change_leaves_no_restart_warning(self):
        """Change a restart-only key, reload (warned), change it back,
        reload: nothing is pending any more, so no warning."""
        scene = await Scene.build(self, reactor)
        logs = LogLines(self)
        original = scene.ini
        self.reload(scene, phantomd={"workers": "3"})
        self.assertEqual(len(logs.matching("only after a restart")), 1)
        self.assertIn("[phantomd] workers",
                      logs.matching("only after a restart")[0])
        # Still pending after an unrelated change.
        self.reload(scene, phantomd={"realm": "other"})
        self.assertEqual(len(logs.matching("only after a restart")), 2)
        scene.ini = original
        scene.gw.gateway.reload(configmod.parse(original, "<reverted.ini>"))
        self.assertEqual(len(logs.matching("only after a restart")), 2,
                         logs.lines[-3:])
        self.assertTrue(logs.matching("configuration reloaded"))


class SecretFilePermissions(unittest.TestCase):
    def test_group_or_world_readable_secret_files_are_named(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        secret = os.path.join(base, "secret")
        key = os.path.join(base, "keys.jwks")
        cert, listener_key = self_signed(os.path.join(base, "tls"))
        with open(secret, "w") as f:
            f.write("s3cret\n")
        jwks_file(key, "k")
        os.chmod(secret, 0o640)
        os.chmod(key, 0o600)
        os.chmod(listener_key, 0o644)
        os.chmod(cert, 0o644)  # a certificate is public: no warning
        from .fakes import gateway_ini
        text = gateway_ini(1, 2, response="json", introspection={
            "client_secret": "", "client_secret_file": secret},
            minting={"key_file": key, "issuer": "https://gw.test"},
            phantomd={"listen": "ssl:0:interface=127.0.0.1:privateKey=%s:"
                      "certKey=%s" % (listener_key, cert)})
        c = configmod.parse(text, "x.ini")
        found = configmod.exposed_secret_files(c)
        self.assertEqual(sorted((s, k, p) for s, k, p, _ in found), sorted([
            ("introspection", "client_secret_file", secret),
            ("phantomd", "listen", listener_key)]))
        os.chmod(secret, 0o600)
        os.chmod(listener_key, 0o400)
        self.assertEqual(configmod.exposed_secret_files(c), [])

