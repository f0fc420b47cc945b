"""Plain callbacks on the miss path, and a ``Deferred`` over them.

A new token's request goes client connection -> gate -> coalescer ->
introspector -> HTTP client and back.  Each hop used to hand the next a
``Deferred``: three of them, five callbacks, about 5 us of the miss path
on this project's bench machine (``bench/missloop.py``).  Those hops now
take a ``done`` callable instead (``Gate.authorize_to``,
``Coalescer.join``, ``Introspector.introspect_to``,
``HTTPClient.request``) and return a *handle*: ``handle.cancel()``
means "I no longer want it", after which ``done`` is never called.  ``done`` is called exactly once otherwise,
with the result or a ``Failure``.

The Deferred methods (``fetch``, ``introspect``, ``authorize``) stay,
built on the direct ones by ``as_deferred``, for callers off the hot path
(forward-auth, the key set, a fleet tier's wrapped introspector); the
coalescer has only ``join``, the gate being its one caller.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def deliver(d: Deferred, result: Any) -> None:
    """Fire ``d`` with ``result``: its errback for a ``Failure``."""
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def as_deferred(start: Callable[[Callable[[Any], None]], Any]) -> Deferred:
    """A Deferred of what ``start(done)`` delivers to ``done``.

    ``start`` returns a handle (``cancel()``) or None; cancelling the
    Deferred cancels the handle, and the Deferred fails with
    ``CancelledError`` as any cancelled Deferred does."""
    handle = None

    def cancel(_: Deferred) -> None:
        if handle is not None:
            handle.cancel()

    d: Deferred = Deferred(cancel)
    handle = start(lambda result: deliver(d, result))
    return d


class _Detach:
    """The handle ``then`` gives for a Deferred still waiting: cancelling
    it cancels the Deferred and drops ``done``, which is not called.  What
    the Deferred ends with then has no one to go to and is dropped: not
    always ``CancelledError`` (treq's request fails with
    ``ResponseNeverReceived([CancelledError])``)."""

    __slots__ = ("d", "done")

    def __init__(self, d: Deferred, done: Callable[[Any], None]) -> None:
        self.d = d
        self.done: Optional[Callable[[Any], None]] = done
        d.addBoth(self._fired)

    def _fired(self, result: Any) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(result)

    def cancel(self) -> None:
        self.done = None
        self.d.cancel()


def then(result: Any, done: Callable[[Any], None]) -> Any:
    """Give ``done`` a result that may still be a Deferred: at once for a
    plain value, a ``Failure`` or a Deferred that has fired, when it fires
    otherwise.  Returns a handle while it is waiting, else None."""
    # Not isinstance: Deferred is an ABC (collections.abc.Awaitable), whose
    # isinstance check is a Python call for every plain decision.
    if Deferred in type(result).__mro__:
        if result.called:
            result.addBoth(done)
            return None
        return _Detach(result, done)
    done(result)
    return None
