"""The parent → worker revocation channel (phantomd.fleet.workerrevoke) on fakes.
The same under the real twistd: tests/test_fleet_service.py
``WorkersWithoutRedis``."""

from __future__ import annotations

import json
import os
import tempfile

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from phantomd.fleet import workerrevoke
from phantomd.ops.metrics import Metrics
from phantomd.token.outcomes import Active, Inactive
from phantomd.fleet.revocation import Revoker, RevokeResource
from phantomd.token.tokens import token_key
from phantomd.fleet.workerrevoke import MAX_PENDING, WorkerRevocations
from tests.test_sharedcache import FakeCache, FakeIntrospector

BEARER = b"b" * 20


class _Fleet:
    def __init__(self, revoker, shared=None):
        self.revoker = revoker
        self.shared = shared


class _Gateway:
    def __init__(self, fleet):
        self.fleet = fleet


class WorkerSideTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.cache = FakeCache()
        self.revoker = Revoker(self.clock, self.cache, Metrics(),
                               max_entries=10)
        self.reactor = MemoryReactorClock()
        d = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, d)
        self.path = os.path.join(d, "revoke-0")

    def listen(self, environ=None, shared=None):
        env = {workerrevoke.WORKER_REVOKE: self.path} if environ is None \
            else environ
        return workerrevoke.listen(self.reactor, env,
                                   _Gateway(_Fleet(self.revoker, shared)))

    def connect(self):
        self.assertIsNotNone(self.listen())
        path, factory, _, mode, _ = self.reactor.unixServers[-1]
        self.assertEqual((path, mode), (self.path, 0o600))
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_a_token_event_empties_the_cache_and_is_confirmed(self):
        proto, transport = self.connect()
        proto.dataReceived(json.dumps(
            {"t": "token", "k": token_key("tok").hex(), "at": 0}
        ).encode() + b"\n")
        self.assertEqual(self.cache.discarded, [token_key("tok")])
        self.assertEqual(transport.value(), b"ok\n")

    def test_a_sub_event_refuses_an_answer_introspected_before_it(self):
        """The parent's time travels along: what this worker is already
        introspecting for the subject is asked again."""
        inner = FakeIntrospector()
        d = self.revoker.wrap(inner).introspect("tok")
        self.clock.advance(1)
        proto, transport = self.connect()
        proto.dataReceived(json.dumps(
            {"t": "sub", "s": self.revoker.digest("alice"), "at": 1.0}
        ).encode() + b"\n")
        self.assertEqual(transport.value(), b"ok\n")
        inner.pending[0][1].callback(Active("old.jwt.x", {"sub": "alice"},
                                            60))
        self.assertNoResult(d)
        inner.pending[1][1].callback(Inactive(5))
        self.assertIsInstance(self.successResultOf(d), Inactive)

    def test_garbage_is_not_confirmed(self):
        for line in (b"not json\n", b'{"t": "flush"}\n', b"x" * 2000):
            proto, transport = self.connect()
            proto.dataReceived(line)
            self.assertEqual(transport.value(), b"")
            self.assertTrue(transport.disconnecting, line)
        self.assertEqual(self.cache.discarded, [])
        self.flushLoggedErrors()

    def test_a_socket_left_by_a_killed_worker_is_replaced(self):
        with open(self.path, "w"):
            pass
        self.connect()
        self.assertFalse(os.path.exists(self.path))

    def test_no_channel_without_a_path_or_with_redis(self):
        self.assertIsNone(self.listen(environ={}))
        self.assertIsNone(self.listen(shared=object()))
        self.assertEqual(self.reactor.unixServers, [])


class ParentSideTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.paths = ["/run/p/revoke-0", "/run/p/revoke-1"]
        self.sender = WorkerRevocations(self.reactor, lambda: self.paths,
                                        timeout=2.0)

    def connected(self, i):
        path, factory, timeout, _ = self.reactor.unixClients[i]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return path, factory, proto, transport

    def test_every_worker_confirms(self):
        d = self.sender.send({"t": "token", "k": "ab", "at": 1.0})
        answers = [self.connected(i) for i in (0, 1)]
        self.assertEqual(sorted(a[0] for a in answers), sorted(self.paths))
        for _, _, proto, transport in answers:
            self.assertEqual(json.loads(transport.value()),
                             {"t": "token", "k": "ab", "at": 1.0})
        answers[0][2].dataReceived(b"ok\n")
        self.assertNoResult(d)
        answers[1][2].dataReceived(b"ok\n")
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(self.sender.pending, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_silent_worker_is_not_confirmed_after_the_timeout(self):
        d = self.sender.send({"t": "sub", "s": "x", "at": 1.0})
        self.connected(0)[2].dataReceived(b"ok\n")
        self.connected(1)  # connected, never answers
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(self.sender.pending, {})

    def test_refused_closed_or_wrong_answer_is_not_confirmed(self):
        d = self.sender.send({"t": "token", "k": "ab", "at": 1.0})
        _, factory, _, _ = self.connected(0)
        factory.clientConnectionFailed(None, Failure(
            ConnectionRefusedError()))
        self.connected(1)[2].dataReceived(b"ok\n")
        self.assertIs(self.successResultOf(d), False)

        d = self.sender.send({"t": "token", "k": "ab", "at": 1.0})
        self.connected(2)[2].dataReceived(b"no\n")
        self.connected(3)[2].connectionLost(None)
        self.assertIs(self.successResultOf(d), False)

    def test_at_most_max_pending_sends_per_worker(self):
        self.paths = ["/run/p/revoke-0"]
        waiting = [self.sender.send({"t": "token", "k": "ab", "at": 1.0})
                   for _ in range(MAX_PENDING)]
        self.assertEqual(len(self.reactor.unixClients), MAX_PENDING)
        over = self.sender.send({"t": "token", "k": "ab", "at": 1.0})
        self.assertIs(self.successResultOf(over), False)
        self.assertEqual(len(self.reactor.unixClients), MAX_PENDING)
        self.reactor.advance(2.0)
        for d in waiting:
            self.assertIs(self.successResultOf(d), False)
        self.assertEqual(self.sender.pending, {})

    def test_no_live_worker_is_nothing_to_wait_for(self):
        self.paths = []
        self.assertIs(self.successResultOf(self.sender.send({})), True)


class RevokeAnswerTests(SynchronousTestCase):
    """/revoke in the parent of workers answers 200 only when every worker
    confirmed, and tells them a digest, never the token or subject."""

    def post(self, body, confirmed):
        from treq.testing import StubTreq
        self.cache = FakeCache()
        revoker = Revoker(Clock(), self.cache, Metrics(), max_entries=10)
        self.sent = []

        def peers(event):
            self.sent.append(event)
            from twisted.internet import defer
            return defer.succeed(confirmed)
        revoker.peers = peers
        stub = StubTreq(RevokeResource(revoker, lambda: BEARER))
        response = self.successResultOf(stub.post(
            "http://admin/revoke", data=body, headers={
                "Authorization": "Bearer " + BEARER.decode(),
                "Content-Type": "application/x-www-form-urlencoded"}))
        return response, self.successResultOf(response.content())

    def test_all_confirmed_is_200(self):
        response, body = self.post(b"token=opaque-1", True)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.cache.discarded, [token_key("opaque-1")])
        self.assertEqual(self.sent[0]["t"], "token")
        self.assertEqual(self.sent[0]["k"], token_key("opaque-1").hex())
        self.assertNotIn("opaque-1", json.dumps(self.sent))

    def test_a_worker_not_confirming_is_503_with_retry_after(self):
        response, body = self.post(b"sub=alice", False)
        self.assertEqual(response.code, 503, body)
        self.assertEqual(response.headers.getRawHeaders("Retry-After"),
                         ["1"])
        self.assertIn(b"worker", body)
        self.assertEqual(self.sent[0]["t"], "sub")
        self.assertNotIn("alice", json.dumps(self.sent))
