"""The front's connection state machine: its table, and that the front
refuses a move the table does not allow."""

from twisted.trial import unittest

from phantomd.http.front import FrontProtocol
from phantomd.http.listener import AtCapacity
from phantomd.http.states import (
    INPUT_TRANSITIONS, TRANSITIONS, Input, State, StateError)
from tests.test_http_server import FrontCase, get


class TableTests(unittest.TestCase):
    def test_each_machine_has_every_state_and_ends_in_one(self) -> None:
        """Both machines (exchange and input) list every state's moves,
        and their last state (CLOSED, ENDED) goes nowhere else."""
        for table, states, final in ((TRANSITIONS, State, State.CLOSED),
                                     (INPUT_TRANSITIONS, Input, Input.ENDED)):
            self.assertEqual(set(table), set(states), states)
            self.assertEqual(table[final], {final}, final)

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


class InputTableTests(unittest.TestCase):
    def test_held_input_is_never_parsed_again(self) -> None:
        """DESIGN section 13: bytes after an upgrade request are the
        tunnel's; nothing turns them back into requests."""
        for state, moves in INPUT_TRANSITIONS.items():
            self.assertNotIn(Input.OPEN, moves, state)
        self.assertEqual(INPUT_TRANSITIONS[Input.HELD], {Input.ENDED})


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


class FrontInputTests(FrontCase):
    def test_a_malformed_request_ends_input_after_the_one_before(self):
        proto, transport = self.connect()
        proto.dataReceived(get() + b"NOT HTTP\r\n\r\n")
        self.assertIs(proto.input, Input.ENDED)  # parsed in one slice
        self.assertEqual(len(self.pool.conns), 1)  # the first still goes
        self.pool.conns[-1].respond()
        self.assertEqual([s for s, _, _ in self.responses(transport)],
                         [200, 400])
        self.assertIs(proto.input, Input.ENDED)
        self.assertIs(proto.state, State.CLOSED)
        proto.dataReceived(get(b"/ignored"))
        self.assertEqual(len(self.pool.conns), 1)

    def test_a_websocket_request_holds_input_until_the_101(self) -> None:
        from twisted.internet.testing import StringTransport
        proto, transport = self.connect()
        proto.dataReceived(get(b"/ws", b"Connection: Upgrade\r\n"
                                      b"Upgrade: websocket\r\n")
                           + b"early")
        self.assertIs(proto.input, Input.HELD)
        proto.dataReceived(b" frame")
        self.assertEqual(len(self.pool.conns), 1)  # never parsed as HTTP
        upstream = StringTransport()
        proto.upstream_switched(upstream, [], b"")
        self.assertEqual(upstream.value(), b"early frame")
        self.assertRaises(StateError, proto._input_to, Input.OPEN)

    def test_a_refused_upgrade_discards_what_was_held(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(get(b"/ws", b"Connection: Upgrade\r\n"
                                      b"Upgrade: websocket\r\n",
                               auth=b"Authorization: Bearer wrong\r\n")
                           + b"x")
        [(status, _, _)] = self.responses(transport)
        self.assertEqual(status, 401)
        self.assertIs(proto.input, Input.ENDED)
        self.assertIs(proto.state, State.CLOSED)
        proto.dataReceived(b"more")
        self.assertEqual(proto._held, [b"x"])


class AtCapacityTests(FrontCase):
    keys = {"max_connections": 1}

    def test_the_connection_past_the_cap_is_its_own_kind(self) -> None:
        first, _ = self.connect()
        self.assertIs(type(first), FrontProtocol)
        proto, transport = self.connect()
        self.assertIs(type(proto), AtCapacity)
        self.assertIs(proto.input, Input.ENDED)
        proto.dataReceived(get())
        self.assertEqual([s for s, _, _ in self.responses(transport)], [503])
        self.assertEqual(self.pool.conns, [])
        proto.connectionLost(None)
        self.assertEqual(self.factory.connections, {first})
        self.assertEqual(self.metrics.sample("phantomd_client_connections"),
                         1)
