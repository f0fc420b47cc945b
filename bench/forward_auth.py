#!/usr/bin/env python3
"""nginx + ``auth_request`` + phantomd's forward-auth listener, against
nginx alone, on a cached token (issue 16's bench).

    /work/venv/bin/python bench/forward_auth.py [--duration 5] [--runs 3]

The mocks, the reference nginx (A) and the measurement are
``bench/run.py``'s: wrk (1 thread, 16 connections, one token), CPU seconds
of the process trees from /proc over the wrk run divided by the requests
completed.  (C) is an nginx configured with the README's ``auth_request``
snippet (plus a keep-alive upstream to phantomd), in front of the same
API, with phantomd answering its checks (``[forward_auth] listen``, no
``[phantomd] upstream``).  The figure is (nginx C + phantomd) CPU per
request over nginx A's; the issue's goal is at most 3x.

``--floor`` puts a stand-in in phantomd's place: the same reactor and
socket writes as phantomd (epoll, ``fastio.lean_polling``,
``fastio.writer_for``) answering every check head with one fixed 200 and a
JWT, parsing nothing, looking nothing up.  Its ratio is the best any check
on Twisted can give here; the gap to phantomd's is phantomd's own work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402  (bench/run.py: mocks, wrk, CPU accounting)


class AuthNginx(run.Proxy):
    name = "nginx+auth_request"

    def __init__(self, procs, tmp, api_port, fa_port, cpu) -> None:
        self.port = run.free_port()
        body = """
  upstream api {{
    server 127.0.0.1:{ap};
    keepalive 64;
  }}
  upstream phantomd {{
    server 127.0.0.1:{fa};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      auth_request /_phantomd;
      auth_request_set $phantomd_jwt $upstream_http_authorization;
      proxy_set_header Authorization $phantomd_jwt;
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location = /_phantomd {{
      internal;
      proxy_pass http://phantomd;
      proxy_http_version 1.1;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Connection "";
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Forwarded-Method "";
      proxy_set_header X-Forwarded-Uri "";
    }}
  }}
""".format(ap=api_port, fa=fa_port, port=self.port)
        self.proc = run.start_nginx(procs, tmp, "auth", body, [self.port],
                                    cpu)


class CheckOnly(run.Proxy):
    """phantomd answering forward-auth checks only."""

    name = "phantomd"

    def __init__(self, procs, tmp, introspect_url, cpu) -> None:
        self.port = run.free_port()
        ini = os.path.join(tmp, "phantomd-fa.ini")
        self.log = os.path.join(tmp, "phantomd-fa.log")
        with open(ini, "w") as f:
            f.write("""\
[phantomd]
listen = tcp:0:interface=127.0.0.1
upstream =

[introspection]
url = {url}
client_id = bench-gateway
client_secret = bench-secret
response = jwt

[metrics]
listen =

[forward_auth]
listen = tcp:{port}:interface=127.0.0.1:backlog=4096
""".format(url=introspect_url, port=self.port))
        cmd = run.pin(cpu) + run.twistd_cmd() + [
            "-n", "--pidfile", os.path.join(tmp, "twistd-fa.pid"),
            "phantomd", "--config", ini]
        self.proc = procs.start(cmd, self.log, cwd=tmp, env=run.tree_env())
        run.wait_port(self.port, self.proc, "phantomd", timeout=30)


FLOOR_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                b"Authorization: Bearer %s\r\n\r\n")


def serve_floor(port: int, jwt: str) -> None:
    """The ``--floor`` stand-in (a child process): answers each check head
    (up to a blank line) with ``FLOOR_ANSWER``, keep-alive."""
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import protocol, reactor

    sys.path.insert(0, run.REPO)
    from phantomd.http.fastio import lean_polling, writer_for

    lean_polling(reactor)
    answer = FLOOR_ANSWER % jwt.encode()

    class Check(protocol.Protocol):
        def connectionMade(self):
            self.write = writer_for(self.transport)
            self.buf = b""

        def dataReceived(self, data):
            buf = self.buf + data
            n = buf.count(b"\r\n\r\n")
            if n:
                self.write(answer * n)
                buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
            self.buf = buf

    reactor.listenTCP(port, protocol.Factory.forProtocol(Check),
                      backlog=4096, interface="127.0.0.1")
    reactor.run()


class Floor(run.Proxy):
    name = "floor"

    def __init__(self, procs, tmp, jwt, cpu) -> None:
        self.port = run.free_port()
        self.proc = procs.start(
            run.pin(cpu) + [sys.executable, os.path.abspath(__file__),
                            "--serve-floor", str(self.port), jwt],
            os.path.join(tmp, "floor.log"), env=run.tree_env())
        run.wait_port(self.port, self.proc, "the floor stand-in")


def main() -> None:
    if sys.argv[1:2] == ["--serve-floor"]:
        serve_floor(int(sys.argv[2]), sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--floor", action="store_true",
                    help="a do-nothing Twisted check in phantomd's place")
    args = ap.parse_args()
    procs = run.Procs()
    tmp = tempfile.mkdtemp(prefix="phantomd-fa-bench-")
    try:
        jwt = run.make_jwt(700)
        mocks = run.Mocks(procs, tmp, jwt, run.make_jwt(1024))
        url = "http://127.0.0.1:%d/introspect" % mocks.token_port
        ref = run.NginxProxy(procs, tmp, mocks.api_port, "1")
        ph = (Floor(procs, tmp, jwt, "1") if args.floor
              else CheckOnly(procs, tmp, url, "1"))
        auth = AuthNginx(procs, tmp, mocks.api_port, ph.port, "1")
        token = "bench-token-forward-auth"
        script = run.wrk_script(tmp, "one", "one", token)
        if run.drive(auth.port, [token], 1) != {200: 1}:
            raise RuntimeError("nginx+auth_request did not answer 200")
        rows = []
        for _ in range(args.runs):
            run.run_wrk(ref.port, script, 1, 16, "0", ref)  # warm-up
            a = run.run_wrk(ref.port, script, args.duration, 16, "0", ref)
            run.run_wrk(auth.port, script, 1, 16, "0", auth)
            before = run.cpu_seconds(ph.pid)
            c = run.run_wrk(auth.port, script, args.duration, 16, "0", auth)
            ph_us = (run.cpu_seconds(ph.pid) - before) / c["requests"] * 1e6
            rows.append({
                "nginx_alone_us": a["cpu_us_per_req"],
                "nginx_auth_us": c["cpu_us_per_req"],
                "phantomd_check_us": ph_us,
                "ratio": (c["cpu_us_per_req"] + ph_us) / a["cpu_us_per_req"],
                "rps_alone": a["rps"], "rps_auth": c["rps"],
                "non_2xx": a["non_2xx"] + c["non_2xx"],
            })
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(json.dumps({"runs": rows, "median": med}, indent=2))
        print("CPU per request: nginx alone %.1f us; nginx+auth_request "
              "%.1f us + %s %.1f us = %.2fx nginx alone"
              % (med["nginx_alone_us"], med["nginx_auth_us"], ph.name,
                 med["phantomd_check_us"], med["ratio"]))
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
