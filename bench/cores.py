#!/usr/bin/env python3
"""What sharing one core costs, apart from anything the workers do together.

    python bench/cores.py [--pairs 3] [--duration 5] [--connections 64]

``bench/run.py --workers 2`` pins both workers to the proxy's one CPU, and
their CPU per request comes out higher than one worker's.  This separates
the two things that could be behind it: work the workers do for each other
(the multiprocess metrics, the parent), and two busy processes taking
turns on one core.  In each round, scenario 1 (one token, all cache hits),
every process on the proxy's CPU, all wrk on the other:

  ph w1      one phantomd, ``workers = 1``, one wrk at N connections
  ph w2      one phantomd, ``workers = 2``, one wrk at N connections
  ph 2x w1   two separate phantomd processes (``workers = 1`` each, nothing
             shared), two wrk at N/2 connections each, at the same time
  nginx w1   nginx as a plain proxy, ``worker_processes 1``
  nginx w2   the same with ``worker_processes 2`` (``reuseport``)

CPU per request is the CPU of every measured process over the requests
every wrk completed; "vs w1" is the median of each round's ratio to that
round's w1 row, over the rounds in which the hypervisor stole less than
10 % of a core (``/proc/stat``) during every row.  If ``ph 2x w1`` costs what ``ph w2`` does, the extra
is the core being shared, not cross-worker work; nginx's own w2/w1 shows
what sharing a core costs a C proxy.  Rounds alternate so each row sees the
same minutes; the table gives each row's median and the ratios to ``w1``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402


#: Rounds in which the hypervisor took more than this share of a core
#: during any row are left out of the ratios: on this kind of VM a busy
#: neighbour raises every process's CPU per request by up to half.
STEAL_LIMIT = 0.10


def measure(proxies: list[run.Proxy], script: str, duration: float,
            connections: int, cpu: str | None) -> dict:
    """wrk against every proxy at once (``connections`` split evenly), one
    warm-up second first; CPU per request over all of them."""
    per = max(1, connections // len(proxies))

    def wrks(seconds: float) -> list[subprocess.Popen]:
        return [subprocess.Popen(
            run.wrk_cmd(p.port, script, seconds, per, cpu),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for p in proxies]

    for w in wrks(1):
        w.communicate(timeout=60)
    before = [run.cpu_split(p.pid) for p in proxies]
    stolen = run.machine_steal()
    t0 = time.monotonic()
    started = wrks(duration)
    outs = [w.communicate(timeout=duration + 60) for w in started]
    after = [run.cpu_split(p.pid) for p in proxies]
    stolen = (run.machine_steal() - stolen) / (time.monotonic() - t0)
    reqs = errors = non_2xx = 0
    for w, (out, err) in zip(started, outs):
        s = run.wrk_summary(w.returncode, out, err)
        reqs += s["requests"]
        non_2xx += s["status"]
        errors += s["connect"] + s["read"] + s["write"] + s["timeout"]
    user = sum(a[0] - b[0] for a, b in zip(after, before))
    sys_ = sum(a[1] - b[1] for a, b in zip(after, before))
    return {"requests": reqs, "errors": errors + non_2xx,
            "cpu_us_per_req": (user + sys_) / reqs * 1e6,
            "user_us_per_req": user / reqs * 1e6,
            "sys_us_per_req": sys_ / reqs * 1e6,
            "steal_cores": stolen}


def rounds(layouts: list, pairs: int, procs: "run.Procs", token: str,
           script: str, duration: float, connections: int,
           wrk_cpu: str) -> dict[str, list[dict]]:
    """Each round, every layout in turn: its proxies started (``start()``
    gives a list), checked, measured at once, stopped.  The rows by
    layout name, one per round."""
    rows: dict[str, list[dict]] = {}
    for rnd in range(1, pairs + 1):
        for name, start in layouts:
            run.log("round %d/%d: %s" % (rnd, pairs, name))
            proxies = start()
            try:
                for proxy in proxies:
                    run.check_ok(proxy, token)
                r = measure(proxies, script, duration, connections, wrk_cpu)
            finally:
                for proxy in proxies:
                    procs.stop(proxy.proc, signal.SIGQUIT
                               if proxy.name == "nginx" else signal.SIGTERM)
            rows.setdefault(name, []).append(r)
            run.log("  %.1f us/req (user %.1f, sys %.1f), %d errors, "
                    "%.0f %% of a core stolen"
                    % (r["cpu_us_per_req"], r["user_us_per_req"],
                       r["sys_us_per_req"], r["errors"],
                       r["steal_cores"] * 100))
    return rows


def save(args: argparse.Namespace, rows: dict, suffix: str) -> None:
    """Print the error count if any, write the rows as JSON."""
    errors = sum(r["errors"] for rs in rows.values() for r in rs)
    if errors:
        print("errors (non-2xx and socket errors): %d" % errors)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    os.makedirs(run.RESULTS, exist_ok=True)
    path = os.path.join(run.RESULTS, "%s-%s.json" % (stamp, suffix))
    with open(path, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print("results: %s" % path)


def options(doc: str) -> argparse.Namespace:
    """``--pairs``, ``--duration``, ``--connections``; help from ``doc``."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--pairs", type=int, default=3, help="rounds of all rows")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=64)
    return p.parse_args()


def one_token(procs: "run.Procs", tmp: str, name: str) -> tuple:
    """The nginx mocks, the introspection URL, a token and the wrk script
    that sends it on every request (scenario 1)."""
    mocks = run.Mocks(procs, tmp, run.make_jwt(700), run.make_jwt(1024))
    url = "http://127.0.0.1:%d/introspect" % mocks.token_port
    token = "%s-%s" % (name, uuid.uuid4().hex[:16])
    return mocks, url, token, run.wrk_script(tmp, name, "one", token)


def main() -> None:
    args = options(__doc__)
    tmp, procs = run.side_bench("phantomd-cores-")
    wrk_cpu, proxy_cpu = "0", "1"
    try:
        mocks, url, token, script = one_token(procs, tmp, "cores")

        def phantomd(tag: str, workers: int) -> run.Phantomd:
            return run.Phantomd(procs, tmp, tag, url, mocks.api_port,
                                proxy_cpu, workers=workers)

        def nginx(workers: int) -> run.NginxProxy:
            return run.NginxProxy(procs, tmp, mocks.api_port, proxy_cpu,
                                  workers)

        layouts = [
            ("ph w1", lambda: [phantomd("w1", 1)]),
            ("ph w2", lambda: [phantomd("w2", 2)]),
            ("ph 2x w1", lambda: [phantomd("a", 1), phantomd("b", 1)]),
            ("nginx w1", lambda: [nginx(1)]),
            ("nginx w2", lambda: [nginx(2)]),
        ]
        rows = rounds(layouts, args.pairs, procs, token, script,
                      args.duration, args.connections, wrk_cpu)
    finally:
        procs.stop_all()
    # Each round's ratio to its own w1 row, taken a minute apart at most:
    # the machine's drift between rounds cancels out of it.
    calm = [i for i in range(args.pairs)
            if all(rs[i]["steal_cores"] <= STEAL_LIMIT
                   for rs in rows.values())]
    if not calm:
        print("every round had more than %d %% of a core stolen: ratios "
              "over all of them" % (STEAL_LIMIT * 100))
        calm = list(range(args.pairs))
    elif len(calm) < args.pairs:
        print("left out of the ratios, more than %d %% of a core stolen: "
              "round %s" % (STEAL_LIMIT * 100, ", ".join(
                  str(i + 1) for i in range(args.pairs) if i not in calm)))
    print("%-10s %12s %7s %7s %9s  %s" % ("layout", "CPU us/req", "user",
                                         "sys", "vs w1", "each round's ratio"))
    for name, _ in layouts:
        med = {k: run.median([r[k] for r in rows[name]])
               for k in ("cpu_us_per_req", "user_us_per_req",
                         "sys_us_per_req")}
        base = rows["nginx w1" if name.startswith("nginx") else "ph w1"]
        ratios = [rows[name][i]["cpu_us_per_req"] / base[i]["cpu_us_per_req"]
                  for i in calm]
        print("%-10s %12.1f %7.1f %7.1f %8.2fx  %s" % (
            name, med["cpu_us_per_req"], med["user_us_per_req"],
            med["sys_us_per_req"], run.median(ratios),
            " ".join("%.2f" % x for x in ratios)))
    save(args, rows, "cores")


if __name__ == "__main__":
    main()
