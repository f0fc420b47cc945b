"""phantomd.ops.sdnotify: messages arrive on a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from phantomd.ops.sdnotify import Notifier, NotifyService, where


class Receiver:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, testcase: SynchronousTestCase, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        testcase.addCleanup(self.sock.close)
        if abstract:
            name = "phantomd-test-%d-%d" % (os.getpid(), id(self))
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            # trial's temp paths can pass the 108-byte AF_UNIX limit.
            path = tempfile.mkdtemp(prefix="phantomd-sdn-")
            testcase.addCleanup(shutil.rmtree, path, True)
            self.env_value = os.path.join(path, "notify")
            self.sock.bind(self.env_value)
        self.sock.setblocking(False)

    def messages(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1)
                            for line in data.decode().splitlines()))


class NotifierTests(SynchronousTestCase):
    def notifier(self, receiver, clock=None, **env):
        env.setdefault("NOTIFY_SOCKET", receiver.env_value)
        n = Notifier(clock or Clock(), env, pid=4242,
                     monotonic=lambda: 12.5)
        self.addCleanup(n.close)
        return n

    def test_ready_stopping_status(self):
        r = Receiver(self)
        n = self.notifier(r)
        self.assertTrue(n.enabled)
        n.ready("serving on 127.0.0.1:8080")
        n.status("draining\n2 requests")
        n.stopping()
        self.assertEqual(r.messages(), [
            {"READY": "1", "STATUS": "serving on 127.0.0.1:8080"},
            {"STATUS": "draining 2 requests"},
            {"STOPPING": "1"},
        ])

    def test_reloading_carries_monotonic_usec(self):
        """systemd >= 253 ignores RELOADING=1 without MONOTONIC_USEC."""
        r = Receiver(self)
        self.notifier(r).reloading()
        self.assertEqual(r.messages(),
                         [{"RELOADING": "1", "MONOTONIC_USEC": "12500000"}])

    def test_abstract_socket(self):
        r = Receiver(self, abstract=True)
        self.notifier(r).ready()
        self.assertEqual(r.messages(), [{"READY": "1"}])

    def test_unset_is_a_no_op(self):
        n = Notifier(Clock(), {})
        self.assertFalse(n.enabled)
        self.assertFalse(n.ready())
        self.assertFalse(n.stopping())
        n.close()

    def test_unusable_values_disable(self):
        for value in ("relative/path", "@", "vsock:2:1234"):
            n = Notifier(Clock(), {"NOTIFY_SOCKET": value})
            self.assertFalse(n.enabled, value)
            self.assertFalse(n.ready(), value)
        self.flushLoggedErrors()

    def test_vanished_socket_loses_message_without_raising(self):
        r = Receiver(self)
        n = self.notifier(r)
        r.sock.close()
        os.unlink(r.env_value)
        self.assertFalse(n.ready())

    def test_watchdog_pings_every_half_interval(self):
        r = Receiver(self)
        clock = Clock()
        n = self.notifier(r, clock, WATCHDOG_USEC="4000000",
                          WATCHDOG_PID="4242")
        self.assertEqual(n.watchdog_interval, 2.0)
        n.ready()
        self.assertEqual(r.messages(), [{"READY": "1"}, {"WATCHDOG": "1"}])
        clock.advance(1.9)
        self.assertEqual(r.messages(), [])
        clock.advance(0.1)
        self.assertEqual(r.messages(), [{"WATCHDOG": "1"}])
        n.stopping()
        clock.advance(10)
        self.assertEqual(r.messages(), [{"STOPPING": "1"}])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_watchdog_for_another_pid_is_ignored(self):
        """A worker inheriting the parent's environment must not ping."""
        r = Receiver(self)
        clock = Clock()
        n = self.notifier(r, clock, WATCHDOG_USEC="4000000",
                          WATCHDOG_PID="1")
        self.assertIsNone(n.watchdog_interval)
        n.ready()
        clock.advance(10)
        self.assertEqual(r.messages(), [{"READY": "1"}])

    def test_watchdog_values(self):
        table = [
            ({}, None),
            ({"WATCHDOG_USEC": "1000000"}, 0.5),
            ({"WATCHDOG_USEC": "0"}, None),
            ({"WATCHDOG_USEC": "soon"}, None),
        ]
        for env, expected in table:
            n = Notifier(Clock(), env, pid=1)
            self.assertEqual(n.watchdog_interval, expected, env)


class NotifyServiceTests(SynchronousTestCase):
    def test_ready_after_listeners_stopping_before_drain(self):
        """Children start in order and stop in reverse: READY follows the
        binding service, STOPPING precedes its drain."""
        from twisted.application.service import MultiService, Service
        r = Receiver(self)
        n = Notifier(Clock(), {"NOTIFY_SOCKET": r.env_value})
        self.addCleanup(n.close)
        events = []

        class Binder(Service):
            def startService(self):
                events.append(("bound", r.messages()))
                super().startService()

            def stopService(self):
                events.append(("drain", r.messages()))
                return super().stopService()

        top = MultiService()
        Binder().setServiceParent(top)
        NotifyService(n, lambda: "serving on 127.0.0.1:8080").setServiceParent(
            top)
        top.startService()
        self.assertEqual(r.messages(), [
            {"READY": "1", "STATUS": "serving on 127.0.0.1:8080"}])
        top.stopService()
        self.assertEqual(events, [
            ("bound", []), ("drain", [{"STOPPING": "1",
                                       "STATUS": "draining"}])])

    def test_where(self):
        from twisted.internet.address import IPv4Address, UNIXAddress

        class P:
            def __init__(self, a):
                self.a = a

            def getHost(self):
                return self.a
        self.assertEqual(where([P(IPv4Address("TCP", "127.0.0.1", 8080)),
                                P(UNIXAddress(b"/run/m.sock"))]),
                         "127.0.0.1:8080 /run/m.sock")
        self.assertEqual(where([]), "-")

    def test_ready_waits_for_the_reactor_to_run(self):
        from twisted.internet.testing import MemoryReactorClock
        r = Receiver(self)
        reactor = MemoryReactorClock()
        n = Notifier(reactor, {"NOTIFY_SOCKET": r.env_value})
        self.addCleanup(n.close)
        svc = NotifyService(n, lambda: "up", reactor=reactor)
        svc.startService()
        self.assertEqual(r.messages(), [])
        reactor.run()
        self.assertEqual(r.messages(), [{"READY": "1", "STATUS": "up"}])
