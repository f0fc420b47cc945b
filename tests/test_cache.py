"""The token cache: TTLs by the injected clock, LRU bound, reloads."""

import base64
import hashlib
import json
from dataclasses import FrozenInstanceError

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from phantomd.token.cache import TokenCache, scope_text
from phantomd.ops.metrics import Metrics
from phantomd.token.outcomes import Active, Inactive

T0 = 1_000_000.0


def key(token):
    return hashlib.sha256(token.encode()).digest()


def make_jwt(claims):
    def seg(obj):
        return base64.urlsafe_b64encode(
            json.dumps(obj).encode()).rstrip(b"=").decode()
    return "%s.%s.%s" % (seg({"alg": "RS256"}), seg(claims), "c2ln")


def active(lifetime=None, exp=None, **claims):
    if exp is not None:
        claims["exp"] = exp
    claims.setdefault("sub", "alice")
    return Active(jwt=make_jwt(claims), claims=claims, lifetime=lifetime)


class CacheTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.metrics = Metrics()

    def cache(self, max_entries=100, max_ttl=3600, default_ttl=0,
              negative_ttl=10, **kw):
        return TokenCache(self.clock, self.metrics, max_entries, max_ttl,
                          default_ttl, negative_ttl, **kw)

    def entries_gauge(self):
        return self.metrics.sample("phantomd_cache_entries")


class TTLTests(CacheTestCase):
    def test_hit_returns_the_jwt_and_its_claims(self):
        """A hit's claims are what the miss's were (its JWT's payload):
        a route's claim headers and a tunnel's exp and sub need them."""
        c = self.cache()
        stored = active(lifetime=60, scope="read", tenant="t1",
                        exp=self.clock.seconds() + 600)
        c.put(key("t"), stored)
        got = c.get(key("t"))
        self.assertIsInstance(got, Active)
        self.assertEqual(dict(got.claims), stored.claims)
        self.assertEqual(got.claims["tenant"], "t1")
        self.assertEqual(got.claims.get("exp"), self.clock.seconds() + 600)
        self.assertNotIn("nope", got.claims)
        self.assertEqual(got.lifetime, 60)
        self.assertEqual(got.jwt, stored.jwt)

    def test_the_gates_questions_need_no_decoding(self):
        """Scopes and cnf come from the entry itself: a JWT that would not
        decode still gets them (the payload is decoded only on demand)."""
        c = self.cache()
        c.put(key("t"), Active(jwt="not.a-jwt", claims={
            "scope": "r", "cnf": {"jkt": "abc"}}, lifetime=60))
        claims = c.get(key("t")).claims
        self.assertEqual(scope_text(claims), "r")
        self.assertEqual(claims.cnf, {"jkt": "abc"})

    def test_expires_exactly_at_put_time_plus_ttl(self):
        c = self.cache()
        c.put(key("t"), active(lifetime=60))
        self.clock.advance(59.999)
        self.assertIsNotNone(c.get(key("t")))
        self.clock.advance(0.001)
        self.assertIsNone(c.get(key("t")))
        self.assertEqual(len(c), 0)
        self.assertEqual(self.entries_gauge(), 0)

    def test_hit_reports_remaining_lifetime(self):
        c = self.cache()
        c.put(key("t"), active(lifetime=60))
        self.clock.advance(20)
        self.assertEqual(c.get(key("t")).lifetime, 40)

    def test_a_hit_cannot_be_changed_by_whoever_got_it(self):
        """Every waiter on a flight shares one answer: none may rewrite
        the JWT the others forward.  Equal answers compare equal whatever
        their ``floorable``."""
        c = self.cache()
        c.put(key("t"), active(lifetime=60))
        got = c.get(key("t"))
        for name in ("jwt", "claims", "lifetime", "floorable"):
            self.assertRaises(FrozenInstanceError, setattr, got, name, None)
        self.assertEqual(Active("j", {}, 1.0, True), Active("j", {}, 1.0))
        self.assertNotEqual(Active("j", {}, 1.0), Active("k", {}, 1.0))
        self.assertEqual(Active("j", {}, 1.0, floorable=True).floorable, True)

    def test_ttl_table(self):
        # (description, result, seconds the entry is kept; 0 = not stored)
        cases = [
            ("lifetime", active(lifetime=60), 60),
            ("no freshness info: default_ttl", active(lifetime=None), 30),
            ("lifetime 0 means not stored", active(lifetime=0), 0),
            ("capped by max_ttl", active(lifetime=10_000), 600),
            ("capped by exp", active(lifetime=60, exp=T0 + 25), 25),
            ("exp already past", active(lifetime=60, exp=T0 - 1), 0),
            ("exp exactly now", active(lifetime=60, exp=T0), 0),
            ("exp later than lifetime", active(lifetime=60, exp=T0 + 999),
             60),
            ("exp not a number", active(lifetime=60, exp="soon"), 0),
            ("exp a boolean", active(lifetime=60, exp=True), 0),
            ("inactive lifetime capped by negative_ttl",
             Inactive(lifetime=60), 10),
            ("inactive shorter lifetime", Inactive(lifetime=4), 4),
            ("inactive without freshness info: default_ttl, capped",
             Inactive(lifetime=None), 10),
            ("inactive no-store", Inactive(lifetime=0), 0),
        ]
        for description, result, kept in cases:
            with self.subTest(description):
                self.clock = Clock()
                self.clock.advance(T0)
                c = self.cache(max_ttl=600, default_ttl=30, negative_ttl=10)
                c.put(key("t"), result)
                if kept == 0:
                    self.assertIsNone(c.get(key("t")))
                    continue
                self.clock.advance(kept - 0.5)
                self.assertEqual(type(c.get(key("t"))), type(result))
                self.clock.advance(0.5)
                self.assertIsNone(c.get(key("t")))

    def test_default_ttl_zero_does_not_store(self):
        c = self.cache(default_ttl=0)
        c.put(key("t"), active(lifetime=None))
        self.assertIsNone(c.get(key("t")))
        self.assertEqual(self.entries_gauge(), 0)

    def test_unstorable_answer_drops_the_older_entry(self):
        c = self.cache()
        c.put(key("t"), active(lifetime=60))
        c.put(key("t"), Inactive(lifetime=0))
        self.assertIsNone(c.get(key("t")))
        self.assertEqual(self.entries_gauge(), 0)

    def test_inactive_hit(self):
        c = self.cache()
        c.put(key("t"), Inactive(lifetime=5))
        self.assertEqual(c.get(key("t")), Inactive(lifetime=5))

    def test_scopes_kept_from_scope_list_or_scp(self):
        c = self.cache()
        for k, claims in (("t", {"scope": ["read", "write"]}),
                          ("u", {"scp": ["read", "write"]}),
                          ("v", {"scp": "read write"})):
            c.put(key(k), Active(jwt="j", claims=claims, lifetime=60))
            self.assertEqual(scope_text(c.get(key(k)).claims), "read write")
        c.put(key("w"), Active(jwt="j", claims={"sub": "a"}, lifetime=60))
        self.assertIsNone(scope_text(c.get(key("w")).claims))

    def test_cnf_kept_for_hits(self):
        """A hit must still show what the token is bound to, or a stolen
        DPoP- or certificate-bound token would pass as a plain bearer once
        cached (DESIGN section 12)."""
        c = self.cache()
        cnf = {"jkt": "abc"}
        c.put(key("t"), active(lifetime=60, scope="r", cnf=cnf))
        claims = c.get(key("t")).claims
        self.assertEqual(claims.cnf, cnf)
        self.assertEqual(claims["cnf"], cnf)

    def test_equal_scope_strings_are_stored_once(self):
        c = self.cache()
        for i in range(3):
            c.put(key("t%d" % i), Active(
                jwt="j", claims={"scope": "".join(["read ", "write"])},
                lifetime=60))
        scopes = {id(scope_text(c.get(key("t%d" % i)).claims))
                  for i in range(3)}
        self.assertEqual(len(scopes), 1)


class BoundTests(CacheTestCase):
    def test_lru_eviction_at_the_bound(self):
        c = self.cache(max_entries=3)
        for t in "abc":
            c.put(key(t), active(lifetime=60))
        self.assertIsNotNone(c.get(key("a")))  # a is now most recent
        c.put(key("d"), active(lifetime=60))
        self.assertIsNone(c.get(key("b")))
        for t in "acd":
            self.assertIsNotNone(c.get(key(t)), t)
        self.assertEqual(len(c), 3)
        self.assertEqual(self.entries_gauge(), 3)

    def test_replacing_an_entry_does_not_evict(self):
        c = self.cache(max_entries=2)
        c.put(key("a"), active(lifetime=60))
        c.put(key("b"), active(lifetime=60))
        c.put(key("a"), Inactive(lifetime=5))
        self.assertEqual(len(c), 2)
        self.assertIsInstance(c.get(key("a")), Inactive)

    def test_random_token_flood_stays_bounded(self):
        c = self.cache(max_entries=50)
        for i in range(1000):
            c.put(key("flood-%d" % i), Inactive(lifetime=10))
        self.assertEqual(len(c), 50)
        self.assertEqual(self.entries_gauge(), 50)
        self.assertIsNotNone(c.get(key("flood-999")))
        self.assertIsNone(c.get(key("flood-949")))

    def test_gauge_follows_traffic(self):
        c = self.cache()
        c.put(key("a"), active(lifetime=10))
        c.put(key("b"), active(lifetime=20))
        c.put(key("c"), Inactive(lifetime=5))
        self.assertEqual(self.entries_gauge(), 3)
        self.clock.advance(10)
        c.get(key("a"))
        c.get(key("c"))
        self.assertEqual(self.entries_gauge(), 1)

    def test_bad_limits_are_refused(self):
        for kwargs in ({"max_entries": 0}, {"max_ttl": -1},
                       {"negative_ttl": float("inf")}):
            with self.subTest(kwargs):
                self.assertRaises(ValueError, self.cache, **kwargs)


class ReconfigureTests(CacheTestCase):
    def test_keeps_valid_entries(self):
        c = self.cache(max_ttl=3600)
        c.put(key("a"), active(lifetime=100))
        c.reconfigure(max_entries=100, max_ttl=3600, default_ttl=0,
                      negative_ttl=10)
        self.clock.advance(99)
        self.assertIsNotNone(c.get(key("a")))

    def test_shortens_expiry_to_new_caps(self):
        c = self.cache(max_ttl=3600, negative_ttl=60)
        c.put(key("a"), active(lifetime=1000))
        c.put(key("b"), active(lifetime=5))
        c.put(key("n"), Inactive(lifetime=60))
        self.clock.advance(1)
        c.reconfigure(max_entries=100, max_ttl=30, default_ttl=0,
                      negative_ttl=2)
        self.clock.advance(2)
        self.assertIsNone(c.get(key("n")))
        self.assertIsNotNone(c.get(key("b")))
        self.clock.advance(2)
        self.assertIsNone(c.get(key("b")))
        self.clock.advance(26 - 0.5)
        self.assertIsNotNone(c.get(key("a")))
        self.clock.advance(0.5)
        self.assertIsNone(c.get(key("a")))

    def test_zero_caps_drop_everything_of_that_kind(self):
        c = self.cache()
        c.put(key("a"), active(lifetime=100))
        c.put(key("n"), Inactive(lifetime=5))
        c.reconfigure(max_entries=100, max_ttl=3600, default_ttl=0,
                      negative_ttl=0)
        self.assertEqual(len(c), 1)
        self.assertIsNone(c.get(key("n")))
        self.assertEqual(self.entries_gauge(), 1)

    def test_evicts_least_recently_used_down_to_new_bound(self):
        c = self.cache(max_entries=10)
        for t in "abcde":
            c.put(key(t), active(lifetime=60))
        c.get(key("a"))
        c.reconfigure(max_entries=2, max_ttl=3600, default_ttl=0,
                      negative_ttl=10)
        self.assertEqual(len(c), 2)
        self.assertEqual(self.entries_gauge(), 2)
        self.assertIsNotNone(c.get(key("a")))
        self.assertIsNotNone(c.get(key("e")))
        c.put(key("f"), active(lifetime=60))
        self.assertEqual(len(c), 2)

    def test_new_default_ttl_applies_to_later_puts(self):
        c = self.cache(default_ttl=0)
        c.reconfigure(max_entries=100, max_ttl=3600, default_ttl=30,
                      negative_ttl=10)
        c.put(key("a"), active(lifetime=None))
        self.clock.advance(29)
        self.assertIsNotNone(c.get(key("a")))

    def test_bad_limits_leave_the_cache_as_it_was(self):
        c = self.cache(max_entries=10)
        c.put(key("a"), active(lifetime=60))
        self.assertRaises(ValueError, c.reconfigure, max_entries=0,
                          max_ttl=1, default_ttl=0, negative_ttl=0)
        self.assertEqual(c.max_entries, 10)
        self.assertIsNotNone(c.get(key("a")))


class ModelTests(CacheTestCase):
    """Random puts, gets and clock steps agree with a plain reference model
    of "LRU at the bound, gone at put-time + TTL"."""

    @settings(derandomize=True, max_examples=300, deadline=None)
    @given(st.lists(st.one_of(
        st.tuples(st.just("put"), st.integers(0, 3),
                  st.sampled_from([0, 2, 12, 12]), st.booleans()),
        st.tuples(st.just("get"), st.integers(0, 3)),
        st.tuples(st.just("get"), st.integers(0, 3)),
        st.tuples(st.just("advance"), st.integers(1, 2))),
        min_size=10, max_size=40))
    def test_against_model(self, ops):
        clock = Clock()
        clock.advance(T0)
        c = TokenCache(clock, Metrics(), 3, 10, 0, 3)
        model = {}  # key -> (expiry, kind); dict order = recency, oldest first
        for op in ops:
            now = clock.seconds()
            if op[0] == "advance":
                clock.advance(op[1])
            elif op[0] == "put":
                _, k, lifetime, is_active = op
                result = (active(lifetime=lifetime) if is_active
                          else Inactive(lifetime=lifetime))
                c.put(key(str(k)), result)
                ttl = min(lifetime, 10 if is_active else 3)
                model.pop(k, None)
                if ttl > 0:
                    model[k] = (now + ttl, type(result))
                    while len(model) > 3:
                        del model[next(iter(model))]
            else:
                k = op[1]
                got = c.get(key(str(k)))
                entry = model.pop(k, None)
                if entry is not None and now < entry[0]:
                    model[k] = entry
                    self.assertIsInstance(got, entry[1])
                    self.assertEqual(got.lifetime, entry[0] - now)
                else:
                    self.assertIsNone(got)
        self.assertLessEqual(len(c), 3)


def floorable(lifetime=None, exp=None, **claims):
    a = active(lifetime, exp, **claims)
    return Active(a.jwt, a.claims, a.lifetime, floorable=True)


class MinTTLTests(CacheTestCase):
    """[cache] min_ttl: a floor for no-store/no-cache/silent active
    answers, never past exp or max_ttl, never for inactive answers."""

    def assertKeptFor(self, c, seconds):
        self.clock.advance(seconds - 0.5)
        self.assertIsNotNone(c.get(key("t")))
        self.clock.advance(0.5)
        self.assertIsNone(c.get(key("t")))

    def test_no_store_kept_for_min_ttl(self):
        c = self.cache(min_ttl=30)
        c.put(key("t"), floorable(lifetime=0))
        self.assertKeptFor(c, 30)

    def test_without_min_ttl_no_store_is_not_kept(self):
        c = self.cache()
        c.put(key("t"), floorable(lifetime=0))
        self.assertIsNone(c.get(key("t")))

    def test_never_past_exp(self):
        c = self.cache(min_ttl=30)
        c.put(key("t"), floorable(lifetime=0, exp=T0 + 10))
        self.assertKeptFor(c, 10)

    def test_expired_or_unreadable_exp_not_kept(self):
        c = self.cache(min_ttl=30)
        c.put(key("t"), floorable(lifetime=0, exp=T0 - 1))
        self.assertIsNone(c.get(key("t")))
        c.put(key("t"), floorable(lifetime=0, exp="soon"))
        self.assertIsNone(c.get(key("t")))

    def test_never_past_max_ttl(self):
        c = self.cache(max_ttl=20, min_ttl=30)
        c.put(key("t"), floorable(lifetime=0))
        self.assertKeptFor(c, 20)

    def test_explicit_lifetime_is_honoured(self):
        """max-age=5 (not floorable) stays 5 s; min_ttl is no override."""
        c = self.cache(min_ttl=30)
        c.put(key("t"), active(lifetime=5))
        self.assertKeptFor(c, 5)
        c.put(key("t"), active(lifetime=0))
        self.assertIsNone(c.get(key("t")))

    def test_longer_default_ttl_wins(self):
        c = self.cache(default_ttl=60, min_ttl=30)
        c.put(key("t"), floorable(lifetime=None))
        self.assertKeptFor(c, 60)

    def test_inactive_answers_keep_negative_ttl(self):
        c = self.cache(min_ttl=30, negative_ttl=10)
        c.put(key("t"), Inactive(lifetime=0))
        self.assertIsNone(c.get(key("t")))
        c.put(key("t"), Inactive(lifetime=None))
        self.assertIsNone(c.get(key("t")))
        c.put(key("t"), Inactive(lifetime=100))
        self.assertKeptFor(c, 10)

    def test_reconfigure_sets_the_floor_for_later_puts(self):
        c = self.cache()
        c.reconfigure(max_entries=100, max_ttl=3600, default_ttl=0,
                      negative_ttl=10, min_ttl=15)
        c.put(key("t"), floorable(lifetime=0))
        self.assertKeptFor(c, 15)

    def test_lowering_min_ttl_drops_active_entries(self):
        """Lowered to see revocations sooner: no entry the old floor kept
        may outlive the reload; inactive entries stay."""
        c = self.cache(min_ttl=300)
        c.put(key("t"), floorable(lifetime=0))
        c.put(key("bad"), Inactive(lifetime=10))
        c.reconfigure(max_entries=100, max_ttl=3600, default_ttl=0,
                      negative_ttl=10, min_ttl=30)
        self.assertIsNone(c.get(key("t")))
        self.assertIsNotNone(c.get(key("bad")))
        self.assertEqual(self.entries_gauge(), 1)

    def test_raising_min_ttl_keeps_entries(self):
        c = self.cache(min_ttl=30)
        c.put(key("t"), floorable(lifetime=0))
        c.reconfigure(max_entries=100, max_ttl=3600, default_ttl=0,
                      negative_ttl=10, min_ttl=60)
        self.assertIsNotNone(c.get(key("t")))

    def test_bad_min_ttl(self):
        for bad in (-1, float("inf"), "30"):
            self.assertRaises(ValueError, self.cache, min_ttl=bad)
