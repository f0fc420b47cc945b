"""``workers = 2`` under the real ``twistd`` with ``[shared_cache]`` on a
real ``redis-server``: the workers share one introspection per token, and
``POST /revoke`` on the parent's metrics listener reaches both workers
(through Redis: the parent has no other way to tell them yet)."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests.helpers_redis import REDIS_SERVER, SKIP_REASON, RedisServer
from tests.test_service_e2e import ServiceCase, child_pids, get_once

BEARER = b"service-revocation-bearer-0123456789"


def unix_post(path: str, target: str, body: bytes, bearer: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"POST %s HTTP/1.0\r\nHost: metrics\r\n"
                  b"Authorization: Bearer %s\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n"
                  b"Content-Length: %d\r\n\r\n%s"
                  % (target.encode(), bearer, len(body), body))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


class WorkersShareRedis(ServiceCase):
    def setUp(self):
        if REDIS_SERVER is None:
            raise SkipTest(SKIP_REASON)
        super().setUp()
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.stop)

    @defer.inlineCallbacks
    def test_one_introspection_and_revocation_reach_every_worker(self):
        secret = os.path.join(self.dir, "fleet-secret")
        bearer = os.path.join(self.dir, "revocation-token")
        with open(secret, "wb") as f:
            f.write(os.urandom(32).hex().encode())
        with open(bearer, "wb") as f:
            f.write(BEARER)
        self.write_ini(workers=2, extra=(
            "[shared_cache]\nurl = %s\nsecret_file = %s\n"
            "[revocation]\ntoken_file = %s\n"
            % (self.redis.unix_url, secret, bearer)))
        yield self.start()
        self.assertEqual(len(child_pids(self.proc.transport.pid)), 2)
        for _ in range(12):
            status, _, _ = yield deferToThread(get_once, self.port, "/w",
                                               self.good)
            self.assertEqual(status, 200, self.why())
        # One introspection of this token for both workers (the parent's
        # readiness probe asks for a random token of its own).
        self.assertEqual(self.tokens.asked.get(self.good), 1, self.why())

        del self.tokens.tokens[self.good]
        answer = yield deferToThread(unix_post, self.metrics_path, "/revoke",
                                     b"token=" + self.good.encode(), BEARER)
        self.assertEqual(answer.split(b"\r\n")[0].split()[1], b"200", answer)
        for _ in range(12):
            status, _, _ = yield deferToThread(get_once, self.port, "/w",
                                               self.good)
            self.assertEqual(status, 401, self.why())
        self.assertNotIn(self.good.encode(), repr(self.redis.dump()).encode())
