"""A real ``redis-server`` for the tests, in a temporary directory.

Started on a free loopback port (redis refuses ``--port 0`` as "pick one":
it means "no TCP"), so the port is found by binding port 0 first and handing
it over; also listening on a unix socket in the same directory.  Tests skip
with a clear reason only when the binary is absent (CI installs the Debian
package ``redis-server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = ("redis-server is not installed (apt-get install "
               "redis-server); the shared cache tests need a real one")


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class RedisServer:
    """``start()`` runs it (blocking until it answers PING: a test setUp,
    not reactor code); ``stop()`` kills it; ``pause()``/``resume()`` stop
    and continue it (a Redis that accepts but never answers)."""

    def __init__(self, extra_args=()) -> None:
        self.dir = tempfile.mkdtemp(prefix="phantomd-redis-")
        self.port = _free_port()
        self.socket = os.path.join(self.dir, "redis.sock")
        self.extra_args = list(extra_args)
        self.proc = None

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:%d/0" % self.port

    def enable_tls(self) -> str:
        """Also serve TLS on another free port, with a throw-away
        certificate for 127.0.0.1; returns the certificate's path (the CA
        to trust).  Call before ``start``."""
        from tests.robustness.fakes import self_signed
        cert, key = self_signed(os.path.join(self.dir, "tls"))
        self.tls_port = _free_port()
        self.extra_args += ["--tls-port", str(self.tls_port),
                            "--tls-cert-file", cert, "--tls-key-file", key,
                            "--tls-auth-clients", "no"]
        return cert

    @property
    def tls_url(self) -> str:
        return "rediss://127.0.0.1:%d/0" % self.tls_port

    @property
    def unix_url(self) -> str:
        return "unix://%s" % self.socket

    def start(self) -> "RedisServer":
        self.password = None
        for i, a in enumerate(self.extra_args):
            if a == "--requirepass":
                self.password = self.extra_args[i + 1]
        args = [REDIS_SERVER, "--port", str(self.port),
                "--bind", "127.0.0.1", "--unixsocket", self.socket,
                "--dir", self.dir, "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--daemonize", "no",
                "--logfile", os.path.join(self.dir, "redis.log")]
        self.proc = subprocess.Popen(args + self.extra_args,
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command("PING") in (b"+PONG", b"-NOAUTH"):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start: %s" %
                                   self.log())
            time.sleep(0.02)

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def command(self, *args) -> bytes:
        """One command over a blocking socket; the raw first reply line
        (or bulk value).  For setUp and for inspecting from tests."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        try:
            out = b"*%d\r\n" % len(args)
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
            if self.password:
                auth = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (
                    len(self.password), self.password.encode())
                out = auth + out
            s.sendall(out)
            f = s.makefile("rb")
            if self.password:
                _read_reply(f)
            return _read_reply(f)
        finally:
            s.close()

    def dump(self) -> dict:
        """Every key and its value (strings as bytes, sets as lists)."""
        keys = self.command("KEYS", "*") or []
        out = {}
        for k in keys:
            kind = self.command("TYPE", k)
            if kind == b"+string":
                out[k] = self.command("GET", k)
            elif kind == b"+set":
                out[k] = self.command("SMEMBERS", k)
            else:
                out[k] = kind
        return out

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_reply(f):
    line = f.readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_read_reply(f) for _ in range(n)]
    if kind == b":":
        return int(rest)
    return line[:-2]
