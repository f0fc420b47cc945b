"""``[shared_cache]`` and ``[revocation]`` end to end: several Gateways on
loopback sharing one real ``redis-server``, a fake token service that
counts introspections, a fake API.

What a user would notice: a token is introspected once for the whole fleet;
Redis holds neither tokens nor JWTs and cannot be used to plant an answer;
Redis being slow, down or restarted changes nothing clients see except
speed; ``POST /revoke`` takes a token out of every process's cache.
"""

from __future__ import annotations

import base64
import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.trial.unittest import SkipTest

from tests.helpers_redis import REDIS_SERVER, SKIP_REASON, RedisServer
from tests.robustness.fakes import (
    Behaviour, FakeAPI, TokenService, async_test, gateway_ini, get,
    jwt_claims, make_jwt, new_token, one_request, start_gateway, wait_for)

# A burst of fresh connections can overflow the fake API's listen backlog
# (50): the kernel then retries the SYN after 1 s, past the fakes' 1 s
# upstream_connect_timeout.
LENIENT = {"phantomd": {"header_timeout": "5", "idle_timeout": "10",
                        "upstream_timeout": "5",
                        "upstream_connect_timeout": "5"},
           "introspection": {"timeout": "5"}}
SECRET = b"0123456789abcdef0123456789abcdef-fleet-secret"
BEARER = b"revocation-bearer-for-the-tests-0123"


class Held(Behaviour):
    """Hold every introspection until ``release()``, then answer each with
    ``answer(request)``."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.held: list = []

    def run(self, conn, request) -> None:
        self.held.append((conn, request))

    def release(self) -> None:
        held, self.held = self.held, []
        for conn, request in held:
            if not conn.lost:
                self.answer(request).run(conn, request)


def sample(gw, name, **labels) -> float:
    return gw.metrics.sample(name, labels)


class Fleet:
    def __init__(self, ts, api, gateways, redis) -> None:
        self.ts, self.api, self.gws, self.redis = ts, api, gateways, redis

    async def get(self, i: int, token: str, **kw):
        return await get(reactor, self.gws[i].front, token, **kw)


class FleetCase(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        if REDIS_SERVER is None:
            raise SkipTest(SKIP_REASON)
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.stop)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.secret_file = self._file("fleet-secret", SECRET)
        self.bearer_file = self._file("revocation-token", BEARER)

    def _file(self, name: str, content: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def sections(self, url=None, **extra) -> dict:
        merged = {name: dict(keys) for name, keys in LENIENT.items()}
        merged["shared_cache"] = {"url": url or self.redis.url,
                                  "secret_file": self.secret_file}
        merged["revocation"] = {"token_file": self.bearer_file}
        for name, keys in extra.items():
            merged.setdefault(name, {}).update(keys)
        return merged

    async def fleet(self, n: int = 2, url=None, **extra) -> Fleet:
        ts, api = TokenService(reactor), FakeAPI(reactor)
        ts_port, api_port = ts.listen(), api.listen()
        self.addCleanup(ts.stop)
        self.addCleanup(api.stop)
        ini = gateway_ini(ts_port, api_port, "jwt",
                          **self.sections(url, **extra))
        gws = [await start_gateway(self, reactor, ini) for _ in range(n)]
        self.assertTrue(await wait_for(reactor, lambda: all(
            g.gateway.fleet.shared.client.connected
            and g.gateway.fleet.shared.subscriber.connected
            for g in gws), 10), "the gateways never connected to Redis")
        return Fleet(ts, api, gws, self.redis)

    async def revoke(self, gw, body: bytes, bearer: bytes = BEARER,
                     method: str = "POST"):
        head = [b"%s /revoke HTTP/1.1" % method.encode(),
                b"Host: admin", b"Connection: close",
                b"Content-Type: application/x-www-form-urlencoded",
                b"Content-Length: %d" % len(body)]
        if bearer is not None:
            head.append(b"Authorization: Bearer " + bearer)
        return await one_request(reactor, gw.admin,
                                 b"\r\n".join(head) + b"\r\n\r\n" + body)


class SharedTierTests(FleetCase):

    @async_test
    async def test_one_introspection_for_the_fleet(self):
        f = await self.fleet(3)
        token = new_token()
        jwt = f.ts.activate(token)
        for i in range(3):
            r = await f.get(i, token)
            self.assertEqual(r.status, 200, r.body)
            self.assertEqual(f.api.requests[-1].header(b"authorization"),
                             [b"Bearer " + jwt.encode()])
        self.assertEqual(f.ts.calls_for(token), 1)
        self.assertEqual(sample(f.gws[1], "phantomd_shared_cache_lookups_total",
                                result="hit"), 1)

    @async_test
    async def test_redis_holds_no_token_and_no_jwt(self):
        f = await self.fleet(2)
        secrets = []
        for _ in range(5):
            token = new_token()
            jwt = f.ts.activate(token, sub="alice@example.com")
            secrets += [token, jwt] + jwt.split(".")
            self.assertEqual((await f.get(0, token)).status, 200)
        inactive = new_token()
        secrets.append(inactive)
        self.assertEqual((await f.get(0, inactive)).status, 401)
        dump = self.redis.dump()
        self.assertTrue(dump, "nothing was written to Redis")
        text = repr(dump).encode()
        for s in secrets + ["alice"]:
            self.assertNotIn(s.encode(), text)
            self.assertNotIn(base64.b64encode(s.encode())[:16], text)

    @async_test
    async def test_entry_forged_without_the_secret_is_ignored(self):
        """Someone who can write to Redis, and even knows the key (say,
        from a dump), but not the fleet secret: the value they plant is
        not taken; the token service is asked and its answer served."""
        from phantomd.fleet.wiring import identity
        from phantomd.fleet.sharedcache import FleetKeys, encode_result
        from phantomd.token.outcomes import Active
        f = await self.fleet(1)
        token = new_token()
        real = f.ts.activate(token)
        gw = f.gws[0].gateway
        rkey = gw.fleet.shared.keys.redis_key(token)
        evil_jwt = make_jwt({"sub": "admin", "scope": "everything"})
        for forger in (FleetKeys(b"x" * 32, identity(gw.config), "phantomd:"),
                       None):
            now = reactor.seconds()
            plain = encode_result(Active(evil_jwt, jwt_claims(evil_jwt),
                                         300), now + 300, now)
            value = (forger.seal(token, rkey, plain) if forger
                     else b"\x01" + b"\0" * 12 + plain)
            self.redis.command("SET", rkey, value, "PX", 60000)
            gw.cache.clear()
            before = f.ts.calls_for(token)
            r = await f.get(0, token)
            self.assertEqual(r.status, 200)
            self.assertEqual(f.api.requests[-1].header(b"authorization"),
                             [b"Bearer " + real.encode()])
            self.assertEqual(f.ts.calls_for(token), before + 1)
        self.assertEqual(sample(f.gws[0], "phantomd_shared_cache_lookups_total",
                                result="refused"), 2)

    @async_test
    async def test_value_copied_to_another_tokens_key_is_refused(self):
        f = await self.fleet(2)
        good, bad = new_token(), new_token()
        f.ts.activate(good)
        self.assertEqual((await f.get(0, good)).status, 200)
        keys = f.gws[0].gateway.fleet.shared.keys
        value = self.redis.command("GET", keys.redis_key(good))
        self.assertIsNotNone(value)
        self.redis.command("SET", keys.redis_key(bad), value, "PX", 60000)
        r = await f.get(1, bad)
        self.assertEqual(r.status, 401)  # the token service says inactive
        self.assertEqual(f.ts.calls_for(bad), 1)

    @async_test
    async def test_redis_ttl_follows_the_local_rules(self):
        f = await self.fleet(1, cache={"negative_ttl": "7"})
        keys = f.gws[0].gateway.fleet.shared.keys
        active = new_token()
        f.ts.activate(active)  # max-age=300 (the fake's default)
        await f.get(0, active)
        pttl = self.redis.command("PTTL", keys.redis_key(active))
        self.assertTrue(290000 < pttl <= 300000, pttl)
        inactive = new_token()
        f.ts.cache_control = "max-age=600"
        from tests.robustness.fakes import Reply
        f.ts.default = Reply(204, ((b"Cache-Control", b"max-age=600"),))
        await f.get(0, inactive)
        pttl = self.redis.command("PTTL", keys.redis_key(inactive))
        self.assertTrue(0 < pttl <= 7000, pttl)
        short = new_token()
        f.ts.activate(short, jwt=make_jwt(lifetime=20))
        await f.get(0, short)
        pttl = self.redis.command("PTTL", keys.redis_key(short))
        self.assertTrue(0 < pttl <= 20000, pttl)
        nostore = new_token()
        f.ts.activate(nostore)
        f.ts.cache_control = "no-store"
        await f.get(0, nostore)
        self.assertIsNone(self.redis.command("GET", keys.redis_key(nostore)))

    @async_test
    async def test_failures_are_not_stored(self):
        from tests.robustness.fakes import Reply
        f = await self.fleet(2)
        token = new_token()
        f.ts.behaviour = Reply(500)
        self.assertEqual((await f.get(0, token)).status, 502)
        keys = f.gws[0].gateway.fleet.shared.keys
        self.assertIsNone(self.redis.command("GET", keys.redis_key(token)))
        f.ts.behaviour = None
        f.ts.activate(token)
        self.assertEqual((await f.get(1, token)).status, 200)

    @async_test
    async def test_redis_killed_then_restarted(self):
        f = await self.fleet(2)
        cached = new_token()
        f.ts.activate(cached)
        self.assertEqual((await f.get(0, cached)).status, 200)
        self.redis.kill()
        shared = f.gws[0].gateway.fleet.shared
        self.assertTrue(await wait_for(reactor,
                                       lambda: not shared.client.connected, 5))
        # Served from the local cache, no introspection.
        self.assertEqual((await f.get(0, cached)).status, 200)
        self.assertEqual(f.ts.calls_for(cached), 1)
        # A new token: each process introspects it itself; never a 5xx.
        fresh = new_token()
        f.ts.activate(fresh)
        for i in (0, 1):
            self.assertEqual((await f.get(i, fresh)).status, 200)
        self.assertEqual(f.ts.calls_for(fresh), 2)
        # A forged-looking nothing: inactive tokens still refused.
        self.assertEqual((await f.get(1, new_token())).status, 401)
        self.assertGreater(sample(f.gws[0], "phantomd_shared_cache_errors_total",
                                  kind="unavailable"), 0)
        # Redis comes back on the same port: everyone reconnects by itself.
        self.redis.start()
        self.assertTrue(await wait_for(reactor, lambda: all(
            g.gateway.fleet.shared.client.connected and
            g.gateway.fleet.shared.subscriber.connected for g in f.gws), 15))
        # Revocations sent while the pub/sub link was down were missed, so
        # each process emptied its local cache on resubscribing.
        self.assertEqual((await f.get(0, cached)).status, 200)
        self.assertEqual(f.ts.calls_for(cached), 2)
        again = new_token()
        f.ts.activate(again)
        for i in (0, 1):
            self.assertEqual((await f.get(i, again)).status, 200)
        self.assertEqual(f.ts.calls_for(again), 1)

    @async_test
    async def test_slow_redis_counts_as_a_miss(self):
        f = await self.fleet(1)
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        token = new_token()
        f.ts.activate(token)
        r = await f.get(0, token)
        self.assertEqual(r.status, 200)
        self.assertEqual(f.ts.calls_for(token), 1)
        self.assertGreater(sample(f.gws[0], "phantomd_shared_cache_errors_total",
                                  kind="timeout"), 0)
        self.redis.resume()


    @async_test
    async def test_reload_to_another_identity_reads_no_old_answers(self):
        """SIGHUP with a setting that changes what answers mean: the
        reloaded process does not take the fleet's old answers."""
        from phantomd import config as configmod
        f = await self.fleet(2)
        token = new_token()
        f.ts.activate(token)
        self.assertEqual((await f.get(0, token)).status, 200)
        gw = f.gws[1]
        text = gateway_ini(f.ts.portnum, f.api.portnum, "jwt",
                           **self.sections(introspection={
                               "token_type_hint": "access_token"}))
        gw.gateway.reload(configmod.parse(text, "<reloaded>"))
        self.assertEqual((await f.get(1, token)).status, 200)
        self.assertEqual(f.ts.calls_for(token), 2)
        self.assertEqual(sample(gw, "phantomd_shared_cache_lookups_total",
                                result="hit"), 0)

    @async_test
    async def test_full_redis_still_serves_its_answers(self):
        """maxmemory reached (noeviction): writes fail, reads still serve,
        new tokens are introspected; clients see no difference."""
        f = await self.fleet(2)
        token = new_token()
        f.ts.activate(token)
        self.assertEqual((await f.get(0, token)).status, 200)
        self.redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        self.redis.command("CONFIG", "SET", "maxmemory", "1")
        self.addCleanup(lambda: self.redis.command("CONFIG", "SET",
                                                   "maxmemory", "0"))
        self.assertEqual((await f.get(1, token)).status, 200)
        self.assertEqual(f.ts.calls_for(token), 1)
        fresh = new_token()
        f.ts.activate(fresh)
        for i in (0, 1):
            self.assertEqual((await f.get(i, fresh)).status, 200)
        self.assertEqual(f.ts.calls_for(fresh), 2)
        self.assertGreater(sample(f.gws[0], "phantomd_shared_cache_errors_total",
                                  kind="error"), 0)


class TransportTests(FleetCase):
    """unix://, rediss:// and a password, each against a real server."""

    def setUp(self) -> None:
        super().setUp()
        self.redis.stop()

    async def one_token_two_gateways(self, f):
        token = new_token()
        f.ts.activate(token)
        for i in (0, 1):
            self.assertEqual((await f.get(i, token)).status, 200)
        self.assertEqual(f.ts.calls_for(token), 1)

    @async_test
    async def test_unix_socket(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.stop)
        await self.one_token_two_gateways(
            await self.fleet(2, url=self.redis.unix_url + "?db=3"))
        self.assertIn(b"db3", self.redis.command("INFO", "keyspace"))

    @async_test
    async def test_tls(self):
        self.redis = RedisServer()
        ca = self.redis.enable_tls()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        await self.one_token_two_gateways(await self.fleet(
            2, url=self.redis.tls_url, shared_cache={"ca_file": ca}))

    @async_test
    async def test_password(self):
        self.redis = RedisServer(["--requirepass", "redis-pass-123"]).start()
        self.addCleanup(self.redis.stop)
        pw = self._file("redis-password", b"redis-pass-123\n")
        await self.one_token_two_gateways(await self.fleet(
            2, shared_cache={"password_file": pw}))

    @async_test
    async def test_wrong_password_is_a_miss_not_an_error(self):
        self.redis = RedisServer(["--requirepass", "redis-pass-123"]).start()
        self.addCleanup(self.redis.stop)
        pw = self._file("redis-password", b"wrong\n")
        ts, api = TokenService(reactor), FakeAPI(reactor)
        self.addCleanup(ts.stop)
        self.addCleanup(api.stop)
        ini = gateway_ini(ts.listen(), api.listen(), "jwt", **self.sections(
            shared_cache={"password_file": pw}))
        gw = await start_gateway(self, reactor, ini)
        token = new_token()
        ts.activate(token)
        self.assertEqual((await get(reactor, gw.front, token)).status, 200)
        self.assertFalse(gw.gateway.fleet.shared.client.connected)


class FleetCoalescingTests(FleetCase):

    @async_test
    async def test_concurrent_misses_on_two_processes_introspect_once(self):
        f = await self.fleet(2)
        token = new_token()
        jwt = f.ts.activate(token)
        held = Held(lambda request: f.ts.active_reply(jwt))
        f.ts.behaviour = held
        first = defer.ensureDeferred(f.get(0, token))
        self.assertTrue(await wait_for(reactor, lambda: held.held, 5))
        second = defer.ensureDeferred(f.get(1, token))
        self.assertTrue(await wait_for(reactor, lambda: sample(
            f.gws[1], "phantomd_shared_cache_leases_total",
            result="waited") == 1, 5))
        held.release()
        a, b = await first, await second
        self.assertEqual((a.status, b.status), (200, 200))
        self.assertEqual(f.ts.calls_for(token), 1)
        self.assertEqual(f.api.requests[-1].header(b"authorization"),
                         [b"Bearer " + jwt.encode()])

    @async_test
    async def test_lease_of_a_dead_holder_is_taken_over(self):
        """A process took the lease and died: after the lease time another
        process introspects the token itself."""
        f = await self.fleet(1, introspection={"timeout": "0.5"})
        token = new_token()
        f.ts.activate(token)
        shared = f.gws[0].gateway.fleet.shared
        lease = shared.keys.lease_key(shared.keys.redis_key(token))
        self.redis.command("SET", lease, "dead-process", "PX",
                           int(shared.lease_time * 1000))
        r = await f.get(0, token)
        self.assertEqual(r.status, 200)
        self.assertEqual(f.ts.calls_for(token), 1)
        self.assertEqual(sample(f.gws[0], "phantomd_shared_cache_leases_total",
                                result="expired"), 1)
        self.assertEqual(sample(f.gws[0], "phantomd_shared_cache_leases_total",
                                result="acquired"), 1)


class RevocationTests(FleetCase):

    @async_test
    async def test_bearer_is_required(self):
        f = await self.fleet(1)
        r = await self.revoke(f.gws[0], b"token=abc", bearer=None)
        self.assertEqual(r.status, 401)
        self.assertEqual(r.first(b"www-authenticate"),
                         b'Bearer realm="phantomd-revocation"')
        r = await self.revoke(f.gws[0], b"token=abc", bearer=BEARER[:-1])
        self.assertEqual(r.status, 401)
        self.assertIn(b'error="invalid_token"', r.first(b"www-authenticate"))
        r = await self.revoke(f.gws[0], b"token=abc", bearer=BEARER + b"x")
        self.assertEqual(r.status, 401)
        r = await self.revoke(f.gws[0], b"", method="GET")
        self.assertEqual(r.status, 405)
        r = await self.revoke(f.gws[0], b"nothing=here")
        self.assertEqual(r.status, 400)
        r = await self.revoke(f.gws[0], b"token=a&sub=b")
        self.assertEqual(r.status, 400)

    @async_test
    async def test_reload_rotates_the_bearer(self):
        from phantomd import config as configmod
        f = await self.fleet(1)
        gw = f.gws[0]
        with open(self.bearer_file, "wb") as fh:
            fh.write(b"the-next-revocation-bearer-456")
        gw.gateway.reload(configmod.parse(gateway_ini(
            f.ts.portnum, f.api.portnum, "jwt", **self.sections()), "<r>"))
        self.assertEqual((await self.revoke(gw, b"token=abc")).status, 401)
        r = await self.revoke(gw, b"token=abc",
                              bearer=b"the-next-revocation-bearer-456")
        self.assertEqual(r.status, 200)

    @async_test
    async def test_revoked_token_leaves_every_process(self):
        f = await self.fleet(3)
        token = new_token()
        f.ts.activate(token)
        for i in range(3):
            self.assertEqual((await f.get(i, token)).status, 200)
        self.assertEqual(f.ts.calls_for(token), 1)
        from phantomd.token.tokens import token_key
        key = token_key(token)
        self.assertTrue(all(g.gateway.cache.get(key) for g in f.gws))
        del f.ts.tokens[token]  # the token service revoked it too
        start = reactor.seconds()
        r = await self.revoke(f.gws[0], b"token=" + token.encode())
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(await wait_for(reactor, lambda: all(
            g.gateway.cache.get(key) is None for g in f.gws), 5,
            interval=0.001))
        elapsed = reactor.seconds() - start
        print("revocation fan-out to 3 processes: %.1f ms" % (elapsed * 1000))
        for i in range(3):
            self.assertEqual((await f.get(i, token)).status, 401)
        self.assertEqual(sample(f.gws[2], "phantomd_shared_cache_revocations_total",
                                kind="token"), 1)

    @async_test
    async def test_revoked_subject_leaves_every_process_and_redis(self):
        f = await self.fleet(2)
        alice = [new_token() for _ in range(3)]
        bob = new_token()
        for t in alice:
            f.ts.activate(t, sub="alice")
        f.ts.activate(bob, sub="bob")
        for t in alice + [bob]:
            for i in (0, 1):
                self.assertEqual((await f.get(i, t)).status, 200)
        keys = f.gws[0].gateway.fleet.shared.keys
        for t in alice:
            del f.ts.tokens[t]
        r = await self.revoke(f.gws[1], b"sub=alice")
        self.assertEqual(r.status, 200, r.body)
        for t in alice:
            self.assertIsNone(self.redis.command("GET", keys.redis_key(t)))
        self.assertIsNotNone(self.redis.command("GET", keys.redis_key(bob)))
        from phantomd.token.tokens import token_key
        self.assertTrue(await wait_for(reactor, lambda: all(
            g.gateway.cache.get(token_key(t)) is None
            for g in f.gws for t in alice), 5, interval=0.001))
        for t in alice:
            self.assertEqual((await f.get(0, t)).status, 401)
        self.assertEqual((await f.get(0, bob)).status, 200)
        self.assertEqual(f.ts.calls_for(bob), 1)

    @async_test
    async def test_forged_revocation_message_is_ignored(self):
        f = await self.fleet(1)
        token = new_token()
        f.ts.activate(token)
        self.assertEqual((await f.get(0, token)).status, 200)
        from phantomd.token.tokens import token_key
        channel = f.gws[0].gateway.fleet.shared.keys.channel
        self.redis.command("PUBLISH", channel, json.dumps(
            {"t": "token", "k": token_key(token).hex()}))
        self.assertTrue(await wait_for(reactor, lambda: sample(
            f.gws[0], "phantomd_shared_cache_errors_total",
            kind="refused") == 1, 5))
        self.assertIsNotNone(f.gws[0].gateway.cache.get(token_key(token)))


class RevocationWithoutRedisTests(unittest.TestCase):
    timeout = 15

    @async_test
    async def test_revoke_on_one_process(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        bearer = os.path.join(d, "token")
        with open(bearer, "wb") as fh:
            fh.write(BEARER)
        ts, api = TokenService(reactor), FakeAPI(reactor)
        ts_port, api_port = ts.listen(), api.listen()
        self.addCleanup(ts.stop)
        self.addCleanup(api.stop)
        sections = {name: dict(keys) for name, keys in LENIENT.items()}
        sections["revocation"] = {"token_file": bearer}
        gw = await start_gateway(self, reactor, gateway_ini(
            ts_port, api_port, "jwt", **sections))
        token = new_token()
        ts.activate(token, sub="carol")
        self.assertEqual((await get(reactor, gw.front, token)).status, 200)
        self.assertEqual((await get(reactor, gw.front, token)).status, 200)
        self.assertEqual(ts.calls_for(token), 1)
        del ts.tokens[token]
        body = b"sub=carol"
        r = await one_request(reactor, gw.admin, b"\r\n".join([
            b"POST /revoke HTTP/1.1", b"Host: a", b"Connection: close",
            b"Authorization: Bearer " + BEARER,
            b"Content-Type: application/x-www-form-urlencoded",
            b"Content-Length: %d" % len(body), b"", body]))
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual((await get(reactor, gw.front, token)).status, 401)
        self.assertEqual(ts.calls_for(token), 2)


async def scrape(port: int) -> str:
    from tests.robustness.fakes import request_bytes
    r = await one_request(reactor, port, request_bytes(
        "GET", "/metrics", None, (), b"", close=True))
    return r.body.decode()


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


class ProcessTests(FleetCase):
    """Gateways in processes of their own, killed with SIGKILL."""

    timeout = 60

    async def spawn(self, n: int, **extra):
        from tests.robustness.fakes import spawn_gateway
        ts, api = TokenService(reactor), FakeAPI(reactor)
        ts_port, api_port = ts.listen(), api.listen()
        self.addCleanup(ts.stop)
        self.addCleanup(api.stop)
        ini = gateway_ini(ts_port, api_port, "jwt",
                          **self.sections(**extra))
        procs = [await spawn_gateway(self, reactor, ini) for _ in range(n)]
        for p in procs:
            up = [0.0]

            async def poll(p=p):
                up[0] = metric(await scrape(p.admin),
                               "phantomd_shared_cache_connected")
            for _ in range(200):
                await poll()
                if up[0] == 1:
                    break
                await _sleep(0.05)
            self.assertEqual(up[0], 1, "process never connected to Redis")
        return ts, api, procs

    @async_test
    async def test_lease_holder_killed(self):
        ts, api, (a, b) = await self.spawn(
            2, introspection={"timeout": "0.5"})
        token = new_token()
        jwt = ts.activate(token)
        held = Held(lambda request: ts.active_reply(jwt))
        ts.behaviour = held
        first = defer.ensureDeferred(get(reactor, a.front, token))
        first.addErrback(lambda f: None)  # its process dies
        self.assertTrue(await wait_for(reactor, lambda: held.held, 10))
        second = defer.ensureDeferred(get(reactor, b.front, token))
        waited = 'phantomd_shared_cache_leases_total{result="waited"}'
        self.assertTrue(await _until(lambda: scrape(b.admin),
                                     lambda t: metric(t, waited) == 1))
        a.transport.signalProcess("KILL")
        await a.ended
        ts.behaviour = None
        r = await second
        self.assertEqual(r.status, 200)
        self.assertEqual(ts.calls_for(token), 2)  # the dead one's, and B's
        text = await scrape(b.admin)
        self.assertEqual(metric(
            text, 'phantomd_shared_cache_leases_total{result="expired"}'), 1)
        self.assertEqual(metric(
            text, 'phantomd_shared_cache_leases_total{result="acquired"}'), 1)

    @async_test
    async def test_burst_across_three_processes_with_redis_killed(self):
        ts, api, procs = await self.spawn(3)
        tokens = [new_token() for _ in range(30)]
        for t in tokens:
            ts.activate(t)

        async def burst(n: int) -> list:
            ds = [defer.ensureDeferred(get(
                reactor, procs[i % 3].front, tokens[i % len(tokens)]))
                for i in range(n)]
            return [r.status for r in await defer.gatherResults(ds)]

        statuses = await burst(90)
        self.assertEqual(set(statuses), {200})
        self.assertEqual({ts.calls_for(t) for t in tokens}, {1})
        fresh = [new_token() for _ in range(30)]
        for t in fresh:
            ts.activate(t)
        tokens = fresh
        running = defer.ensureDeferred(burst(90))
        self.redis.kill()  # SIGKILL while the burst is in flight
        statuses = await running
        self.assertEqual(set(statuses), {200}, statuses)
        # Each process introspected a token at most once.
        self.assertLessEqual(max(ts.calls_for(t) for t in fresh), 3)


async def _sleep(seconds: float) -> None:
    from twisted.internet import task
    await task.deferLater(reactor, seconds, lambda: None)


async def _until(read, predicate, timeout: float = 10.0) -> bool:
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        if predicate(await read()):
            return True
        await _sleep(0.02)
    return False


class SentinelTests(FleetCase):
    """``redis-sentinel://``: a primary, a replica and one sentinel, all
    real; when the primary dies the fleet follows Sentinel to the new one."""

    timeout = 60

    def sentinel(self, master_port: int):
        import subprocess
        from tests.helpers_redis import _free_port
        port = _free_port()
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write("port %d\nbind 127.0.0.1\ndir %s\n"
                    "sentinel monitor svc 127.0.0.1 %d 1\n"
                    "sentinel down-after-milliseconds svc 1000\n"
                    "sentinel failover-timeout svc 3000\n"
                    % (port, self.dir, master_port))
        proc = subprocess.Popen([REDIS_SERVER, conf, "--sentinel"],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (proc.kill(), proc.wait()))
        return port

    @async_test
    async def test_failover(self):
        replica = RedisServer(["--replicaof", "127.0.0.1",
                               str(self.redis.port)]).start()
        self.addCleanup(replica.stop)
        sport = self.sentinel(self.redis.port)
        sentinel = RedisServer()  # only to talk to it
        self.addCleanup(sentinel.stop)
        sentinel.port, sentinel.password = sport, None

        def knows_replica() -> bool:
            try:
                info = replica.command("INFO", "replication")
                if b"master_link_status:up" not in info:
                    return False
                return bool(sentinel.command("SENTINEL", "REPLICAS", "svc"))
            except OSError:
                return False
        self.assertTrue(await wait_for(reactor, knows_replica, 30))
        f = await self.fleet(2, url="redis-sentinel://127.0.0.1:%d/svc" % sport)
        token = new_token()
        f.ts.activate(token)
        for i in (0, 1):
            self.assertEqual((await f.get(i, token)).status, 200)
        self.assertEqual(f.ts.calls_for(token), 1)
        self.redis.kill()  # the primary dies; Sentinel promotes the replica
        during = new_token()
        f.ts.activate(during)
        for i in (0, 1):
            self.assertEqual((await f.get(i, during)).status, 200)
        self.assertTrue(await wait_for(reactor, lambda: b"role:master" in (
            replica.command("INFO", "replication")), 30))
        # Clients never see an error meanwhile; once the fleet follows the
        # new primary, a new token is introspected once again.
        keys = f.gws[0].gateway.fleet.shared.keys

        async def shared_on_new_primary() -> bool:
            t = new_token()
            f.ts.activate(t)
            for i in (0, 1):
                self.assertEqual((await f.get(i, t)).status, 200)
            return replica.command("GET", keys.redis_key(t)) is not None \
                and f.ts.calls_for(t) == 1
        for _ in range(100):
            if await shared_on_new_primary():
                break
            await _sleep(0.1)
        else:
            self.fail("the fleet never used the new primary")
