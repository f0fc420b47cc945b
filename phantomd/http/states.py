"""The front's two state machines, in the shape of h11's (one per party):
where the exchange is (``State``) and what becomes of the client's bytes
(``Input``).  Each has a table of the moves it may make; any other move is
a bug in the front (``StateError``)."""

from __future__ import annotations

import enum


class StateError(RuntimeError):
    """A move a table does not allow: a bug in the front."""


class State(enum.IntEnum):
    """Where a client connection's exchange is (``FrontProtocol.state``).
    Ordered: the front asks "has the request reached the upstream yet?" as
    ``state >= UPSTREAM``."""

    IDLE = 0  #: no request in flight: waiting for a head or the next one
    GATE = 1  #: the gate is deciding about the request
    CONNECT = 2  #: waiting for an upstream connection (or a fresh retry)
    UPSTREAM = 3  #: the request is going upstream; no answer head yet
    RESPONSE = 4  #: an answer (the upstream's or phantomd's) is going out
    #: DESIGN section 13: the upstream answered a WebSocket upgrade 101;
    #: both transports are the ``Tunnel``'s, the front reads and answers
    #: nothing more (the client's bytes go to the tunnel unparsed).
    TUNNEL = 5
    CLOSED = 6  #: closing or closed: nothing more is read or answered


#: The moves an exchange may make.
TRANSITIONS = {
    State.IDLE: frozenset((State.GATE, State.CONNECT, State.RESPONSE,
                           State.CLOSED)),
    State.GATE: frozenset((State.CONNECT, State.RESPONSE, State.CLOSED)),
    # CONNECT -> CONNECT and UPSTREAM -> CONNECT: a reused connection closed
    # before answering a retryable request, a fresh one is on its way.
    State.CONNECT: frozenset((State.CONNECT, State.UPSTREAM, State.RESPONSE,
                              State.CLOSED)),
    State.UPSTREAM: frozenset((State.CONNECT, State.RESPONSE, State.TUNNEL,
                               State.CLOSED)),
    State.RESPONSE: frozenset((State.IDLE, State.CLOSED)),
    # A tunnel is never followed by another request: the connection ends
    # with it (connectionLost, or a drain after it ended).
    State.TUNNEL: frozenset((State.CLOSED,)),
    # connectionLost after phantomd closed.
    State.CLOSED: frozenset((State.CLOSED,)),
}


class Input(enum.IntEnum):
    """What becomes of the bytes the client sends (``FrontProtocol.input``).
    Independent of ``State``: a request may still be answered after its
    client's input ended (a half-close, a malformed pipelined request)."""

    OPEN = 0  #: parsed as HTTP/1.1 requests
    #: DESIGN section 13: after a WebSocket upgrade request, never parsed:
    #: kept (the socket paused) until the upstream's 101, then relayed.
    HELD = 1
    #: discarded: the client half-closed, sent what phantomd refused, ran
    #: out of time, or phantomd is closing the connection.
    ENDED = 2


#: The moves the input may make.  Once ended it stays ended; held input
#: ends when the connection closes without a tunnel.
INPUT_TRANSITIONS = {
    Input.OPEN: frozenset((Input.HELD, Input.ENDED)),
    Input.HELD: frozenset((Input.ENDED,)),
    Input.ENDED: frozenset((Input.ENDED,)),
}
