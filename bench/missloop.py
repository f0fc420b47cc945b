"""Python CPU per request through a whole Gateway, without sockets.

A real ``phantomd.app.Gateway`` (gate, cache, coalescer, introspector, lean
client, upstream pool, front) on a ``MemoryReactorClock``: requests go into
the front protocol, the introspection and API requests it writes are
answered with the bytes nginx sends in ``bench/run.py``, and the process CPU
time per request is taken over many requests (best of 5 rounds).  No
kernel, no other process: the figure moves only when phantomd's Python
does, which makes it the one to watch while shaving the miss path.  Real
sockets add the system calls and the reactor's dispatch on top (see
``bench/run.py``).

    python bench/missloop.py             # misses (a new token every time)
    python bench/missloop.py hit 20000   # one cached token
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import (MemoryReactorClock,  # noqa: E402
                                      StringTransport)

from phantomd import config  # noqa: E402
from phantomd.app import Gateway  # noqa: E402
from run import make_jwt  # noqa: E402

TOKEN_PORT, API_PORT = 9002, 9001
JWT = make_jwt(700).encode()
TOKEN_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\n"
    b"Date: Sun, 22 Nov 2026 17:00:00 GMT\r\n"
    b"Content-Type: application/jwt\r\nContent-Length: %d\r\n"
    b"Connection: keep-alive\r\nCache-Control: max-age=300\r\n\r\n%s"
    % (len(JWT), JWT))
API_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\n"
    b"Date: Sun, 22 Nov 2026 17:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 18\r\n"
    b"Connection: keep-alive\r\n\r\n" b'{"hello":"world"}\n')
CONFIG = """
[phantomd]
listen = tcp:0
upstream = http://127.0.0.1:%d
[introspection]
url = http://127.0.0.1:%d/introspect
client_id = bench-gateway
client_secret = bench-secret
response = jwt
[cache]
max_entries = 100000
[metrics]
listen = tcp:0
""" % (API_PORT, TOKEN_PORT)


#: Requests answered per reactor turn.  bench/run.py at 64 connections
#: makes about 0.03 epoll_wait calls per request (``--profile``'s system
#: call counts): one turn reads and answers some 30 requests.
#: ``MISSLOOP_TURN=1`` gives the worst case, one request per turn.
TURN = int(os.environ.get("MISSLOOP_TURN", "32"))


def _transport() -> StringTransport:
    return StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))


class Loop:
    #: What the fake token service answers every introspection with.
    token_answer = TOKEN_ANSWER

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        gateway = Gateway(self.reactor, config.parse(CONFIG))
        self.front = gateway.front.buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 5555))
        self.client = _transport()
        self.front.makeConnection(self.client)
        self.conns: dict = {}
        self.served = 0

    def _pump(self) -> None:
        """Connect what phantomd is connecting; answer what it wrote."""
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = _transport()
            protocol.makeConnection(transport)
            self.conns[transport] = (protocol, port)
        for transport, (protocol, port) in list(self.conns.items()):
            if transport.value():
                transport.clear()
                protocol.dataReceived(
                    self.token_answer if port == TOKEN_PORT else API_ANSWER)

    def one(self, token: bytes) -> None:
        self.front.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                                b"Authorization: Bearer %s\r\n\r\n" % token)
        self._pump()
        self._pump()
        self.served += 1
        if self.served % TURN == 0:
            # The end of a reactor turn: calls due now run (the metrics'
            # hand-over among them).
            self.reactor.advance(0)
        answer = self.client.value()
        self.client.clear()
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise SystemExit("phantomd answered %r" % answer[:200])


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "miss"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
    if mode not in ("miss", "hit"):
        raise SystemExit(__doc__)
    loop = Loop()
    for i in range(2000):
        loop.one(b"warm-%d" % i)
    loop.one(b"hit-token")
    best = None
    for rnd in range(5):
        tokens = ([b"tok-%d-%d" % (rnd, i) for i in range(n)]
                  if mode == "miss" else [b"hit-token"] * n)
        gc.collect()
        t0 = time.process_time()
        for token in tokens:
            loop.one(token)
        spent = time.process_time() - t0
        best = spent if best is None else min(best, spent)
    print("%s: %.1f us of CPU per request (best of 5 rounds of %d)"
          % (mode, best / n * 1e6, n))


if __name__ == "__main__":
    main()
