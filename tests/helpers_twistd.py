"""``twistd -n phantomd --config FILE`` as a real process, for the tests of
what an operator sees: its output, its exit status, its listeners.

Runs this source tree (``PYTHONPATH`` = the repository) with the test's
interpreter, in its own session so that stopping it reaches its workers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT = 60  # two shared cores: interpreter, Twisted, plugin scan

INI = """\
[phantomd]
listen = {listen}
upstream = http://127.0.0.1:1
workers = {workers}
drain_timeout = 1
[introspection]
url = http://127.0.0.1:1/introspect
client_id = gw
client_secret = s3cret
[metrics]
listen = {metrics}
"""


def write_ini(directory: str, name: str = "phantomd.ini", listen: str =
              "tcp:0:interface=127.0.0.1", workers="1",
              metrics: str = "") -> str:
    """An ini whose token service and API are closed ports: phantomd's own
    answers (401 without a token) are all these tests need."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(INI.format(listen=listen, workers=workers, metrics=metrics))
    return path


def argv(ini: str) -> list[str]:
    return [sys.executable, "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "phantomd", "--config", ini]


def environ(tmpdir: Optional[str] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID",
                        "LISTEN_FDNAMES", "JOURNAL_STREAM")}
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    env["PYTHONPATH"] = ROOT
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_to_exit(ini: str, cwd: str, timeout: float = STARTUP_TIMEOUT,
                tmpdir: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run phantomd expecting it to stop by itself (a startup error); one
    that keeps running is killed and reported as AssertionError.
    ``tmpdir`` is its TMPDIR."""
    proc = subprocess.Popen(argv(ini), cwd=cwd, env=environ(tmpdir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            "phantomd did not stop by itself within %ds; it started:\n%s%s"
            % (timeout, out.decode("utf-8", "replace"),
               err.decode("utf-8", "replace")))
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       out.decode("utf-8", "replace"),
                                       err.decode("utf-8", "replace"))


class Twistd:
    """A running phantomd; ``stop()`` (also a cleanup) ends it and its
    workers with SIGTERM, then SIGKILL."""

    def __init__(self, testcase, ini: str, cwd: str) -> None:
        self.proc = subprocess.Popen(argv(ini), cwd=cwd, env=environ(),
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        testcase.addCleanup(self.stop)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1,
                 timeout: float = STARTUP_TIMEOUT) -> list:
        """The first ``count`` matches of ``pattern`` in the output, once
        there are that many; AssertionError if phantomd exits or
        ``timeout`` passes first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in map(regex.search, self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None
                                 and not self._reader.is_alive()):
                    raise AssertionError(
                        "no %d line(s) matching %r from phantomd (exit "
                        "status %r); its output:\n%s" % (
                            count, pattern, self.proc.poll(), self.output))
                self._changed.wait(min(left, 0.5))

    def port(self, count: int = 1) -> int:
        """The client port, from the ``listening on`` line of every one of
        ``count`` processes (one per worker); they must agree."""
        found = self.wait_for(r"listening on 127\.0\.0\.1:(\d+)", count)
        ports = {int(m.group(1)) for m in found}
        if len(ports) != 1:
            raise AssertionError("workers listen on %r" % (ports,))
        return ports.pop()

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        try:  # a worker its parent did not take down with it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(10)
        return self.proc.returncode
