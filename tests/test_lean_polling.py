"""fastio.lean_polling: Twisted's epoll reactor dispatching events without
a log context per event, over real loopback sockets."""

import socket

from twisted.internet import epollreactor, protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from phantomd.http.fastio import lean_polling


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data.upper())


class Boom(Echo):
    def connectionLost(self, reason):
        raise RuntimeError("connectionLost went wrong")


class LeanPollingTests(unittest.TestCase):
    def setUp(self):
        self.reactor = epollreactor.EPollReactor()
        self.addCleanup(self._close)
        self.assertTrue(lean_polling(self.reactor))
        self.errors = []

        def observe(event):
            if event.get("log_failure") is not None:
                self.errors.append(event)
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def _close(self):
        for selectable in self.reactor.removeAll():
            selectable.socket.close()
        self.reactor._poller.close()

    def listen(self, proto):
        f = protocol.Factory.forProtocol(proto)
        port = self.reactor.listenTCP(0, f, interface="127.0.0.1")
        self.addCleanup(port.connectionLost, None)
        return port.getHost().port

    def turns(self, until, n=200):
        for _ in range(n):
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.01)
            if until():
                return
        self.fail("the reactor did not get there")

    def client(self, port):
        c = socket.create_connection(("127.0.0.1", port))
        c.setblocking(False)
        self.addCleanup(c.close)
        return c

    def answer(self, sock):
        """What the reactor, turning, sends back on ``sock``."""
        got = []

        def answered():
            try:
                got.append(sock.recv(100))
            except BlockingIOError:
                return False
            return True
        self.turns(answered)
        return got[0]

    def test_reads_and_writes_reach_the_protocol(self):
        port = self.listen(Echo)
        c = self.client(port)
        c.send(b"hello")
        self.assertEqual(self.answer(c), b"HELLO")

    def test_an_escaping_error_is_logged_and_the_turn_goes_on(self):
        boom = self.listen(Boom)
        echo = self.listen(Echo)
        a, b = self.client(boom), self.client(echo)
        self.turns(lambda: len(self.reactor._selectables) >= 4)
        a.close()  # Boom's connectionLost raises in this turn ...
        b.send(b"still here")  # ... and this event is still handled
        self.assertEqual(self.answer(b), b"STILL HERE")
        self.turns(lambda: self.errors)
        self.assertIn("connectionLost went wrong",
                      str(self.errors[0]["log_failure"].value))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class OtherReactorsTests(unittest.TestCase):
    def test_left_alone(self):
        for r in (MemoryReactorClock(), Clock()):
            before = getattr(r, "doIteration", None)
            self.assertFalse(lean_polling(r))
            self.assertEqual(getattr(r, "doIteration", None), before)
