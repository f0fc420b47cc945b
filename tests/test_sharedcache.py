"""``SharedTier`` on fakes: a Redis client whose answers the test gives by
hand, a fake introspector, a ``Clock``.  The orderings a real Redis makes
rare (a message overtaking an answer, a lease that never comes back) are
played here exactly."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from phantomd.ops.metrics import Metrics
from phantomd.token.outcomes import Active, Inactive, IntrospectionFailed
from phantomd.fleet.redisconn import Unavailable
from phantomd.fleet.sharedcache import FleetKeys, SharedTier

SECRET = b"k" * 40


class FakeRedis:
    def __init__(self) -> None:
        self.calls: list = []
        self.connected = True

    def call(self, *args):
        d = defer.Deferred()
        self.calls.append((args, d))
        return d

    def script(self, i):
        return self.calls[i][0][1]


class FakeIntrospector:
    def __init__(self) -> None:
        self.pending: list = []

    def introspect(self, token):
        d = defer.Deferred()
        self.pending.append((token, d))
        return d


class TierTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.redis = FakeRedis()
        self.sub = FakeRedis()
        self.metrics = Metrics()
        self.keys = FleetKeys(SECRET, b"id", "p:")
        self.tier = SharedTier(self.clock, self.redis, self.sub, self.keys,
                               lambda r: 60.0, self.metrics, lease_time=6.0)
        self.inner = FakeIntrospector()
        self.wrapped = self.tier.wrap(self.inner)

    def lease_count(self, result):
        return self.metrics.sample("phantomd_shared_cache_leases_total",
                                   {"result": result})

    def test_message_that_overtakes_the_lookup_answer_wakes_the_waiter(self):
        d = self.wrapped.introspect("tok")
        rkey = self.keys.redis_key("tok")
        self.assertEqual(len(self.redis.calls), 1)
        # The holder finished: its message arrives first...
        self.tier.message(self.keys.channel, self.keys.seal_event(
            {"t": "done", "r": rkey.decode()}))
        # ...then our lookup's answer, "leased elsewhere".
        self.redis.calls[0][1].callback([0])
        # Looked again at once, without waiting out the lease.
        self.assertEqual(len(self.redis.calls), 2)
        self.redis.calls[1][1].callback([1, self.keys.seal(
            "tok", rkey, b'{"u":1000,"at":0,"a":0}')])
        self.assertIsInstance(self.successResultOf(d), Inactive)
        self.assertEqual(self.inner.pending, [])
        self.assertEqual(self.lease_count("expired"), 0)

    def test_lease_never_released_expires_and_is_taken(self):
        d = self.wrapped.introspect("tok")
        self.redis.calls[0][1].callback([0])
        self.clock.advance(5.9)
        self.assertEqual(len(self.redis.calls), 1)
        self.clock.advance(0.2)
        self.assertEqual(len(self.redis.calls), 2)
        self.redis.calls[1][1].callback([2])  # ours now
        self.assertEqual(len(self.inner.pending), 1)
        self.inner.pending[0][1].callback(Active("a.b.c", {}, 30))
        self.assertEqual(len(self.redis.calls), 3)  # the store
        self.redis.calls[2][1].callback(1)
        self.assertIsInstance(self.successResultOf(d), Active)
        self.assertEqual(self.lease_count("expired"), 1)

    def test_a_lease_renewed_behind_an_expired_one_is_not_waited_for(self):
        # Someone keeps the lease key alive (a stuck holder, a Redis
        # writer): after one lease time the process introspects itself
        # instead of waiting MAX_ROUNDS lease times.
        d = self.wrapped.introspect("tok")
        self.redis.calls[0][1].callback([0])
        self.clock.advance(6.1)
        self.assertEqual(len(self.redis.calls), 2)
        self.redis.calls[1][1].callback([0])  # held again
        self.assertEqual(len(self.inner.pending), 1)
        self.inner.pending[0][1].callback(Inactive(30))
        self.redis.calls[2][1].callback(1)  # the store (no lease to give)
        self.assertIsInstance(self.successResultOf(d), Inactive)
        self.assertEqual(self.lease_count("expired"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_redis_failure_introspects_and_never_fails_the_caller(self):
        d = self.wrapped.introspect("tok")
        self.redis.calls[0][1].errback(Unavailable("down"))
        self.inner.pending[0][1].callback(Inactive(5))
        self.redis.calls[1][1].errback(Unavailable("down"))
        self.assertIsInstance(self.successResultOf(d), Inactive)
        self.assertEqual(self.metrics.sample(
            "phantomd_shared_cache_errors_total", {"kind": "unavailable"}), 2)

    def test_failed_introspection_gives_the_lease_back_and_is_not_stored(self):
        d = self.wrapped.introspect("tok")
        self.redis.calls[0][1].callback([2])
        self.inner.pending[0][1].errback(IntrospectionFailed("error", "x"))
        self.failureResultOf(d, IntrospectionFailed)
        self.assertEqual(len(self.redis.calls), 2)
        self.assertIn(b"DEL", self.redis.script(1))  # the release script
        self.assertNotIn(b"'SET', KEYS[1]", self.redis.script(1))

    def test_answer_introspected_before_its_subject_was_revoked_is_refused(self):
        rkey = self.keys.redis_key("tok")
        digest = self.keys.subject_digest("alice")
        self.tier.revoked_after = {digest: 50.0}.get
        d = self.wrapped.introspect("tok")
        self.redis.calls[0][1].callback([1, self.keys.seal(
            "tok", rkey, b'{"u":1000,"at":40,"a":1,"j":"a.b.c",'
                         b'"c":{"sub":"alice"}}')])
        self.assertEqual(len(self.inner.pending), 1)  # asked again
        self.inner.pending[0][1].callback(Active("d.e.f", {"sub": "alice"},
                                                 30))
        self.redis.calls[1][1].callback(1)
        self.assertEqual(self.successResultOf(d).jwt, "d.e.f")


class FakeCache:
    def __init__(self) -> None:
        self.discarded: list = []

    def discard(self, key) -> bool:
        self.discarded.append(key)
        return True


class RevokerIndexTests(SynchronousTestCase):
    def test_at_the_bound_the_oldest_leaves_index_and_cache(self):
        """A cached answer the sub index forgot could never be revoked by
        subject, so forgetting it also drops it from the cache."""
        from phantomd.fleet.revocation import Revoker
        from phantomd.token.tokens import token_key
        cache = FakeCache()
        revoker = Revoker(Clock(), cache, Metrics(), max_entries=2)
        inner = FakeIntrospector()
        wrapped = revoker.wrap(inner)
        for i, token in enumerate(("t1", "t2", "t3")):
            d = wrapped.introspect(token)
            inner.pending[i][1].callback(Active("a.b.c", {"sub": "u"}, 60))
            self.successResultOf(d)
        self.assertEqual(cache.discarded, [token_key("t1")])
        cache.discarded.clear()
        revoker.revoke_subject("u")
        self.assertEqual(set(cache.discarded),
                         {token_key("t2"), token_key("t3")})

    def test_listeners_hear_every_revocation_and_cannot_stop_one(self):
        # The front's tunnels listen here (DESIGN section 13).
        from phantomd.fleet.revocation import Revoker
        from phantomd.token.tokens import token_key
        cache = FakeCache()
        revoker = Revoker(Clock(), cache, Metrics(), max_entries=10)
        heard = []

        def broken(key, digest):
            raise RuntimeError("a listener went wrong")
        revoker.listeners += [broken, lambda k, d: heard.append((k, d))]
        revoker.revoke_token("tok")
        revoker.revoke_subject("u")
        self.assertEqual(heard, [(token_key("tok"), None),
                                 (None, revoker.digest("u"))])
        self.assertIn(token_key("tok"), cache.discarded)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_answer_started_before_a_subject_revocation_is_asked_again(self):
        from phantomd.fleet.revocation import Revoker
        clock = Clock()
        revoker = Revoker(clock, FakeCache(), Metrics(), max_entries=10)
        inner = FakeIntrospector()
        d = revoker.wrap(inner).introspect("tok")
        clock.advance(1)
        revoker.revoke_subject("u")
        inner.pending[0][1].callback(Active("old.jwt.x", {"sub": "u"}, 60))
        self.assertNoResult(d)
        inner.pending[1][1].callback(Inactive(5))
        self.assertIsInstance(self.successResultOf(d), Inactive)


class HolderFailureTests(SynchronousTestCase):
    setUp = TierTests.setUp
    def test_holder_failure_makes_waiters_ask_at_once(self):
        """The holder's token service call failed: waiting for another
        round would stack timeouts; the waiter introspects itself now."""
        d = self.wrapped.introspect("tok")
        rkey = self.keys.redis_key("tok")
        self.redis.calls[0][1].callback([0])
        self.tier.message(self.keys.channel, self.keys.seal_event(
            {"t": "fail", "r": rkey.decode()}))
        self.assertEqual(len(self.inner.pending), 1)
        self.assertEqual(len(self.redis.calls), 1)  # no new lookup round
        self.inner.pending[0][1].callback(Inactive(5))
        self.redis.calls[1][1].callback(1)
        self.assertIsInstance(self.successResultOf(d), Inactive)


class RevocationReplayTests(SynchronousTestCase):
    """Someone who can write to Redis but lacks the fleet secret replays
    what they saw: an old sealed entry, an old revocation message.  Neither
    may bring back an answer from before the latest revocation."""

    def setUp(self):
        from phantomd.fleet.revocation import Revoker
        TierTests.setUp(self)
        self.clock.advance(100)
        self.revoker = Revoker(self.clock, FakeCache(), self.metrics,
                               max_entries=10, shared=self.tier)
        self.front = self.revoker.wrap(self.wrapped)

    def replayed_lookup(self, d, token, at, sub="alice"):
        rkey = self.keys.redis_key(token)
        self.redis.calls[-1][1].callback([1, self.keys.seal(
            token, rkey, b'{"u":1000,"at":%d,"a":1,"j":"old.jwt.x",'
                         b'"c":{"sub":"%s"}}' % (at, sub.encode()))])

    def test_replayed_entry_of_a_revoked_token_is_refused(self):
        self.revoker.revoke_token("tok")
        self.clock.advance(1)
        n = len(self.redis.calls)
        d = self.front.introspect("tok")
        # The entry DEL'd by the revocation, written back by hand.
        self.replayed_lookup(d, "tok", at=90)
        self.assertEqual(len(self.inner.pending), 1)  # asked again
        self.inner.pending[0][1].callback(Inactive(5))
        self.redis.calls[-1][1].callback(1)
        self.assertIsInstance(self.successResultOf(d), Inactive)
        self.assertGreater(len(self.redis.calls), n)

    def test_replayed_old_subject_message_does_not_lower_the_revocation(self):
        self.revoker.revoke_subject("alice")  # at 100
        self.clock.advance(1)
        digest = self.keys.subject_digest("alice")
        # An older revocation of alice, published again by hand.
        self.tier.message(self.keys.channel, self.keys.seal_event(
            {"t": "sub", "s": digest, "at": 10.0}))
        d = self.front.introspect("tok")
        self.replayed_lookup(d, "tok", at=90)  # from before the revocation
        self.assertEqual(len(self.inner.pending), 1)
        self.inner.pending[0][1].callback(Inactive(5))
        self.redis.calls[-1][1].callback(1)
        self.assertIsInstance(self.successResultOf(d), Inactive)


class TokenRevocationInFlightTests(SynchronousTestCase):
    def test_answer_started_before_a_token_revocation_is_asked_again(self):
        """Like a sub= revocation: an introspection in flight when the token
        was revoked may carry the token service's answer from before it."""
        from phantomd.fleet.revocation import Revoker
        clock = Clock()
        revoker = Revoker(clock, FakeCache(), Metrics(), max_entries=10)
        inner = FakeIntrospector()
        d = revoker.wrap(inner).introspect("tok")
        clock.advance(1)
        revoker.revoke_token("tok")
        inner.pending[0][1].callback(Active("old.jwt.x", {}, 60))
        self.assertNoResult(d)
        inner.pending[1][1].callback(Inactive(5))
        self.assertIsInstance(self.successResultOf(d), Inactive)


class RevokeFormTests(SynchronousTestCase):
    """``token=`` names a bearer token: what no bearer token can be is a
    caller's encoding mistake, answered 400, never a 200 that revoked
    nothing nor a 500."""

    def post(self, body):
        from treq.testing import StubTreq
        from phantomd.fleet.revocation import Revoker, RevokeResource
        self.cache = FakeCache()
        revoker = Revoker(Clock(), self.cache, Metrics(), max_entries=10)
        stub = StubTreq(RevokeResource(revoker, lambda: b"b" * 20))
        response = self.successResultOf(stub.post(
            "http://admin/revoke", data=body, headers={
                "Authorization": "Bearer " + "b" * 20,
                "Content-Type": "application/x-www-form-urlencoded"}))
        return response.code, self.successResultOf(response.content())

    def test_plus_sent_unencoded_is_refused(self):
        # "+" is a space in a form: this revoked "abc def", not "abc+def".
        code, body = self.post(b"token=abc+def")
        self.assertEqual(code, 400, body)
        self.assertIn(b"%2B", body)
        self.assertEqual(self.cache.discarded, [])

    def test_non_ascii_token_is_400(self):
        code, body = self.post(b"token=%C3%A9")
        self.assertEqual(code, 400, body)

    def test_encoded_plus_revokes_the_token(self):
        from phantomd.token.tokens import token_key
        code, body = self.post(b"token=abc%2Bdef")
        self.assertEqual(code, 200, body)
        self.assertEqual(self.cache.discarded, [token_key("abc+def")])


class RevokeFailureTests(SynchronousTestCase):
    def test_a_failed_revocation_is_answered_500_not_left_hanging(self):
        from twisted.internet import defer
        from treq.testing import StubTreq
        from phantomd.fleet.revocation import Revoker, RevokeResource
        revoker = Revoker(Clock(), FakeCache(), Metrics(), max_entries=10)
        revoker.revoke_token = lambda token: defer.fail(RuntimeError("x"))
        stub = StubTreq(RevokeResource(revoker, lambda: b"b" * 20))
        response = self.successResultOf(stub.post(
            "http://admin/revoke", data=b"token=abc", headers={
                "Authorization": "Bearer " + "b" * 20,
                "Content-Type": "application/x-www-form-urlencoded"}))
        self.assertEqual(response.code, 500)
        self.assertIn(b"server_error", self.successResultOf(
            response.content()))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RemoteRevocationInFlightTests(SynchronousTestCase):
    def test_message_from_a_host_whose_clock_is_behind(self):
        """An introspection in flight here when another host's sub=
        revocation arrives is asked again, even when that host's clock
        put the revocation before this one started."""
        TierTests.setUp(self)
        from phantomd.fleet.revocation import Revoker
        self.clock.advance(100)
        revoker = Revoker(self.clock, FakeCache(), self.metrics,
                          max_entries=10, shared=self.tier)
        inner = FakeIntrospector()
        d = revoker.wrap(inner).introspect("tok")
        self.clock.advance(1)
        self.tier.message(self.keys.channel, self.keys.seal_event(
            {"t": "sub", "s": self.keys.subject_digest("alice"),
             "at": 50.0}))
        inner.pending[0][1].callback(Active("old.jwt.x", {"sub": "alice"},
                                            60))
        self.assertNoResult(d)
        self.assertEqual(len(inner.pending), 2)
