"""Revocation from the parent to its workers, without Redis.

With ``[phantomd] workers = N`` only the parent serves ``POST /revoke`` (on
the metrics listener).  Without ``[shared_cache] url`` there is no pub/sub
to carry it, so the parent tells each worker itself:

* each worker listens on a unix socket in the parent's private temporary
  directory (mode 0700, so only phantomd's user can reach it; the path comes
  in ``PHANTOMD_WORKER_REVOKE``), bound *before* it adopts the client
  sockets, so a worker that serves has the channel open;
* for each revocation the parent connects to every live worker's socket and
  sends one line, the same JSON event Redis pub/sub carries
  (``{"t": "token", "k": <cache key hex>, "at": ...}`` or
  ``{"t": "sub", "s": <subject digest>, "at": ...}``; never the token
  itself); the worker applies it (``Revoker._event``: the time is kept, so
  a ``sub=`` also refuses answers introspected before it) and answers
  ``ok``.

The caller of ``/revoke`` gets 200 only when every live worker answered
``ok``; a worker that cannot be reached, answers anything else or takes
longer than ``timeout`` seconds makes it 503 with ``Retry-After`` (the
revocation is applied wherever it arrived; sending it again is harmless).
A worker started later begins with an empty cache, so nothing is replayed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

__all__ = ["WORKER_REVOKE", "WorkerRevocations", "listen"]

log = Logger()

#: Environment of a worker: the unix socket path it listens on.
WORKER_REVOKE = "PHANTOMD_WORKER_REVOKE"
#: A revocation message is one short JSON line.
MAX_LINE = 1024
#: Sends to one worker still waiting for its answer; past this a new
#: revocation fails at once for that worker (the caller gets 503).
MAX_PENDING = 32
DEFAULT_TIMEOUT = 2.0


# -- the worker side ------------------------------------------------------------

class _Receiver(LineOnlyReceiver):
    MAX_LENGTH = MAX_LINE
    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict) or event.get("t") not in ("token",
                                                                "sub"):
            log.warn("ignored a malformed revocation from the parent")
            self.transport.loseConnection()
            return
        self.factory.apply(event)
        self.sendLine(b"ok")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.loseConnection()


class _ReceiverFactory(protocol.Factory):
    protocol = _Receiver
    noisy = False

    def __init__(self, apply: Callable[[dict], None]) -> None:
        self.apply = apply


def listen(reactor: Any, environ: Mapping[str, str], gateway: Any):
    """In a worker: listen for the parent's revocations when the parent
    passed a socket path and this gateway revokes without Redis.  Returns
    the listening port or None.  A socket left by a killed predecessor in
    the slot is removed first (the directory is the parent's private one).
    """
    path = environ.get(WORKER_REVOKE)
    fleet = getattr(gateway, "fleet", None)
    if not path or fleet is None or fleet.shared is not None:
        return None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return reactor.listenUNIX(path, _ReceiverFactory(fleet.revoker._event),
                              mode=0o600)


# -- the parent side ------------------------------------------------------------

class _Sender(LineOnlyReceiver):
    MAX_LENGTH = 64
    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.sendLine(self.factory.line)

    def lineReceived(self, line: bytes) -> None:
        self.factory.done(line == b"ok")
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.factory.done(False)


class _SenderFactory(protocol.ClientFactory):
    protocol = _Sender
    noisy = False  # one start/stop log line per worker and revocation

    def __init__(self, line: bytes, d: defer.Deferred) -> None:
        self.line = line
        self._d = d

    def done(self, ok: bool) -> None:
        if not self._d.called:
            self._d.callback(ok)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.done(False)


class WorkerRevocations:
    """The parent's sender: ``send(event)`` fires True when every path of
    ``paths()`` (the live workers' sockets) answered ``ok`` within
    ``timeout`` seconds on ``reactor``, else False (never fails).  At most
    ``MAX_PENDING`` sends per path wait at once; past that the path counts
    as not answering.  The pending map holds only live workers' paths."""

    def __init__(self, reactor: Any, paths: Callable[[], list],
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.reactor = reactor
        self.paths = paths
        self.timeout = timeout
        self.pending: dict[str, int] = {}

    def send(self, event: dict) -> defer.Deferred:
        line = json.dumps(event).encode("ascii")
        sends = [self._one(path, line) for path in self.paths()]
        d = defer.gatherResults(sends)
        return d.addCallback(all)

    def _one(self, path: str, line: bytes) -> defer.Deferred:
        if self.pending.get(path, 0) >= MAX_PENDING:
            log.warn("revocation not sent to worker at {path}: {n} sends "
                     "still unanswered", path=path, n=MAX_PENDING)
            return defer.succeed(False)
        self.pending[path] = self.pending.get(path, 0) + 1
        d: defer.Deferred = defer.Deferred()
        factory = _SenderFactory(line, d)
        connector = self.reactor.connectUNIX(path, factory,
                                             timeout=self.timeout)
        timer = self.reactor.callLater(self.timeout, factory.done, False)

        def finished(ok: bool) -> bool:
            if timer.active():
                timer.cancel()
            connector.disconnect()
            left = self.pending.get(path, 1) - 1
            if left > 0:
                self.pending[path] = left
            else:
                self.pending.pop(path, None)
            if not ok:
                log.warn("a worker ({path}) did not confirm a revocation",
                         path=path)
            return ok
        return d.addCallback(finished)
