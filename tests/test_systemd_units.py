"""systemd/phantomd.service and phantomd.socket: valid, and wired together."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = os.path.join(os.path.dirname(HERE), "systemd")
SERVICE = os.path.join(UNITS, "phantomd.service")
SOCKET = os.path.join(UNITS, "phantomd.socket")
ANALYZE = shutil.which("systemd-analyze")


def directives(path: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows repeated keys."""
    out, section = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            out.append((section, key.strip(), value.strip()))
    return out


def values(path: str, section: str, key: str) -> list[str]:
    return [v for s, k, v in directives(path) if (s, k) == (section, key)]


def one(path: str, section: str, key: str) -> str:
    found = values(path, section, key)
    if len(found) != 1:
        raise AssertionError("%s: [%s] %s appears %d times"
                             % (path, section, key, len(found)))
    return found[0]


def twistd_path() -> str:
    """An executable twistd, for verify's check that ExecStart exists."""
    found = shutil.which("twistd")
    if found:
        return os.path.realpath(found)
    return os.path.join(os.path.dirname(sys.executable), "twistd")


class UnitContentTests(SynchronousTestCase):
    def test_exec_start_runs_twistd_in_the_foreground(self):
        argv = shlex.split(one(SERVICE, "Service", "ExecStart"))
        self.assertEqual(os.path.basename(argv[0]), "twistd")
        self.assertEqual(argv[1:], ["--nodaemon", "--pidfile=", "phantomd",
                                    "--config", "/etc/phantomd/phantomd.ini"])

    def test_notify_reload_and_stop(self):
        self.assertEqual(one(SERVICE, "Service", "Type"), "notify")
        reload_argv = shlex.split(one(SERVICE, "Service", "ExecReload"))
        self.assertEqual(reload_argv[1:], ["-HUP", "$MAINPID"])
        self.assertEqual(os.path.basename(reload_argv[0]), "kill")
        self.assertEqual(one(SERVICE, "Service", "KillSignal"), "SIGTERM")
        # Workers get SIGTERM from the parent, once, not from systemd too.
        self.assertEqual(one(SERVICE, "Service", "KillMode"), "mixed")
        self.assertEqual(one(SERVICE, "Service", "NotifyAccess"), "main")

    def test_stop_timeout_covers_the_default_drain(self):
        """systemd SIGKILLs after TimeoutStopSec; the default drain_timeout
        (30 s) must fit inside it."""
        from phantomd.config import SCHEMA
        drain = float(SCHEMA["phantomd"]["drain_timeout"][1])
        self.assertGreater(float(one(SERVICE, "Service", "TimeoutStopSec")),
                           drain)

    def test_socket_name_matches_the_documented_endpoint(self):
        """The ini says systemd:domain=INET:name=phantomd-http, so the socket
        must be named so and be an IPv4 stream socket."""
        self.assertEqual(one(SOCKET, "Socket", "FileDescriptorName"),
                         "phantomd-http")
        host, _, port = one(SOCKET, "Socket", "ListenStream").rpartition(":")
        self.assertEqual(ipaddress.ip_address(host).version, 4)
        self.assertTrue(0 < int(port) < 65536)
        self.assertEqual(one(SOCKET, "Socket", "Service"), "phantomd.service")

    def test_shipped_socket_and_ini_do_not_bind_one_address(self):
        """With the shipped ini (a tcp: listener), enabling or starting the
        service must not also bind the socket unit on the same address:
        phantomd would stop with "address already in use".  Socket
        activation is an opt-in (README, Operations)."""
        from phantomd import config
        shipped = config.load(os.path.join(os.path.dirname(HERE), "etc",
                                           "phantomd.ini"))
        socket_address = one(SOCKET, "Socket", "ListenStream")
        host, _, port = socket_address.rpartition(":")
        binds_it = [d for d in shipped.phantomd.listen
                    if d.startswith("tcp:%s:" % port) and
                    ("interface=%s" % host in d or "interface=" not in d)]
        if binds_it:
            pulled = []
            for section, key in [("Unit", "Wants"), ("Unit", "Requires"),
                                 ("Unit", "BindsTo"), ("Unit", "Upholds"),
                                 ("Install", "Also")]:
                for value in values(SERVICE, section, key):
                    if "phantomd.socket" in value.split():
                        pulled.append("[%s] %s" % (section, key))
            self.assertEqual(pulled, [], "the ini listens on %s (%r) and "
                             "the service pulls in phantomd.socket, which "
                             "binds it too" % (socket_address, binds_it))

    def test_sandboxing(self):
        expected = {
            "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
            "ProtectSystem": "strict", "ProtectHome": "yes",
            "PrivateTmp": "yes", "PrivateDevices": "yes",
            "LockPersonality": "yes",
            "RestrictNamespaces": "yes", "User": "phantomd",
        }
        for key, value in expected.items():
            self.assertEqual(one(SERVICE, "Service", key), value, key)
        self.assertEqual(
            set(one(SERVICE, "Service", "RestrictAddressFamilies").split()),
            {"AF_INET", "AF_INET6", "AF_UNIX"})
        self.assertIn("@system-service",
                      values(SERVICE, "Service", "SystemCallFilter"))


# Run under PR_SET_MDWE (what MemoryDenyWriteExecute= sets, Linux >= 6.3):
# does building a TLS client connection still work?
MDWE_PROBE = """
import ctypes, sys
if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(3)
from phantomd.http import tls
try:
    tls.client_tls_options("example.com").clientConnectionForTLS(None)
except MemoryError:
    sys.exit(4)
"""


class MemoryDenyWriteExecuteTests(SynchronousTestCase):
    def test_not_set_while_tls_needs_writable_code(self):
        probe = subprocess.run(
            [sys.executable, "-c", MDWE_PROBE], capture_output=True,
            timeout=60, cwd=os.path.dirname(HERE))
        if probe.returncode == 3:
            raise self.skipTest("this kernel has no PR_SET_MDWE to probe with")
        if probe.returncode == 0:
            raise self.skipTest("TLS works without write+execute memory "
                                "here; MemoryDenyWriteExecute=yes could be "
                                "turned on")
        self.assertEqual(probe.returncode, 4, probe.stderr)
        self.assertNotIn("yes", values(SERVICE, "Service",
                                       "MemoryDenyWriteExecute"))


class VerifyTests(SynchronousTestCase):
    def setUp(self):
        if ANALYZE is None:
            raise self.skipTest("systemd-analyze is not installed")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        with open(SERVICE) as f:
            text = f.read()
        # verify insists that ExecStart's binary exists; point it at ours.
        text = re.sub(r"^ExecStart=\S+", "ExecStart=" + twistd_path(), text,
                      flags=re.M)
        with open(os.path.join(self.dir, "phantomd.service"), "w") as f:
            f.write(text)
        shutil.copy(SOCKET, self.dir)

    def analyze(self, *args):
        return subprocess.run(
            [ANALYZE, *args], capture_output=True, text=True, timeout=60,
            cwd=self.dir)

    def test_verify_is_clean(self):
        """Exit status 0 and no warnings (verify warns, e.g. about an
        unknown key, with status 0)."""
        result = self.analyze("verify", "phantomd.socket", "phantomd.service")
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""),
                         result.stdout)

    def test_security_exposure_is_low(self):
        result = self.analyze("security", "--offline=yes", "phantomd.service")
        match = re.search(r"Overall exposure level for phantomd\.service: "
                          r"([\d.]+)", result.stdout)
        if match is None:
            raise self.skipTest("systemd-analyze security --offline "
                                "unsupported: %s" % result.stderr.strip())
        self.assertLessEqual(float(match.group(1)), 2.0, result.stdout)
