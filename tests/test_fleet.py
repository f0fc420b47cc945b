"""``[shared_cache]`` / ``[revocation]`` without Redis: config mistakes are
one line naming the key, and what the fleet keys derive is bound to the
secret, the config identity and the token."""

import os

from twisted.trial.unittest import SynchronousTestCase

from phantomd import config

from phantomd.fleet import wiring as fleet
from phantomd.config import ConfigError
from phantomd.token.outcomes import Active
from phantomd.fleet.redisconn import parse_url
from phantomd.fleet.sharedcache import FleetKeys, decode_result, encode_result

MINIMAL = """\
[phantomd]
upstream = http://127.0.0.1:3000
[introspection]
url = http://127.0.0.1:8443/introspect
client_id = gw
client_secret = s3cret
"""

SECRET = b"s" * 40



class KeyCache:
    """The local cache as the fleet sees it: which keys it holds."""

    def __init__(self):
        self.keys = set()

    def ttl(self, result):
        return 60.0

    def discard(self, key):
        self.keys.discard(key)

    def clear(self):
        self.keys.clear()

class ConfigTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def file(self, name, content):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def load(self, extra):
        c = config.parse(MINIMAL + extra, "/etc/p.ini")
        fleet.check(c)
        return c

    def assertRefused(self, extra, section, key, words):
        with self.assertRaises(ConfigError) as e:
            self.load(extra)
        msg = str(e.exception)
        self.assertNotIn("\n", msg)
        self.assertIn("/etc/p.ini: [%s] %s: " % (section, key), msg)
        self.assertIn(words, msg)

    def test_off_by_default(self):
        c = self.load("")
        self.assertIsNone(c.shared_cache.url)
        self.assertEqual(c.shared_cache.timeout, 0.05)

    def test_url_without_secret_file(self):
        self.assertRefused("[shared_cache]\nurl = redis://127.0.0.1\n",
                           "shared_cache", "secret_file", "required with url")

    def test_unreadable_secret_file(self):
        self.assertRefused(
            "[shared_cache]\nurl = redis://127.0.0.1\nsecret_file = %s\n"
            % os.path.join(self.dir, "absent"),
            "shared_cache", "secret_file", "cannot read")

    def test_short_secret(self):
        path = self.file("short", b"tooshort\n")
        self.assertRefused(
            "[shared_cache]\nurl = redis://127.0.0.1\nsecret_file = %s\n"
            % path, "shared_cache", "secret_file", "at least 32 are needed")

    def test_bad_urls(self):
        for url in ("http://127.0.0.1", "redis://", "unix://host/x",
                    "redis://h/notanumber", "redis://h:99999"):
            self.assertRefused("[shared_cache]\nurl = %s\n" % url,
                               "shared_cache", "url", url)

    def test_short_revocation_token(self):
        path = self.file("rt", b"short")
        self.assertRefused("[revocation]\ntoken_file = %s\n" % path,
                           "revocation", "token_file", "at least 16")

    def test_revocation_with_workers_needs_no_redis(self):
        # The parent tells its workers itself (phantomd.fleet.workerrevoke).
        path = self.file("rt", b"a-long-enough-revocation-token")
        c = config.parse(MINIMAL.replace("[phantomd]\n",
                                         "[phantomd]\nworkers = 2\n")
                         + "[revocation]\ntoken_file = %s\n" % path,
                         "/etc/p.ini")
        self.assertEqual((c.phantomd.workers, c.shared_cache.url,
                          c.revocation.token_file), (2, None, path))
        fleet.check(c)

    def test_good(self):
        secret = self.file("secret", SECRET + b"\n")
        c = self.load("[shared_cache]\nurl = rediss://u:p@redis.example:6380/2"
                      "\nsecret_file = %s\n" % secret)
        self.assertEqual(fleet.read_secrets(c).fleet, SECRET)


class URLTests(SynchronousTestCase):
    def test_forms(self):
        t = parse_url("redis://:pw@10.0.0.1:6380/3")
        self.assertEqual((t.host, t.port, t.db, t.password, t.tls),
                         ("10.0.0.1", 6380, 3, "pw", False))
        self.assertTrue(parse_url("rediss://r.example").tls)
        t = parse_url("unix:///run/redis.sock?db=4")
        self.assertEqual((t.path, t.db), ("/run/redis.sock", 4))
        t = parse_url("redis-sentinel://:pw@s1:26379,s2/mymaster/2")
        self.assertEqual((t.sentinels, t.service, t.db, t.password),
                         ((("s1", 26379), ("s2", 26379)), "mymaster", 2,
                          "pw"))
        for bad in ("redis-sentinel://s1:x/svc", "redis-sentinel://s1",
                    "redis-sentinel://s1/svc/notadb"):
            with self.assertRaises(ValueError):
                parse_url(bad)


class KeysTests(SynchronousTestCase):
    def test_key_depends_on_secret_and_identity(self):
        a = FleetKeys(SECRET, b"id1", "p:")
        self.assertTrue(a.redis_key("tok").startswith(b"p:t:"))
        self.assertNotIn(b"tok", a.redis_key("tok"))
        self.assertNotEqual(a.redis_key("tok"),
                            FleetKeys(b"t" * 40, b"id1", "p:").redis_key("tok"))
        self.assertNotEqual(a.redis_key("tok"),
                            FleetKeys(SECRET, b"id2", "p:").redis_key("tok"))

    def test_value_opens_only_for_its_token_key_and_fleet(self):
        keys = FleetKeys(SECRET, b"id", "p:")
        plain = encode_result(Active("a.b.c", {"sub": "x"}, 60), 100.0, 1.0)
        k1 = keys.redis_key("one")
        sealed = keys.seal("one", k1, plain)
        self.assertNotIn(b"a.b.c", sealed)
        self.assertEqual(keys.open("one", k1, sealed), plain)
        self.assertIsNone(keys.open("two", keys.redis_key("two"), sealed))
        self.assertIsNone(keys.open("one", keys.redis_key("two"), sealed))
        self.assertIsNone(FleetKeys(SECRET, b"other", "p:").open(
            "one", k1, sealed))
        tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
        self.assertIsNone(keys.open("one", k1, tampered))

    def test_expired_value_is_a_miss(self):
        plain = encode_result(Active("a.b.c", {}, 60), 100.0, 1.0)
        result, at = decode_result(plain, 40.0)
        self.assertEqual(result.lifetime, 60.0)
        self.assertIsNone(decode_result(plain, 100.0))

    def test_events_are_authenticated(self):
        keys = FleetKeys(SECRET, b"id", "p:")
        other = FleetKeys(b"o" * 40, b"id", "p:")
        m = keys.seal_event({"t": "token", "k": "00"})
        self.assertEqual(keys.open_event(m), {"t": "token", "k": "00"})
        self.assertIsNone(other.open_event(m))
        self.assertIsNone(keys.open_event(b'{"t":"token","k":"00"}'))


class RotationTests(SynchronousTestCase):
    def test_sub_revocation_after_a_secret_rotation_reaches_older_answers(self):
        """Subjects are indexed under a digest keyed by the fleet secret: a
        rotation (SIGHUP) must not leave cached answers that a later
        ``sub=`` revocation can no longer find."""
        from twisted.internet.task import Clock
        from twisted.internet import defer
        from phantomd.ops.metrics import Metrics
        from phantomd.token.tokens import token_key

        class Introspector:
            def introspect(self, token):
                return defer.succeed(Active("a.b.c", {"sub": "alice"}, 60))

        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "secret")
        with open(path, "wb") as f:
            f.write(SECRET)
        text = MINIMAL + ("[shared_cache]\nurl = redis://127.0.0.1:1\n"
                          "secret_file = %s\n" % path)
        cache = KeyCache()
        f = fleet.Fleet(Clock(), config.parse(text, "/etc/p.ini"), cache,
                        Metrics())
        self.successResultOf(f.revoker.wrap(Introspector()).introspect(
            "tok"))
        cache.keys.add(token_key("tok"))  # what the local cache then holds
        with open(path, "wb") as fh:
            fh.write(b"n" * 40)
        f.reload(config.parse(text, "/etc/p.ini"))
        f.revoker.revoke_subject("alice")
        self.assertNotIn(token_key("tok"), cache.keys)


class CacheLimitsIdentityTests(SynchronousTestCase):
    def test_lower_cache_limits_on_reload_leave_the_old_redis_entries(self):
        """Redis entries live as long as the writer's [cache] rule said:
        after a reload lowering max_ttl (or min_ttl, to see revocations
        sooner), reading them would serve answers the new limits drop."""
        base = MINIMAL + "[cache]\n"
        for old, new in (("max_ttl = 3600\n", "max_ttl = 60\n"),
                         ("min_ttl = 300\n", "min_ttl = 0\n"),
                         ("negative_ttl = 60\n", "negative_ttl = 5\n"),
                         ("default_ttl = 60\n", "default_ttl = 0\n")):
            before = fleet.identity(config.parse(base + old, "/etc/p.ini"))
            after = fleet.identity(config.parse(base + new, "/etc/p.ini"))
            self.assertNotEqual(before, after, new)
            keys = FleetKeys(SECRET, before, "p:")
            rkey = keys.redis_key("tok")
            sealed = keys.seal("tok", rkey, b"{}")
            reloaded = FleetKeys(SECRET, after, "p:")
            self.assertIsNone(reloaded.open("tok", reloaded.redis_key("tok"),
                                            sealed))
            self.assertIsNone(reloaded.open("tok", rkey, sealed))


class ReloadIdentityTests(SynchronousTestCase):
    def test_identity_follows_a_reload_that_also_changes_a_restart_key(self):
        """A new token service and a new [shared_cache] timeout in one
        reload: the timeout waits for a restart, but answers of the old
        token service must not be read from Redis meanwhile."""
        from twisted.internet.task import Clock
        from phantomd.ops.metrics import Metrics

        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "secret")
        with open(path, "wb") as f:
            f.write(SECRET)
        shared = ("[shared_cache]\nurl = redis://127.0.0.1:1\n"
                  "secret_file = %s\n" % path)
        f = fleet.Fleet(Clock(), config.parse(MINIMAL + shared, "/p.ini"),
                        KeyCache(), Metrics())
        new = config.parse(MINIMAL.replace("8443", "9443") + shared
                           + "timeout = 0.2\n", "/p.ini")
        f.reload(new)
        self.assertEqual(f.shared.keys.identity, fleet.identity(new))


class FirstSubscriptionTests(SynchronousTestCase):
    def test_answers_cached_before_the_first_subscription_are_dropped(self):
        """The command connection can be up (answers read from Redis and
        cached) before the pub/sub one: revocations published until it
        subscribes were never heard, the first time as any other."""
        from twisted.internet.task import Clock
        from phantomd.ops.metrics import Metrics
        from phantomd.token.tokens import token_key

        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "secret")
        with open(path, "wb") as f:
            f.write(SECRET)
        cache = KeyCache()
        f = fleet.Fleet(Clock(), config.parse(
            MINIMAL + "[shared_cache]\nurl = redis://127.0.0.1:1\n"
            "secret_file = %s\n" % path, "/p.ini"), cache, Metrics())
        cache.keys.add(token_key("tok"))  # served before pub/sub was up
        f.shared.subscriber._on_connect()  # the first subscription
        self.assertEqual(cache.keys, set())
