"""Python CPU per forward-auth check, without sockets (the check path of
``bench/forward_auth.py`` in process, as ``bench/missloop.py`` is for the
front).

A real ``phantomd.app.Gateway`` with ``[forward_auth] listen`` on a
``MemoryReactorClock``: the check request nginx's ``auth_request`` sends in
``bench/forward_auth.py`` (HTTP/1.1 keep-alive, ``X-Original-*``) goes into
one ``CheckProtocol`` over a ``StringTransport``; the token is cached
after the first check (answered with the bytes nginx sends in
``bench/run.py``).  Process CPU time per check over many checks, best of 5
rounds; ``profile`` prints cProfile's top entries instead.

    python bench/checkloop.py            # us of CPU per cached check
    python bench/checkloop.py 20000
    python bench/checkloop.py profile
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

from phantomd import config  # noqa: E402
from phantomd.app import Gateway  # noqa: E402
from missloop import (CONFIG, TOKEN_ANSWER, TOKEN_PORT,  # noqa: E402
                      _transport)
from twisted.internet.testing import MemoryReactorClock  # noqa: E402

CHECK = (b"GET /_phantomd HTTP/1.1\r\nX-Original-Method: GET\r\n"
         b"X-Original-URI: /orders/1?x=1\r\nHost: phantomd\r\n"
         b"User-Agent: bench\r\nAccept: */*\r\n"
         b"Authorization: Bearer hit-token\r\n\r\n")


class Loop:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        gateway = Gateway(self.reactor, config.parse(
            CONFIG + "[forward_auth]\nlisten = tcp:0\n"))
        self.check = gateway.forward_auth.buildProtocol(None)
        self.client = _transport()
        self.check.makeConnection(self.client)
        self.one()  # the miss: answer the introspection
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            assert port == TOKEN_PORT
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = _transport()
            protocol.makeConnection(transport)
            protocol.dataReceived(TOKEN_ANSWER)
        self.client.clear()
        self.one()
        answer = self.client.value()
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise SystemExit("phantomd answered %r" % answer[:300])

    def one(self) -> None:
        self.check.dataReceived(CHECK)

    def run(self, n: int) -> None:
        one = self.one
        client = self.client
        for _ in range(n):
            one()
            client.clear()


def main() -> None:
    args = sys.argv[1:]
    loop = Loop()
    if args and args[0] == "profile":
        import cProfile
        import pstats
        cProfile.runctx("loop.run(50000)", globals(), {"loop": loop},
                        "/tmp/checkloop.prof")
        pstats.Stats("/tmp/checkloop.prof").sort_stats(
            "tottime").print_stats(18)
        return
    n = int(args[0]) if args else 20000
    best = None
    for _ in range(5):
        gc.collect()
        t0 = time.process_time()
        loop.run(n)
        spent = time.process_time() - t0
        best = spent if best is None else min(best, spent)
    print("cached check: %.1f us of CPU per check (best of 5 rounds of %d)"
          % (best / n * 1e6, n))


if __name__ == "__main__":
    main()
