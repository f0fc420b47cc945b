"""The gate with the real cache and coalescer, a Clock, and a fake
introspector whose Deferreds the tests fire by hand: every token row of
DESIGN section 2."""

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from phantomd.token.cache import TokenCache
from phantomd.token.coalescer import Coalescer
from phantomd.token.gate import Gate
from phantomd.ops.metrics import Metrics
from phantomd.token.outcomes import (
    Active, Forward, Inactive, IntrospectionFailed, Reject)


class FakeIntrospector:
    def __init__(self):
        self.calls = []  # (token, Deferred)

    def introspect(self, token):
        d = Deferred()
        self.calls.append((token, d))
        return d


def bearer(token):
    return [b"Bearer " + token.encode()]


class GateTestsMixin:
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = Metrics()
        self.cache = TokenCache(self.clock, self.metrics, max_entries=100,
                                max_ttl=3600, default_ttl=0, negative_ttl=10)
        self.coalescer = Coalescer(self.metrics, max_in_flight=2)
        self.introspector = FakeIntrospector()
        self.gate = Gate(self.clock, self.cache, self.coalescer,
                         self.introspector, self.metrics, "api",
                         self.required_scopes)

    required_scopes = ()

    def active(self, scope="read write", lifetime=60, exp_in=3600):
        return Active(jwt="header.payload.sig",
                      claims={"sub": "alice", "scope": scope,
                              "exp": self.clock.seconds() + exp_in},
                      lifetime=lifetime)

    def decide(self, headers):
        results = []
        self.gate.authorize(headers).addBoth(results.append)
        return results

    def only(self, results):
        self.assertEqual(len(results), 1, results)
        return results[0]


class CredentialRows(GateTestsMixin, SynchronousTestCase):
    def test_no_authorization_is_401_without_error(self):
        r = self.only(self.decide([]))
        self.assertEqual((r.status, r.error), (401, None))
        self.assertEqual(dict(r.headers("api"))[b"WWW-Authenticate"],
                         b'Bearer realm="api"')
        self.assertEqual(self.introspector.calls, [])

    def test_other_scheme_is_401(self):
        r = self.only(self.decide([b"Basic dXNlcjpwYXNz"]))
        self.assertEqual((r.status, r.error), (401, None))

    def test_malformed_is_400_invalid_request(self):
        r = self.only(self.decide([b"Bearer a b"]))
        self.assertEqual((r.status, r.error), (400, "invalid_request"))
        self.assertIn(b'error="invalid_request"',
                      dict(r.headers("api"))[b"WWW-Authenticate"])
        self.assertEqual(self.introspector.calls, [])


class IntrospectionRows(GateTestsMixin, SynchronousTestCase):
    def test_active_token_forwards_jwt(self):
        results = self.decide(bearer("opaque-1"))
        self.assertEqual(results, [])
        token, d = self.introspector.calls[0]
        self.assertEqual(token, "opaque-1")
        d.callback(self.active())
        f = self.only(results)
        self.assertIsInstance(f, Forward)
        self.assertEqual(f.jwt, "header.payload.sig")
        self.assertEqual(f.cache, "miss")
        self.assertNotIn("opaque", f.token_id)

    def test_second_request_is_cache_hit(self):
        self.decide(bearer("t"))
        self.introspector.calls[0][1].callback(self.active())
        f = self.only(self.decide(bearer("t")))
        self.assertEqual((type(f), f.cache), (Forward, "hit"))
        self.assertEqual(len(self.introspector.calls), 1)
        self.assertEqual(self.metrics.sample(
            "phantomd_cache_lookups_total", {"result": "hit"}), 1)
        self.assertEqual(self.metrics.sample(
            "phantomd_cache_lookups_total", {"result": "miss"}), 1)

    def test_inactive_is_401_invalid_token_and_remembered(self):
        results = self.decide(bearer("bad"))
        self.introspector.calls[0][1].callback(Inactive(lifetime=None))
        r = self.only(results)
        self.assertEqual((r.status, r.error), (401, "invalid_token"))
        self.assertIn(b'error="invalid_token"',
                      dict(r.headers("api"))[b"WWW-Authenticate"])
        # remembered for negative_ttl (default_ttl is 0, so... only when
        # the token service gave a lifetime): ask with one.
        self.decide(bearer("bad2"))
        self.introspector.calls[1][1].callback(Inactive(lifetime=60))
        r2 = self.only(self.decide(bearer("bad2")))
        self.assertEqual(r2.status, 401)
        self.assertEqual(len(self.introspector.calls), 2)
        self.assertEqual(self.metrics.sample(
            "phantomd_cache_lookups_total", {"result": "negative_hit"}), 1)
        self.clock.advance(10)  # negative_ttl caps the 60 s
        self.decide(bearer("bad2"))
        self.assertEqual(len(self.introspector.calls), 3)

    def test_expired_jwt_is_401(self):
        results = self.decide(bearer("t"))
        self.introspector.calls[0][1].callback(self.active(exp_in=-1))
        self.assertEqual(self.only(results).status, 401)

    def test_failures_map_to_statuses_and_are_not_cached(self):
        for kind, status in (("error", 502), ("timeout", 504),
                             ("unavailable", 503)):
            results = self.decide(bearer("t-" + kind))
            self.introspector.calls[-1][1].errback(
                IntrospectionFailed(kind, "boom", retry_after=7
                                    if kind == "unavailable" else None))
            r = self.only(results)
            self.assertIsInstance(r, Reject)
            self.assertEqual(r.status, status)
            headers = dict(r.headers("api"))
            self.assertNotIn(b"WWW-Authenticate", headers)
            self.assertEqual(headers[b"Cache-Control"], b"no-store")
            if status == 503:
                self.assertEqual(headers[b"Retry-After"], b"7")
            n = len(self.introspector.calls)
            self.decide(bearer("t-" + kind))
            self.assertEqual(len(self.introspector.calls), n + 1)
            self.introspector.calls[-1][1].errback(
                IntrospectionFailed(kind, "still down"))
        self.assertEqual(self.metrics.sample(
            "phantomd_introspections_total", {"outcome": "timeout"}), 2)
        self.assertEqual(self.metrics.sample(
            "phantomd_introspections_total", {"outcome": "error"}), 4)

    def test_unexpected_exception_is_502_not_a_pass(self):
        class Broken:
            def introspect(self, token):
                return fail(RuntimeError("bug"))
        self.gate.reconfigure(introspector=Broken())
        r = self.only(self.decide(bearer("t")))
        self.assertEqual(r.status, 502)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_shed_beyond_max_in_flight_is_503_retry_after(self):
        self.decide(bearer("a"))
        self.decide(bearer("b"))
        r = self.only(self.decide(bearer("c")))
        self.assertEqual(r.status, 503)
        self.assertIn(b"Retry-After", dict(r.headers("api")))
        self.assertEqual(self.metrics.sample(
            "phantomd_introspections_total", {"outcome": "shed"}), 1)

    def test_concurrent_requests_share_one_introspection(self):
        results = [self.decide(bearer("same")) for _ in range(5)]
        self.assertEqual(len(self.introspector.calls), 1)
        self.introspector.calls[0][1].callback(self.active())
        for r in results:
            self.assertIsInstance(self.only(r), Forward)
        self.assertEqual(self.metrics.sample(
            "phantomd_coalesced_requests_total"), 4)

    def test_answer_from_a_replaced_introspector_is_not_cached(self):
        """A reload that swapped the token service emptied the cache; an
        introspection still running on the old one must not refill it."""
        results = self.decide(bearer("t"))
        self.gate.reconfigure(introspector=FakeIntrospector())
        self.introspector.calls[0][1].callback(self.active())
        self.assertIsInstance(self.only(results), Forward)
        self.assertEqual(len(self.cache), 0)
        self.decide(bearer("t"))
        self.assertEqual(len(self.gate.introspector.calls), 1)

    def test_request_after_a_reload_does_not_join_the_old_flight(self):
        """Issue 19: an introspection in flight against the old token
        service is not joined by a request arriving after a reload that
        replaced it; that request asks the new one, and each gets the
        answer of the service it was meant for."""
        before = self.decide(bearer("t"))
        new = FakeIntrospector()
        self.gate.reconfigure(introspector=new)
        after = self.decide(bearer("t"))
        self.assertEqual(len(new.calls), 1,
                         "the request after the reload joined the flight "
                         "against the old token service")
        new.calls[0][1].callback(Inactive(lifetime=10))
        self.assertEqual(self.only(after).status, 401)
        self.introspector.calls[0][1].callback(self.active())
        self.assertIsInstance(self.only(before), Forward)
        # The new service's answer is what the cache keeps.
        self.assertEqual(self.only(self.decide(bearer("t"))).status, 401)
        self.assertEqual(self.metrics.sample(
            "phantomd_coalesced_requests_total"), 0)

    def test_cancelled_waiter_leaves_others(self):
        d1 = self.gate.authorize(bearer("same"))
        d1.addErrback(lambda f: None)
        results = self.decide(bearer("same"))
        d1.cancel()
        self.introspector.calls[0][1].callback(self.active())
        self.assertIsInstance(self.only(results), Forward)



class DirectIntrospector:
    """An introspector with ``introspect_to``, as the real one has."""

    def __init__(self):
        self.calls = []  # (token, done)
        self.cancelled = 0

    def introspect_to(self, token, done):
        self.calls.append((token, done))
        return self

    def cancel(self):
        self.cancelled += 1


class DirectRows(GateTestsMixin, SynchronousTestCase):
    """``authorize_to``, the front's way in: a decision at once for a hit,
    a handle while a miss waits, nothing after that handle's cancel()."""

    def setUp(self):
        super().setUp()
        self.direct = DirectIntrospector()
        self.gate.reconfigure(introspector=self.direct)

    def test_miss_then_hit(self):
        got = []
        self.assertIsNotNone(self.gate.authorize_to(got.append, bearer("t")))
        self.assertEqual(got, [])
        self.direct.calls[0][1](self.active())
        self.assertEqual([(type(f), f.cache) for f in got],
                         [(Forward, "miss")])
        got = []
        self.assertIsNone(self.gate.authorize_to(got.append, bearer("t")))
        self.assertEqual([(type(f), f.cache) for f in got],
                         [(Forward, "hit")])

    def test_refusal_is_at_once(self):
        got = []
        self.assertIsNone(self.gate.authorize_to(got.append, []))
        self.assertEqual(self.only(got).status, 401)

    def test_cancelled_caller_is_never_called_and_the_rest_are(self):
        first, second = [], []
        self.gate.authorize_to(first.append, bearer("t")).cancel()
        self.gate.authorize_to(second.append, bearer("t"))
        self.assertEqual(len(self.direct.calls), 1)
        self.direct.calls[0][1](self.active())
        self.assertEqual(first, [])
        self.assertIsInstance(self.only(second), Forward)
        self.assertEqual(self.direct.cancelled, 0, "the shared work was "
                         "cancelled for the others")

    def test_introspector_that_raises_is_502_and_frees_the_token(self):
        class Raising:
            def introspect_to(self, token, done):
                raise RuntimeError("bug")

        self.gate.reconfigure(introspector=Raising())
        got = []
        self.gate.authorize_to(got.append, bearer("t"))
        self.assertEqual(self.only(got).status, 502)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.coalescer), 0)
        self.assertEqual(self.metrics.sample(
            "phantomd_introspections_total", {"outcome": "error"}), 1)

class ScopeRows(GateTestsMixin, SynchronousTestCase):
    required_scopes = ("read", "admin")

    def test_missing_scope_is_403_on_miss_and_hit(self):
        results = self.decide(bearer("t"))
        self.introspector.calls[0][1].callback(self.active(scope="read"))
        for r in (self.only(results), self.only(self.decide(bearer("t")))):
            self.assertEqual((r.status, r.error), (403, "insufficient_scope"))
            self.assertIn(b'scope="admin read"',
                          dict(r.headers("api"))[b"WWW-Authenticate"])

    def test_all_scopes_forward(self):
        results = self.decide(bearer("t"))
        self.introspector.calls[0][1].callback(
            self.active(scope="admin read extra"))
        self.assertIsInstance(self.only(results), Forward)

    def test_scp_list_claim(self):
        results = self.decide(bearer("t"))
        self.introspector.calls[0][1].callback(Active(
            jwt="j", claims={"scp": ["read", "admin"],
                             "exp": self.clock.seconds() + 60},
            lifetime=60))
        self.assertIsInstance(self.only(results), Forward)

    def test_reload_changes_required_scopes_for_cached_tokens(self):
        results = self.decide(bearer("t"))
        self.introspector.calls[0][1].callback(self.active(scope="read"))
        self.assertEqual(self.only(results).status, 403)
        self.gate.reconfigure(required_scopes=("read",))
        self.assertIsInstance(self.only(self.decide(bearer("t"))), Forward)


    def test_per_call_scopes_checked_on_miss_and_hit(self):
        """A route's scopes replace the gate's for that request only, and
        a cached token is checked against them too (the hole of gateways
        that checked scopes only when introspecting)."""
        results = []
        self.gate.authorize(bearer("t"), required_scopes=frozenset(
            ("orders",))).addBoth(results.append)
        self.introspector.calls[0][1].callback(self.active(scope="orders"))
        self.assertIsInstance(self.only(results), Forward)
        hit = []
        self.gate.authorize(bearer("t"), required_scopes=frozenset(
            ("admin",))).addBoth(hit.append)
        r = self.only(hit)
        self.assertEqual((r.status, r.cache), (403, "hit"))
        self.assertIn(b'scope="admin"',
                      dict(r.headers("api"))[b"WWW-Authenticate"])
        # The gate's own scopes still apply when none are passed ...
        self.assertEqual(self.only(self.decide(bearer("t"))).status, 403)
        # ... and an empty set means none are needed.
        none = []
        self.gate.authorize(bearer("t"), required_scopes=frozenset()
                            ).addBoth(none.append)
        self.assertIsInstance(self.only(none), Forward)
        self.assertEqual(len(self.introspector.calls), 1)


class MinTTLRows(GateTestsMixin, SynchronousTestCase):
    """[cache] min_ttl through the gate: floored active answers are hits,
    failures and inactive answers are not kept by the floor."""

    def setUp(self):
        super().setUp()
        self.cache.reconfigure(max_entries=100, max_ttl=3600, default_ttl=0,
                               negative_ttl=10, min_ttl=300)

    def test_no_store_active_answer_is_a_hit(self):
        self.decide(bearer("t"))
        self.introspector.calls[0][1].callback(Active(
            jwt="header.payload.sig",
            claims={"sub": "alice", "exp": self.clock.seconds() + 3600},
            lifetime=0, floorable=True))
        self.clock.advance(299)
        r = self.only(self.decide(bearer("t")))
        self.assertIsInstance(r, Forward)
        self.assertEqual(r.cache, "hit")
        self.assertEqual(len(self.introspector.calls), 1)

    def test_failures_and_inactive_answers_are_not_floored(self):
        self.decide(bearer("t"))
        self.introspector.calls[-1][1].errback(
            IntrospectionFailed("error", "boom"))
        self.decide(bearer("t"))
        self.assertEqual(len(self.introspector.calls), 2)
        self.introspector.calls[-1][1].callback(Inactive(lifetime=0))
        self.decide(bearer("t"))
        self.assertEqual(len(self.introspector.calls), 3)
