"""One timer per connection that rarely moves.

Every connection phantomd holds waits for something with a time limit: a
request head, the next request, a body's minimum rate, the upstream's
answer, an idle pooled connection's expiry.  Scheduling and cancelling a
``DelayedCall`` per read costs more than parsing the read, so a
``Deadline`` keeps one call and moves only the time it stands for: a wake-up
before that time sleeps again for the rest; ``arm`` with an earlier time
moves the call forward.  Nothing here knows what the wait is for: ``fire``
gets the ``kind`` it was armed with and decides.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class Deadline:
    """``arm(seconds, kind)`` then, unless ``disarm``/``cancel`` came first,
    ``fire(kind)`` once ``seconds`` have passed on ``clock``.

    Arming again replaces the time and the kind (one wait at a time).
    ``disarm`` is cheap (the call stays, wakes and does nothing); ``cancel``
    removes the call too, for a connection that is gone."""

    __slots__ = ("_clock", "_fire", "_call", "_due", "at", "kind")

    def __init__(self, clock: Any, fire: Callable[[Any], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._call: Any = None
        self._due = 0.0  # when the call is scheduled to wake
        #: When the wait runs out (clock time), or None when disarmed.
        self.at: Optional[float] = None
        self.kind: Any = None

    def arm(self, seconds: float, kind: Any = None) -> None:
        self.kind = kind
        at = self._clock.seconds() + seconds
        self.at = at
        call = self._call
        if call is None:
            self._call = self._clock.callLater(seconds, self._wake)
            self._due = at
        elif self._due > at:
            call.reset(seconds)
            self._due = at

    def disarm(self) -> None:
        self.at = None
        self.kind = None

    def cancel(self) -> None:
        self.disarm()
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    @property
    def armed(self) -> bool:
        return self.at is not None

    def _wake(self) -> None:
        self._call = None
        at = self.at
        if at is None:
            return
        left = at - self._clock.seconds()
        if left > 0:
            self._call = self._clock.callLater(left, self._wake)
            self._due = at
            return
        kind = self.kind
        self.at = None
        self.kind = None
        self._fire(kind)
