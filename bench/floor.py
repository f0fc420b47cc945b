#!/usr/bin/env python3
"""What the least Twisted proxy costs per request, beside nginx and phantomd.

    python bench/floor.py [--pairs 3] [--duration 5] [--connections 64]

Issue 14 asks for a cache hit at no more than 3x nginx's CPU per request.
This shows how much of that budget goes before phantomd does any work of
its own.  The rows, in scenario 1 of ``bench/run.py`` (one token, all cache
hits; the proxy on one CPU, wrk and the nginx mocks on the other):

  nginx           nginx as a plain proxy (the reference)
  relay           a relay with no HTTP in it (``relay`` below): it waits
                  for a request head, sends one fixed request with a JWT on
                  an idle upstream connection, and relays the answer once
                  its Content-Length is in (no error handling: the mocks
                  keep connections open for a million requests).  Stock
                  Twisted: every event through ``_doReadOrWrite``, every
                  write through ``transport.write`` on the next turn.
  relay+fastio    the same relay on phantomd's I/O (``fastio``: the lean
                  poll, writes sent at once or once per poll)
  phantomd        phantomd itself, ``workers = 1``

``relay`` is what Twisted alone costs; ``relay+fastio`` is the floor under
phantomd, and what phantomd costs above it is its own Python: parsing,
the gate, the cache, headers, metrics.  Rows alternate so each round's
ratios are taken a minute apart at most; the table gives medians over the
rounds in which less than 10 % of a core was stolen.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cores  # noqa: E402
import run  # noqa: E402


def relay(port: int, api_port: int, jwt: bytes, fastio: bool) -> None:
    """The relay, in this process (``--relay``)."""
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import protocol, reactor

    writer = None
    if fastio:
        from phantomd.http.fastio import lean_polling, writer_for
        lean_polling(reactor)
        writer = writer_for
    upstream_request = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                        b"Authorization: Bearer %s\r\n\r\n" % (api_port, jwt))
    idle: list = []

    def write_for(transport):
        if writer is not None:
            return writer(transport)
        transport.setTcpNoDelay(True)
        return transport.write

    class Upstream(protocol.Protocol):
        front = None
        buf = b""

        def connectionMade(self):
            self.write = write_for(self.transport)
            self.write(upstream_request)

        def dataReceived(self, data):
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            at = self.buf.find(b"Content-Length: ")
            length = int(self.buf[at + 16:self.buf.find(b"\r\n", at)])
            if len(self.buf) < end + 4 + length:
                return
            answer, self.buf = self.buf, b""
            front, self.front = self.front, None
            idle.append(self)
            front.write(answer)

    class Front(protocol.Protocol):
        buf = b""

        def connectionMade(self):
            self.write = write_for(self.transport)

        def dataReceived(self, data):
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            self.buf = b""
            if idle:
                up = idle.pop()
                up.front = self
                up.write(upstream_request)
            else:
                up = Upstream()
                up.front = self
                protocol.ClientCreator(reactor, lambda: up).connectTCP(
                    "127.0.0.1", api_port)

    reactor.listenTCP(port, protocol.Factory.forProtocol(Front),
                      backlog=4096, interface="127.0.0.1")
    reactor.run()


class Relay(run.Proxy):
    def __init__(self, procs: run.Procs, tmp: str, api_port: int,
                 cpu: str, fastio: bool) -> None:
        self.name = "relay+fastio" if fastio else "relay"
        self.port = run.free_port()
        cmd = run.pin(cpu) + [
            sys.executable, os.path.abspath(__file__), "--relay",
            str(self.port), str(api_port)] + (["--fastio"] if fastio else [])
        self.proc = procs.start(cmd, os.path.join(tmp, self.name + ".log"),
                                env=run.tree_env())
        run.wait_port(self.port, self.proc, self.name)


def main() -> None:
    if sys.argv[1:2] == ["--relay"]:
        relay(int(sys.argv[2]), int(sys.argv[3]), run.make_jwt(700).encode(),
              "--fastio" in sys.argv)
        return
    args = cores.options(__doc__)
    tmp, procs = run.side_bench("phantomd-floor-")
    wrk_cpu, proxy_cpu = "0", "1"
    try:
        mocks, url, token, script = cores.one_token(procs, tmp, "floor")
        layouts = [
            ("nginx", lambda: [run.NginxProxy(procs, tmp, mocks.api_port,
                                              proxy_cpu)]),
            ("relay", lambda: [Relay(procs, tmp, mocks.api_port, proxy_cpu,
                                     fastio=False)]),
            ("relay+fastio", lambda: [Relay(procs, tmp, mocks.api_port,
                                            proxy_cpu, fastio=True)]),
            ("phantomd", lambda: [run.Phantomd(procs, tmp, "floor", url,
                                               mocks.api_port, proxy_cpu)]),
        ]
        rows = cores.rounds(layouts, args.pairs, procs, token, script,
                            args.duration, args.connections, wrk_cpu)
    finally:
        procs.stop_all()
    calm = [i for i in range(args.pairs)
            if all(rs[i]["steal_cores"] <= cores.STEAL_LIMIT
                   for rs in rows.values())] or list(range(args.pairs))
    print("%-13s %11s %6s %6s %9s  %s" % (
        "proxy", "CPU us/req", "user", "sys", "vs nginx",
        "each round's ratio"))
    for name, _ in layouts:
        med = {k: run.median([rows[name][i][k] for i in calm])
               for k in ("cpu_us_per_req", "user_us_per_req",
                         "sys_us_per_req")}
        ratios = [rows[name][i]["cpu_us_per_req"]
                  / rows["nginx"][i]["cpu_us_per_req"] for i in calm]
        print("%-13s %11.1f %6.1f %6.1f %8.2fx  %s" % (
            name, med["cpu_us_per_req"], med["user_us_per_req"],
            med["sys_us_per_req"], run.median(ratios),
            " ".join("%.2f" % x for x in ratios)))
    if len(calm) < args.pairs:
        print("rounds left out (more than %d %% of a core stolen): %d"
              % (cores.STEAL_LIMIT * 100, args.pairs - len(calm)))
    cores.save(args, rows, "floor")


if __name__ == "__main__":
    main()
