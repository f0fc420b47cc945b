"""What an operator sees when phantomd cannot start, from a real ``twistd``:
one line naming file, section, key (and endpoint) with the reason, exit
status 1, no usage text, no traceback; and a second phantomd on an address
a first one serves fails so, whatever ``workers`` either has.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers_twistd import Twistd, run_to_exit, write_ini


class StartupErrorTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def busy_port(self) -> int:
        """A port something else listens on."""
        s = socket.socket()
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        return s.getsockname()[1]

    def assertOneErrorLine(self, result, expected: str) -> None:
        """Exit status 1; ``expected`` ends exactly one line of the output,
        nothing else looks like an error report."""
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Usage:", output)
        self.assertNotIn("--help", output)
        lines = [line for line in output.splitlines()
                 if line.endswith(expected)]
        self.assertEqual(len(lines), 1, output)
        self.assertEqual([line for line in output.splitlines()
                          if "error" in line.lower() or
                          "critical" in line.lower()], lines, output)

    def test_ini_mistake_is_one_line_without_usage_text(self):
        ini = os.path.join(self.dir, "bad.ini")
        with open(ini, "w") as f:
            f.write("[phantomd]\nupstream = http://127.0.0.1:1\n"
                    "workers = lots\n")
        result = run_to_exit(ini, self.dir)
        self.assertOneErrorLine(
            result, "%s: [phantomd] workers: 'lots' is not a whole number"
            % ini)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr.splitlines(), [
            "phantomd: %s: [phantomd] workers: 'lots' is not a whole number"
            % ini])

    def test_client_port_in_use(self):
        for workers in ("1", "2"):
            listen = "tcp:%d:interface=127.0.0.1" % self.busy_port()
            ini = write_ini(self.dir, listen=listen, workers=workers)
            self.assertOneErrorLine(
                run_to_exit(ini, self.dir),
                "%s: [phantomd] listen: cannot listen on %s: address "
                "already in use" % (ini, listen))

    def test_metrics_port_in_use(self):
        for workers in ("1", "2"):
            metrics = "tcp:%d:interface=127.0.0.1" % self.busy_port()
            ini = write_ini(self.dir, metrics=metrics, workers=workers)
            # Short: the parent's notify sockets live there (AF_UNIX paths
            # are at most 107 bytes).
            tmp = tempfile.mkdtemp(prefix="phantomd-test-")
            self.addCleanup(shutil.rmtree, tmp, True)
            self.assertOneErrorLine(
                run_to_exit(ini, self.dir, tmpdir=tmp),
                "%s: [metrics] listen: cannot listen on %s: address "
                "already in use" % (ini, metrics))
            # The parent of workers made a private directory: it is gone.
            self.assertEqual(os.listdir(tmp), [])


class OneInstancePerAddressTests(SynchronousTestCase):
    """Two real phantomd processes on one address: the second one fails,
    the first one keeps serving."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def second(self, port: int, workers: str, name: str):
        listen = "tcp:%d:interface=127.0.0.1" % port
        ini = write_ini(self.dir, name, listen=listen, workers=workers)
        result = run_to_exit(ini, self.dir)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertIn("%s: [phantomd] listen: cannot listen on %s: address "
                      "already in use" % (ini, listen), output)
        self.assertNotIn("Traceback", output)

    def assertServes(self, port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), 30) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close"
                      b"\r\n\r\n")
            self.assertTrue(c.recv(100).startswith(b"HTTP/1.1 401 "))

    def test_first_with_two_workers(self):
        first = Twistd(self, write_ini(self.dir, "first.ini", workers="2"),
                       self.dir)
        port = first.port(2)
        self.second(port, "2", "second.ini")
        self.second(port, "1", "third.ini")
        for _ in range(4):
            self.assertServes(port)

    def test_first_with_one_worker(self):
        first = Twistd(self, write_ini(self.dir, "first.ini", workers="1"),
                       self.dir)
        port = first.port(1)
        self.second(port, "2", "second.ini")
        self.assertServes(port)
