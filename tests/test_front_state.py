"""The front's connection state machine: its table, and that the front
refuses a move the table does not allow."""

from twisted.trial import unittest

from phantomd.http.front import TRANSITIONS, State, StateError
from tests.test_http_server import FrontCase, get


class TableTests(unittest.TestCase):
    def test_every_state_has_its_moves(self) -> None:
        self.assertEqual(set(TRANSITIONS), set(State))

    def test_closed_is_final(self) -> None:
        self.assertEqual(TRANSITIONS[State.CLOSED], {State.CLOSED})

    def test_an_answer_comes_before_the_next_request(self) -> None:
        """A request in flight never goes back to IDLE without an answer."""
        for state in (State.GATE, State.CONNECT, State.UPSTREAM):
            self.assertNotIn(State.IDLE, TRANSITIONS[state], state)
        self.assertIn(State.IDLE, TRANSITIONS[State.RESPONSE])

    def test_the_upstream_is_reached_only_through_connect(self) -> None:
        for state, moves in TRANSITIONS.items():
            if state is not State.CONNECT:
                self.assertNotIn(State.UPSTREAM, moves, state)


    def test_a_tunnel_comes_only_from_the_upstream_and_ends_closed(self):
        """DESIGN section 13: only the upstream's 101 opens a tunnel, and
        no request follows one on that connection."""
        for state, moves in TRANSITIONS.items():
            if state is not State.UPSTREAM:
                self.assertNotIn(State.TUNNEL, moves, state)
        self.assertIn(State.TUNNEL, TRANSITIONS[State.UPSTREAM])
        self.assertEqual(TRANSITIONS[State.TUNNEL], {State.CLOSED})


class FrontStateTests(FrontCase):
    def test_a_request_walks_the_table(self) -> None:
        proto, transport = self.connect()
        self.assertIs(proto.state, State.IDLE)
        proto.dataReceived(get())
        self.assertIs(proto.state, State.UPSTREAM)
        self.pool.conns[-1].respond()
        self.assertIs(proto.state, State.IDLE)
        proto.connectionLost(None)
        self.assertIs(proto.state, State.CLOSED)

    def test_a_websocket_walks_through_tunnel(self) -> None:
        from twisted.internet.testing import StringTransport
        proto, transport = self.connect()
        proto.dataReceived(get(b"/ws", b"Connection: Upgrade\r\n"
                                      b"Upgrade: websocket\r\n"))
        self.assertIs(proto.state, State.UPSTREAM)
        self.assertIsNotNone(proto.upstream_switched(StringTransport(), [],
                                                     b""))
        self.assertIs(proto.state, State.TUNNEL)
        self.assertRaises(StateError, proto._to, State.IDLE)
        proto.connectionLost(None)
        self.assertIs(proto.state, State.CLOSED)

    def test_a_wrong_move_raises(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get())
        self.assertRaises(StateError, proto._to, State.IDLE)
        self.assertIs(proto.state, State.UPSTREAM)

    def test_the_factory_gives_the_reader_its_limits(self) -> None:
        from zope.interface.verify import verifyObject

        from phantomd.http.wire import IRequestConsumer, IRequestLimits
        self.assertTrue(verifyObject(IRequestLimits, self.factory))
        self.assertTrue(verifyObject(IRequestConsumer, self.connect()[0]))
