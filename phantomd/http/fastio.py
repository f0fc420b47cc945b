"""Two ways around costs Twisted adds to every socket event.

Writing to a plain TCP socket without waiting for the reactor:

Twisted's ``transport.write`` only queues: the bytes go out on the next
reactor turn, after an epoll call to watch the socket for writing, a
``doWrite`` and another epoll call to stop watching.  For a small response on
an idle socket the kernel would have taken it at once, so ``writer_for``
sends right away when nothing is queued, and queues only what the kernel did
not take (so ordering, flow control and producers work as before).

Dispatching the epoll reactor's events without a log context per event:
``lean_polling``.
"""

from __future__ import annotations

import errno
import types
from typing import Any, Callable

from twisted.internet import tcp
from twisted.logger import Logger

log = Logger()

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


def _lean_do_poll(self: Any, timeout: Any) -> None:
    """``EPollReactor.doPoll`` (Twisted 22-25), but each event goes straight
    to ``_doReadOrWrite`` instead of through ``log.callWithLogger``.

    That wrapper pushes a legacy-log context ("system": the transport's
    log prefix) around every read and write: eight Python calls and a dict
    copy per event, two events per proxied request.  phantomd's log
    formats never show that field.  ``_doReadOrWrite`` already turns a
    protocol's exception into a logged disconnect; anything that still
    escapes (a ``connectionLost`` raising) is logged here, as the wrapper
    did, and the other events of the turn are still dispatched."""
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    dispatch = self._doReadOrWrite
    selectables = self._selectables
    for fd, event in events:
        # Looked up per event: an earlier one may have closed this fd.
        selectable = selectables.get(fd)
        if selectable is not None:
            try:
                dispatch(selectable, fd, event)
            except BaseException:
                log.failure("while handling an event on {selectable!r}",
                            selectable=selectable)


def lean_polling(reactor: Any) -> bool:
    """Make ``reactor`` dispatch with ``_lean_do_poll`` if it is Twisted's
    epoll reactor (twistd's default on Linux); say whether it did.  Any
    other reactor (``twistd --reactor``, a test's fake) is left alone."""
    from twisted.internet.epollreactor import EPollReactor
    if type(reactor) is not EPollReactor or not hasattr(
            reactor, "_doReadOrWrite") or not hasattr(reactor, "_poller"):
        return False
    reactor.doIteration = types.MethodType(_lean_do_poll, reactor)
    return True
