"""The real service: ``twistd -n phantomd --config FILE`` as a subprocess.

A Curity-style fake token service (POST ``token=...``; 200 with the JWT as
``application/jwt``; 204 for unknown tokens) and a fake API run in this
process on loopback.  The client port is a real socket this test binds and
hands over the way systemd does (``LISTEN_FDS``/``LISTEN_FDNAMES``/
``LISTEN_PID``), and systemd's notify socket is a datagram socket here, so
READY/RELOADING/STOPPING are observed exactly as systemd would see them.
Every test checks that no output line carries the token, JWT or secret.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import unquote_plus

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "E2e-Cl1ent-S3cret!x"
CLIENT_ID = "gateway_e2e"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(scope: str) -> str:
    """An unverified JWT (phantomd runs with verify_jwt = no here)."""
    now = int(time.time())
    claims = {"iss": "https://login.e2e.test", "sub": "alice", "aud": "api",
              "iat": now, "exp": now + 3600, "scope": scope,
              "jti": os.urandom(8).hex()}
    return ".".join((b64url(b'{"alg":"RS256","typ":"JWT"}'),
                     b64url(json.dumps(claims).encode()),
                     b64url(os.urandom(48))))


class TokenService(resource.Resource):
    """Curity's introspection as the nginx phantom-token module expects."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, str] = {}
        self.calls = 0
        self.asked: dict[str, int] = {}  # token -> introspections of it

    @staticmethod
    def credentials(request):
        """client_secret_basic: RFC 6749 2.3.1 form-encodes both parts."""
        scheme, _, value = (request.getHeader("authorization") or ""
                            ).partition(" ")
        if scheme.lower() != "basic":
            return None
        user, _, password = base64.b64decode(value).decode().partition(":")
        return unquote_plus(user), unquote_plus(password)

    def render_POST(self, request):
        self.calls += 1
        if self.credentials(request) != (CLIENT_ID, SECRET):
            request.setResponseCode(401)
            return b""
        token = request.args.get(b"token", [b""])[0].decode()
        self.asked[token] = self.asked.get(token, 0) + 1
        jwt = self.tokens.get(token)
        if jwt is None:
            request.setResponseCode(204)
            return b""
        request.setHeader(b"content-type", b"application/jwt")
        request.setHeader(b"cache-control", b"max-age=300")
        return jwt.encode()


class API(resource.Resource):
    """Echoes what it received; ``/slow`` answers after ``slow_delay``."""

    isLeaf = True
    slow_delay = 1.5

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list[str] = []
        self.slow_arrived = defer.Deferred()

    def render_GET(self, request):
        self.authorizations.append(request.getHeader("authorization") or "")
        body = json.dumps({"path": request.path.decode(),
                           "pid_note": "api"}).encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.path.startswith(b"/slow"):
            def finish():
                request.write(body)
                request.finish()
            reactor.callLater(self.slow_delay, finish)
            if not self.slow_arrived.called:
                self.slow_arrived.callback(None)
            return server.NOT_DONE_YET
        return body


class Notifications(protocol.DatagramProtocol):
    """systemd's end of NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self._waiters: list = []

    def datagramReceived(self, data, addr):
        msg = dict(line.split("=", 1)
                   for line in data.decode().splitlines() if "=" in line)
        self.messages.append(msg)
        for w in list(self._waiters):
            key, start, d = w
            if key in msg:
                self._waiters.remove(w)
                d.callback(msg)

    def wait(self, key: str, after: int = 0, timeout: float = 20):
        """The first message from index ``after`` on that carries ``key``."""
        for msg in self.messages[after:]:
            if key in msg:
                return defer.succeed(msg)
        d = defer.Deferred()
        self._waiters.append((key, after, d))
        return d.addTimeout(timeout, reactor)


class Phantomd(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended = defer.Deferred()
        self.status = None

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.status = reason.value
        self.ended.callback(reason.value)

    def lines(self) -> list[str]:
        return self.output.decode("utf-8", "replace").splitlines()


class Client:
    """A blocking keep-alive HTTP/1.1 client (run it in a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by phantomd")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def get(self, path: str, token: str) -> tuple[int, dict, bytes]:
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: api.e2e\r\n"
                           "Authorization: Bearer %s\r\n\r\n"
                           % (path, token)).encode())
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while True:
            line = self._line()
            if not line:
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                body += self._take(size)
                self._take(2)
        else:
            body = self._take(int(headers.get("content-length", "0")))
        return status, headers, body


def get_once(port: int, path: str, token: str):
    c = Client(port)
    try:
        return c.get(path, token)
    finally:
        c.close()


def unix_get(path: str, target: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(("GET %s HTTP/1.0\r\nHost: metrics\r\n\r\n" % target)
                  .encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", head
    return body


class ServiceCase(TestCase):
    timeout = 90

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="phantomd-e2e-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tokens = TokenService()
        self.api = API()
        self.ts_port = reactor.listenTCP(0, server.Site(self.tokens),
                                         interface="127.0.0.1")
        self.addCleanup(self.ts_port.stopListening)
        self.api_site = server.Site(self.api)
        self.api_port = reactor.listenTCP(0, self.api_site,
                                          interface="127.0.0.1")
        self.addCleanup(self.api_port.stopListening)
        self.notify = Notifications()
        self.notify_port = reactor.listenUNIXDatagram(
            os.path.join(self.dir, "notify"), self.notify)
        self.addCleanup(self.notify_port.stopListening)
        # The client port, bound here and inherited, as systemd does it.
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]
        self.metrics_path = os.path.join(self.dir, "metrics.sock")
        self.ini = os.path.join(self.dir, "phantomd.ini")
        self.good = "opq-" + os.urandom(16).hex()
        self.jwt = make_jwt("read")
        self.tokens.tokens[self.good] = self.jwt
        self.proc = None

    def write_ini(self, required_scopes="read", workers=1, extra=""):
        with open(self.ini, "w") as f:
            f.write(
                "[phantomd]\n"
                "listen = systemd:domain=INET:name=phantomd-http\n"
                "upstream = http://127.0.0.1:%d\n"
                "required_scopes = %s\n"
                "workers = %d\n"
                "drain_timeout = 10\n"
                "[introspection]\n"
                "url = http://127.0.0.1:%d/introspect\n"
                "client_id = %s\n"
                "client_secret = %s\n"
                "response = jwt\n"
                "[metrics]\n"
                "listen = unix:%s\n"
                "[log]\n"
                "access = yes\n"
                "%s"
                % (self.api_port.getHost().port, required_scopes, workers,
                   self.ts_port.getHost().port, CLIENT_ID, SECRET,
                   self.metrics_path, extra))

    def start(self):
        """Run phantomd with our socket as fd 3 and LISTEN_PID = its pid."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": ROOT,
            "NOTIFY_SOCKET": os.path.join(self.dir, "notify"),
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "phantomd-http",
        }
        argv = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"',
                sys.executable, "-c",
                "from twisted.scripts.twistd import run; run()",
                "--nodaemon", "--pidfile=", "phantomd", "--config", self.ini]
        self.proc = Phantomd()
        reactor.spawnProcess(self.proc, argv[0], argv, env=env, path=ROOT,
                             childFDs={0: "w", 1: "r", 2: "r",
                                       3: self.listener.fileno()})
        self.addCleanup(self._reap)
        return self.notify.wait("READY").addErrback(self._explain, "READY=1")

    def _explain(self, failure, what):
        self.fail("no %s from phantomd; its output:\n%s" % (
            what, self.proc.output.decode("utf-8", "replace")))

    @defer.inlineCallbacks
    def _reap(self):
        if not self.proc.ended.called:
            # Its workers share its output pipes: they must go too.
            for pid in child_pids(self.proc.transport.pid):
                os.kill(pid, signal.SIGKILL)
            self.proc.transport.signalProcess("KILL")
            yield self.proc.ended
        leaks = [line for line in self.proc.lines()
                 if self.good in line or SECRET in line or
                 self.jwt in line or self.jwt.split(".")[1] in line]
        self.assertEqual(leaks, [], "secrets in phantomd's output")

    @defer.inlineCallbacks
    def metrics_with(self, want: bytes):
        """The parent's /metrics once it shows ``want`` (up to 5 s): a
        worker counts a request at the end of the reactor turn that wrote
        its answer, so the client can read the answer a moment before it
        is counted."""
        for _ in range(50):
            text = yield deferToThread(unix_get, self.metrics_path,
                                       "/metrics")
            if want in text:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertIn(want, text)
        return text

    def why(self, *context) -> str:
        """Failure context: what the test saw and phantomd's output."""
        return "%r\n--- phantomd output ---\n%s" % (
            context, self.proc.output.decode("utf-8", "replace"))

    @defer.inlineCallbacks
    def stopped_cleanly(self):
        """twistd re-raises the SIGTERM it stopped for, so the status is
        "killed by SIGTERM" (systemd counts that as a clean exit)."""
        status = yield self.proc.ended
        self.assertIn((status.exitCode, status.signal),
                      [(0, None), (None, signal.SIGTERM)], self.why())

    def assertPromtoolClean(self, scrape: bytes):
        """The live /metrics passes promtool's lint (when it is installed)."""
        promtool = shutil.which("promtool")
        if promtool:
            lint = subprocess.run([promtool, "check", "metrics"], input=scrape,
                                  capture_output=True, timeout=30)
            self.assertEqual(lint.returncode, 0, lint.stdout + lint.stderr)

    def signal(self, name):
        self.proc.transport.signalProcess(name)

    def log_lines(self, needle):
        return [line for line in self.proc.lines() if needle in line]


class LifecycleTests(ServiceCase):
    @defer.inlineCallbacks
    def test_ready_serve_stop(self):
        """Socket activation, READY=1, a phantom-token round trip, then
        SIGTERM: STOPPING=1 and a clean exit."""
        self.write_ini()
        yield self.start()
        status, _, body = yield deferToThread(get_once, self.port, "/orders",
                                              self.good)
        self.assertEqual(status, 200, self.why(body))
        self.assertEqual(self.api.authorizations, ["Bearer " + self.jwt])
        status, headers, _ = yield deferToThread(get_once, self.port, "/x",
                                                 "opq-unknown")
        self.assertEqual(status, 401)
        self.assertIn('error="invalid_token"', headers["www-authenticate"])
        metrics = yield deferToThread(unix_get, self.metrics_path,
                                      "/metrics")
        self.assertIn(b'phantomd_requests_total{code="2xx"} 1.0', metrics)
        self.assertPromtoolClean(metrics)
        mark = len(self.notify.messages)
        self.signal("TERM")
        yield self.notify.wait("STOPPING", after=mark)
        yield self.stopped_cleanly()
        self.assertTrue(self.log_lines("GET /orders 200"),
                        "no access log line")

    @defer.inlineCallbacks
    def test_a_readable_secret_file_is_named_once_at_startup(self):
        """Issue 19: a secret file readable by group or others gets one
        warning line naming it (not one per worker), and phantomd runs."""
        secret = os.path.join(self.dir, "client-secret")
        with open(secret, "w") as f:
            f.write(SECRET + "\n")
        os.chmod(secret, 0o644)
        self.write_ini(workers=2)
        with open(self.ini) as f:
            text = f.read()
        with open(self.ini, "w") as f:
            f.write(text.replace("client_secret = %s\n" % SECRET,
                                 "client_secret_file = %s\n" % secret))
        yield self.start()
        status, _, body = yield deferToThread(get_once, self.port, "/a",
                                              self.good)
        self.assertEqual(status, 200, self.why(body))
        warned = self.log_lines("readable by group or others")
        self.assertEqual(len(warned), 1, self.why(warned))
        self.assertIn(secret, warned[0])
        self.assertIn("0644", warned[0])

    @defer.inlineCallbacks
    def test_reload_good_and_bad_on_a_kept_alive_connection(self):
        self.write_ini(required_scopes="read")
        yield self.start()
        client = Client(self.port)
        self.addCleanup(client.close)
        status, _, _ = yield deferToThread(client.get, "/a", self.good)
        self.assertEqual(status, 200)

        self.write_ini(required_scopes="admin")
        mark = len(self.notify.messages)
        self.signal("HUP")
        reloading = yield self.notify.wait("RELOADING", after=mark)
        self.assertIn("MONOTONIC_USEC", reloading)
        yield self.notify.wait("READY", after=mark)
        status, headers, _ = yield deferToThread(client.get, "/b", self.good)
        self.assertEqual(status, 403)
        self.assertIn('scope="admin"', headers["www-authenticate"])

        with open(self.ini, "a") as f:
            f.write("no_such_key = 1\n")
        mark = len(self.notify.messages)
        self.signal("HUP")
        yield self.notify.wait("READY", after=mark)
        status, _, _ = yield deferToThread(client.get, "/c", self.good)
        self.assertEqual(status, 403, "the last good config still applies")
        refused = self.log_lines("reload refused")
        self.assertEqual(len(refused), 1, refused)
        self.assertIn("no_such_key", refused[0])
        self.assertIn(self.ini, refused[0])
        self.assertIsNone(self.proc.status, "phantomd exited")

    @defer.inlineCallbacks
    def test_sigterm_lets_a_slow_response_finish(self):
        self.write_ini()
        yield self.start()
        pending = deferToThread(get_once, self.port, "/slow", self.good)
        yield self.api.slow_arrived.addTimeout(20, reactor)
        self.signal("TERM")
        status, _, body = yield pending
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["path"], "/slow")
        yield self.stopped_cleanly()


def child_pids(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for task_dir in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, task_dir)) as f:
                out.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


class WorkerTests(ServiceCase):
    @defer.inlineCallbacks
    def until(self, predicate, what, timeout=30):
        for _ in range(int(timeout / 0.1)):
            if predicate():
                return
            yield deferLater(reactor, 0.1, lambda: None)
        self.fail("timed out waiting for %s; output:\n%s"
                  % (what, self.proc.output.decode("utf-8", "replace")))

    @defer.inlineCallbacks
    def test_two_workers_ready_and_process_metrics_per_worker(self):
        """The parent's /readyz waits for the token service (its start-up
        probe) and both workers; its /metrics shows each process once."""
        self.write_ini(workers=2)
        yield self.start()
        ready = {}

        def readyz():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(self.metrics_path)
                s.sendall(b"GET /readyz HTTP/1.0\r\nHost: m\r\n\r\n")
                raw = b"".join(iter(lambda: s.recv(65536), b""))
            head, _, body = raw.partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(body)

        for _ in range(100):
            ready["status"], ready["doc"] = yield deferToThread(readyz)
            if ready["status"] == 200:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((ready["status"], ready["doc"]),
                         (200, {"ready": True, "reason": "ok"}), self.why())
        self.assertGreaterEqual(self.tokens.calls, 1, "the probe")
        text = yield deferToThread(unix_get, self.metrics_path, "/metrics")
        rss = sorted(line.split(b" ")[0] for line in text.splitlines()
                     if line.startswith(b"process_resident_memory_bytes"))
        self.assertEqual(rss, [
            b'process_resident_memory_bytes{worker="0"}',
            b'process_resident_memory_bytes{worker="1"}',
            b'process_resident_memory_bytes{worker="parent"}'])
        self.assertEqual(len([line for line in text.splitlines()
                              if line.startswith(b"phantomd_build_info{")]),
                         1)
        self.assertPromtoolClean(text)

    @defer.inlineCallbacks
    def test_two_workers_one_killed_is_replaced_reload_reaches_all(self):
        self.write_ini(workers=2, extra="format = json\n")
        yield self.start()
        parent = self.proc.transport.pid
        workers = child_pids(parent)
        self.assertEqual(len(workers), 2, workers)
        for _ in range(6):
            status, _, _ = yield deferToThread(get_once, self.port, "/w",
                                               self.good)
            self.assertEqual(status, 200)

        # Counted once handed to the files, at the end of the turn that
        # wrote the answer; a SIGKILL loses that turn's counts, so the
        # victim is killed after they are there.  What must survive is
        # what it had written.
        yield self.metrics_with(b'phantomd_requests_total{code="2xx"} 6.0')
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        yield self.until(lambda: len(child_pids(parent) - {victim}) == 2,
                         "a replacement worker")
        for _ in range(6):
            status, _, _ = yield deferToThread(get_once, self.port, "/w",
                                               self.good)
            self.assertEqual(status, 200)

        text = yield self.metrics_with(
            b'phantomd_requests_total{code="2xx"} 12.0')
        self.assertPromtoolClean(text)

        records = [json.loads(line) for line in self.proc.lines()
                   if line.startswith("{")]
        self.assertTrue(records, "no JSON log lines")
        self.assertTrue([r for r in records
                         if r.get("namespace") == "phantomd.access"])

        # A reload reaches every worker, the replacement included.
        self.write_ini(workers=2, required_scopes="admin",
                       extra="format = json\n")
        mark = len(self.notify.messages)
        self.signal("HUP")
        yield self.notify.wait("RELOADING", after=mark)
        yield self.notify.wait("READY", after=mark)
        for _ in range(8):
            status, _, _ = yield deferToThread(get_once, self.port, "/w",
                                               self.good)
            self.assertEqual(status, 403, self.why())

        serving = child_pids(parent)
        mark = len(self.notify.messages)
        self.signal("TERM")
        yield self.notify.wait("STOPPING", after=mark)
        yield self.stopped_cleanly()
        # The parent waited for its workers: none is left behind.
        self.assertEqual([p for p in serving
                          if os.path.exists("/proc/%d" % p)], [])
