#!/usr/bin/env python3
"""phantomd against nginx, side by side, in one command.

    python bench/run.py                  # 3 runs of every scenario, medians
    python bench/run.py --quick          # 1 short run, 20,000 entries in 5
    python bench/run.py --scenarios 1,3 --runs 5 --duration 10
    python bench/run.py --nginx-only     # the harness alone (scenarios 1-3, A)
    python bench/run.py --profile        # scenario 1 under py-spy, top functions
    python bench/run.py --profile --profile-scenario 3

Everything runs on loopback with ports picked at run time.  Mocks are nginx
serving fixed answers (token service: POST /introspect -> a fixed JWT with
Cache-Control: max-age=300; API: GET / -> a small body), so the proxies are
what is measured.  The reference (A) is nginx as a plain keep-alive reverse
proxy, one worker; (B) is ``twistd -n phantomd --config <ini>``, one worker.

Scenarios:
  1  one token, every request a cache hit
  2  10,000 tokens rotating, cache warmed first
  3  a new token on every request (every request introspects)
  4  200 concurrent requests with one new token, token service answering
     after 100 ms (bench/slowtoken.py): introspection calls and latencies
  5  100,000 cached ~1 KB JWTs: RSS growth per entry, minus the JWT size

Per proxy: wrk's req/s, p50/p99 latency, and CPU seconds per request from
/proc/<pid>/stat (utime+stime of the proxy's process tree over the wrk run,
divided by the requests wrk completed): on a shared machine the last is the
figure that stays comparable.  Results: a table on stdout and JSON in
bench/results/<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

SCENARIO_TITLES = {
    1: "one token, all cache hits",
    2: "{tokens:,} tokens rotating, warm cache",
    3: "new token every request (all misses)",
    4: "{burst} concurrent, one new token, IdP {delay_ms:.0f} ms",
    5: "{entries:,} cached ~1 KB JWTs",
}
API_BODY = '{"hello":"world"}\n'


def title(sc: int, args) -> str:
    return SCENARIO_TITLES[sc].format(
        tokens=args.tokens, burst=args.burst, entries=args.entries,
        delay_ms=args.idp_delay * 1000)


def log(msg: str) -> None:
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# -- installing what is missing -------------------------------------------------

def ensure_tools(need_phantomd: bool, need_pyspy: bool) -> None:
    if not (shutil.which("wrk") and shutil.which("nginx")):
        log("wrk or nginx missing: apt-get install -y wrk nginx-light")
        cmd = ["apt-get", "install", "-y", "wrk", "nginx-light"]
        if subprocess.call(cmd) != 0:
            subprocess.check_call(["apt-get", "update"])
            subprocess.check_call(cmd)
    if need_phantomd and not phantomd_installed():
        log("phantomd not installed: pip install -e %s" % REPO)
        subprocess.check_call([sys.executable, "-m", "pip", "install",
                               "--quiet", "-e", REPO])
        if not phantomd_installed():
            # setuptools' default editable mode installs an import hook that
            # Twisted's plugin discovery (twisted/plugins/ on sys.path) does
            # not see; the compat mode puts the tree on sys.path.
            log("twistd does not list phantomd: pip install -e again with "
                "editable_mode=compat")
            subprocess.check_call([sys.executable, "-m", "pip", "install",
                                   "--quiet", "-e", REPO, "--config-settings",
                                   "editable_mode=compat"])
        if not phantomd_installed():
            sys.exit("phantomd is still not runnable as a twistd plugin "
                     "after pip install -e %s" % REPO)
    if need_pyspy and not pyspy_path():
        log("py-spy missing: pip install py-spy")
        subprocess.call([sys.executable, "-m", "pip", "install", "--quiet",
                         "py-spy"])


def twistd_cmd() -> list[str]:
    near = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(near, os.X_OK):
        return [near]
    found = shutil.which("twistd")
    return [found] if found else [sys.executable, "-m", "twisted"]


def tree_env() -> dict[str, str]:
    """The environment phantomd runs in: this tree first on sys.path, so the
    code measured is the code here even when a copy of phantomd (from
    ``pip install .``) sits in site-packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def phantomd_installed() -> bool:
    """This tree's phantomd imports with its dependencies and twistd lists
    it as a plugin."""
    with tempfile.TemporaryDirectory() as d:
        where = subprocess.run(
            [sys.executable, "-c",
             "import phantomd.app, phantomd.tap; print(phantomd.__file__)"],
            cwd=d, capture_output=True, text=True, env=tree_env())
        if not where.stdout.strip().startswith(os.path.join(REPO, "")):
            return False
        r = subprocess.run(twistd_cmd() + ["--help"], cwd=d,
                           capture_output=True, text=True, env=tree_env())
        return r.returncode == 0 and re.search(r"^\s+phantomd\s", r.stdout,
                                               re.M) is not None


def pyspy_path() -> str | None:
    near = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return near if os.access(near, os.X_OK) else shutil.which("py-spy")


# -- small helpers -------------------------------------------------------------

_taken: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now (bind 0, read it back)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _taken:
            _taken.add(port)
            return port


def wait_port(port: int, proc: subprocess.Popen | None, what: str,
              timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with %s before listening on %d"
                               % (what, proc.returncode, port))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not listen on %d within %ss"
                       % (what, port, timeout))


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_split(root: int) -> tuple[float, float]:
    """(utime, stime) of ``root`` and its descendants, in seconds."""
    user = system = 0
    for pid in tree_pids(root):
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def context_switches(root: int) -> int:
    """Voluntary and involuntary context switches of ``root`` and its
    descendants: how often the proxy gave up (or lost) its CPU."""
    n = 0
    for pid in tree_pids(root):
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if "ctxt_switches:" in line:
                        n += int(line.split()[1])
        except OSError:
            continue
    return n


def cpu_seconds(root: int) -> float:
    """utime+stime of ``root`` and its descendants, in seconds."""
    return sum(cpu_split(root))


def rss_bytes(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS for %d" % pid)


def side_bench(prefix: str) -> tuple[str, Procs]:
    """For the scripts beside this one: tools installed, a temporary
    directory and a ``Procs`` to stop everything started in it."""
    ensure_tools(need_phantomd=True, need_pyspy=False)
    return tempfile.mkdtemp(prefix=prefix), Procs()


def pin(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu is not None and shutil.which(
        "taskset") else []


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(size: int) -> str:
    """A compact RS256 JWS of about ``size`` characters, exp in 2100."""
    now = int(time.time())
    header = b64u(json.dumps({"alg": "RS256", "typ": "JWT",
                              "kid": "bench-2026"},
                             separators=(",", ":")).encode())

    def claims(pad: int) -> str:
        return b64u(json.dumps({
            "iss": "https://login.example.com", "sub": "bench-user",
            "aud": "api", "exp": 4102444800, "iat": now,
            "jti": uuid.uuid4().hex, "client_id": "bench",
            "scope": "read write", "ext": "x" * pad,
        }, separators=(",", ":")).encode())

    sig_len = 342  # RS256 with a 2048-bit key
    pad = 0
    while len(header) + len(claims(pad)) + sig_len + 2 < size:
        pad += 1
    protected = '{"alg":"RS256","typ":"JWT","kid":"bench-2026"}'
    payload = base64.urlsafe_b64decode(claims(pad) + "===")
    try:
        from jwcrypto import jwk, jws
    except ImportError:  # the shape is what matters; nobody verifies it
        return header + "." + claims(pad) + "." + b64u(os.urandom(256))
    key = jwk.JWK.generate(kty="RSA", size=2048, kid="bench-2026")
    token = jws.JWS(payload)
    token.add_signature(key, None, protected)
    return token.serialize(compact=True)


# -- processes -----------------------------------------------------------------

class Procs:
    """Everything this run started; stopped by pid on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log_path: str, **kw) -> subprocess.Popen:
        out = open(log_path, "ab")
        p = subprocess.Popen(cmd, stdout=kw.pop("stdout", out),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             **kw)
        out.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(reversed(self.procs)):
            self.stop(p)


def nginx_common(tmp: str, name: str, workers: int = 1) -> str:
    return """
worker_processes {workers};
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/{name}-body;
  proxy_temp_path {tmp}/{name}-proxy;
  fastcgi_temp_path {tmp}/{name}-fastcgi;
  uwsgi_temp_path {tmp}/{name}-uwsgi;
  scgi_temp_path {tmp}/{name}-scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
""".format(tmp=tmp, name=name, workers=workers)


def start_nginx(procs: Procs, tmp: str, name: str, body: str,
                ports: list[int], cpu: str | None,
                workers: int = 1) -> subprocess.Popen:
    conf = os.path.join(tmp, name + ".conf")
    with open(conf, "w") as f:
        f.write(nginx_common(tmp, name, workers) + body + "}\n")
    p = procs.start(pin(cpu) + ["nginx", "-p", tmp, "-c", conf,
                                "-e", os.path.join(tmp, name + "-error.log")],
                    os.path.join(tmp, name + ".out"))
    for port in ports:
        wait_port(port, p, "nginx " + name)
    return p


class Mocks:
    """nginx serving the token service and the API on two ports."""

    def __init__(self, procs: Procs, tmp: str, jwt: str, jwt1k: str) -> None:
        self.token_port, self.api_port = free_port(), free_port()
        body = """
  server {{
    listen 127.0.0.1:{tp} backlog=4096;
    location = /introspect {{
      default_type application/jwt;
      add_header Cache-Control "max-age=300" always;
      return 200 "{jwt}";
    }}
    location = /introspect1k {{
      default_type application/jwt;
      add_header Cache-Control "max-age=300" always;
      return 200 "{jwt1k}";
    }}
  }}
  server {{
    listen 127.0.0.1:{ap} backlog=4096;
    location / {{
      default_type application/json;
      return 200 '{api}';
    }}
  }}
""".format(tp=self.token_port, ap=self.api_port, jwt=jwt, jwt1k=jwt1k,
           api=API_BODY.strip())
        self.proc = start_nginx(procs, tmp, "mocks", body,
                                [self.token_port, self.api_port], None)


class Proxy:
    name = ""
    proc: subprocess.Popen
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


class NginxProxy(Proxy):
    name = "nginx"

    def __init__(self, procs: Procs, tmp: str, api_port: int,
                 cpu: str | None, workers: int = 1) -> None:
        """``workers``: nginx's ``worker_processes``, each accepting on its
        own ``SO_REUSEPORT`` socket when there are more than one."""
        self.port = free_port()
        body = """
  upstream api {{
    server 127.0.0.1:{ap};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096{reuse};
    location / {{
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
""".format(ap=api_port, port=self.port,
           reuse=" reuseport" if workers > 1 else "")
        self.proc = start_nginx(procs, tmp, "reference", body, [self.port],
                                cpu, workers)


class Phantomd(Proxy):
    name = "phantomd"

    def __init__(self, procs: Procs, tmp: str, tag: str, introspect_url: str,
                 api_port: int, cpu: str | None, max_entries: int = 100000,
                 twistd_args: list[str] | None = None,
                 client_id: str = "bench-gateway",
                 client_secret: str = "bench-secret",
                 extra_ini: str = "", workers: int = 1) -> None:
        """``extra_ini``: more sections, after the ones every bench uses
        (``bench/routes.py`` adds its ``[route NAME]`` sections);
        ``workers``: ``[phantomd] workers`` (all pinned to the one CPU, so
        CPU per request shows what the extra processes cost)."""
        self.port, self.metrics_port = free_port(), free_port()
        self.ini = os.path.join(tmp, "phantomd-%s.ini" % tag)
        self.log = os.path.join(tmp, "phantomd-%s.log" % tag)
        with open(self.ini, "w") as f:
            f.write("""\
[phantomd]
listen = tcp:{port}:interface=127.0.0.1:backlog=4096
upstream = http://127.0.0.1:{api}
workers = {workers}

[introspection]
url = {url}
client_id = {client_id}
client_secret = {client_secret}
response = jwt

[cache]
max_entries = {max_entries}

[metrics]
listen = tcp:{mport}:interface=127.0.0.1

{extra}""".format(port=self.port, api=api_port, url=introspect_url,
                  client_id=client_id, client_secret=client_secret,
                  max_entries=max_entries, mport=self.metrics_port,
                  extra=extra_ini, workers=workers))
        cmd = pin(cpu) + twistd_cmd() + [
            "-n", "--pidfile", os.path.join(tmp, "twistd-%s.pid" % tag)] + (
            twistd_args or []) + ["phantomd", "--config", self.ini]
        self.proc = procs.start(cmd, self.log, cwd=tmp, env=tree_env())
        try:
            wait_port(self.port, self.proc, "phantomd", timeout=30)
        except RuntimeError:
            sys.stderr.write(self.log_tail())
            raise

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def scrape(self) -> list[str]:
        """The lines of phantomd's /metrics (raises OSError)."""
        with socket.create_connection(("127.0.0.1", self.metrics_port),
                                      timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n"
                      b"Connection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode(errors="replace").splitlines()

    def metric(self, name: str) -> float | None:
        try:
            lines = self.scrape()
        except OSError:
            return None
        for line in lines:
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(None, 1)[1])
        return None


# -- load generation -----------------------------------------------------------

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%.0f,"p99_us":%.0f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_script(tmp: str, name: str, mode: str, prefix: str,
               count: int = 0) -> str:
    """mode: one (a fixed token), rotate (count tokens in turn), fresh."""
    if mode == "one":
        body = 'wrk.headers["Authorization"] = "Bearer %s"\n' % prefix
    else:
        step = "n = n %% %d + 1" % count if mode == "rotate" else "n = n + 1"
        body = """
local n = 0
local headers = {}
request = function()
  %s
  headers["Authorization"] = "Bearer %s" .. n
  return wrk.format(nil, nil, headers)
end
""" % (step, prefix)
    path = os.path.join(tmp, name + ".lua")
    with open(path, "w") as f:
        f.write(body + WRK_DONE)
    return path


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        cols = [int(c) for c in f.readline().split()[1:]]
    return (sum(cols[:8]) - cols[3] - cols[4]) / CLK_TCK  # less idle, iowait


def machine_steal() -> float:
    """CPU seconds the hypervisor gave other guests since boot, all cores
    (/proc/stat).  On the development VM, measurements taken while it
    grew showed up to half as much again CPU per request
    (``bench/cores.py``)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / CLK_TCK


def wrk_cmd(port: int, script: str, duration: float, connections: int,
            cpu: str | None) -> list[str]:
    return pin(cpu) + ["wrk", "-t1", "-c%d" % connections,
                       "-d%ds" % max(1, round(duration)), "--latency",
                       "--timeout", "5s", "-s", script,
                       "http://127.0.0.1:%d/" % port]


def wrk_summary(returncode: int, stdout: str, stderr: str) -> dict:
    """The summary ``WRK_DONE`` printed; ``RuntimeError`` if wrk failed."""
    m = re.search(r"^BENCHJSON (.*)$", stdout, re.M)
    if returncode != 0 or not m:
        raise RuntimeError("wrk failed (%s): %s %s" % (returncode, stdout,
                                                       stderr))
    return json.loads(m.group(1))


def run_wrk(port: int, script: str, duration: float, connections: int,
            cpu: str | None, proxy: Proxy | None = None,
            mocks: int | None = None) -> dict:
    cmd = wrk_cmd(port, script, duration, connections, cpu)
    before_split = cpu_split(proxy.pid) if proxy else (0.0, 0.0)
    before = sum(before_split)
    switches_before = context_switches(proxy.pid) if proxy else 0
    mocks_before = cpu_seconds(mocks) if mocks else 0.0
    busy_before = machine_busy()
    steal_before = machine_steal()
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True,
                       timeout=duration + 60)
    wall = time.monotonic() - t0
    after_split = cpu_split(proxy.pid) if proxy else (0.0, 0.0)
    after = sum(after_split)
    switches = context_switches(proxy.pid) - switches_before if proxy else 0
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = machine_busy() - busy_before
    stolen = machine_steal() - steal_before
    mocks_cpu = cpu_seconds(mocks) - mocks_before if mocks else None
    s = wrk_summary(r.returncode, r.stdout, r.stderr)
    reqs = s["requests"]
    errors = s["connect"] + s["read"] + s["write"] + s["timeout"]
    return {
        "requests": reqs,
        "rps": reqs / (s["duration_us"] / 1e6),
        "p50_ms": s["p50_us"] / 1000.0,
        "p99_ms": s["p99_us"] / 1000.0,
        "non_2xx": s["status"],
        "socket_errors": errors,
        "cpu_s": after - before,
        "cpu_us_per_req": (after - before) / reqs * 1e6 if reqs else None,
        # user (the proxy's own code) against system (the kernel's sockets)
        "user_us_per_req": ((after_split[0] - before_split[0]) / reqs * 1e6
                            if reqs else None),
        "sys_us_per_req": ((after_split[1] - before_split[1]) / reqs * 1e6
                           if reqs else None),
        "switches_per_req": switches / reqs if reqs else None,
        "wall_s": wall,
        # where else the CPU went: is the reference limited by the machine?
        "wrk_cpu_s": (wrk_after.ru_utime + wrk_after.ru_stime
                      - wrk_before.ru_utime - wrk_before.ru_stime),
        "mocks_cpu_s": mocks_cpu,
        "machine_busy_cores": busy / wall,
        # share of a core stolen by the hypervisor: above ~0.1 the CPU
        # figures of this measurement are inflated
        "steal_cores": stolen / wall,
        "proxy_core_use": (after - before) / (s["duration_us"] / 1e6),
    }


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, close = None, False, lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            close = b"close" in value
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        close = True
    return status, close


def _request(port: int, token: str) -> bytes:
    return ("GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            "Authorization: Bearer %s\r\n\r\n" % (port, token)).encode()


async def _drive(port: int, tokens, connections: int) -> dict[int, int]:
    """Send one request per token over ``connections`` keep-alive
    connections; return a count of statuses."""
    statuses: dict[int, int] = {}
    it = iter(tokens)

    async def worker() -> None:
        reader = writer = None
        for token in it:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1",
                                                               port)
            writer.write(_request(port, token))
            try:
                status, close = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                status, close = 0, True
            statuses[status] = statuses.get(status, 0) + 1
            if close:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses


def drive(port: int, tokens, connections: int = 16) -> dict[int, int]:
    return asyncio.run(_drive(port, tokens, connections))


async def _burst(port: int, token: str, n: int) -> dict:
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                   for _ in range(n)))
    req = _request(port, token)

    async def one(reader, writer) -> tuple[float, int]:
        t0 = time.perf_counter()
        writer.write(req)
        try:
            status, _ = await _read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            status = 0
        return time.perf_counter() - t0, status

    results = await asyncio.gather(*(one(r, w) for r, w in conns))
    for _, w in conns:
        w.close()
    lat = sorted(t for t, _ in results)
    statuses: dict[int, int] = {}
    for _, s in results:
        statuses[s] = statuses.get(s, 0) + 1
    return {"min_ms": lat[0] * 1000, "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "max_ms": lat[-1] * 1000, "statuses": statuses}


def percentile(sorted_values: list[float], p: float) -> float:
    k = max(0, min(len(sorted_values) - 1,
                   int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def http_get_json(port: int, path: str) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\nConnection: close"
                  b"\r\n\r\n" % path.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def check_ok(proxy: Proxy, token: str) -> None:
    statuses = drive(proxy.port, [token], 1)
    if statuses != {200: 1}:
        tail = proxy.log_tail() if isinstance(proxy, Phantomd) else ""
        raise RuntimeError("%s answered %s to a good token\n%s"
                           % (proxy.name, statuses, tail))


# -- scenarios -----------------------------------------------------------------

class Bench:
    def __init__(self, args, tmp: str, procs: Procs) -> None:
        self.args, self.tmp, self.procs = args, tmp, procs
        self.jwt = make_jwt(700)
        self.jwt1k = make_jwt(1024)
        with open(os.path.join(tmp, "jwt.txt"), "w") as f:
            f.write(self.jwt)
        self.mocks = Mocks(procs, tmp, self.jwt, self.jwt1k)
        self.introspect_url = "http://127.0.0.1:%d/introspect" % (
            self.mocks.token_port)
        self.fill_seconds = 0.0
        self.failures: list[dict] = []
        self.wrk_cpu = None if args.no_pin else "0"
        self.proxy_cpu = None if args.no_pin else "1"

    def proxies(self, tag: str, url: str | None = None):
        """Yield the reference, then phantomd, each stopped afterwards."""
        if not self.args.phantomd_only:
            ref = NginxProxy(self.procs, self.tmp, self.mocks.api_port,
                             self.proxy_cpu)
            try:
                yield ref
            finally:
                self.procs.stop(ref.proc, signal.SIGQUIT)
        if not self.args.nginx_only:
            try:
                ph = Phantomd(self.procs, self.tmp, tag,
                              url or self.introspect_url, self.mocks.api_port,
                              self.proxy_cpu, workers=self.args.workers)
            except RuntimeError as e:  # keep the reference's figures
                log("phantomd did not start: %s" % e)
                self.failures.append({"tag": tag, "error": str(e)})
                return
            try:
                yield ph
            finally:
                self.procs.stop(ph.proc)

    def measure(self, proxy: Proxy, script: str, warm: str) -> dict:
        run_wrk(proxy.port, warm, self.args.warmup, self.args.connections,
                self.wrk_cpu, None)
        return run_wrk(proxy.port, script, self.args.duration,
                       self.args.connections, self.wrk_cpu, proxy,
                       self.mocks.proc.pid)

    def scenario1(self, run: int) -> dict:
        out = {}
        token = "s1-r%d-%s" % (run, uuid.uuid4().hex[:16])
        script = wrk_script(self.tmp, "s1", "one", token)
        for proxy in self.proxies("s1-r%d" % run):
            check_ok(proxy, token)
            out[proxy.name] = self.measure(proxy, script, script)
        return out

    def scenario2(self, run: int) -> dict:
        out = {}
        n = self.args.tokens
        prefix = "s2-r%d-%s-" % (run, uuid.uuid4().hex[:8])
        script = wrk_script(self.tmp, "s2", "rotate", prefix, n)
        for proxy in self.proxies("s2-r%d" % run):
            t0 = time.monotonic()
            statuses = drive(proxy.port, (prefix + str(i)
                                          for i in range(1, n + 1)))
            warm = {"seconds": time.monotonic() - t0, "statuses": statuses}
            if statuses.get(200) != n:
                log("scenario 2: warming %s answered %s" % (proxy.name,
                                                            statuses))
            r = self.measure(proxy, script, script)
            r["warm"] = warm
            out[proxy.name] = r
        return out

    def scenario3(self, run: int) -> dict:
        out = {}
        tag = uuid.uuid4().hex[:8]
        script = wrk_script(self.tmp, "s3", "fresh", "s3-r%d-%s-" % (run, tag))
        warm = wrk_script(self.tmp, "s3w", "fresh", "s3w-r%d-%s-" % (run, tag))
        for proxy in self.proxies("s3-r%d" % run):
            out[proxy.name] = self.measure(proxy, script, warm)
        return out

    def scenario4(self, run: int) -> dict:
        if self.args.nginx_only:
            return {}
        log_path = os.path.join(self.tmp, "slowtoken.log")
        slow = self.procs.start(
            [sys.executable, os.path.join(HERE, "slowtoken.py"),
             "--jwt-file", os.path.join(self.tmp, "jwt.txt"),
             "--delay", str(self.args.idp_delay)], log_path,
            stdout=subprocess.PIPE)
        try:
            line = slow.stdout.readline().decode()
            if not line.startswith("PORT "):
                raise RuntimeError("slowtoken.py said %r" % line)
            sport = int(line.split()[1])
            ph = Phantomd(self.procs, self.tmp, "s4-r%d" % run,
                          "http://127.0.0.1:%d/introspect" % sport,
                          self.mocks.api_port, self.proxy_cpu)
            try:
                # one request first so connection pools and imports are warm
                check_ok(ph, "s4-warm-r%d-%s" % (run, uuid.uuid4().hex[:8]))
                before = http_get_json(sport, "/stats")["calls"]
                token = "s4-r%d-%s" % (run, uuid.uuid4().hex)
                r = asyncio.run(_burst(ph.port, token, self.args.burst))
                r["introspection_calls"] = (
                    http_get_json(sport, "/stats")["calls"] - before)
                r["requests"] = self.args.burst
                r["coalesced_metric"] = ph.metric(
                    "phantomd_coalesced_requests_total")
            finally:
                self.procs.stop(ph.proc)
        finally:
            self.procs.stop(slow)
        return {"phantomd": r}

    def scenario5(self, run: int) -> dict:
        if self.args.nginx_only:
            return {}
        n = self.args.entries
        ph = Phantomd(self.procs, self.tmp, "s5-r%d" % run,
                      self.introspect_url + "1k", self.mocks.api_port,
                      self.proxy_cpu, max_entries=n + 1000)
        try:
            tag = "s5-r%d-%s-" % (run, uuid.uuid4().hex[:8])
            # warm the code paths and connection buffers with few entries
            drive(ph.port, (tag + "w%d" % (i % 100) for i in range(2000)))
            time.sleep(0.5)
            entries_before = ph.metric("phantomd_cache_entries")
            before = rss_bytes(ph.pid)
            t0 = time.monotonic()
            statuses = drive(ph.port, (tag + str(i) for i in range(n)))
            fill_s = self.fill_seconds = time.monotonic() - t0
            time.sleep(0.5)
            after = rss_bytes(ph.pid)
            entries_after = ph.metric("phantomd_cache_entries")
        finally:
            self.procs.stop(ph.proc)
        jwt_len = len(self.jwt1k)
        return {"phantomd": {
            "entries": n, "jwt_bytes": jwt_len,
            "rss_before": before, "rss_after": after,
            "bytes_per_entry": (after - before) / n,
            "overhead_per_entry": (after - before) / n - jwt_len,
            "cache_entries_metric": [entries_before, entries_after],
            "fill_seconds": fill_s, "fill_rps": n / fill_s,
            "statuses": statuses,
        }}


# -- summarising ---------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict]) -> dict:
    """Median of every numeric field, per scenario and proxy."""
    out: dict = {}
    for run in runs:
        for sc, per_proxy in run.items():
            for proxy, fields in per_proxy.items():
                slot = out.setdefault(sc, {}).setdefault(proxy, {})
                for k, v in fields.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        slot.setdefault(k, []).append(v)
    return {sc: {proxy: {k: median(v) for k, v in fields.items()}
                 for proxy, fields in per.items()}
            for sc, per in out.items()}


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def ratio(a, b) -> str:
    return "-" if not a or not b else "%.2fx" % (a / b)


def table(med: dict, runs: list[dict], args) -> str:
    rows = ["%-44s %-9s %9s %8s %8s %11s %6s %6s %6s %6s %6s" % (
        "scenario", "proxy", "req/s", "p50 ms", "p99 ms", "CPU us/req",
        "user", "sys", "core%", "steal%", "errors")]
    rows.append("-" * len(rows[0]))
    for sc in ("1", "2", "3"):
        if sc not in med:
            continue
        label = "%s %s" % (sc, title(int(sc), args))
        per = med[sc]
        for name in ("nginx", "phantomd"):
            if name not in per:
                continue
            m = per[name]
            errs = sum((r.get(sc, {}).get(name, {}).get("non_2xx", 0) or 0) +
                       (r.get(sc, {}).get(name, {}).get("socket_errors", 0)
                        or 0) for r in runs)
            use = m.get("proxy_core_use")
            steal = m.get("steal_cores")
            rows.append("%-44s %-9s %9s %8s %8s %11s %6s %6s %6s %6s %6s" % (
                label, name, fmt(m.get("rps"), ".0f"),
                fmt(m.get("p50_ms"), ".2f"), fmt(m.get("p99_ms"), ".2f"),
                fmt(m.get("cpu_us_per_req"), ".1f"),
                fmt(m.get("user_us_per_req"), ".1f"),
                fmt(m.get("sys_us_per_req"), ".1f"),
                fmt(use * 100 if use is not None else None, ".0f"),
                fmt(steal * 100 if steal is not None else None, ".0f"),
                errs))
            label = ""
        if "nginx" in per and "phantomd" in per:
            a, b = per["phantomd"], per["nginx"]
            rows.append("%-44s %-9s %9s %8s %8s %11s" % (
                "", "ph/nginx", ratio(a.get("rps"), b.get("rps")),
                ratio(a.get("p50_ms"), b.get("p50_ms")),
                ratio(a.get("p99_ms"), b.get("p99_ms")),
                ratio(a.get("cpu_us_per_req"), b.get("cpu_us_per_req"))))
    if "4" in med and "phantomd" in med["4"]:
        m = med["4"]["phantomd"]
        st = [r["4"]["phantomd"]["statuses"] for r in runs if "4" in r
              and "phantomd" in r["4"]]
        rows.append("4 %s: introspection calls %s (per run %s), min %s ms, "
                    "p50 %s ms, p99 %s ms, statuses %s" % (
                        title(4, args), fmt(m.get("introspection_calls"),
                                                ".0f"),
                        [r["4"]["phantomd"]["introspection_calls"]
                         for r in runs if "4" in r and "phantomd" in r["4"]],
                        fmt(m.get("min_ms"), ".1f"),
                        fmt(m.get("p50_ms"), ".1f"),
                        fmt(m.get("p99_ms"), ".1f"), st[-1] if st else "-"))
    if "5" in med and "phantomd" in med["5"]:
        m = med["5"]["phantomd"]
        last = [r["5"]["phantomd"] for r in runs if "5" in r
                and "phantomd" in r["5"]][-1]
        rows.append("5 %s: RSS +%s B/entry, JWT %s B -> overhead %s B/entry "
                    "(per run %s; cache_entries %s; fill %s req/s, "
                    "statuses %s)" % (
                        title(5, args), fmt(m.get("bytes_per_entry"), ".0f"),
                        fmt(m.get("jwt_bytes"), ".0f"),
                        fmt(m.get("overhead_per_entry"), ".0f"),
                        [round(r["5"]["phantomd"]["overhead_per_entry"])
                         for r in runs if "5" in r and "phantomd" in r["5"]],
                        "->".join(fmt(v, ".0f")
                                  for v in last["cache_entries_metric"]),
                        fmt(m.get("fill_rps"), ".0f"), last["statuses"]))
    return "\n".join(rows)


def environment() -> dict:
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return None
    return {
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "nginx": out(["nginx", "-v"]), "wrk": out(["wrk", "-v"]),
        "git": out(["git", "rev-parse", "HEAD"]),
        # others' uncommitted edits are what ran, if any: say which
        "uncommitted": subprocess.run(
            ["git", "status", "--porcelain", "--", "phantomd", "twisted"],
            capture_output=True, text=True, cwd=REPO).stdout.split("\n")[:-1],
        "phantomd_from": subprocess.run(
            [sys.executable, "-c", "import phantomd; print(phantomd.__file__)"],
            cwd="/", capture_output=True, text=True,
            env=tree_env()).stdout.strip(),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "kernel": platform.release(),
    }


# -- profiling -----------------------------------------------------------------

def profile_load(args, bench: Bench, ph: Proxy) -> str:
    """Prepare phantomd for scenario ``args.profile_scenario``; return the
    wrk script that drives it."""
    sc, tag = args.profile_scenario, "prof-%s-" % uuid.uuid4().hex[:8]
    check_ok(ph, tag + "check")
    if sc == 1:
        script = wrk_script(bench.tmp, "prof", "one", tag + "one")
    elif sc == 2:
        script = wrk_script(bench.tmp, "prof", "rotate", tag, args.tokens)
        drive(ph.port, (tag + str(i) for i in range(1, args.tokens + 1)))
    else:
        script = wrk_script(bench.tmp, "prof", "fresh", tag)
    if sc != 2:
        # Scenario 3 warms up on tokens of its own: the measured run counts
        # from the same first token, which would then be cache hits.
        warm = script if sc == 1 else wrk_script(
            bench.tmp, "profw", "fresh", tag + "warm-")
        run_wrk(ph.port, warm, args.warmup, args.connections, bench.wrk_cpu)
    return script


def profile(args, bench: Bench) -> None:
    """One scenario against phantomd under py-spy (else cProfile)."""
    spy = pyspy_path()
    raw = os.path.join(bench.tmp, "pyspy.txt")
    ph = Phantomd(bench.procs, bench.tmp, "profile", bench.introspect_url,
                  bench.mocks.api_port, bench.proxy_cpu)
    try:
        script = profile_load(args, bench, ph)
        top = None
        if spy:
            recorder = bench.procs.start(
                [spy, "record", "--pid", str(ph.pid), "--format", "raw",
                 "--function", "--rate", "250", "--nonblocking",
                 "--duration", str(int(args.duration) + 2), "-o", raw],
                os.path.join(bench.tmp, "pyspy.log"))
            time.sleep(1.0)
            r = run_wrk(ph.port, script, args.duration, args.connections,
                        bench.wrk_cpu, ph)
            recorder.wait(args.duration + 60)
            if recorder.returncode == 0 and os.path.exists(raw):
                top = pyspy_top(raw, args.top)
                os.makedirs(RESULTS, exist_ok=True)
                kept = os.path.join(RESULTS, time.strftime(
                    "%Y%m%dT%H%M%SZ-pyspy-s" + str(args.profile_scenario)
                    + ".txt", time.gmtime()))
                shutil.copy(raw, kept)
                top += "\nraw stacks (flamegraph.pl input): %s" % (
                    os.path.relpath(kept))
            else:
                with open(os.path.join(bench.tmp, "pyspy.log")) as f:
                    log("py-spy failed, falling back to cProfile: "
                        + f.read()[-400:])
        if top is None:
            bench.procs.stop(ph.proc)
            ph = None
            stats = os.path.join(bench.tmp, "cprofile.stats")
            ph = Phantomd(bench.procs, bench.tmp, "cprofile",
                          bench.introspect_url, bench.mocks.api_port,
                          bench.proxy_cpu, twistd_args=[
                              "--profile", stats, "--profiler", "cprofile",
                              "--savestats"])
            script = profile_load(args, bench, ph)
            r = run_wrk(ph.port, script, args.duration, args.connections,
                        bench.wrk_cpu, ph)
            bench.procs.stop(ph.proc, signal.SIGINT)
            top = cprofile_top(stats, args.top)
        sys_counts = {}
        if shutil.which("strace") and not args.no_strace:
            ph = Phantomd(bench.procs, bench.tmp, "strace",
                          bench.introspect_url, bench.mocks.api_port,
                          bench.proxy_cpu)
            sys_counts["phantomd"] = syscalls(args, bench, ph,
                                              profile_load(args, bench, ph))
            bench.procs.stop(ph.proc)
            ref = NginxProxy(bench.procs, bench.tmp, bench.mocks.api_port,
                             bench.proxy_cpu)
            sys_counts["nginx"] = syscalls(args, bench, ref,
                                           profile_load(args, bench, ref))
            bench.procs.stop(ref.proc, signal.SIGQUIT)
    finally:
        if ph is not None:
            bench.procs.stop(ph.proc)
    print("scenario %d under the profiler: %.0f req/s, %.1f CPU us/req "
          "(profiler overhead included), %d non-2xx"
          % (args.profile_scenario, r["rps"], r["cpu_us_per_req"],
             r["non_2xx"]))
    print(top)
    if sys_counts:
        print(syscall_table(sys_counts))


def syscalls(args, bench: Bench, proxy: Proxy, script: str) -> dict:
    """System calls per request while wrk runs ``script`` (strace -c -f);
    strace slows the proxy, so req/s here mean nothing, counts do."""
    out = os.path.join(bench.tmp, "strace-%s.txt" % proxy.name)
    attach = [a for pid in tree_pids(proxy.pid) for a in ("-p", str(pid))]
    tracer = bench.procs.start(["strace", "-c", "-f"] + attach + ["-o", out],
                               os.path.join(bench.tmp, "strace.log"))
    time.sleep(1.0)
    r = run_wrk(proxy.port, script, min(args.duration, 3.0), args.connections,
                bench.wrk_cpu)
    bench.procs.stop(tracer, signal.SIGINT)
    counts: dict[str, float] = {}
    with open(out) as f:
        for line in f:
            cols = line.split()
            if len(cols) >= 5 and cols[0][0].isdigit() and cols[-1] != "total":
                counts[cols[-1]] = int(cols[3]) / r["requests"]
    return counts


def syscall_table(per_proxy: dict[str, dict]) -> str:
    names = sorted({n for c in per_proxy.values() for n, v in c.items()
                    if v >= 0.01},
                   key=lambda n: -max(c.get(n, 0) for c in per_proxy.values()))
    rows = ["system calls per request (strace -c -f):",
            "%-16s" % "" + "".join("%10s" % p for p in per_proxy)]
    for n in names:
        rows.append("%-16s" % n + "".join(
            "%10.2f" % c.get(n, 0) for c in per_proxy.values()))
    rows.append("%-16s" % "total" + "".join(
        "%10.2f" % sum(c.values()) for c in per_proxy.values()))
    return "\n".join(rows)


def pyspy_top(path: str, n: int) -> str:
    own: dict[str, int] = {}
    total_incl: dict[str, int] = {}
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            c = int(count)
            frames = stack.split(";")
            frames = [fr for fr in frames if not fr.startswith("process ")
                      and not fr.startswith("thread ")]
            if not frames:
                continue
            samples += c
            own[frames[-1]] = own.get(frames[-1], 0) + c
            for fr in set(frames):
                total_incl[fr] = total_incl.get(fr, 0) + c
    lines = ["py-spy, %d samples (idle threads excluded); top %d by own time:"
             % (samples, n),
             "%7s %7s  %s" % ("own %", "incl %", "function (file:line)")]
    for fr, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        lines.append("%6.1f%% %6.1f%%  %s" % (100.0 * c / samples,
                                              100.0 * total_incl[fr] / samples,
                                              short(fr)))
    return "\n".join(lines)


def short(frame: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        i = frame.find(marker)
        if i >= 0:
            j = frame.rfind("(", 0, i)
            return frame[:j + 1] + frame[i + len(marker):]
    return frame


def cprofile_top(path: str, n: int) -> str:
    import io
    import pstats
    buf = io.StringIO()
    pstats.Stats(path, stream=buf).sort_stats("tottime").print_stats(n)
    return "cProfile, top %d by own time (tottime):\n%s" % (n, buf.getvalue())


# -- main ----------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(
        description="phantomd against nginx, side by side.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0,
                   help="seconds of each measured wrk run")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of unmeasured wrk before each measurement")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, default=1,
                   help="[phantomd] workers for scenarios 1-3 (every "
                   "process pinned to the proxy's CPU)")
    p.add_argument("--scenarios", default="1,2,3,4,5")
    p.add_argument("--tokens", type=int, default=10000,
                   help="tokens rotating in scenario 2")
    p.add_argument("--entries", type=int, default=100000,
                   help="distinct tokens cached in scenario 5")
    p.add_argument("--burst", type=int, default=200,
                   help="concurrent requests in scenario 4")
    p.add_argument("--idp-delay", type=float, default=0.1,
                   help="token service delay in scenario 4, seconds")
    p.add_argument("--quick", action="store_true",
                   help="1 run, 2 s each, 20,000 entries in scenario 5")
    p.add_argument("--nginx-only", action="store_true",
                   help="only the reference (tests the harness)")
    p.add_argument("--phantomd-only", action="store_true")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin wrk to CPU 0 and the proxy to CPU 1")
    p.add_argument("--profile", action="store_true",
                   help="scenario 1 against phantomd under py-spy")
    p.add_argument("--profile-scenario", type=int, choices=(1, 2, 3),
                   default=1, help="which scenario --profile runs")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--no-strace", action="store_true",
                   help="--profile without counting system calls")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, logs)")
    p.add_argument("--json", help="where to write results "
                   "(default bench/results/<UTC timestamp>.json)")
    args = p.parse_args()
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 2.0, 0.5
        args.entries = min(args.entries, 20000)
    if (os.cpu_count() or 1) < 2:
        args.no_pin = True
    scenarios = [int(s) for s in args.scenarios.split(",") if s.strip()]

    ensure_tools(need_phantomd=not args.nginx_only,
                 need_pyspy=args.profile)
    tmp = tempfile.mkdtemp(prefix="phantomd-bench-")
    procs = Procs()
    started = time.time()
    load_before = open("/proc/loadavg").read().split()[:3]
    try:
        bench = Bench(args, tmp, procs)
        if args.profile:
            profile(args, bench)
            return
        runs: list[dict] = []
        for run in range(1, args.runs + 1):
            result: dict = {}
            for sc in scenarios:
                if sc == 5 and run > 1 and bench.fill_seconds > 120:
                    log("skipping scenario 5 in run %d: its fill took %.0f s"
                        " (keeps the whole run near 10 minutes)"
                        % (run, bench.fill_seconds))
                    continue
                log("run %d/%d, scenario %d: %s" % (run, args.runs, sc,
                                                   title(sc, args)))
                try:
                    result[str(sc)] = getattr(bench, "scenario%d" % sc)(run)
                except Exception as e:  # report it, go on with the rest
                    log("scenario %d failed: %s" % (sc, e))
                    bench.failures.append({"tag": "s%d-r%d" % (sc, run),
                                           "error": str(e)})
            runs.append(result)
        med = summarise(runs)
        text = table(med, runs, args)
        for f in bench.failures:
            text += "\nFAILED %(tag)s: %(error)s" % f
        print(text)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
        path = args.json or os.path.join(RESULTS, stamp + ".json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"started": stamp, "seconds": time.time() - started,
                       "args": vars(args), "environment": dict(environment(),
                                           loadavg_before=load_before),
                       "jwt_bytes": {"s1-4": len(bench.jwt),
                                     "s5": len(bench.jwt1k)},
                       "median": med, "runs": runs, "failures": bench.failures,
                       "table": text}, f,
                      indent=1, sort_keys=True)
        print("results: %s (%.0f s)" % (os.path.relpath(path),
                                       time.time() - started))
    finally:
        procs.stop_all()
        if args.keep:
            log("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
