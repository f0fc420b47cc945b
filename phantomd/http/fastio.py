"""Three ways around costs Twisted adds to every socket event.

Writing to a plain TCP socket without waiting for the reactor:

Twisted's ``transport.write`` only queues: the bytes go out on the next
reactor turn, after an epoll call to watch the socket for writing, a
``doWrite`` and another epoll call to stop watching.  For a small response on
an idle socket the kernel would have taken it at once, so ``writer_for``
sends right away when nothing is queued, and queues only what the kernel did
not take (so ordering, flow control and producers work as before).

Writing once per poll (``Cork``): while ``lean_polling``'s reactor
dispatches the events one ``epoll_wait`` returned, what ``writer_for``'s
writers write is held in the transport's own write buffer, and sent, one
``send`` per socket, after the last event.  Each ``send`` on loopback (or to
a host whose process sleeps in ``epoll_wait``) wakes the peer; sent one by
one between events, each answer to a client or request to an API may wake
its peer again, which costs the sender a cross-CPU wake-up in the kernel.
Sent together, one wake-up serves the lot (the same idea as Netty's flush
consolidation).  A poll that returned one event holds nothing.  What is
held is bounded by one poll: each event is one read of at most 64 KiB, and
each socket is written by one event's work.  Because
the bytes sit in Twisted's buffer, anything else that touches the transport
keeps its order: a ``transport.write`` goes after them, a
``loseConnection`` or ``loseWriteConnection`` sends them first (Twisted's
``doWrite``), an ``abortConnection`` drops them as it drops any queued
byte.  Writes outside a poll's dispatch (a timer, a Deferred fired by one)
go out at once.

Dispatching the epoll reactor's events without a log context per event:
``lean_polling``.
"""

from __future__ import annotations

import errno
import types
import weakref
from typing import Any, Callable

from select import EPOLLIN

from twisted.internet import tcp
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger

log = Logger()

_PLAIN_TCP = (tcp.Server, tcp.Client)
#: The parts of Twisted's write buffer (``abstract.FileDescriptor``, Twisted
#: 24-26) the writers read and fill.  A transport without all of them (a
#: later Twisted) gets plain ``transport.write``: slower, never wrong.
_BUFFER_PARTS = ("dataBuffer", "_tempDataBuffer", "_tempDataLen",
                 "_writeDisconnected", "_writeDisconnecting", "_aborting",
                 "writeSomeData", "startWriting")


def _no_delay(transport: Any) -> None:
    """Disable Nagle's algorithm: a proxy forwards pieces as they come, and
    a body written after its head must not wait for a (delayed) ACK."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass  # not a TCP socket after all (UNIX, or already closed)


class Cork:
    """Writes held while one poll's events are dispatched (module
    docstring).  ``lean_polling`` makes one per reactor; its dispatch
    sets ``corked`` and calls ``release`` after the last event."""

    __slots__ = ("corked", "held")

    def __init__(self) -> None:
        self.corked = False
        #: A writer's ``release`` for each transport holding bytes.
        self.held: list = []

    def release(self) -> None:
        """Send what every writer held during this poll."""
        self.corked = False
        held, self.held = self.held, []
        for release in held:
            try:
                release()
            except Exception:
                log.failure("while sending held bytes")


_SEND_LIMIT = tcp.Connection.SEND_LIMIT
_CORKS: "weakref.WeakKeyDictionary[Any, Cork]" = weakref.WeakKeyDictionary()


def _send_now(t: Any, data: bytes) -> None:
    """Give ``data`` to the kernel; queue in Twisted what it did not take.
    Up to Twisted's ``SEND_LIMIT``, straight to the socket: ``writeSomeData``
    would add a memoryview and two calls around the same ``send``."""
    if len(data) <= _SEND_LIMIT:
        try:
            sent = t.socket.send(data)
        except OSError:
            # EAGAIN: all of it waits; any other error shows again, the
            # usual way, when Twisted tries to send it.
            t.write(data)
            return
    else:
        sent = t.writeSomeData(data)
        if type(sent) is not int:
            t.write(data)  # the error shows again, the usual way
            return
    if sent < len(data):
        t.write(data[sent:])


def _send_held(t: Any) -> None:
    """Send the bytes a corked writer left in ``t``'s buffer."""
    if not t.connected or t._aborting or not t._tempDataLen:
        return  # aborted or lost meanwhile: dropped, as Twisted drops them
    if t.dataBuffer or t.disconnecting or t._writeDisconnecting:
        # Twisted has its own work on this transport (a close asked for
        # after the held bytes, or bytes it already queued): its doWrite
        # sends everything in order, then closes as asked.
        t.startWriting()
        return
    buffered = t._tempDataBuffer
    data = buffered[0] if len(buffered) == 1 else b"".join(buffered)
    t._tempDataBuffer = []
    t._tempDataLen = 0
    _send_now(t, data)


def writer_for(transport: Any) -> Callable[[bytes], None]:
    """A ``write(data)`` for ``transport``, with Nagle's algorithm off; plain
    ``transport.write`` for anything that is not a plain TCP socket (TLS,
    UNIX, test transports).  On a reactor ``lean_polling`` set up, bytes
    written while a poll's events are dispatched are held until its
    end (``Cork``)."""
    _no_delay(transport)
    if type(transport) not in _PLAIN_TCP or not all(
            hasattr(transport, part) for part in _BUFFER_PARTS):
        return transport.write
    cork = _CORKS.get(transport.reactor)
    holding = [False]

    def release() -> None:
        holding[0] = False
        _send_held(transport)

    def write(data: bytes) -> None:
        t = transport
        if holding[0]:
            # Behind what this poll already held: as Twisted's own write,
            # less the watch for writability.
            if data and t.connected and not t._writeDisconnected:
                t._tempDataBuffer.append(data)
                t._tempDataLen += len(data)
            return
        if t.dataBuffer or t._tempDataLen or t.disconnecting \
                or not t.connected or t._writeDisconnected:
            t.write(data)
            return
        if cork is not None and cork.corked:
            if data:
                holding[0] = True
                t._tempDataBuffer.append(data)
                t._tempDataLen += len(data)
                cork.held.append(release)
            return
        _send_now(t, data)
    return write


def _read(t: Any, lost: Callable[..., None]) -> None:
    """Twisted's ``tcp.Connection.doRead`` and what ``_doReadOrWrite`` does
    with its answer, in one call: ``recv``, then the protocol's
    ``dataReceived``; the end of input, a socket error or an exception
    from the protocol disconnect ``t`` (``lost``: the reactor's
    ``_disconnectSelectable``)."""
    try:
        data = t.socket.recv(t.bufferSize)
    except OSError as e:
        if e.args[0] != errno.EAGAIN:
            lost(t, CONNECTION_LOST, True)
        return
    if not data:
        lost(t, CONNECTION_DONE, True)
        return
    try:
        t.protocol.dataReceived(data)
    except BaseException as e:
        log.failure("while reading {selectable!r}", selectable=t)
        lost(t, e, True)


def _lean_do_poll(self: Any, timeout: Any) -> None:
    """``EPollReactor.doPoll`` (Twisted 22-26), but each event goes straight
    to ``_doReadOrWrite`` instead of through ``log.callWithLogger``, and
    the writes of all the events go out after the last (``Cork``).  A
    plain TCP connection with only input waiting is read here, as its
    ``doRead`` would (``recv``, then ``dataReceived``; end of input,
    an error or an exception from the protocol disconnect it as
    ``_doReadOrWrite`` would), without four Python calls around it.

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
    lost = self._disconnectSelectable
    selectables = self._selectables
    cork = _CORKS[self]
    # A lone event has no one to share its sends with: they go at once.
    cork.corked = len(events) > 1
    try:
        for fd, event in events:
            # Looked up per event: an earlier one may have closed this fd.
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == EPOLLIN and type(selectable) in _PLAIN_TCP:
                    _read(selectable, lost)
                else:
                    dispatch(selectable, fd, event)
            except BaseException:
                log.failure("while handling an event on {selectable!r}",
                            selectable=selectable)
    finally:
        cork.release()


def lean_polling(reactor: Any) -> bool:
    """Make ``reactor`` dispatch with ``_lean_do_poll`` if it is Twisted's
    epoll reactor (twistd's default on Linux); say whether it did.  Any
    other reactor (``twistd --reactor``, a test's fake) is left alone."""
    from twisted.internet.epollreactor import EPollReactor
    if type(reactor) is not EPollReactor or not all(
            hasattr(reactor, part) for part in (
                "_doReadOrWrite", "_poller", "_disconnectSelectable")):
        return False
    _CORKS[reactor] = Cork()
    reactor.doIteration = types.MethodType(_lean_do_poll, reactor)
    return True
