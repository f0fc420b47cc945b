"""Writing to a plain TCP socket without waiting for the reactor.

Twisted's ``transport.write`` only queues: the bytes go out on the next
reactor turn, after an epoll call to watch the socket for writing, a
``doWrite`` and another epoll call to stop watching.  For a small response on
an idle socket the kernel would have taken it at once, so ``writer_for``
sends right away when nothing is queued, and queues only what the kernel did
not take (so ordering, flow control and producers work as before).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def _no_delay(transport: Any) -> None:
    """Disable Nagle's algorithm: a proxy forwards pieces as they come, and
    a body written after its head must not wait for a (delayed) ACK."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass  # not a TCP socket after all (UNIX, or already closed)


def writer_for(transport: Any) -> Callable[[bytes], None]:
    """A ``write(data)`` for ``transport``, with Nagle's algorithm off; plain
    ``transport.write`` for anything that is not a plain TCP socket (TLS,
    UNIX, test transports)."""
    _no_delay(transport)
    if type(transport) not in _PLAIN_TCP:
        return transport.write

    def write(data: bytes) -> None:
        t = transport
        if t.dataBuffer or t._tempDataLen or t.disconnecting \
                or not t.connected or t._writeDisconnected:
            t.write(data)
            return
        sent = t.writeSomeData(data)
        if type(sent) is not int:
            t.write(data)  # the error shows again, the usual way
        elif sent < len(data):
            t.write(data[sent:])
    return write
