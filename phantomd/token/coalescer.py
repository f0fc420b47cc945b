"""One introspection per token at a time, however many requests want it.

Every caller joins with a ``done`` callable of its own and gets a handle
(``phantomd.direct``), fed from the one shared work, so cancelling one
caller (a client that went away) detaches only that caller and never the
introspection the others are waiting for.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure

from phantomd.token.outcomes import Shed

__all__ = ["Coalescer"]


class _Waiter:
    """One caller's place in a flight: ``cancel()`` leaves it."""

    __slots__ = ("flight", "done")

    def __init__(self, flight: "_Flight", done: Callable[[Any], None]
                 ) -> None:
        self.flight = flight
        self.done: Optional[Callable[[Any], None]] = done

    def cancel(self) -> None:
        self.done = None
        self.flight.waiters.pop(self, None)


class _Flight:
    """The callers waiting on one running work, in arrival order."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: dict[_Waiter, None] = {}


class Coalescer:
    """Runs ``work`` once per key while earlier work for it is in flight.

    The map of in-flight works holds at most ``max_in_flight`` keys: at the
    bound a call for a new key fails at once with ``outcomes.Shed`` (the
    caller answers 503), while a call for a key already in flight still
    joins it, since that costs the token service nothing.  Waiters per key
    are bounded by the callers the front admits (``max_connections``).
    The gate counts the shed outcome; this class counts joins
    (``metrics.coalesced``) and keeps ``metrics.introspections_in_flight``
    equal to the number of running works.
    """

    log = Logger()

    def __init__(self, metrics: Any, max_in_flight: int) -> None:
        self._metrics = metrics
        self._flights: dict[Hashable, _Flight] = {}
        self.reconfigure(max_in_flight)
        self._update_gauge()

    def reconfigure(self, max_in_flight: int) -> None:
        """A new bound; works already running finish, new keys are shed
        until fewer than ``max_in_flight`` are running."""
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError("max_in_flight must be a whole number >= 1, "
                             "not %r" % (max_in_flight,))
        self.max_in_flight = max_in_flight

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: Hashable, start: Callable[[Callable[[Any], None]],
                                                  Any],
             done: Callable[[Any], None]) -> Optional[_Waiter]:
        """Join the work for ``key``, starting it if none is in flight:
        ``done`` gets the shared result or ``Failure``, in the same reactor
        turn as every other waiter, after the key is free again.
        ``start(finish)`` is called only when no work for ``key`` is in
        flight, and must call ``finish`` once with the result (if it
        raises, that failure is the result).  Returns the caller's handle
        (``cancel()`` detaches it), or None when shed (``done`` already
        has the ``Shed`` failure)."""
        flight = self._flights.get(key)
        if flight is not None:
            self._metrics.coalesced.inc()
            waiter = _Waiter(flight, done)
            flight.waiters[waiter] = None
            return waiter
        if len(self._flights) >= self.max_in_flight:
            done(Failure(Shed()))
            return None
        flight = self._flights[key] = _Flight()
        self._update_gauge()
        waiter = _Waiter(flight, done)
        flight.waiters[waiter] = None
        try:
            start(lambda result: self._finished(result, key, flight))
        except BaseException:
            # A broken ``start`` must not hold the key forever; a second
            # ``_finished`` (had it called ``finish`` first) finds no one.
            self._finished(Failure(), key, flight)
        return waiter

    def _finished(self, result: Any, key: Hashable,
                  flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
            self._update_gauge()
        waiters = list(flight.waiters)
        flight.waiters.clear()
        if isinstance(result, Failure) and not waiters:
            self.log.debug("shared work failed with no caller left: {error}",
                           error=result.getErrorMessage())
        for waiter in waiters:
            done, waiter.done = waiter.done, None
            if done is None:  # cancelled by an earlier waiter's callback
                continue
            try:
                done(result)
            except Exception:
                # One caller's bug must not keep the others waiting.
                self.log.failure("a waiter failed on its result")

    def _update_gauge(self) -> None:
        self._metrics.introspections_in_flight.set(len(self._flights))
