#!/usr/bin/env python3
"""A 1 GiB response and pipelined requests through phantomd and through
nginx, side by side (issue 14: "no regression for 1 GiB streaming or
pipelining").

    /work/venv/bin/python bench/stream.py [--runs 3] [--size-mib 1024]
        [--depth 16] [--duration 5] [--connections 16]

Both go through ``bench/run.py``'s harness: the token service is run.py's
nginx mock; the API is one more nginx, serving a sparse file of
``--size-mib`` MiB at ``/big`` (sendfile, so the API costs almost nothing)
and run.py's small JSON body everywhere else.  The proxies are run.py's:
nginx as a plain keep-alive reverse proxy and ``twistd -n phantomd``, one
worker each, pinned to CPU 1 (curl and wrk to CPU 0).

Streaming: ``curl`` fetches ``/big`` once per run with a cached token;
per proxy, CPU seconds of its process tree per GiB and the MiB/s curl saw.
Pipelining: wrk sends ``--depth`` requests at a time on each of
``--connections`` connections (one token, all cache hits); CPU per request.
Compare phantomd's figures between two trees by running this file from
each (it measures the tree it sits in).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: wrk, CPU accounting, processes)

GiB = 1 << 30


class API:
    """nginx serving ``/big`` (a sparse file) and run.py's small body."""

    def __init__(self, procs: run.Procs, tmp: str, size: int) -> None:
        self.port = run.free_port()
        big = os.path.join(tmp, "big.bin")
        with open(big, "wb") as f:
            f.truncate(size)
        # nginx's worker (nobody, when run as root) must read it.
        os.chmod(tmp, 0o755)
        os.chmod(big, 0o644)
        body = """
  sendfile on;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /big {{
      default_type application/octet-stream;
      alias {big};
    }}
    location / {{
      default_type application/json;
      return 200 '{api}';
    }}
  }}
""".format(port=self.port, big=big, api=run.API_BODY.strip())
        self.proc = run.start_nginx(procs, tmp, "stream-api", body,
                                    [self.port], None)


def stream_once(proxy: run.Proxy, token: str, cpu: str | None) -> dict:
    cmd = run.pin(cpu) + [
        "curl", "-s", "-o", "/dev/null", "--max-time", "300",
        "-w", "%{http_code} %{size_download} %{time_total}",
        "-H", "Authorization: Bearer " + token,
        "http://127.0.0.1:%d/big" % proxy.port]
    before = run.cpu_seconds(proxy.pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=330)
    spent = run.cpu_seconds(proxy.pid) - before
    code, size, took = out.stdout.split()
    size, took = int(size), float(took)
    if code != "200":
        raise RuntimeError("%s answered %s for /big" % (proxy.name, code))
    return {"bytes": size, "cpu_s_per_gib": spent / (size / GiB),
            "mib_per_s": size / (1 << 20) / took}


def pipeline_script(tmp: str, token: str, depth: int) -> str:
    path = os.path.join(tmp, "pipeline.lua")
    with open(path, "w") as f:
        f.write("""
init = function(args)
  local r = {}
  wrk.headers["Authorization"] = "Bearer %s"
  for i = 1, %d do
    r[i] = wrk.format(nil, "/")
  end
  req = table.concat(r)
end
request = function()
  return req
end
""" % (token, depth) + run.WRK_DONE)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    args = p.parse_args()
    tmp, procs = run.side_bench("phantomd-stream-")
    wrk_cpu, proxy_cpu = "0", "1"
    results: dict = {"nginx": [], "phantomd": []}
    try:
        mocks = run.Mocks(procs, tmp, run.make_jwt(700), run.make_jwt(1024))
        api = API(procs, tmp, args.size_mib << 20)
        url = "http://127.0.0.1:%d/introspect" % mocks.token_port
        for i in range(args.runs):
            token = "stream-%d-%s" % (i, uuid.uuid4().hex[:12])
            script = pipeline_script(tmp, token, args.depth)
            for name in ("nginx", "phantomd"):
                proxy = (run.NginxProxy(procs, tmp, api.port, proxy_cpu)
                         if name == "nginx" else
                         run.Phantomd(procs, tmp, "stream%d" % i, url,
                                      api.port, proxy_cpu))
                try:
                    run.check_ok(proxy, token)
                    row = stream_once(proxy, token, wrk_cpu)
                    run.run_wrk(proxy.port, script, 1.0, args.connections,
                                wrk_cpu, None)
                    w = run.run_wrk(proxy.port, script, args.duration,
                                    args.connections, wrk_cpu, proxy)
                    row["pipelined_cpu_us_per_req"] = w["cpu_us_per_req"]
                    row["pipelined_rps"] = w["rps"]
                    row["non_2xx"] = w["non_2xx"] + w["socket_errors"]
                    results[name].append(row)
                    run.log("run %d %s: %.2f CPU s/GiB, %.0f MiB/s; "
                            "pipelined %.1f CPU us/req, %.0f req/s"
                            % (i + 1, name, row["cpu_s_per_gib"],
                               row["mib_per_s"],
                               row["pipelined_cpu_us_per_req"],
                               row["pipelined_rps"]))
                finally:
                    procs.stop(proxy.proc)
    finally:
        procs.stop_all()
    med = {name: {k: statistics.median(r[k] for r in rows)
                  for k in rows[0]} for name, rows in results.items()}
    print("medians of %d runs (%d MiB streamed; pipelining depth "
          "%d, %d connections):" % (args.runs, args.size_mib, args.depth,
                                     args.connections))
    print("%-9s %12s %10s %16s %12s" % ("proxy", "CPU s/GiB", "MiB/s",
                                        "pipelined us/req", "req/s"))
    for name in ("nginx", "phantomd"):
        m = med[name]
        print("%-9s %12.2f %10.0f %16.1f %12.0f" % (
            name, m["cpu_s_per_gib"], m["mib_per_s"],
            m["pipelined_cpu_us_per_req"], m["pipelined_rps"]))


if __name__ == "__main__":
    main()
