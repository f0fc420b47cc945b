"""The README's demo works as written: ``twistd -n phantomd --demo`` starts,
prints curl commands, and each of them gets the answer its comment promises.

The demo runs as a real twistd process from this source tree
(``PYTHONPATH`` = the repository, so an older installed copy cannot stand in
for it); the curl commands are parsed from its output and performed with a
small Python HTTP client, so curl is not needed.  SIGTERM must end it within
a few seconds.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from twisted.internet import defer, error, protocol, reactor
from twisted.trial import unittest

from tests.robustness.fakes import async_test, one_request, request_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")
STARTUP_TIMEOUT = 30  # two shared cores: interpreter, Twisted and plugin scan
STOP_TIMEOUT = 5

# The interpreter running the tests, with twistd's own entry point (works
# whether phantomd is pip-installed or only on PYTHONPATH; a ``twistd`` script
# next to sys.executable may be missing or belong to another environment).
# It first reports which phantomd it imported.
RUNNER = ("import sys, phantomd; "
          "print('PHANTOMD-FROM', phantomd.__file__, file=sys.stderr, "
          "flush=True); "
          "from twisted.scripts.twistd import run; run()")


class Demo(protocol.ProcessProtocol):
    """The twistd process; ``announced`` fires once its stdout has the
    whole curl list, ``ended`` with the exit reason."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.announced = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if not self.announced.called and b"Stop with Ctrl-C." in self.out:
            self.announced.callback(self.out.decode("utf-8", "replace"))

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-50000:]

    def processEnded(self, reason) -> None:
        if not self.announced.called:
            self.announced.errback(RuntimeError(
                "the demo exited before printing its commands:\n%s\n%s" % (
                    self.out[-3000:].decode("utf-8", "replace"),
                    self.err[-3000:].decode("utf-8", "replace"))))
        self.ended.callback(reason.value)

    @property
    def running(self) -> bool:
        return not self.ended.called

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


@dataclass
class Curl:
    """One printed curl command, read the way curl would."""

    comment: str
    line: str
    method: str = "GET"
    url: str = ""
    headers: list = field(default_factory=list)
    data: bytes = b""
    grep: str = ""


def parse_curls(text: str) -> list:
    """Every ``curl`` line of the demo's output, with the comment above it."""
    out = []
    comment = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comment = line.lstrip("# ")
            continue
        if not line.startswith("curl "):
            continue
        command, _, pipe = line.partition("|")
        argv = shlex.split(command)
        c = Curl(comment, line)
        i = 1
        while i < len(argv):
            a = argv[i]
            if a == "-X":
                c.method, i = argv[i + 1], i + 2
                continue
            if a == "-H":
                name, _, value = argv[i + 1].partition(":")
                c.headers.append((name.strip(), value.strip()))
                i += 2
                continue
            if a == "-d":
                c.data = argv[i + 1].encode()
                if c.method == "GET":
                    c.method = "POST"
                i += 2
                continue
            if a == "-u":
                c.headers.append(("Authorization", "Basic " + base64.b64encode(
                    argv[i + 1].encode()).decode()))
                i += 2
                continue
            if a.startswith("http://"):
                c.url = a
            elif not re.fullmatch(r"-[si]+", a):
                raise AssertionError("unexpected curl option %r in %r" % (
                    a, line))
            i += 1
        if c.data and not any(k.lower() == "content-type"
                              for k, _ in c.headers):
            c.headers.append(("Content-Type",
                              "application/x-www-form-urlencoded"))
        if pipe.strip():
            grep = shlex.split(pipe)
            if grep[:1] != ["grep"] or len(grep) != 2:
                raise AssertionError("unexpected pipeline %r" % line)
            c.grep = grep[1]
        out.append(c)
        comment = ""
    return out


async def perform(curl: Curl, **replace_headers):
    """The request curl would send; a fresh connection, closed after."""
    url = urlsplit(curl.url)
    headers = [(k, replace_headers.get(k.lower(), v))
               for k, v in curl.headers]
    target = url.path + ("?" + url.query if url.query else "")
    return await one_request(reactor, url.port, request_bytes(
        curl.method, target or "/", None, headers, curl.data, close=True,
        host=url.netloc), timeout=10)


def jwt_payload(jwt: str) -> dict:
    parts = jwt.split(".")
    if len(parts) != 3 or not all(parts):
        raise AssertionError("not a compact JWS: %r" % jwt[:80])
    p = parts[1]
    return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))


def challenge(r) -> dict:
    [value] = r.header(b"www-authenticate")
    text = value.decode("ascii")
    assert text.startswith("Bearer "), text
    return dict(re.findall(r'([a-z_]+)="([^"]*)"', text))


class DemoTests(unittest.TestCase):
    timeout = STARTUP_TIMEOUT + 30

    def readme_command(self) -> list:
        """The demo command of README.rst, as twistd arguments."""
        with open(README, encoding="utf-8") as f:
            text = f.read()
        m = re.search(r"^\s*python3 -m venv (\S+) && \1/bin/pip install \. "
                      r"&& \1/bin/(twistd -n phantomd --demo)\s*$",
                      text, re.M)
        self.assertIsNotNone(m, "README.rst no longer shows the demo "
                             "command 'python3 -m venv .venv && .venv/bin/pip "
                             "install . && .venv/bin/twistd -n phantomd "
                             "--demo'")
        argv = shlex.split(m.group(2))
        # --pidfile= : no twistd.pid left behind, none in the way.
        return [argv[1], "--pidfile="] + argv[2:]

    async def start_demo(self) -> tuple:
        args = self.readme_command()
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        demo = Demo()
        reactor.spawnProcess(demo, sys.executable,
                             [sys.executable, "-c", RUNNER] + args,
                             env=env, path=cwd)
        self.addCleanup(self.kill, demo)
        timer = reactor.callLater(STARTUP_TIMEOUT, lambda: (
            demo.announced.called or demo.announced.errback(
                RuntimeError("no 'Stop with Ctrl-C.' within %ds:\n%s\n%s" % (
                    STARTUP_TIMEOUT,
                    demo.out[-3000:].decode("utf-8", "replace"),
                    demo.err[-3000:].decode("utf-8", "replace"))))))
        try:
            text = await demo.announced
        finally:
            if timer.active():
                timer.cancel()
        m = re.search(rb"PHANTOMD-FROM (\S+)", demo.err)
        self.assertIsNotNone(m)
        self.assertEqual(os.path.dirname(os.path.dirname(
            m.group(1).decode())), ROOT, "the demo did not run this tree")
        return demo, text

    async def kill(self, demo: Demo) -> None:
        if demo.running:
            demo.signal("KILL")
            await demo.ended

    @async_test
    async def test_demo_as_written(self):
        demo, text = await self.start_demo()
        curls = parse_curls(text)
        by = {}
        for c in curls:
            for key in ("200", "401 invalid_token", "401 with a bare",
                        "403 insufficient_scope", "a fresh opaque token",
                        "introspect a token yourself", "metrics"):
                if c.comment.startswith(key) or key in c.comment:
                    self.assertNotIn(key, by, "two commands for %r" % key)
                    by[key] = c
        self.assertEqual(len(by), 7, "commands found: %r" % (
            [c.line for c in curls],))
        self.assertEqual(len(curls), 7)
        # The token service's credentials are printed (issue 12).
        self.assertRegex(text, r"client_id=\S+")
        self.assertRegex(text, r"client_secret=\S+")

        # 200: the API received a JWT instead of the opaque token
        good = by["200"]
        [(_, auth)] = good.headers
        opaque = auth.split(" ", 1)[1]
        r = await perform(good)
        self.assertEqual(r.status, 200, r.body)
        doc = r.json()
        self.assertTrue(doc["authorization"].startswith("Bearer "), doc)
        jwt = doc["authorization"][len("Bearer "):]
        self.assertNotEqual(jwt, opaque)
        self.assertNotIn(opaque, r.body.decode())
        claims = jwt_payload(jwt)
        self.assertEqual(doc["jwt_claims"], claims)
        self.assertIsInstance(claims.get("sub"), str)
        self.assertIn("read", claims.get("scope", "").split())

        # 401 invalid_token: a token the token service does not know
        r = await perform(by["401 invalid_token"])
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(challenge(r)["error"], "invalid_token")
        self.assertEqual(challenge(r)["realm"], "demo")
        self.assertEqual(r.json()["error"], "invalid_token")

        # 401 with a bare Bearer challenge: no token at all
        r = await perform(by["401 with a bare"])
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(r.header(b"www-authenticate"),
                         [b'Bearer realm="demo"'])

        # 403 insufficient_scope: a real token without the scope "read"
        r = await perform(by["403 insufficient_scope"])
        self.assertEqual(r.status, 403, r.body)
        self.assertEqual(challenge(r)["error"], "insufficient_scope")
        self.assertEqual(challenge(r)["scope"], "read")
        self.assertEqual(r.json()["error"], "insufficient_scope")

        # a fresh opaque token, which then works like the first one
        r = await perform(by["a fresh opaque token"])
        self.assertEqual(r.status, 200, r.body)
        fresh = r.json()["access_token"]
        self.assertNotEqual(fresh, opaque)
        r = await perform(good, authorization="Bearer " + fresh)
        self.assertEqual(r.status, 200, r.body)
        doc = r.json()
        self.assertEqual(jwt_payload(doc["authorization"][7:])["scope"],
                         "read")
        self.assertNotIn(fresh, r.body.decode())

        # introspect a token with the printed credentials: the JWT itself
        r = await perform(by["introspect a token yourself"])
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.header(b"content-type"), [b"application/jwt"])
        self.assertIn("read", jwt_payload(r.body.decode())["scope"].split())
        creds = re.search(r"client_id=(\S+)\s+client_secret=(\S+)", text)
        self.assertIsNotNone(creds, text)
        self.assertEqual(by["introspect a token yourself"].headers[0][1],
                         "Basic " + base64.b64encode(
                             ("%s:%s" % creds.groups()).encode()).decode())

        # cache and introspection metrics
        m = by["metrics"]
        r = await perform(m)
        self.assertEqual(r.status, 200, r.body)
        lines = [line for line in r.body.decode().splitlines()
                 if re.search(m.grep, line)]
        self.assertTrue(lines, "grep %r matched nothing" % m.grep)
        samples = {}
        for line in lines:
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
        self.assertEqual(samples.get(
            'phantomd_requests_total{code="2xx"}'), 2.0, lines)
        self.assertEqual(samples.get(
            'phantomd_requests_total{code="4xx"}'), 3.0, lines)
        self.assertGreaterEqual(samples.get(
            'phantomd_introspections_total{outcome="active"}', 0), 2, lines)

        # Ctrl-C's sibling: SIGTERM ends it within a few seconds, cleanly
        demo.signal("TERM")
        timer = reactor.callLater(STOP_TIMEOUT, lambda: demo.signal("KILL"))
        ended = await demo.ended
        stopped_in_time = timer.active()
        if stopped_in_time:
            timer.cancel()
        self.assertTrue(stopped_in_time, "SIGTERM did not stop the demo "
                        "within %d s" % STOP_TIMEOUT)
        # twistd stops the reactor, then ends itself with the signal that
        # stopped it (exit status 143 in a shell): that, or 0, is a clean
        # stop; its last log line says so.
        self.assertTrue(ended.exitCode == 0 or ended.signal == 15,
                        "exit code %r, signal %r" % (ended.exitCode,
                                                     ended.signal))
        self.assertIn(b"Server Shut Down.", demo.out + demo.err)
