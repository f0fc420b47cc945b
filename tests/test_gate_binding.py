"""The gate's sender constraints (DESIGN section 12) on a Clock: DPoP proofs
and certificate-bound tokens, on cache misses and hits."""

from twisted.trial.unittest import SynchronousTestCase

from phantomd.token.dpop import ProofChecker
from phantomd.token.outcomes import Active, Forward, Inactive, Reject
from tests.test_dpop import EC_KEY, URL, make_proof
from tests.test_gate import GateTestsMixin

TOKEN = "opaque-token-1"  # the one tests.test_dpop's proofs hash
JKT = EC_KEY.thumbprint()
X5T = "x5t-of-the-client-certificate"


class BindingTests(GateTestsMixin, SynchronousTestCase):

    def active(self, cnf=None, **kw):
        a = super().active(**kw)
        claims = dict(a.claims)
        if cnf is not None:
            claims["cnf"] = cnf
        return Active(jwt=a.jwt, claims=claims, lifetime=a.lifetime)

    def dpop(self, proof=None, token=TOKEN, **kw):
        results = []
        self.gate.authorize(
            [b"DPoP " + token.encode()],
            dpop=[proof if proof is not None else make_proof(
                iat=self.clock.seconds(), **kw)],
            method=b"GET", url=URL).addBoth(results.append)
        return results

    def bearer(self, token=TOKEN, **kw):
        results = []
        self.gate.authorize([b"Bearer " + token.encode()],
                            **kw).addBoth(results.append)
        return results

    def answer(self, result):
        [(token, d)] = self.introspector.calls
        self.introspector.calls = []
        d.callback(result)

    def failures(self, reason):
        return self.metrics.sample("phantomd_dpop_failures_total",
                                   {"reason": reason})

    def assertRefused(self, r, error, scheme="DPoP"):
        self.assertIsInstance(r, Reject)
        self.assertEqual((r.status, r.error), (401, error), r.description)
        challenges = [v for k, v in r.headers("api")
                      if k == b"WWW-Authenticate"]
        self.assertTrue(challenges[0].startswith(scheme.encode() + b" "),
                        challenges)
        self.assertIn(b'algs="ES256 RS256 PS256 EdDSA"', challenges[-1])

    def test_bound_token_with_proof_on_miss_and_hit(self):
        first = make_proof(iat=self.clock.seconds(), jti="one")
        results = self.dpop(first)
        self.answer(self.active(cnf={"jkt": JKT}))
        self.assertIsInstance(self.only(results), Forward)
        self.assertIsInstance(self.only(self.dpop(jti="two")), Forward)
        # The proof is checked on hits too: the first one is used up.
        self.assertRefused(self.only(self.dpop(first)), "invalid_dpop_proof")
        self.assertEqual(self.failures("replay"), 1)

    def test_bad_proof_is_refused_before_introspection(self):
        r = self.only(self.dpop(htm="POST"))
        self.assertRefused(r, "invalid_dpop_proof")
        self.assertEqual(self.introspector.calls, [])
        self.assertEqual(self.failures("htm"), 1)

    def test_default_call_form_refuses_dpop_scheme(self):
        """A caller that passes no proof (forward-auth, say) gets the DPoP
        scheme refused, not waved through."""
        results = []
        self.gate.authorize([b"DPoP " + TOKEN.encode()]).addBoth(
            results.append)
        self.assertRefused(self.only(results), "invalid_dpop_proof")
        self.assertEqual(self.failures("missing"), 1)

    def test_proof_by_another_key(self):
        results = self.dpop()
        self.answer(self.active(cnf={"jkt": "another-thumbprint"}))
        self.assertRefused(self.only(results), "invalid_dpop_proof")
        self.assertEqual(self.failures("binding"), 1)

    def test_unbound_token_with_dpop_scheme(self):
        results = self.dpop()
        self.answer(self.active())
        self.assertRefused(self.only(results), "invalid_token")
        # and on a hit
        self.assertRefused(self.only(self.dpop(jti="2")), "invalid_token")

    def test_bound_token_as_bearer_on_miss_and_hit(self):
        results = self.bearer()
        self.answer(self.active(cnf={"jkt": JKT}))
        for r in (self.only(results), self.only(self.bearer())):
            self.assertRefused(r, "invalid_token", scheme="Bearer")
        self.assertEqual(self.failures("binding"), 2)

    def test_unreadable_cnf(self):
        results = self.bearer()
        self.answer(self.active(cnf="jkt"))
        r = self.only(results)
        self.assertEqual((r.status, r.error), (401, "invalid_token"))

    def test_inactive_token_with_dpop_gets_dpop_challenge(self):
        results = self.dpop()
        self.answer(Inactive(lifetime=10))
        self.assertRefused(self.only(results), "invalid_token")

    def test_replay_cache_full_is_503(self):
        self.gate.dpop = ProofChecker(self.clock, max_entries=1)
        results = self.dpop(jti="a")
        self.answer(self.active(cnf={"jkt": JKT}))
        self.assertIsInstance(self.only(results), Forward)
        r = self.only(self.dpop(jti="b"))
        self.assertEqual((r.status, r.retry_after), (503, 1))
        self.assertEqual(self.failures("full"), 1)

    def test_certificate_bound_token(self):
        results = self.bearer(client_cert=X5T)
        self.answer(self.active(cnf={"x5t#S256": X5T}))
        self.assertIsInstance(self.only(results), Forward)
        self.assertIsInstance(self.only(self.bearer(client_cert=X5T)),
                              Forward)
        for kw in ({}, {"client_cert": "another"}):
            r = self.only(self.bearer(**kw))
            self.assertEqual((r.status, r.error), (401, "invalid_token"))
        self.assertEqual(self.metrics.sample(
            "phantomd_cert_binding_failures_total"), 2)

    def test_certificate_of_unbound_token_is_ignored(self):
        results = self.bearer(client_cert=X5T)
        self.answer(self.active())
        self.assertIsInstance(self.only(results), Forward)


class FakeRedis:
    """``call`` answers like txredisapi's SET NX: b"OK" the first time a
    key is set, None after; or fails while ``down``."""

    def __init__(self):
        self.keys = {}
        self.down = False

    def call(self, *args):
        from twisted.internet.defer import fail, succeed
        if self.down:
            return fail(ConnectionError("redis is down"))
        self.keys.setdefault(args[1], []).append(args)
        return succeed(b"OK" if len(self.keys[args[1]]) == 1 else None)


class SharedReplayTests(BindingTests):
    """With [shared_cache] the jti is also claimed in Redis, so a proof
    seen by another process is refused here."""

    def setUp(self):
        super().setUp()
        from phantomd.token.dpop import SharedReplays
        self.redis = FakeRedis()
        self.gate.dpop.shared = SharedReplays(self.redis, b"phantomd:")

    def test_replay_seen_by_another_process(self):
        p = make_proof(iat=self.clock.seconds(), jti="x")
        results = self.dpop(p)
        self.answer(self.active(cnf={"jkt": JKT}))
        self.assertIsInstance(self.only(results), Forward)
        [(key, args)] = [(k, v[0]) for k, v in self.redis.keys.items()]
        self.assertTrue(key.startswith(b"phantomd:d:"), key)
        self.assertEqual(args[2:5], (b"1", b"NX", b"PX"))
        self.assertEqual(args[5], 70000)  # max_age + 2 * skew, in ms
        # Another process, with its own local replay cache, using the same
        # Redis: the proof is refused there.
        other = ProofChecker(self.clock)
        other.shared = self.gate.dpop.shared
        self.gate.dpop = other
        self.assertRefused(self.only(self.dpop(p)), "invalid_dpop_proof")
        self.assertEqual(self.failures("replay"), 1)

    def test_redis_down_fails_closed(self):
        results = self.dpop(jti="a")
        self.answer(self.active(cnf={"jkt": JKT}))
        self.assertIsInstance(self.only(results), Forward)
        self.redis.down = True
        r = self.only(self.dpop(jti="b"))
        self.assertEqual((r.status, r.error, r.retry_after),
                         (503, "temporarily_unavailable", 1))
        self.assertEqual(self.failures("unavailable"), 1)

    def test_caller_gone_during_the_replay_check_gets_nothing(self):
        """A miss whose caller leaves while Redis is claiming the proof's
        jti: the caller is told nothing afterwards (no decision reaches a
        cancelled request, and its Deferred is not fired twice)."""
        from twisted.internet.defer import CancelledError, Deferred
        pending = []
        self.redis.call = lambda *args: pending.append(Deferred()) or \
            pending[-1]
        got = []
        handle = self.gate.authorize_to(
            got.append, [b"DPoP " + TOKEN.encode()],
            dpop=[make_proof(iat=self.clock.seconds(), jti="a")],
            method=b"GET", url=URL)
        d = self.gate.authorize(
            [b"DPoP " + TOKEN.encode()],
            dpop=[make_proof(iat=self.clock.seconds(), jti="b")],
            method=b"GET", url=URL)
        self.answer(self.active(cnf={"jkt": JKT}))
        self.assertEqual((len(pending), got), (2, []))
        handle.cancel()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for claim in pending:
            self.assertTrue(claim.called, "the Redis claim was not "
                            "cancelled with its caller")
        self.assertEqual(got, [])

    def test_replay_cache_full_is_503(self):
        self.gate.dpop.replays.max_entries = 1
        results = self.dpop(jti="a")
        self.answer(self.active(cnf={"jkt": JKT}))
        self.assertIsInstance(self.only(results), Forward)
        r = self.only(self.dpop(jti="b"))
        self.assertEqual((r.status, r.retry_after), (503, 1))
