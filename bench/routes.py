#!/usr/bin/env python3
"""phantomd with 50 ``[route NAME]`` sections against phantomd with none,
on a cached token (issue 15's bench).

    /work/venv/bin/python bench/routes.py [--duration 5] [--runs 3] [--routes 50]

The token service and the API are the Python fakes of the robustness tests
(``tests/robustness/fakes.py``), in one child process on loopback.  The
measurement is ``bench/run.py``'s: wrk (1 thread, 16 connections, one
token, pinned to CPU 0; phantomd under ``twistd -n``, one worker, pinned to
CPU 1), req/s from wrk and CPU seconds of phantomd's process tree from
/proc over the wrk run divided by the requests completed.

Config A has no ``[route]`` section; config B has ``--routes`` of them,
``/svc00`` ... ``/svc49``, each ``auth = required``, of depths 1 to 5 (route
i matches ``/svcNN`` plus ``i % 5`` more segments), so the table holds five
distinct prefix lengths.  Every request asks for ``/svc49/a/b/c/d/items``:
in B it takes route svc49, one of the longest prefixes; in A it takes
``[phantomd]``'s upstream.  Both forward to the same fake API.  The goal
is B's req/s within 5% of A's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: wrk, CPU accounting, processes)

sys.path.insert(0, run.REPO)  # tests.robustness.fakes

TOKEN = "bench-token-routes-0123456789abcdef"
SEGMENTS = ["a", "b", "c", "d"]


def serve_fakes() -> None:
    """Child process: the fake token service (answering ``TOKEN`` as
    active, ``max-age=300``) and the fake API; prints ``PORTS ts api``."""
    from twisted.internet import reactor, task

    from tests.robustness.fakes import FakeAPI, TokenService, make_jwt

    ts, api = TokenService(reactor), FakeAPI(reactor)
    ts.activate(TOKEN, make_jwt(lifetime=86400))

    def forget() -> None:  # the fakes record every request; keep it bounded
        del ts.requests[:], api.requests[:], api.every_connection[:]
        del ts.every_connection[:]
    task.LoopingCall(forget).start(1.0, now=False)
    print("PORTS %d %d" % (ts.listen(), api.listen()), flush=True)
    reactor.run()


class Fakes:
    def __init__(self, procs: run.Procs, tmp: str) -> None:
        self.proc = procs.start(
            [sys.executable, os.path.abspath(__file__), "--serve-fakes"],
            os.path.join(tmp, "fakes.log"), stdout=subprocess.PIPE,
            cwd=tmp, env=run.tree_env())
        line = self.proc.stdout.readline().split()
        if line[:1] != [b"PORTS"]:
            raise RuntimeError("fakes did not start: %r" % line)
        self.token_port, self.api_port = int(line[1]), int(line[2])


def route_sections(n: int) -> str:
    out = []
    for i in range(n):
        prefix = "/svc%02d" % i + "".join("/" + s for s in SEGMENTS[:i % 5])
        out.append("[route svc%02d]\nmatch = %s\nauth = required\n"
                   % (i, prefix))
    return "\n".join(out)


def target(n: int) -> str:
    """The path of every request: under the last route of greatest depth
    (a route of depth 5 exists from 5 routes on)."""
    last = max(i for i in range(max(n, 5)) if i % 5 == 4)
    return "/svc%02d/%s/items" % (last, "/".join(SEGMENTS))


def routed_phantomd(procs: run.Procs, tmp: str, tag: str, fakes: Fakes,
                    routes: int, cpu: str | None) -> run.Phantomd:
    """``bench/run.py``'s phantomd with the fakes and ``routes`` sections."""
    from tests.robustness.fakes import CLIENT_SECRET
    return run.Phantomd(
        procs, tmp, tag, "http://127.0.0.1:%d/introspect" % fakes.token_port,
        fakes.api_port, cpu, client_id="gateway_client",
        client_secret=CLIENT_SECRET, extra_ini=route_sections(routes))


def wrk_script(tmp: str, path: str) -> str:
    name = os.path.join(tmp, "routes.lua")
    with open(name, "w") as f:
        f.write('wrk.path = "%s"\nwrk.headers["Authorization"] = '
                '"Bearer %s"\n' % (path, TOKEN) + run.WRK_DONE)
    return name


def served_by(proxy: run.Phantomd, route: str) -> float:
    """Requests ``route`` answered with 2xx, from phantomd's /metrics."""
    for line in proxy.scrape():
        if (line.startswith("phantomd_route_requests_total{")
                and 'route="%s"' % route in line and 'code="2xx"' in line):
            return float(line.rsplit(None, 1)[1])
    return 0.0


def check(proxy: run.Phantomd, path: str, route: str) -> None:
    """One request answers 200 through ``route`` (and caches the token)."""
    import socket
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(("GET %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
                   "%s\r\nConnection: close\r\n\r\n" % (path, TOKEN)).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("%s answered %r\n%s" % (
            proxy.name, data[:200], proxy.log_tail()))
    import time
    for _ in range(50):  # counted once the response is finished
        if served_by(proxy, route) >= 1:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError("%s did not serve %s through route %s"
                           % (proxy.name, path, route))


def in_process(routes: int, n: int = 20000) -> float:
    """Python CPU us per cached-token request through a whole Gateway on
    in-memory transports (``bench/missloop.py``'s loop, best of 5 rounds),
    with ``routes`` route sections: no kernel, no other process."""
    import gc
    import time

    import missloop

    path = target(max(routes, 5)).encode()
    saved = missloop.CONFIG
    missloop.CONFIG = saved + "\n" + route_sections(routes)
    try:
        loop = missloop.Loop()
    finally:
        missloop.CONFIG = saved
    request = (b"GET %s HTTP/1.1\r\nHost: localhost\r\n"
               b"Authorization: Bearer hit-token\r\n\r\n" % path)

    def one() -> None:
        loop.front.dataReceived(request)
        loop._pump()
        loop._pump()
        answer = loop.client.value()
        loop.client.clear()
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise SystemExit("phantomd answered %r" % answer[:200])
    for _ in range(2000):
        one()
    best = None
    for _ in range(5):
        gc.collect()
        t0 = time.process_time()
        for _ in range(n):
            one()
        spent = time.process_time() - t0
        best = spent if best is None else min(best, spent)
    return best / n * 1e6


def main() -> None:
    if sys.argv[1:] == ["--serve-fakes"]:
        return serve_fakes()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--routes", type=int, default=50,
                    help="at least 5 (the request needs a depth-5 route)")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--in-process", action="store_true",
                    help="only the in-memory loop of bench/missloop.py")
    args = ap.parse_args()
    if args.routes < 5:
        ap.error("--routes must be at least 5")
    if args.in_process:
        a, b = in_process(0), in_process(args.routes)
        print("in-process Python CPU per request, GET %s, cached token "
              "(best of 5 rounds of 20000):\n  no routes %.1f us, "
              "%d routes %.1f us, ratio %.3f"
              % (target(args.routes), a, args.routes, b, b / a))
        return
    wrk_cpu, ph_cpu = (None, None) if args.no_pin else ("0", "1")
    procs = run.Procs()
    tmp = tempfile.mkdtemp(prefix="phantomd-routes-bench-")
    try:
        fakes = Fakes(procs, tmp)
        path = target(args.routes)
        configs = [("no routes", routed_phantomd(procs, tmp, "none", fakes, 0,
                                                ph_cpu)),
                   ("%d routes" % args.routes,
                    routed_phantomd(procs, tmp, "routes", fakes, args.routes,
                                   ph_cpu))]
        script = wrk_script(tmp, path)
        check(configs[0][1], path, "default")
        check(configs[1][1], path, path.split("/")[1])
        runs: dict = {label: [] for label, _ in configs}
        for _ in range(args.runs):
            for label, ph in configs:  # interleaved: same machine load
                run.run_wrk(ph.port, script, 1, 16, wrk_cpu, ph)  # warm-up
                r = run.run_wrk(ph.port, script, args.duration, 16, wrk_cpu,
                                ph)
                runs[label].append({k: r[k] for k in (
                    "rps", "cpu_us_per_req", "p50_ms", "p99_ms", "non_2xx",
                    "socket_errors", "proxy_core_use",
                    "machine_busy_cores")})
        med = {label: {k: statistics.median(x[k] for x in rs)
                       for k in rs[0]} for label, rs in runs.items()}
        print(json.dumps({"path": path, "runs": runs, "median": med},
                         indent=2))
        a, b = (med[label] for label, _ in configs)
        errors = {label: sum(x["non_2xx"] + x["socket_errors"] for x in rs)
                  for label, rs in runs.items()}
        print("\nGET %s, one cached token, median of %d runs of %gs"
              % (path, args.runs, args.duration))
        print("%-12s %10s %12s %8s %8s %7s %7s" % (
            "config", "req/s", "CPU us/req", "p50 ms", "p99 ms", "core%",
            "errors"))
        for (label, _), m in zip(configs, (a, b)):
            print("%-12s %10.0f %12.1f %8.2f %8.2f %6.0f%% %7d" % (
                label, m["rps"], m["cpu_us_per_req"], m["p50_ms"],
                m["p99_ms"], m["proxy_core_use"] * 100, errors[label]))
        print("%-12s %10.3f %12.3f" % (
            "ratio B/A", b["rps"] / a["rps"],
            b["cpu_us_per_req"] / a["cpu_us_per_req"]))
        print("goal: req/s ratio >= 0.95: %s"
              % ("met" if b["rps"] / a["rps"] >= 0.95 else "NOT met"))
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
