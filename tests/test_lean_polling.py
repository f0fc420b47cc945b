"""fastio.lean_polling: Twisted's epoll reactor dispatching events without
a log context per event, over real loopback sockets."""

import socket
import struct

from twisted.internet import epollreactor, error, protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from phantomd.http.fastio import lean_polling, writer_for


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data.upper())


class Boom(Echo):
    def connectionLost(self, reason):
        raise RuntimeError("connectionLost went wrong")


class EpollCase(unittest.TestCase):
    """A lean-polled epoll reactor of the test's own, turned by hand."""

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


class LeanPollingTests(EpollCase):
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


class Recorder(protocol.Protocol):
    """Keeps what it reads and how its connection ended."""

    instances: list = []
    fail_on = None

    def connectionMade(self):
        self.got = []
        self.reason = None
        Recorder.instances.append(self)

    def dataReceived(self, data):
        self.got.append(data)
        if self.fail_on is not None and self.fail_on in data:
            raise RuntimeError("dataReceived went wrong")

    def connectionLost(self, reason):
        self.reason = reason


class Failing(Recorder):
    fail_on = b"boom"


class ReadTests(EpollCase):
    """A plain TCP connection's input, read by the lean poll itself, ends
    the way Twisted's own doRead ends it."""

    def setUp(self):
        super().setUp()
        Recorder.instances = []

    def connected(self, proto):
        c = self.client(self.listen(proto))
        self.turns(lambda: Recorder.instances)
        return c, Recorder.instances[-1]

    def test_bytes_arrive_in_order(self):
        c, server = self.connected(Recorder)
        c.send(b"one ")
        self.turns(lambda: server.got)
        c.send(b"two")
        self.turns(lambda: b"".join(server.got) == b"one two")
        self.assertIsNone(server.reason)

    def test_the_end_of_input_is_a_clean_close(self):
        c, server = self.connected(Recorder)
        c.send(b"last words")
        c.shutdown(socket.SHUT_WR)
        self.turns(lambda: server.reason is not None)
        self.assertEqual(b"".join(server.got), b"last words")
        self.assertTrue(server.reason.check(error.ConnectionDone))

    def test_a_reset_is_a_lost_connection(self):
        c, server = self.connected(Recorder)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                     struct.pack("ii", 1, 0))
        c.close()  # with SO_LINGER 0: a reset
        self.turns(lambda: server.reason is not None)
        self.assertTrue(server.reason.check(error.ConnectionLost))

    def test_a_protocol_error_drops_only_its_connection(self):
        bad, failing = self.connected(Failing)
        good, fine = self.connected(Recorder)
        bad.send(b"boom")
        good.send(b"still read")
        self.turns(lambda: failing.reason is not None and fine.got)
        self.assertTrue(failing.reason.check(RuntimeError))
        self.assertEqual(fine.got, [b"still read"])
        self.assertIsNone(fine.reason)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("dataReceived went wrong",
                      str(self.errors[0]["log_failure"].value))


class OtherReactorsTests(unittest.TestCase):
    def test_left_alone(self):
        for r in (MemoryReactorClock(), Clock()):
            before = getattr(r, "doIteration", None)
            self.assertFalse(lean_polling(r))
            self.assertEqual(getattr(r, "doIteration", None), before)


class Held(protocol.Protocol):
    """Answers through ``writer_for``; ``script`` says what else it does
    with the transport in the same event."""

    script = staticmethod(lambda proto, data: proto.w(data.upper()))

    def connectionMade(self):
        self.w = writer_for(self.transport)
        self.paused = self.resumed = 0

    def dataReceived(self, data):
        self.script(self, data)

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1

    def stopProducing(self):
        pass


class CorkTests(EpollCase):
    """What ``writer_for`` writes while one poll's events are dispatched
    goes out after the last of them, in order with anything else done to
    the transport."""

    def listen_script(self, script, made=None):
        """A port serving ``Held`` running ``script``; each protocol goes
        into ``made`` when it is connected."""
        class P(Held):
            def connectionMade(self):
                Held.connectionMade(self)
                if made is not None:
                    made.append(self)
        P.script = staticmethod(script)
        return self.listen(P)

    def serve(self, script):
        """A client of a ``Held`` running ``script``, and its protocol."""
        made = []
        c = self.client(self.listen_script(script, made))
        self.turns(lambda: made)
        self.companion = self.client(self.listen(Echo))
        n = len(self.reactor._selectables)
        self.turns(lambda: len(self.reactor._selectables) > n)
        return c, made[0]

    def kick(self, c, data):
        """Send ``data`` on ``c`` while the companion sends too, so that
        the next poll has two events and holds what is written."""
        c.send(data)
        self.companion.send(b"-")

    def read_all(self, sock, until_eof=True, n=10000):
        got = []

        def done():
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                chunk = b""
            got.append(chunk)
            return chunk == b"" if until_eof else True
        self.turns(done, n)
        return b"".join(got)

    def test_held_until_the_poll_ends(self):
        peeked = {}
        clients = []

        def script(proto, data):
            proto.w(data.upper())
            for c in clients:  # loopback delivers an unheld send at once
                try:
                    peeked.setdefault(c, []).append(
                        c.recv(100, socket.MSG_PEEK))
                except BlockingIOError:
                    peeked.setdefault(c, []).append(None)
        port = self.listen_script(script)
        clients += [self.client(port), self.client(port)]
        self.turns(lambda: len(self.reactor._selectables) >= 4)
        for c in clients:  # both readable before the next poll
            c.send(b"hi")
        self.assertEqual([self.answer(c) for c in clients], [b"HI", b"HI"])
        # While the poll's two events were dispatched neither answer had
        # left: the first was held while the second was handled.
        self.assertEqual([peeked[c] for c in clients],
                         [[None, None], [None, None]])

    def test_a_lone_event_is_not_held(self):
        peeked = []

        def script(proto, data):
            proto.w(data.upper())
            peeked.append(c.recv(100, socket.MSG_PEEK))
        c, _ = self.serve(script)
        c.send(b"hello")
        self.assertEqual(self.answer(c), b"HELLO")
        self.assertEqual(peeked, [b"HELLO"])

    def test_without_lean_polling_a_write_goes_out_at_once(self):
        plain = epollreactor.EPollReactor()
        self.addCleanup(plain._poller.close)
        peeked = []

        class P(Held):
            def dataReceived(self, data):
                self.w(data.upper())
                peeked.append(c.recv(100, socket.MSG_PEEK))
        port = plain.listenTCP(0, protocol.Factory.forProtocol(P),
                               interface="127.0.0.1")
        self.addCleanup(port.connectionLost, None)
        c = self.client(port.getHost().port)
        c.send(b"hello")
        for _ in range(200):
            plain.runUntilCurrent()
            plain.doIteration(0.01)
            if peeked:
                break
        self.assertEqual(peeked, [b"HELLO"])
        for selectable in plain.removeAll():
            selectable.socket.close()

    def test_direct_writes_keep_their_place(self):
        def script(proto, data):
            proto.w(b"a")
            proto.transport.write(b"b")
            proto.w(b"c")
            proto.transport.writeSequence([b"d", b"e"])
            proto.w(b"f")
        c, _ = self.serve(script)
        self.kick(c, b"x")
        got = b""
        while len(got) < 6:
            got += self.answer(c)
        self.assertEqual(got, b"abcdef")

    def test_a_close_sends_what_was_held_first_and_an_abort_drops_it(self):
        for close, seen in (("loseConnection", b"goodbye"),
                            ("abortConnection", b"")):
            def script(proto, data):
                proto.w(b"goodbye")
                getattr(proto.transport, close)()
            c, _ = self.serve(script)
            self.kick(c, b"x")
            self.assertEqual(self.read_all(c), seen, close)
        self.assertEqual(self.errors, [])

    def test_a_half_close_sends_what_was_held_first(self):
        got_after = []

        def script(proto, data):
            if data == b"x":
                proto.w(b"answer")
                proto.transport.loseWriteConnection()
            else:
                got_after.append(data)  # still reading after the half-close
        c, _ = self.serve(script)
        self.kick(c, b"x")
        self.assertEqual(self.read_all(c), b"answer")
        c.send(b"more")
        self.turns(lambda: got_after)
        self.assertEqual(got_after, [b"more"])

    def test_a_write_outside_a_poll_goes_out_at_once(self):
        c, proto = self.serve(lambda p, d: None)
        proto.w(b"now")
        self.assertEqual(c.recv(100), b"now")

    def test_what_the_kernel_does_not_take_pauses_the_producer(self):
        big = b"z" * (8 << 20)

        def script(proto, data):
            proto.transport.registerProducer(proto, True)
            proto.w(big)
        c, proto = self.serve(script)
        self.kick(c, b"x")
        self.turns(lambda: proto.paused)
        got = len(self.read_all(c, until_eof=False))
        while got < len(big):
            got += len(self.read_all(c, until_eof=False))
        self.assertEqual(got, len(big))
        self.turns(lambda: proto.resumed)
        self.assertEqual((proto.paused, proto.resumed), (1, 1))

    def test_a_twisted_without_the_expected_buffer_gets_plain_writes(self):
        c, proto = self.serve(lambda p, d: None)
        t = proto.transport
        self.assertIsNot(writer_for(t), t.write)
        del t._tempDataLen  # as if Twisted kept its buffer otherwise
        self.addCleanup(setattr, t, "_tempDataLen", 0)
        self.assertEqual(writer_for(t), t.write)
